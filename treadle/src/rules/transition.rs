//! The requests the rules answer: new items, claims, the end of an
//! attempt, review verdicts. The engine builds them; stores pass them to
//! the rules unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::review::{Decision, ReviewRequest};
use crate::stage::Backoff;
use crate::status::AttemptRecord;
use crate::task::TaskKey;

/// A new item, to be created with one pending stage row per stage of
/// pipeline version `version`.
#[derive(Debug, Clone)]
pub struct NewItem {
    /// The item's id.
    pub id: String,
    /// The item serialized as JSON text.
    pub payload: String,
    /// The registered pipeline version the item moves on.
    pub version: u32,
    /// The submission time.
    pub at: DateTime<Utc>,
}

/// A worker's request for runnable work.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The claiming worker's token, recorded as the lease owner.
    pub owner: Arc<str>,
    /// The most units of work to claim.
    pub limit: usize,
    /// How long the lease lasts before another worker may take the work over.
    pub lease: Duration,
    /// The current time, against which retry times are compared.
    pub now: DateTime<Utc>,
    /// How work abandoned by a worker that stopped mid-attempt is retried.
    pub crash_retries: CrashRetries,
    /// The lane to claim from first, for a store split into lanes
    /// (`Store::lanes`); once it has no more runnable work, the other
    /// lanes' work is claimed too. `None` starts at the first lane. A store
    /// with one lane ignores it.
    pub lane: Option<usize>,
}

/// How a unit whose worker stopped mid-attempt (its lease expired, or was
/// released because its process is gone) is run again. Such an abandoned
/// attempt does not count against the stage's own attempt budget; it uses
/// up one of `limit` crash retries, and the unit runs again after
/// `backoff` (its nominal delay for the n-th crash, no jitter). Once more
/// attempts than `limit` were abandoned in a row of runs, the unit fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashRetries {
    /// How many abandoned attempts a unit may have in one run of attempts.
    pub limit: u32,
    /// The delay before running an abandoned unit again.
    pub backoff: Backoff,
}

impl CrashRetries {
    /// Three crash retries, 1 s, 2 s and 4 s after each crash is noticed.
    pub const DEFAULT: CrashRetries = CrashRetries {
        limit: 3,
        backoff: Backoff::Exponential {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        },
    };
}

impl Default for CrashRetries {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A unit of work claimed by a worker, with what the stage needs to run.
#[derive(Debug, Clone)]
pub struct Claim {
    /// What was claimed.
    pub task: TaskKey,
    /// The attempt number this claim starts (1-based within the current run).
    pub attempt: u32,
    /// The fencing generation every write for this claim must carry.
    pub generation: u64,
    /// When the attempt started.
    pub started_at: DateTime<Utc>,
    /// The item as stored at submission, as JSON text.
    pub payload: Arc<str>,
    /// The stored outputs of the item's completed stages, by stage name.
    pub outputs: BTreeMap<String, Value>,
    /// The pipeline version the item moves on.
    pub version: u32,
    /// Attempts of this run abandoned by workers that stopped mid-attempt;
    /// they do not count against the stage's own attempt budget.
    pub crashes: u32,
    /// Why the unit cannot run: its crash retries are spent, or a stored
    /// output of the item cannot be decoded. The engine fails the unit with
    /// this reason instead of running it.
    pub cannot_run: Option<String>,
    /// Edits of an approval that the engine must check against the stage's
    /// output type instead of running the stage ([`Verdict::ApproveWithEditsToCheck`]).
    pub edits_to_check: Option<Value>,
}

/// The end of one attempt, to be applied atomically.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The unit of work.
    pub task: TaskKey,
    /// The generation of the claim; a mismatch means the lease was lost.
    pub generation: u64,
    /// The attempt record to append to the history.
    pub attempt: AttemptRecord,
    /// The new state.
    pub transition: Transition,
}

/// What an attempt does to its stage or subtask.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Completed, with an optional stored output.
    Complete {
        /// The output.
        output: Option<Value>,
    },
    /// Skipped (subtask: counts as done, with no output).
    Skip {
        /// Why.
        reason: String,
    },
    /// Parked for review (never for a subtask).
    AwaitReview(ReviewRequest),
    /// Run again at `at`.
    RetryAt {
        /// When.
        at: DateTime<Utc>,
    },
    /// Failed for good.
    Fail {
        /// Why.
        reason: String,
    },
    /// The edits being checked do not fit the stage's output: the review
    /// is asked again in a new round (never for a subtask).
    RefuseEdits {
        /// Why the edits do not fit.
        reason: String,
    },
    /// Split into subtasks, created pending (never for a subtask).
    FanOut {
        /// The subtask names, distinct.
        subtasks: Vec<String>,
    },
}

impl Transition {
    /// The transition as it applies to a subtask: a subtask cannot ask for
    /// review or fan out again, so those become failures.
    pub fn for_subtask(self) -> SubtaskTransition {
        match self {
            Transition::Complete { output } => SubtaskTransition::Complete { output },
            Transition::Skip { reason } => SubtaskTransition::Skip { reason },
            Transition::RetryAt { at } => SubtaskTransition::RetryAt { at },
            Transition::Fail { reason } => SubtaskTransition::Fail { reason },
            Transition::AwaitReview(_)
            | Transition::FanOut { .. }
            | Transition::RefuseEdits { .. } => SubtaskTransition::Fail {
                reason: "a subtask cannot ask for review or fan out".to_owned(),
            },
        }
    }
}

/// The transitions a fan-out subtask can make.
#[derive(Debug, Clone, PartialEq)]
pub enum SubtaskTransition {
    /// Completed, with an optional output.
    Complete {
        /// The output.
        output: Option<Value>,
    },
    /// Skipped; counts as done, with no output.
    Skip {
        /// Why.
        reason: String,
    },
    /// Run again at `at`.
    RetryAt {
        /// When.
        at: DateTime<Utc>,
    },
    /// Failed for good.
    Fail {
        /// Why.
        reason: String,
    },
}

/// What a reviewer decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Complete with the proposed output.
    Approve,
    /// Complete with this output instead.
    ApproveWithEdits(Value),
    /// Complete with this output instead once a worker, which knows the
    /// stage's output type, has checked it (a decision made where the type
    /// is unknown, as in the CLI); edits that do not fit put the review
    /// back to awaiting a decision.
    ApproveWithEditsToCheck(Value),
    /// Fail the stage with this reason.
    Reject {
        /// Why.
        reason: String,
    },
}

/// A review decision to apply atomically.
#[derive(Debug, Clone)]
pub struct DecisionCommit {
    /// The item.
    pub item_id: String,
    /// The stage awaiting review.
    pub stage: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Who decided, their note, and the round they answer.
    pub decision: Decision,
    /// When.
    pub at: DateTime<Utc>,
}
