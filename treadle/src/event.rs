//! Events: the audit trail of every transition, stored and broadcast.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::state::DecisionKind;

/// One committed transition, as appended to the store's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the event log; strictly increasing in commit order and
    /// never reused. Gapless except below the store's `pruned_through`,
    /// where the events of pruned items are gone.
    pub seq: u64,
    /// When the transition was committed.
    pub at: DateTime<Utc>,
    /// The item it concerns.
    pub item_id: String,
    /// The stage it concerns, if any.
    pub stage: Option<String>,
    /// The fan-out subtask it concerns, if any.
    pub subtask: Option<String>,
    /// What happened.
    pub kind: EventKind,
}

/// What a transition did. An attempt's own record (result, error, timings)
/// is kept in the stage's attempt history; the events say what happened to
/// the stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The item was stored and its stages created.
    ItemSubmitted,
    /// A worker claimed the stage (or subtask) and started an attempt.
    Started {
        /// The attempt number.
        attempt: u32,
        /// The worker that claimed it (shared with the claim's lease).
        owner: Arc<str>,
    },
    /// A unit left `running` by a worker whose lease expired (it crashed or
    /// stalled) became claimable again; its attempt counts as abandoned.
    Recovered {
        /// The worker that held the expired lease.
        previous_owner: String,
        /// The abandoned attempt's number.
        attempt: u32,
    },
    /// The stage (or subtask) completed.
    Completed,
    /// The stage skipped itself.
    Skipped {
        /// Why.
        reason: String,
    },
    /// The attempt failed or asked to be retried; another is scheduled.
    RetryScheduled {
        /// When it will run.
        at: DateTime<Utc>,
        /// What went wrong in the attempt that ended.
        error: Option<String>,
    },
    /// The stage (or subtask) failed for good.
    Failed {
        /// Why.
        reason: String,
    },
    /// The stage fanned out into subtasks.
    FannedOut {
        /// The subtask names.
        subtasks: Vec<String>,
    },
    /// The stage parked the item for review.
    ReviewRequested {
        /// What to check.
        summary: String,
    },
    /// A person decided a review.
    ReviewDecided {
        /// The decision.
        decision: DecisionKind,
        /// Who decided.
        by: String,
    },
    /// A person asked for a failed stage to run again.
    RetryRequested,
    /// The edits of an approval did not fit the stage's output; the review
    /// is asked again (the refused decision stays in the review's history).
    EditsRefused {
        /// Why the edits do not fit.
        reason: String,
        /// The refused edits, kept here for the record (boxed: a rare event
        /// should not make every event bigger).
        edits: Box<serde_json::Value>,
    },
    /// An operator asked for a finished or failed stage to run again, with
    /// every stage downstream of it; `reset` names those stages.
    RerunRequested {
        /// The downstream stages reset to pending with it, in order.
        reset: Vec<String>,
    },
    /// Every stage of the item completed or was skipped.
    ItemCompleted,
    /// The item was cancelled.
    ItemCancelled,
    /// An operator moved the unfinished item to another pipeline version.
    ItemMigrated {
        /// The version it moved on before.
        from: u32,
        /// The version it moves on now.
        to: u32,
    },
}
