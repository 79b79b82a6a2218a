//! What a stage returns: the outcome of one attempt.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The result of one successful run of a stage.
///
/// Returning `Err` from a stage is a failed attempt that the retry policy
/// may repeat; [`StageOutcome::Failed`] is a deliberate, permanent failure.
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutcome {
    /// The stage finished; the output, if any, is stored for later stages.
    Complete {
        /// The stage's output as JSON.
        output: Option<Value>,
    },
    /// The item parks here until a person approves or rejects it.
    NeedsReview(ReviewRequest),
    /// Run this stage again after a delay. It counts as an attempt: once
    /// the policy's `max_attempts` are used, the stage fails instead.
    Retry {
        /// How long to wait before the next attempt.
        after: Duration,
        /// Why the stage asked for a retry.
        reason: String,
    },
    /// The stage failed for good; no further attempts are made.
    Failed {
        /// Why it failed.
        reason: String,
    },
    /// Run the stage once per named subtask, concurrently; the stage completes
    /// when every subtask has completed, with an output mapping subtask names
    /// to their outputs.
    FanOut(Vec<String>),
    /// The stage does not apply to this item; its dependents run as if it completed.
    Skip {
        /// Why it was skipped.
        reason: String,
    },
}

impl StageOutcome {
    /// Completed with no output.
    pub fn complete() -> Self {
        StageOutcome::Complete { output: None }
    }

    /// Completed with an output, serialized to JSON for storage.
    pub fn complete_with(output: impl Serialize) -> Result<Self> {
        let output =
            serde_json::to_value(output).map_err(|e| Error::json("the stage output", e))?;
        Ok(StageOutcome::Complete {
            output: Some(output),
        })
    }

    /// Park the item for a person's review.
    pub fn needs_review(request: ReviewRequest) -> Self {
        StageOutcome::NeedsReview(request)
    }

    /// Try again after `after`.
    pub fn retry(after: Duration, reason: impl Into<String>) -> Self {
        StageOutcome::Retry {
            after,
            reason: reason.into(),
        }
    }

    /// Fail permanently.
    pub fn failed(reason: impl Into<String>) -> Self {
        StageOutcome::Failed {
            reason: reason.into(),
        }
    }

    /// Split into named subtasks that run concurrently.
    pub fn fan_out<I, S>(subtasks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        StageOutcome::FanOut(subtasks.into_iter().map(Into::into).collect())
    }

    /// Skip this stage for this item.
    pub fn skip(reason: impl Into<String>) -> Self {
        StageOutcome::Skip {
            reason: reason.into(),
        }
    }
}

/// What a person is asked to review.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ReviewRequest {
    /// One line saying what to check.
    pub summary: String,
    /// Anything that helps the reviewer decide.
    pub details: Value,
    /// The output the stage proposes; approving keeps it, approving with
    /// edits replaces it.
    pub proposed_output: Option<Value>,
    /// When the review times out, and what is decided then.
    #[serde(default)]
    pub deadline: Option<ReviewDeadline>,
}

/// A review's time limit, kept in the store with the request, so it fires
/// even if the process that asked was restarted.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ReviewDeadline {
    /// When the review times out.
    pub at: chrono::DateTime<chrono::Utc>,
    /// What is decided at that time if nobody decided before.
    pub then: DeadlineAction,
}

/// The decision a review deadline makes, recorded as made by [`DEADLINE_REVIEWER`].
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum DeadlineAction {
    /// Approve with the proposed output.
    Approve,
    /// Reject with this reason.
    Reject {
        /// Why.
        reason: String,
    },
}

/// The reviewer name recorded for decisions made by a review deadline.
pub const DEADLINE_REVIEWER: &str = "treadle:deadline";

impl ReviewRequest {
    /// A review request with a summary and no details.
    pub fn new(summary: impl Into<String>) -> Self {
        ReviewRequest {
            summary: summary.into(),
            details: Value::Null,
            proposed_output: None,
            deadline: None,
        }
    }

    /// Times the review out `after` from now; then `then` is decided.
    pub fn deadline_after(self, after: Duration, then: DeadlineAction) -> Self {
        let at =
            chrono::Utc::now() + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        self.deadline_at(at, then)
    }

    /// Times the review out at `at`; then `then` is decided.
    pub fn deadline_at(mut self, at: chrono::DateTime<chrono::Utc>, then: DeadlineAction) -> Self {
        self.deadline = Some(ReviewDeadline { at, then });
        self
    }

    /// Attaches details (serialized to JSON) for the reviewer.
    pub fn details(mut self, details: impl Serialize) -> Result<Self> {
        self.details =
            serde_json::to_value(details).map_err(|e| Error::json("the review details", e))?;
        Ok(self)
    }

    /// Attaches the output this stage proposes, kept if the review approves it.
    pub fn proposed_output(mut self, output: impl Serialize) -> Result<Self> {
        self.proposed_output =
            Some(serde_json::to_value(output).map_err(|e| Error::json("the proposed output", e))?);
        Ok(self)
    }
}
