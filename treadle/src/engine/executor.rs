//! The run loop: claims runnable work, runs each attempt
//! ([`super::attempt`]) and commits what it settled to. An attempt runs in
//! its own task, except that on a current-thread runtime with a store whose
//! commits never wait it is first polled inline, and one that ends at once
//! needs no task at all.
//!
//! The loop is a small state machine, one [`RunLoop`] per call of
//! [`Engine::run`] or [`Engine::run_until_idle`], or one per lane for a
//! store split into lanes ([`super::lanes`]). Each turn it
//!
//! 1. **collects** the attempts that finished (each committed its own end),
//! 2. **claims** more work if slots are free and something may be runnable
//!    (the claim runs beside the attempts, so a slow durable claim never
//!    holds up their commits),
//! 3. then either **waits while busy** (for a claim, an attempt, a wake-up,
//!    a lease renewal or shutdown) or, with nothing running or being
//!    claimed, asks **what idleness means** ([`Idle`]): return, claim again,
//!    or wait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio::time::{Interval, MissedTickBehavior};
use tracing::Instrument;

use super::attempt::{Attempt, AttemptSettings, Settled, StageRef, StageTable};
use super::lanes::{LaneGroup, Rejoin};
use super::owner::LeaseOwner;
use super::retention::Retention;
use super::{Engine, Running, RunningWork};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::item::WorkItem;
use crate::review::Decision;
use crate::review::{DEADLINE_REVIEWER, DeadlineAction};
use crate::store::{Claim, ClaimBatch, ClaimRequest, Store, Verdict};
use crate::task::TaskKey;

/// What a run of the engine did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Attempts whose end was committed.
    pub attempts: u64,
    /// Attempts whose result was discarded because their claim was lost
    /// (the item was cancelled, or another worker took the work over).
    pub discarded: u64,
}

/// How one unit of work ended, for the report.
enum Finished {
    Committed,
    Discarded,
}

impl RunReport {
    /// Adds up the reports of a run's lanes.
    fn add(&mut self, other: RunReport) {
        self.attempts += other.attempts;
        self.discarded += other.discarded;
    }

    /// Counts a finished attempt task; a store error in it ends the run.
    fn count(
        &mut self,
        joined: std::result::Result<Result<Finished>, tokio::task::JoinError>,
    ) -> Result<()> {
        let finished = match joined {
            Ok(finished) => finished?,
            // Aborted: its item was cancelled or its lease lost.
            Err(e) if e.is_cancelled() => Finished::Discarded,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        match finished {
            Finished::Committed => self.attempts += 1,
            Finished::Discarded => self.discarded += 1,
        }
        Ok(())
    }
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// [`Engine::run_until_idle`]: when nothing can happen without outside input.
    UntilIdle,
    /// [`Engine::run`]: when shutdown is asked and running attempts are done.
    UntilShutdown,
}

/// What an idle loop (nothing running, nothing being claimed) does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// Return: nothing more can happen without outside input, or shutdown
    /// was asked and every attempt is done.
    Done,
    /// Something may have become runnable: claim at once.
    Claim,
    /// Wait this long, or until woken, then claim.
    Wait(Duration),
}

/// A claim in flight.
type Claiming<'e> = Pin<Box<dyn Future<Output = Result<ClaimBatch>> + Send + 'e>>;

/// Which lane a run loop works, and what it shares with the other lanes'
/// loops (`None`: the store has one lane, and this loop is the only one).
struct LaneOf {
    index: usize,
    group: Option<Arc<LaneGroup>>,
}

