//! Everything about human review: what a stage asks, its deadline, the
//! decision a person makes, and the review state stored with the stage.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::state::DecisionKind;

/// Who decided and what they said; completed by `approve`, `reject` or
/// `approve_with_edits` on the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The reviewer.
    pub by: String,
    /// An optional note.
    pub note: Option<String>,
    /// The review round this decision answers, if the caller knows it; a
    /// decision for an older round is rejected instead of overwriting a newer one.
    pub round: Option<u64>,
}

impl Decision {
    /// A decision made by `reviewer`.
    pub fn by(reviewer: impl Into<String>) -> Self {
        Decision {
            by: reviewer.into(),
            note: None,
            round: None,
        }
    }

    /// Adds a note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// Answers a specific review round (see [`ReviewStatus::round`]).
    pub fn for_round(mut self, round: u64) -> Self {
        self.round = Some(round);
        self
    }
}

/// Checks the reviewer named by a person's decision: a blank name would
/// leave the audit trail without a reviewer, and [`DEADLINE_REVIEWER`] is
/// reserved for the decisions the engine itself makes when a review
/// deadline passes (that path does not call this check).
pub fn check_reviewer(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::BlankReviewer);
    }
    if name == DEADLINE_REVIEWER {
        return Err(Error::ReservedReviewer(name.to_owned()));
    }
    Ok(())
}

/// Checks the reason of a rejection: it is what the failed stage shows, so
/// it must say something.
pub fn check_reject_reason(reason: &str) -> Result<()> {
    if reason.trim().is_empty() {
        return Err(Error::BlankRejectReason);
    }
    Ok(())
}

/// A recorded review decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Approved, approved with edits, or rejected.
    pub kind: DecisionKind,
    /// The reviewer.
    pub by: String,
    /// When the decision was committed.
    pub at: DateTime<Utc>,
    /// The reviewer's note.
    pub note: Option<String>,
    /// The reason for a rejection.
    pub reason: Option<String>,
    /// The output that replaced the stage's, for approval with edits.
    pub edits: Option<Value>,
}

/// The review state of a stage that asked for one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewStatus {
    /// Which review of this stage this is (1 for the first; a retry that asks
    /// again starts a new round).
    pub round: u64,
    /// What the stage asked.
    pub request: ReviewRequest,
    /// When it asked.
    pub requested_at: DateTime<Utc>,
    /// The decision, once made.
    pub decision: Option<DecisionRecord>,
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
