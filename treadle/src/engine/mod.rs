//! The engine: submits items, runs their stages, and takes people's decisions.

mod attempt;
mod executor;
mod lanes;
mod owner;
mod retention;
mod settle;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tokio::sync::{OnceCell, broadcast};

use crate::context::AttemptUnit;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::fast_hash::FastMap;
use crate::item::{WorkItem, check_item_id};
use crate::pipeline::Pipeline;
use crate::review::{Decision, check_reject_reason, check_reviewer};
use crate::rules::CrashRetries;
use crate::state::StageState;
use crate::status::{AwaitingReview, ItemStatus};
use crate::store::{
    DecisionCommit, EventQuery, MigrateOutcome, NewItem, PipelineDrift, Store, TaskKey, Verdict,
};

use lanes::Wake;

pub use executor::RunReport;
pub use owner::{LeaseOwner, ProcessMark};
pub use retention::PRUNE_BATCH;

/// Tuning of an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The most units of work (stages or subtasks) running at once; on a
    /// store split into lanes, shared between them (at least one each).
    pub max_concurrency: usize,
    /// How long a claim holds before another worker may take it over; the
    /// engine renews the leases of its running work every third of this.
    /// A worker whose process died on the same host is taken over at once
    /// by the next engine that starts there ([`LeaseOwner`]); one on
    /// another host, or one whose process still lives, only when its lease
    /// expires.
    pub lease: Duration,
    /// This worker's identity, recorded (with its host and process, see
    /// [`LeaseOwner`]) as the owner of its claims. A worker starting with
    /// the id of an earlier one takes that one's claims over at once.
    pub worker_id: String,
    /// How often an idle `run` looks for work committed by other processes
    /// (a store whose feed carries other processes' commits, PostgreSQL,
    /// wakes it at once), and how often `run_until_idle` looks again at
    /// work another worker runs.
    pub idle_poll: Duration,
    /// The longest an attempt of a stage that sets no timeout of its own may
    /// run before it counts as failed (timed out). Default: 10 minutes;
    /// `None` lets such stages run for as long as they take.
    ///
    /// A timeout stops a stage at its next `.await`: a stage that blocks its
    /// thread (CPU-heavy work, blocking I/O) cannot be stopped and should run
    /// that work in `tokio::task::spawn_blocking`.
    pub default_attempt_timeout: Option<Duration>,
    /// How work is run again after its worker stopped mid-attempt (a crash,
    /// a kill, a full disk): up to 3 times per run of attempts, after 1 s,
    /// 2 s, 4 s, without spending the stage's own attempts; then the stage
    /// (or subtask) fails with a reason saying so.
    pub crash_retries: CrashRetries,
    /// If set, a long-running [`Engine::run`] removes items that finished
    /// for good longer ago than this, by itself, a bounded batch at a time
    /// (see [`Engine::prune`]). `None` (the default) keeps every item.
    pub retention: Option<Duration>,
}

impl EngineConfig {
    /// The timeout applied to stages that set none: 10 minutes.
    pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_concurrency: 256,
            lease: Duration::from_secs(60),
            worker_id: default_worker_id(),
            idle_poll: Duration::from_millis(250),
            default_attempt_timeout: Some(Self::DEFAULT_ATTEMPT_TIMEOUT),
            crash_retries: CrashRetries::DEFAULT,
            retention: None,
        }
    }
}

fn default_worker_id() -> String {
    let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    format!(
        "worker-{}-{:x}",
        std::process::id(),
        nanos as u64 & 0xffff_ffff
    )
}

/// Runs a [`Pipeline`] over work items kept in a [`Store`].
///
/// Cheap to clone: clones share the same pipeline, store and running work,
/// so one clone can run while another submits items or records decisions.
pub struct Engine<W: WorkItem, S: Store> {
    shared: Arc<Shared<W, S>>,
}

