//! The store: where items, stage states, outputs, reviews and events live.
//!
//! The [`Store`] trait is made of *transitions* (submit, claim, commit an
//! outcome, decide a review, retry, cancel), each of which a store applies
//! atomically together with the events that record it. The engine decides
//! *what* a transition is (it knows the pipeline and the retry policy); the
//! store checks that it is still allowed (fencing, current state) and applies
//! it. That split lets SQLite, memory and a future PostgreSQL store
//! (`FOR UPDATE SKIP LOCKED`) implement the same contract.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::PipelineDef;
use crate::error::Result;
use crate::event::Event;
use crate::review::{Decision, ReviewRequest};
use crate::state::StageState;
use crate::status::{AttemptRecord, AwaitingReview, ItemStatus};
pub use crate::task::TaskKey;

mod fan_in;
mod memory;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use fan_in::{FanIn, fan_in};
pub use memory::MemoryStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// Checks that `text` is well-formed JSON (without building it), so no
/// store ever keeps a payload that cannot be read back.
pub(crate) fn check_json(text: &str, what: &str) -> Result<()> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(drop)
        .map_err(|e| crate::Error::json(what, e))
}

/// A new item with the stages it must go through.
#[derive(Debug, Clone)]
pub struct NewItem {
    /// The item's id.
    pub id: String,
    /// The item serialized as JSON text.
    pub payload: String,
    /// One entry per stage, in the pipeline's topological order.
    pub stages: Vec<StageSeed>,
    /// The submission time.
    pub at: DateTime<Utc>,
}

/// A stage to create for a new item.
#[derive(Debug, Clone)]
pub struct StageSeed {
    /// The stage's name.
    pub name: String,
    /// How many upstream stages must complete or skip before it is runnable.
    pub upstream: u32,
}

/// A worker's request for runnable work.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The claiming worker's token, recorded as the lease owner.
    pub owner: String,
    /// The most units of work to claim.
    pub limit: usize,
    /// How long the lease lasts before another worker may take the work over.
    pub lease: Duration,
    /// The current time, against which retry times are compared.
    pub now: DateTime<Utc>,
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
}

/// The result of a claim: the work and the events the claim committed.
#[derive(Debug, Clone, Default)]
pub struct ClaimBatch {
    /// The claimed units of work.
    pub claims: Vec<Claim>,
    /// One `Started` event per claim, already committed.
    pub events: Vec<Event>,
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
    /// The stages that depend on this stage, unblocked when it (or, for a
    /// subtask, its whole fan-out) completes or skips.
    pub dependents: Arc<[String]>,
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
            Transition::AwaitReview(_) | Transition::FanOut { .. } => SubtaskTransition::Fail {
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
    /// The stage's dependents, unblocked by an approval.
    pub dependents: Arc<[String]>,
}

/// The number of items whose `stage` is in `state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageCount {
    /// The stage.
    pub stage: String,
    /// The state.
    pub state: StageState,
    /// How many items.
    pub items: u64,
}

/// Which events to read from the log.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Only events with a sequence number greater than this.
    pub after: u64,
    /// Only events of this item.
    pub item_id: Option<String>,
    /// At most this many (all if `None`).
    pub limit: Option<usize>,
}

/// Differences between the pipeline a store last saw and the current one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineDrift {
    /// Stages in the code that the store did not know.
    pub added_stages: Vec<String>,
    /// Stages the store knows that the code no longer has.
    pub removed_stages: Vec<String>,
    /// Edges in the code that the store did not know.
    pub added_edges: Vec<(String, String)>,
    /// Edges the store knows that the code no longer has.
    pub removed_edges: Vec<(String, String)>,
}

impl PipelineDrift {
    /// The differences from `stored` to `current`.
    pub fn between(stored: &PipelineDef, current: &PipelineDef) -> Self {
        fn missing<T: Clone + PartialEq>(from: &[T], in_: &[T]) -> Vec<T> {
            from.iter().filter(|x| !in_.contains(x)).cloned().collect()
        }
        PipelineDrift {
            added_stages: missing(&current.stages, &stored.stages),
            removed_stages: missing(&stored.stages, &current.stages),
            added_edges: missing(&current.edges, &stored.edges),
            removed_edges: missing(&stored.edges, &current.edges),
        }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added_stages.is_empty()
            && self.removed_stages.is_empty()
            && self.added_edges.is_empty()
            && self.removed_edges.is_empty()
    }
}

/// How many events a store's live feed buffers per subscriber.
pub const EVENT_FEED_CAPACITY: usize = 16_384;