/// The state of one run of the engine.
struct RunLoop<'e, W: WorkItem, S: Store, F> {
    engine: &'e Engine<W, S>,
    mode: Mode,
    /// Completes when the caller asks the run to stop.
    shutdown: Pin<Box<F>>,
    /// Set once shutdown was asked: no more claims; running attempts finish.
    stopping: bool,
    /// The running attempts, each committing its own end.
    tasks: JoinSet<Result<Finished>>,
    /// The claim in flight and how many units it asked for.
    claiming: Option<(Claiming<'e>, usize)>,
    /// Whether something may have become claimable since the last claim.
    claim_wanted: bool,
    /// The most attempts running at once.
    capacity: usize,
    /// While work runs, claim only once this many slots are free (batches).
    refill: usize,
    /// Ticks every third of a lease: renew leases, fire review deadlines.
    renewal: Interval,
    /// When a long-running worker with retention prunes next.
    retention: Option<Retention>,
    /// For `run`: the store's feed. Any commit, by this process or another
    /// sharing the store, may have made work runnable: it wakes the loop.
    commits: Option<broadcast::Receiver<Event>>,
    /// The lane this loop claims from.
    lane: LaneOf,
    /// This worker as its leases record it: the loop's own copy, which
    /// every claim shares (one loop's claims never touch another's count).
    owner: Arc<str>,
    /// The pipeline's stages, this loop's own table (as `owner`).
    stages: StageTable<W>,
    /// Whether this loop claimed work, or made work runnable, since it last
    /// found nothing to do (for the end of a multi-lane `run_until_idle`).
    progressed: bool,
    report: RunReport,
}

impl<'e, W: WorkItem, S: Store, F: Future<Output = ()>> RunLoop<'e, W, S, F> {
    fn new(engine: &'e Engine<W, S>, mode: Mode, shutdown: F, lane: LaneOf) -> Self {
        let config = &engine.shared.config;
        // The lanes share the concurrency between them (at least one each).
        let lanes = lane.group.as_ref().map_or(1, |group| group.lanes());
        let most = config.max_concurrency;
        let capacity = (most / lanes + usize::from(lane.index < most % lanes)).max(1);
        let mut renewal = tokio::time::interval(config.lease / 3);
        renewal.set_missed_tick_behavior(MissedTickBehavior::Delay);
        renewal.reset();
        RunLoop {
            engine,
            mode,
            shutdown: Box::pin(shutdown),
            stopping: false,
            tasks: JoinSet::new(),
            claiming: None,
            claim_wanted: true,
            capacity,
            refill: (capacity / 8).max(1),
            renewal,
            // One lane prunes for all.
            retention: Retention::schedule(
                mode == Mode::UntilShutdown && lane.index == 0,
                config.retention,
            ),
            commits: (mode == Mode::UntilShutdown).then(|| engine.shared.store.subscribe()),
            lane,
            owner: Arc::from(&*engine.shared.owner_text),
            stages: engine.shared.pipeline.stages().into(),
            progressed: false,
            report: RunReport::default(),
        }
    }

    async fn run(mut self) -> Result<RunReport> {
        loop {
            if let Some(retention) = &mut self.retention {
                retention.tick(self.engine).await?;
            }
            self.collect_finished()?;
            self.claim_if_wanted();
            if self.claiming.is_some() || !self.tasks.is_empty() {
                self.wait_while_busy().await?;
                continue;
            }
            match self.idle().await? {
                Idle::Done => match self.rejoin().await {
                    Rejoin::Finish => return Ok(self.report),
                    Rejoin::Claim => self.claim_wanted = true,
                },
                Idle::Claim => self.claim_wanted = true,
                Idle::Wait(nap) => {
                    self.nap(nap).await;
                    self.claim_wanted = true;
                }
            }
        }
    }

    /// With nothing left to do: a loop alone is done; one lane of several
    /// waits for the others ([`LaneGroup::rejoin`]), unless it is stopping.
    async fn rejoin(&mut self) -> Rejoin {
        let Some(group) = self.lane.group.clone() else {
            return Rejoin::Finish;
        };
        if self.stopping {
            return Rejoin::Finish;
        }
        let progressed = std::mem::take(&mut self.progressed);
        let wake = self.engine.shared.wake.notified(self.lane.index);
        group.rejoin(progressed, wake).await
    }

    /// Counts the attempts that have finished; their slots are free again.
    fn collect_finished(&mut self) -> Result<()> {
        while let Some(joined) = self.tasks.try_join_next() {
            self.report.count(joined)?;
            self.claim_wanted = true;
        }
        Ok(())
    }