impl<W: WorkItem, S: Store> Clone for Engine<W, S> {
    fn clone(&self) -> Self {
        Engine {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<W: WorkItem, S: Store> {
    pipeline: Pipeline<W>,
    store: S,
    config: EngineConfig,
    /// This worker as the owner of its leases.
    owner: LeaseOwner,
    /// `owner` as its leases record it.
    owner_text: Arc<str>,
    /// Set once the pipeline has been recorded in the store.
    drift: OnceCell<PipelineDrift>,
    /// Wakes the run loops: new items, decisions, retries.
    wake: Wake,
    /// Work this process is running, for cancellation and lease renewal.
    running: Mutex<FastMap<Running, RunningWork>>,
    random: AtomicU64,
}

/// A unit of work this process runs, as the running-work registry's key:
/// found by its [`TaskKey`], and holding the attempt's cancellation flag.
struct Running(Arc<AttemptUnit>);

impl std::borrow::Borrow<TaskKey> for Running {
    fn borrow(&self) -> &TaskKey {
        &self.0.key
    }
}

impl std::hash::Hash for Running {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.key.hash(state);
    }
}

impl PartialEq for Running {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for Running {}

struct RunningWork {
    generation: u64,
    /// The attempt's task; `None` only until it is spawned (see
    /// `Engine::start`).
    abort: Option<tokio::task::AbortHandle>,
}

impl<W: WorkItem, S: Store> Engine<W, S> {
    /// An engine with the default configuration, running as many attempts
    /// at once as the store suggests ([`Store::suggested_concurrency`]).
    pub fn new(pipeline: Pipeline<W>, store: S) -> Self {
        let config = EngineConfig {
            max_concurrency: store.suggested_concurrency(),
            ..EngineConfig::default()
        };
        Self::with_config(pipeline, store, config)
    }

    /// An engine with an explicit configuration.
    pub fn with_config(pipeline: Pipeline<W>, store: S, config: EngineConfig) -> Self {
        let seed =
            Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64 ^ u64::from(std::process::id());
        let owner = LeaseOwner::this_process(&config.worker_id);
        let store_lanes = store.lanes();
        Engine {
            shared: Arc::new(Shared {
                pipeline,
                store,
                owner_text: owner.to_string().into(),
                owner,
                config,
                drift: OnceCell::new(),
                wake: Wake::new(store_lanes),
                running: Mutex::new(FastMap::default()),
                random: AtomicU64::new(seed),
            }),
        }
    }

    /// The configuration this engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// The pipeline this engine runs.
    pub fn pipeline(&self) -> &Pipeline<W> {
        &self.shared.pipeline
    }

    /// The store this engine uses.
    pub fn store(&self) -> &S {
        &self.shared.store
    }

    /// Registers the pipeline with the store (on first use of the engine)
    /// and reports its version number, how it differs from the version
    /// registered before it, and the unfinished items that still move on
    /// older versions (see [`Engine::migrate_all`]).
    /// The first call also logs a warning naming the older versions in
    /// flight, if any.
    pub async fn drift(&self) -> Result<&PipelineDrift> {
        self.shared
            .drift
            .get_or_try_init(|| async {
                let drift = self
                    .shared
                    .store
                    .register_pipeline(self.shared.pipeline.definition())
                    .await?;
                if !drift.in_flight.is_empty() {
                    tracing::warn!(%drift, "items of older pipeline versions are in flight");
                }
                Ok(drift)
            })
            .await
    }

    /// Stores `item` and makes its first stages runnable. Idempotent by id:
    /// returns `false` (and changes nothing) if an item with this id exists.
    /// An empty id is refused ([`Error::EmptyItemId`]).
    pub async fn submit(&self, item: W) -> Result<bool> {
        Ok(self.submit_all([item]).await? == 1)
    }

    /// Stores many items in one transition; returns how many were new. One
    /// item with an empty id refuses the whole batch.
    pub async fn submit_all(&self, items: impl IntoIterator<Item = W>) -> Result<usize> {
        let version = self.drift().await?.version;
        let at = Utc::now();
        let items = items
            .into_iter()
            .map(|item| {
                check_item_id(item.id())?;
                let payload = serde_json::to_string(&item)
                    .map_err(|e| Error::json(format!("item `{}`", item.id()), e))?;
                Ok(NewItem {
                    id: item.id().to_owned(),
                    payload,
                    version,
                    at,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let new = self.shared.store.submit(items).await?;
        self.shared.wake.all();
        Ok(new)
    }

    /// Approves a stage awaiting review; it completes with its proposed output.
    ///
    /// A decision must name its reviewer ([`check_reviewer`]), as must
    /// those of `approve_with_edits` and `reject`.
    pub async fn approve(&self, item_id: &str, stage: &str, decision: Decision) -> Result<()> {
        check_reviewer(&decision.by)?;
        self.decide(item_id, stage, decision, Verdict::Approve)
            .await
    }

    /// Approves a stage awaiting review, replacing its output with `edits`.
    ///
    /// The edits must be a valid output of the stage ([`Stage::check_output`]):
    /// otherwise this returns [`Error::OutputShape`] and nothing changes.
    ///
    /// [`Stage::check_output`]: crate::Stage::check_output
    pub async fn approve_with_edits(
        &self,
        item_id: &str,
        stage: &str,
        decision: Decision,
        edits: impl Serialize,
    ) -> Result<()> {
        check_reviewer(&decision.by)?;
        let edits = serde_json::to_value(edits).map_err(|e| Error::json("the review edits", e))?;
        if let Some(runner) = self.shared.pipeline.stage(stage) {
            runner.check_output(&edits)?;
        }
        self.decide(item_id, stage, decision, Verdict::ApproveWithEdits(edits))
            .await
    }

    /// Rejects a stage awaiting review; it fails with `reason` (which must
    /// not be blank), and can be run again with [`Engine::retry`].
    pub async fn reject(
        &self,
        item_id: &str,
        stage: &str,
        decision: Decision,
        reason: impl Into<String>,
    ) -> Result<()> {
        let reason = reason.into();
        check_reviewer(&decision.by)?;
        check_reject_reason(&reason)?;
        self.decide(item_id, stage, decision, Verdict::Reject { reason })
            .await
    }

    pub(super) async fn decide(
        &self,
        item_id: &str,
        stage: &str,
        decision: Decision,
        verdict: Verdict,
    ) -> Result<()> {
        self.shared
            .store
            .decide(DecisionCommit {
                item_id: item_id.to_owned(),
                stage: stage.to_owned(),
                verdict,
                decision,
                at: Utc::now(),
            })
            .await?;
        self.shared.wake.all();
        Ok(())
    }

    /// Runs a failed stage again (a fan-out stage runs only its failed subtasks).
    pub async fn retry(&self, item_id: &str, stage: &str) -> Result<()> {
        self.shared.store.retry(item_id, stage, Utc::now()).await?;
        self.shared.wake.all();
        Ok(())
    }

    /// Moves an unfinished, idle item to this engine's pipeline version,
    /// matching stages by name: completed stages stay completed, stages new
    /// in this version start pending, stages this version lacks are dropped.
    /// Finished items keep their version; an item with running work is left
    /// for later. See [`crate::rules::migrate`].
    pub async fn migrate(&self, item_id: &str) -> Result<MigrateOutcome> {
        let version = self.drift().await?.version;
        let (outcome, _) = self
            .shared
            .store
            .migrate(item_id, version, Utc::now())
            .await?;
        self.shared.wake.all();
        Ok(outcome)
    }

    /// Migrates every unfinished item of an older pipeline version (see
    /// [`Engine::migrate`]); returns how many moved.
    pub async fn migrate_all(&self) -> Result<usize> {
        let version = self.drift().await?.version;
        let mut moved = 0;
        for item in self.shared.store.items_before_version(version).await? {
            if self.migrate(&item).await? == MigrateOutcome::Moved {
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Runs a finished (completed or skipped) or failed stage again, with
    /// every stage downstream of it on the item's pipeline version, keeping
    /// their attempt history: a review stage asks for a new review round,
    /// and downstream work still running here is stopped. Any other state
    /// is [`Error::NotRerunnable`].
    pub async fn rerun(&self, item_id: &str, stage: &str) -> Result<()> {
        let (running, _) = self.shared.store.rerun(item_id, stage, Utc::now()).await?;
        self.stop_local(running);
        self.shared.wake.all();
        Ok(())
    }

    /// Cancels an item: its running stages are stopped and nothing more runs.
    pub async fn cancel(&self, item_id: &str) -> Result<()> {
        let (running, _) = self.shared.store.cancel(item_id, Utc::now()).await?;
        self.stop_local(running);
        Ok(())
    }

    /// One item's status: every stage with its state, attempts, timings,
    /// errors, subtasks and review.
    pub async fn status(&self, item_id: &str) -> Result<ItemStatus> {
        self.shared.store.status(item_id).await
    }

    /// The ids of items whose `stage` is in `state`.
    pub async fn items_in(&self, stage: &str, state: StageState) -> Result<Vec<String>> {
        self.shared.store.items_in(stage, state).await
    }

    /// Every stage awaiting a person's review, oldest first.
    pub async fn awaiting_review(&self) -> Result<Vec<AwaitingReview>> {
        self.shared.store.awaiting_review().await
    }

    /// Events from the store's log.
    pub async fn events(&self, query: EventQuery) -> Result<Vec<Event>> {
        self.shared.store.events(query).await
    }

    /// A live feed of committed events, in commit order.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.store.subscribe()
    }

    /// Stops this process's attempts for `keys`: raises their cancellation
    /// signal and aborts them; their results will not be committed.
    fn stop_local(&self, keys: impl IntoIterator<Item = TaskKey>) {
        let mut running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for key in keys {
            if let Some((unit, work)) = running.remove_entry(&key) {
                unit.0.cancel();
                if let Some(abort) = work.abort {
                    abort.abort();
                }
            }
        }
    }

    /// A uniform random number in `[0, 1)` for backoff jitter (splitmix64).
    fn random(&self) -> f64 {
        // Each thread draws from its own sequence (the run loops of a
        // store's lanes never share a counter), started from the engine's.
        thread_local! {
            static NEXT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        }
        const STEP: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut z = NEXT.with(|next| {
            let mut value = next.get();
            if value == 0 {
                value = self.shared.random.fetch_add(STEP << 20, Ordering::Relaxed) | 1;
            }
            value = value.wrapping_add(STEP);
            next.set(value);
            value
        });
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}
