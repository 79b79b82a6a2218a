//! The store: where items, stage states, outputs, reviews and events live.
//!
//! The [`Store`] trait is made of *transitions* (submit, claim, commit an
//! outcome, decide a review, retry, cancel, migrate), each of which a store
//! applies atomically together with the events that record it. The engine
//! turns an attempt's end into a transition by the stage's policy; the rules
//! in [`crate::rules`] decide whether it is allowed and what it changes; a
//! store loads the rows, calls the rule and saves the result. That split lets
//! SQLite, memory and PostgreSQL (`FOR UPDATE SKIP LOCKED`) implement the
//! same contract without repeating a rule.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::definition::PipelineDef;
pub use crate::definition::PipelineDrift;
use crate::error::Result;
use crate::event::Event;
pub use crate::rules::{
    Claim, ClaimRequest, Commit, DecisionCommit, MigrateOutcome, NewItem, SubtaskTransition,
    Transition, Verdict,
};
use crate::state::StageState;
use crate::status::{AwaitingReview, ItemStatus};
pub use crate::task::TaskKey;

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod retention;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore};
pub use retention::{Pruned, cutoff, prune_all};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// Checks that a new item's payload is well-formed JSON (without building
/// it), so no store ever keeps a payload that cannot be read back.
pub(crate) fn check_payload(item: &NewItem) -> Result<()> {
    serde_json::from_str::<serde::de::IgnoredAny>(&item.payload)
        .map(drop)
        .map_err(|e| crate::Error::json(format!("the payload of item `{}`", item.id), e))
}

/// The result of a claim: the work it took. Its events (a `Started` per
/// claim, a `Recovered` per expired lease it took over) are in the log.
#[derive(Debug, Clone, Default)]
pub struct ClaimBatch {
    /// The claimed units of work.
    pub claims: Vec<Claim>,
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

    /// How many lanes the store's items are split into: an engine runs one
    /// claim loop per lane, each claiming with [`ClaimRequest::lane`] set,
    /// so that lanes can run in parallel without contending (a loop whose
    /// lane has no more runnable work claims the others'). An item stays in
    /// one lane. Stores that do not split their items have one.
    fn lanes(&self) -> usize {
        1
    }

    /// Whether a commit completes without waiting (no I/O, no other
    /// thread). On a current-thread runtime the engine then polls each
    /// attempt inline first, and one that ends at once needs no task of its
    /// own; a store that waits for a writer or a server gains nothing from
    /// that, and its group commits are fuller with tasks.
    fn commits_without_waiting(&self) -> bool {
        false
    }

    /// Commits the ends of attempts at once, on the caller's thread, each
    /// as [`Store::commit`] does, if this store commits without waiting:
    /// one answer per commit, in their order. Otherwise (the default) hands
    /// the commits back for [`Store::commit`]. The engine's inline attempts
    /// commit this way, a claimed batch's worth at a time, without futures.
    fn commit_at_once(
        &self,
        commits: Vec<Commit>,
    ) -> std::result::Result<Vec<Result<()>>, Vec<Commit>> {
        Err(commits)
    }

    /// Stores the pipeline definition as a numbered version (a definition
    /// equal to a stored version reuses its number) and reports the version,
    /// how it differs from the latest version stored before, and how many
    /// unfinished items move on older versions.
    async fn register_pipeline(&self, definition: &PipelineDef) -> Result<PipelineDrift>;

    /// Stores new items, each with one `pending` stage row per stage of its
    /// pipeline version (which must be registered) and an `ItemSubmitted`
    /// event, in one transition. Idempotent by id: an existing item is left
    /// unchanged and gets no event. Returns how many items were new.
    async fn submit(&self, items: Vec<NewItem>) -> Result<usize>;

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
    /// The events are in the log (a worker has no use for them, and the
    /// hottest transition does not copy them out).
    async fn commit(&self, commit: Commit) -> Result<()>;

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

    /// Runs a finished or failed stage again with every stage downstream of
    /// it ([`crate::rules::rerun`]), keeping their history. Returns the keys
    /// of downstream units that were running (they lose their claim), and
    /// the events. Any other state is [`crate::Error::NotRerunnable`].
    async fn rerun(
        &self,
        item_id: &str,
        stage: &str,
        at: DateTime<Utc>,
    ) -> Result<(Vec<TaskKey>, Vec<Event>)>;

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

    /// Moves an unfinished, idle item to pipeline version `version` (see
    /// [`crate::rules::migrate`]); reports what happened and the events.
    async fn migrate(
        &self,
        item_id: &str,
        version: u32,
        at: DateTime<Utc>,
    ) -> Result<(MigrateOutcome, Vec<Event>)>;

    /// The ids of unfinished items (not completed, not cancelled) whose
    /// pipeline version is older than `version`, oldest version first, then
    /// in submission order.
    async fn items_before_version(&self, version: u32) -> Result<Vec<String>>;

    /// How the latest registered pipeline version stands, without
    /// registering anything: its number, how it differs from the version
    /// before it, and the unfinished items of older versions. `None` if no
    /// pipeline was registered yet. This is what operators' tools show.
    async fn pipeline_drift(&self) -> Result<Option<PipelineDrift>>;

    /// The latest pipeline definition recorded by `register_pipeline`, if any.
    async fn pipeline_definition(&self) -> Result<Option<PipelineDef>>;

    /// The definition stored as pipeline version `version`, if any.
    async fn pipeline_version(&self, version: u32) -> Result<Option<PipelineDef>>;

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

    /// Removes up to `batch` items that finished for good strictly before
    /// `finished_before` (as [`crate::rules::retention::prunable`] decides
    /// on each item's rows), with their stage rows, subtasks, attempts,
    /// review decisions, queue entries and events, in one short write
    /// transaction; work in flight is never touched. Call again while
    /// [`Pruned::more`] to remove the rest in bounded steps.
    async fn prune(&self, finished_before: DateTime<Utc>, batch: usize) -> Result<Pruned>;

    /// The highest sequence number of an event a prune removed (0 if none).
    /// Sequence numbers are never reused, and the log has no gaps above this
    /// watermark; below it, the events of pruned items are gone. A follower
    /// that last saw sequence number `n < pruned_through()` may have missed
    /// events between `n` and the watermark: they belonged to pruned items.
    async fn pruned_through(&self) -> Result<u64>;
}