    /// Starts a claim if one is wanted and slots are free (while work runs,
    /// only once a batch's worth is free).
    fn claim_if_wanted(&mut self) {
        let free = self.capacity - self.tasks.len();
        let batch_ready = free > 0 && (self.tasks.is_empty() || free >= self.refill);
        if self.stopping || !self.claim_wanted || self.claiming.is_some() || !batch_ready {
            return;
        }
        self.claim_wanted = false;
        let shared = &self.engine.shared;
        let claim = shared.store.claim(ClaimRequest {
            owner: self.owner.clone(),
            limit: free,
            lease: shared.config.lease,
            now: Utc::now(),
            crash_retries: shared.config.crash_retries,
            lane: self.lane.group.as_ref().map(|_| self.lane.index),
        });
        self.claiming = Some((claim, free));
    }

    /// Waits for the next thing to happen while a claim or attempts run.
    async fn wait_while_busy(&mut self) -> Result<()> {
        let RunLoop {
            engine,
            shutdown,
            stopping,
            tasks,
            claiming,
            claim_wanted,
            renewal,
            commits,
            lane,
            progressed,
            stages,
            report,
            ..
        } = self;
        tokio::select! {
            batch = async { claiming.as_mut().expect("guarded").0.as_mut().await }, if claiming.is_some() => {
                let (_, asked) = claiming.take().expect("guarded");
                let batch = batch?;
                // A full batch means more may be runnable right away; so
                // may work committed while the claim was in flight.
                *claim_wanted |= batch.claims.len() == asked;
                *progressed |= !batch.claims.is_empty();
                // Attempts that ended inline freed their slots and may
                // have made their dependents runnable.
                *claim_wanted |= engine.start(tasks, batch.claims, stages, report)? > 0;
            }
            Some(joined) = tasks.join_next() => {
                report.count(joined)?;
                *claim_wanted = true;
            }
            () = engine.shared.wake.notified(lane.index), if !*stopping => *claim_wanted = true,
            // Another process's commit (a decision, a submission, finished
            // work) may have made work runnable; a claim already in flight
            // may have missed it.
            () = next_commit(commits), if !*stopping => *claim_wanted = true,
            _ = renewal.tick() => {
                engine.renew_leases().await?;
                if engine.expire_reviews().await? > 0 {
                    *claim_wanted = true;
                    *progressed = true;
                }
            }
            () = shutdown.as_mut(), if !*stopping => *stopping = true,
        }
        Ok(())
    }

    /// What to do with nothing running and nothing being claimed.
    ///
    /// `run_until_idle` returns once no retry is scheduled and no unit is
    /// running under another worker's lease; until then it waits for the
    /// earlier of the two (a lease is looked at again every `idle_poll`, as
    /// its worker may finish and unblock more work, or die and leave the
    /// lease to expire, after which the next claim recovers the unit).
    /// Review deadlines are not waited for: a stage awaiting review waits
    /// for a person. `run` waits, at most `idle_poll`, for anything to be
    /// due, including review deadlines.
    async fn idle(&mut self) -> Result<Idle> {
        if self.stopping {
            return Ok(Idle::Done);
        }
        let engine = self.engine;
        if engine.expire_reviews().await? > 0 {
            self.progressed = true;
            return Ok(Idle::Claim);
        }
        let store = &engine.shared.store;
        let poll = engine.shared.config.idle_poll;
        let retry_due = store.next_due().await?;
        let until = |at: DateTime<Utc>| (at - Utc::now()).to_std().unwrap_or_default();
        match self.mode {
            Mode::UntilIdle => {
                let lease_ends = store.next_lease_expiry().await?;
                Ok(match (retry_due, lease_ends) {
                    (None, None) => Idle::Done,
                    (Some(due), None) => Idle::Wait(until(due)),
                    (due, Some(lease)) => {
                        let first = due.map_or(lease, |due| due.min(lease));
                        Idle::Wait(until(first).min(poll))
                    }
                })
            }
            Mode::UntilShutdown => {
                let deadline = store.next_review_deadline().await?;
                let first = retry_due.into_iter().chain(deadline).min();
                Ok(Idle::Wait(first.map_or(poll, |at| until(at).min(poll))))
            }
        }
    }