/// Persistent state of items and their stages.
///
/// Every method that changes state is one atomic transition: the state, any
/// output, the attempt record and the events are committed together or not
/// at all, and the returned events are the committed ones (in log order).
/// Stores are shared (`&self`) between tasks and, for SQLite and PostgreSQL,
/// between processes.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A live feed of the events this store commits, in log order. Each event
    /// is sent only after its transition is committed. A receiver that falls
    /// behind gets `Lagged` and can catch up from [`Store::events`].
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event>;

    /// How many attempts an engine should keep running at once on this
    /// store by default ([`crate::Engine::new`]). A store that commits
    /// transitions in groups gains from more work in flight: each group,
    /// and each fsync, then carries more transitions.
    fn suggested_concurrency(&self) -> usize {
        256
    }

    /// Records the pipeline's shape and reports how it differs from the one
    /// recorded before (empty the first time).
    async fn register_pipeline(&self, definition: &PipelineDef) -> Result<PipelineDrift>;

    /// Stores new items, each with its stages `pending` and an
    /// `ItemSubmitted` event, in one transition. Idempotent by id: an
    /// existing item is left unchanged and gets no event.
    async fn submit(&self, items: Vec<NewItem>) -> Result<Vec<Event>>;

    /// Claims up to `limit` runnable units of work, oldest first: pending
    /// stages whose upstream stages are all done, scheduled retries that are
    /// due, and pending subtasks; never work of a cancelled item. Each claim
    /// sets the unit `running`, counts the attempt, bumps its generation and
    /// takes a lease for `owner`, with a `Started` event.
    async fn claim(&self, request: ClaimRequest) -> Result<ClaimBatch>;

    /// Applies the end of an attempt if the claim still holds (same
    /// generation, still `running`); otherwise returns [`crate::Error::LeaseLost`]
    /// and changes nothing. Completing or skipping a stage unblocks its
    /// dependents; the last subtask of a fan-out to finish completes (or fails)
    /// the stage; the last stage of an item to finish records `ItemCompleted`.
    async fn commit(&self, commit: Commit) -> Result<Vec<Event>>;

    /// Applies a review decision if the stage is awaiting review (and, when
    /// the decision names a round, that round is current); otherwise returns
    /// [`crate::Error::NotAwaitingReview`] and changes nothing.
    async fn decide(&self, decision: DecisionCommit) -> Result<Vec<Event>>;

    /// Makes a failed stage runnable again, starting a new run of attempts;
    /// for a fanned-out stage only the failed subtasks run again. Any other
    /// state is [`crate::Error::NotRetryable`].
    async fn retry(&self, item_id: &str, stage: &str, at: DateTime<Utc>) -> Result<Vec<Event>>;

    /// Extends the leases of claims this worker still holds, until `until`.
    /// Returns the claims that were lost (a different generation, or no longer
    /// running); their work must stop.
    async fn renew(&self, claims: &[(TaskKey, u64)], until: DateTime<Utc>) -> Result<Vec<TaskKey>>;

    /// Cancels an item: every stage and subtask not yet finished becomes
    /// `cancelled` (so running claims lose their lease). Returns the keys of
    /// the units that were running, and the events. Cancelling twice is a no-op.
    async fn cancel(&self, item_id: &str, at: DateTime<Utc>) -> Result<(Vec<TaskKey>, Vec<Event>)>;

    /// The earliest time a scheduled retry falls due, if any.
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>>;

    /// The earliest deadline of a review still awaiting a decision, if any.
    async fn next_review_deadline(&self) -> Result<Option<DateTime<Utc>>>;

    /// Reviews still awaiting a decision whose deadline is at or before `now`.
    async fn due_reviews(&self, now: DateTime<Utc>) -> Result<Vec<AwaitingReview>>;

    /// Makes every unit still `running` under `owner`'s lease claimable at
    /// once, as if its lease had expired: a restarted worker with a stable
    /// id recovers its own dead claims without waiting. Returns how many.
    async fn release_claims(&self, owner: &str, now: DateTime<Utc>) -> Result<u64>;

    /// The earliest lease expiry among units running under a worker's lease,
    /// if any: when such a unit may be recovered (if its worker stopped
    /// renewing). A store that does not enforce leases returns `None`.
    async fn next_lease_expiry(&self) -> Result<Option<DateTime<Utc>>>;

    /// The distinct owner tokens of the leases of running units (see
    /// [`crate::LeaseOwner`]), so a starting worker can tell which of them
    /// are dead. A store that does not enforce leases returns none.
    async fn lease_owners(&self) -> Result<Vec<String>>;

    /// The pipeline definition last recorded by `register_pipeline`, if any.
    async fn pipeline_definition(&self) -> Result<Option<PipelineDef>>;

    /// How many items are in each (stage, state), for every pair that has
    /// at least one, ordered by stage name then state.
    async fn stage_counts(&self) -> Result<Vec<StageCount>>;

    /// One item's full status.
    async fn status(&self, item_id: &str) -> Result<ItemStatus>;

    /// The ids of items whose `stage` is in `state`, in submission order.
    async fn items_in(&self, stage: &str, state: StageState) -> Result<Vec<String>>;

    /// Every stage awaiting review, oldest request first.
    async fn awaiting_review(&self) -> Result<Vec<AwaitingReview>>;

    /// Events from the log, in sequence order.
    async fn events(&self, query: EventQuery) -> Result<Vec<Event>>;
}
