//! What a stage returns: the outcome of one attempt.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::review::ReviewRequest;

/// The result of one successful run of a stage, completing with an output
/// of type `T`.
///
/// A `#[stage]` function that may do more than complete returns
/// `treadle::Result<StageOutcome<T>>`: its output type is `T`, and
/// [`StageOutcome::done`] completes with a `T`. The engine stores outputs as
/// JSON, so it works with the untyped form `StageOutcome` (that is,
/// `StageOutcome<serde_json::Value>`), which hand-written [`Stage`](crate::Stage)
/// impls return.
///
/// Returning `Err` from a stage is a failed attempt that the retry policy
/// may repeat; [`StageOutcome::Failed`] is a deliberate, permanent failure.
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutcome<T = Value> {
    /// The stage finished; the output, if any, is stored for later stages.
    Complete {
        /// The stage's output.
        output: Option<T>,
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
}

impl<T> StageOutcome<T> {
    /// Completed with `output`, the stage's typed output.
    pub fn done(output: T) -> Self {
        StageOutcome::Complete {
            output: Some(output),
        }
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