    /// Sleeps for `nap`, or until woken (new work, a decision) or shut down.
    async fn nap(&mut self, nap: Duration) {
        tokio::select! {
            () = self.shutdown.as_mut(), if !self.stopping => self.stopping = true,
            () = self.engine.shared.wake.notified(self.lane.index) => {}
            () = next_commit(&mut self.commits) => {}
            () = tokio::time::sleep(nap) => {}
        }
    }
}

/// Waits until `feed` carries another committed event (or reports that
/// it fell behind), then takes every event already waiting too, so a burst
/// of commits wakes the loop once; never returns once there is no feed.
async fn next_commit(feed: &mut Option<broadcast::Receiver<Event>>) {
    if let Some(receiver) = feed {
        match receiver.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                while !matches!(
                    receiver.try_recv(),
                    Err(broadcast::error::TryRecvError::Empty
                        | broadcast::error::TryRecvError::Closed)
                ) {}
                return;
            }
            Err(broadcast::error::RecvError::Closed) => *feed = None,
        }
    }
    std::future::pending().await
}

impl<W: WorkItem, S: Store> Engine<W, S> {
    /// Runs until nothing more can happen without a person, a new item or
    /// another worker: every item is completed, failed, cancelled or
    /// awaiting review. Waits for scheduled retries to fall due, and for
    /// units other workers are running (until they finish, or their lease
    /// expires and this run recovers them); see [`EngineConfig::lease`](super::EngineConfig::lease).
    pub async fn run_until_idle(&self) -> Result<RunReport> {
        self.drive(Mode::UntilIdle, std::future::pending()).await
    }

