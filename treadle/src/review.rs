//! A person's review decision.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    pub request: crate::outcome::ReviewRequest,
    /// When it asked.
    pub requested_at: DateTime<Utc>,
    /// The decision, once made.
    pub decision: Option<DecisionRecord>,
}