    /// Runs as a long-lived worker until `shutdown` completes, then stops
    /// claiming work, lets running attempts finish, and returns. Picks up
    /// new items, decisions and due retries as they come, including those
    /// committed by other processes sharing the store.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<RunReport> {
        self.drive(Mode::UntilShutdown, shutdown).await
    }

    async fn drive(&self, mode: Mode, shutdown: impl Future<Output = ()>) -> Result<RunReport> {
        self.drift().await?;
        self.take_over_dead_claims().await?;
        let lanes = self.shared.store.lanes();
        if lanes <= 1 {
            let only = LaneOf {
                index: 0,
                group: None,
            };
            return RunLoop::new(self, mode, shutdown, only).run().await;
        }
        self.drive_lanes(lanes, mode, shutdown).await
    }

    /// Runs one loop per lane, each a task, until every one has returned;
    /// `shutdown`, or an error in any lane, stops them all. Returns the
    /// first error, else their reports added up.
    async fn drive_lanes(
        &self,
        lanes: usize,
        mode: Mode,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunReport> {
        let group = Arc::new(LaneGroup::new(lanes));
        let mut loops = JoinSet::new();
        for index in 0..lanes {
            let engine = self.clone();
            let group = group.clone();
            loops.spawn(async move {
                let lane = LaneOf {
                    index,
                    group: Some(group.clone()),
                };
                let ran = RunLoop::new(&engine, mode, group.stopped(), lane)
                    .run()
                    .await;
                if ran.is_err() {
                    group.stop();
                }
                ran
            });
        }
        tokio::pin!(shutdown);
        let mut asked_to_stop = false;
        let mut report = RunReport::default();
        let mut failed = None;
        loop {
            tokio::select! {
                () = &mut shutdown, if !asked_to_stop => {
                    asked_to_stop = true;
                    group.stop();
                }
                joined = loops.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(lane))) => report.add(lane),
                    Some(Ok(Err(e))) => {
                        failed.get_or_insert(e);
                    }
                    Some(Err(e)) => std::panic::resume_unwind(e.into_panic()),
                },
            }
        }
        failed.map_or(Ok(report), Err)
    }

    /// Makes claimable at once the units whose worker is known not to run
    /// them any more: those of a worker with this engine's `worker_id` (a
    /// restart of it), and those of any worker whose process on this host
    /// is gone. Leases of live processes and of other hosts are left to
    /// expire.
    async fn take_over_dead_claims(&self) -> Result<()> {
        let shared = &self.shared;
        let here = shared.owner.process.as_ref();
        for token in shared.store.lease_owners().await? {
            let owner = LeaseOwner::parse(&token);
            let why = if owner.worker_id == shared.owner.worker_id {
                "a previous run of this worker left them running"
            } else if owner.is_gone(here) {
                "their worker's process on this host is gone"
            } else {
                continue;
            };
            let released = shared.store.release_claims(&token, Utc::now()).await?;
            if released > 0 {
                tracing::warn!(released, previous_owner = %token, "recovering claims: {why}");
            }
        }
        Ok(())
    }

    /// Starts each claimed attempt and returns how many ended at once.
    ///
    /// With a store whose commits complete without waiting
    /// ([`Store::commits_without_waiting`]), on a current-thread runtime or
    /// when the store has several lanes (whose loops run in parallel), an
    /// attempt is first polled here, inline: those that end at once (quick
    /// stages) are committed together once the batch is started
    /// ([`Store::commit_at_once`]) and counted here, each without a task of
    /// its own and without being registered for cancellation or renewal (it
    /// never waits, so there is nothing to stop; a cancellation that races
    /// it is caught by the commit's fencing). One
    /// that waits, and every attempt of a single loop on a multi-thread
    /// runtime (whose workers run attempts in parallel) or on a store that
    /// waits for I/O, is registered and runs as a task of `tasks`. An
    /// attempt polled inline is registered only after that first poll, so
    /// its task first renews its claim: a cancellation (or lost lease) that
    /// came during the poll found nothing to stop, and is caught there.
    fn start(
        &self,
        tasks: &mut JoinSet<Result<Finished>>,
        claims: Vec<Claim>,
        stages: &StageTable<W>,
        report: &mut RunReport,
    ) -> Result<usize> {
        let store = &self.shared.store;
        let inline = store.commits_without_waiting()
            && (store.lanes() > 1
                || tokio::runtime::Handle::current().runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::CurrentThread);
        let mut ended = Vec::new();
        for claim in claims {
            let generation = claim.generation;
            let attempt = Attempt::from(claim);
            let unit = attempt.unit.clone();
            let mut running = Box::pin(self.run_attempt(attempt, stages));
            if inline {
                // The task, if one is needed, polls again with its own waker.
                let mut cx = Context::from_waker(Waker::noop());
                if let Poll::Ready(settled) = running.as_mut().poll(&mut cx) {
                    // The commit takes the unit's last reference, without a copy.
                    drop(unit);
                    ended.push(settled.into_commit());
                    continue;
                }
            }
            // Registered before the task can run (on a multi-thread runtime
            // it may start, and end, at once).
            let work = RunningWork {
                generation,
                abort: None,
            };
            self.running().insert(Running(unit.clone()), work);
            let engine = self.clone();
            let polled_inline = inline.then(|| unit.key.clone());
            let abort = tasks.spawn(async move {
                if let Some(key) = polled_inline
                    && engine.claim_lost(&key, generation).await?
                {
                    engine.stop_local([key]);
                    return Ok(Finished::Discarded);
                }
                let settled = running.await;
                engine.running().remove(&settled.unit.key);
                engine.commit(settled).await
            });
            match self.running().get_mut(&unit.key) {
                Some(work) => work.abort = Some(abort),
                // Stopped before its task was known: the flag is raised,
                // and the task is aborted here.
                None if unit.is_cancelled() => abort.abort(),
                // The task has already ended.
                None => {}
            }
        }
        if ended.is_empty() {
            return Ok(0);
        }
        match store.commit_at_once(ended) {
            Ok(answers) => {
                let committed = answers.len();
                for answer in answers {
                    report.count(Ok(finished(answer)))?;
                }
                Ok(committed)
            }
            Err(commits) => {
                for commit in commits {
                    let engine = self.clone();
                    tasks.spawn(async move { finished(engine.shared.store.commit(commit).await) });
                }
                Ok(0)
            }
        }
    }

    /// Decides every review whose deadline has passed, as its deadline says.
    /// Returns how many were decided here (another worker may win a race).
    async fn expire_reviews(&self) -> Result<usize> {
        let due = self.shared.store.due_reviews(Utc::now()).await?;
        let mut decided = 0;
        for parked in due {
            let Some(deadline) = parked.review.request.deadline else {
                continue;
            };
            let decision = Decision::by(DEADLINE_REVIEWER)
                .note(format!(
                    "the review deadline {} passed",
                    deadline.at.to_rfc3339()
                ))
                .for_round(parked.review.round);
            let verdict = match deadline.then {
                DeadlineAction::Approve => Verdict::Approve,
                DeadlineAction::Reject { reason } => Verdict::Reject { reason },
            };
            match self
                .decide(&parked.item_id, &parked.stage, decision, verdict)
                .await
            {
                Ok(()) => decided += 1,
                Err(Error::NotAwaitingReview { .. } | Error::StaleDecision { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(decided)
    }

    /// Extends the leases of this process's running work; stops work whose
    /// claim was lost.
    async fn renew_leases(&self) -> Result<()> {
        let held: Vec<(TaskKey, u64)> = self
            .running()
            .iter()
            .map(|(running, work)| (running.0.key.clone(), work.generation))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let until = Utc::now() + self.shared.config.lease;
        let lost = self.shared.store.renew(&held, until).await?;
        for key in &lost {
            tracing::warn!(%key, "lease lost; stopping the attempt");
        }
        self.stop_local(lost);
        Ok(())
    }

    /// Whether the claim `generation` on `key` is lost (the item was
    /// cancelled, or the work taken over); if not, its lease is renewed.
    async fn claim_lost(&self, key: &TaskKey, generation: u64) -> Result<bool> {
        let until = Utc::now() + self.shared.config.lease;
        let lost = self
            .shared
            .store
            .renew(&[(key.clone(), generation)], until)
            .await?;
        Ok(!lost.is_empty())
    }

    fn running(
        &self,
    ) -> std::sync::MutexGuard<'_, crate::fast_hash::FastMap<Running, RunningWork>> {
        self.shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// One claimed attempt, to run to its settled end.
    fn run_attempt(
        &self,
        attempt: Attempt,
        stages: &StageTable<W>,
    ) -> impl Future<Output = Settled> + Send + 'static {
        let span = tracing::info_span!(
            "treadle.attempt",
            item_id = %attempt.unit.key.item_id,
            stage = %attempt.unit.key.stage,
            subtask = attempt.unit.key.subtask.as_deref(),
            attempt = attempt.attempt,
        );
        let settings = AttemptSettings {
            stage: (self.shared.pipeline)
                .position(&attempt.unit.key.stage)
                .map(|index| StageRef::new(stages.clone(), index)),
            default_timeout: self.shared.config.default_attempt_timeout,
            random: self.random(),
        };
        attempt.run(settings).instrument(span)
    }

    /// Commits a settled attempt; a claim lost meanwhile discards it.
    async fn commit(self, settled: Settled) -> Result<Finished> {
        let outcome = self.shared.store.commit(settled.into_commit()).await;
        finished(outcome)
    }
}

/// How a commit ended: committed, or discarded because the claim was lost
/// (the item was cancelled, or another worker took the work over).
fn finished(outcome: Result<()>) -> Result<Finished> {
    match outcome {
        Ok(()) => Ok(Finished::Committed),
        Err(Error::LeaseLost { task, generation }) => {
            tracing::warn!(%task, generation, "claim lost before commit; result discarded");
            Ok(Finished::Discarded)
        }
        Err(e) => Err(e),
    }
}
