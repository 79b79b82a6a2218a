//! The run loop: claims runnable work, runs each attempt in its own task,
//! and commits what it returned.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::settle::{AttemptEnd, AttemptFacts, settle};
use super::{Engine, RunningWork};
use crate::context::{CancelSignal, StageContext};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::item::WorkItem;
use crate::outcome::StageOutcome;
use crate::review::Decision;
use crate::review::{DEADLINE_REVIEWER, DeadlineAction};
use crate::stage::{Stage, StagePolicy};
use crate::state::AttemptResult;
use crate::store::{Claim, ClaimBatch, ClaimRequest, Commit, Store, Verdict};
use crate::task::TaskKey;

/// Waits until `feed` carries another committed event (or reports that
/// it fell behind); never, once there is no feed.
async fn next_commit(feed: &mut Option<broadcast::Receiver<Event>>) {
    if let Some(receiver) = feed {
        match receiver.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => *feed = None,
        }
    }
    std::future::pending().await
}

/// What a run of the engine did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Attempts whose end was committed.
    pub attempts: u64,
    /// Attempts whose result was discarded because their claim was lost
    /// (the item was cancelled, or another worker took the work over).
    pub discarded: u64,
}

/// A claimed unit of work as the engine runs it: the claim, with its key
/// shared between the attempt, its context and the running-work registry.
struct Attempt {
    task: Arc<TaskKey>,
    attempt: u32,
    generation: u64,
    started_at: chrono::DateTime<Utc>,
    payload: Arc<str>,
    outputs: std::collections::BTreeMap<String, serde_json::Value>,
    version: u32,
}

impl From<Claim> for Attempt {
    fn from(claim: Claim) -> Self {
        Attempt {
            task: Arc::new(claim.task),
            attempt: claim.attempt,
            generation: claim.generation,
            started_at: claim.started_at,
            payload: claim.payload,
            outputs: claim.outputs,
            version: claim.version,
        }
    }
}

/// How one unit of work ended, for the report.
enum Finished {
    Committed,
    Discarded,
}

impl RunReport {
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

impl<W: WorkItem, S: Store> Engine<W, S> {
    /// Runs until nothing more can happen without a person or a new item:
    /// every item is completed, failed, cancelled or awaiting review. Waits
    /// for scheduled retries to fall due.
    pub async fn run_until_idle(&self) -> Result<RunReport> {
        self.drive(None::<std::future::Pending<()>>).await
    }

    /// Runs as a long-lived worker until `shutdown` completes, then stops
    /// claiming work, lets running attempts finish, and returns. Picks up
    /// new items, decisions and due retries as they come, including those
    /// committed by other processes sharing the store.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<RunReport> {
        self.drive(Some(shutdown)).await
    }

    async fn drive<F: Future<Output = ()>>(&self, shutdown: Option<F>) -> Result<RunReport> {
        self.drift().await?;
        let shared = &self.shared;
        let released = shared
            .store
            .release_claims(&shared.config.worker_id, Utc::now())
            .await?;
        if released > 0 {
            tracing::warn!(released, worker = %shared.config.worker_id, "recovering claims a previous run of this worker left running");
        }
        let capacity = shared.config.max_concurrency.max(1);
        let forever = shutdown.is_some();
        let mut shutdown = pin!(async move {
            match shutdown {
                Some(signal) => signal.await,
                None => std::future::pending().await,
            }
        });
        // A long-lived engine naps when idle; any commit, by this process or
        // another sharing the store, may have made work runnable and wakes it.
        let mut commits = forever.then(|| shared.store.subscribe());
        let mut renewal = tokio::time::interval(shared.config.lease / 3);
        renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renewal.reset();
        let mut tasks: JoinSet<Result<Finished>> = JoinSet::new();
        let mut report = RunReport::default();
        let mut stopping = false;
        // A claim runs concurrently with the attempts already running, so a
        // slow (durable) claim never holds up the commits of finished work.
        let mut claiming: Option<Pin<Box<dyn Future<Output = Result<ClaimBatch>> + Send + '_>>> =
            None;
        let mut claim_wanted = true;
        // Claim in batches: wait for this many free slots while work runs.
        let refill = (capacity / 8).max(1);
        loop {
            while let Some(joined) = tasks.try_join_next() {
                report.count(joined)?;
                claim_wanted = true;
            }
            let free = capacity - tasks.len();
            if !stopping
                && claim_wanted
                && claiming.is_none()
                && free > 0
                && (tasks.is_empty() || free >= refill)
            {
                claim_wanted = false;
                claiming = Some(Box::pin(shared.store.claim(ClaimRequest {
                    owner: shared.config.worker_id.clone(),
                    limit: free,
                    lease: shared.config.lease,
                    now: Utc::now(),
                })));
            }
            if claiming.is_none() && tasks.is_empty() {
                if stopping {
                    return Ok(report);
                }
                if self.expire_reviews().await? > 0 {
                    claim_wanted = true;
                    continue;
                }
                let due = shared.store.next_due().await?;
                if !forever && due.is_none() {
                    return Ok(report);
                }
                let mut nap = shared.config.idle_poll;
                let deadline = if forever {
                    shared.store.next_review_deadline().await?
                } else {
                    None
                };
                if let Some(at) = due.into_iter().chain(deadline).min() {
                    let until_due = (at - Utc::now()).to_std().unwrap_or_default();
                    nap = if forever {
                        nap.min(until_due)
                    } else {
                        until_due
                    };
                }
                tokio::select! {
                    () = &mut shutdown, if !stopping => stopping = true,
                    () = shared.wake.notified() => {}
                    () = next_commit(&mut commits) => {}
                    () = tokio::time::sleep(nap) => {}
                }
                claim_wanted = true;
                continue;
            }
            tokio::select! {
                batch = async { claiming.as_mut().expect("guarded").await }, if claiming.is_some() => {
                    claiming = None;
                    let batch = batch?;
                    // A full batch means more may be runnable right away; so
                    // may work committed while the claim was in flight.
                    claim_wanted |= batch.claims.len() == free;
                    self.start(&mut tasks, batch.claims);
                }
                Some(joined) = tasks.join_next() => {
                    report.count(joined)?;
                    claim_wanted = true;
                }
                () = shared.wake.notified(), if !stopping => claim_wanted = true,
                _ = renewal.tick() => {
                    self.renew_leases().await?;
                    if self.expire_reviews().await? > 0 {
                        claim_wanted = true;
                    }
                }
                () = &mut shutdown, if !stopping => stopping = true,
            }
        }
    }

    /// Spawns one task per claim and registers it for cancellation and renewal.
    fn start(&self, tasks: &mut JoinSet<Result<Finished>>, claims: Vec<Claim>) {
        let mut running = self.running();
        for claim in claims {
            let (engine, signal) = (self.clone(), CancelSignal::default());
            let generation = claim.generation;
            let attempt = Attempt::from(claim);
            let key = attempt.task.clone();
            let abort = tasks.spawn(engine.execute(attempt, signal.clone()));
            running.insert(
                key,
                RunningWork {
                    generation,
                    signal,
                    abort,
                },
            );
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
            .map(|(key, work)| (TaskKey::clone(key), work.generation))
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

    fn running(
        &self,
    ) -> std::sync::MutexGuard<'_, crate::fast_hash::FastMap<Arc<TaskKey>, RunningWork>> {
        self.shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one claimed attempt and commits its end.
    async fn execute(self, claimed: Attempt, signal: CancelSignal) -> Result<Finished> {
        let span = tracing::info_span!(
            "treadle.attempt",
            item_id = %claimed.task.item_id,
            stage = %claimed.task.stage,
            subtask = claimed.task.subtask.as_deref(),
            attempt = claimed.attempt,
        );
        async move {
            let stage = self.shared.pipeline.stage(&claimed.task.stage).cloned();
            let policy = stage.as_ref().map_or(StagePolicy::DEFAULT, |s| s.policy());
            let Attempt {
                task,
                attempt,
                generation,
                started_at,
                payload,
                outputs,
                version,
            } = claimed;
            let end = match stage {
                None => AttemptEnd::Outcome(StageOutcome::failed(
                    Error::StageNotInBuild {
                        stage: task.stage.clone(),
                        version,
                    }
                    .to_string(),
                )),
                Some(_) if attempt > policy.max_attempts => {
                    AttemptEnd::Outcome(StageOutcome::failed(format!(
                        "no attempts left: {} of {} were used by workers that stopped mid-attempt",
                        attempt - 1,
                        policy.max_attempts
                    )))
                }
                Some(stage) => match serde_json::from_str::<W>(&payload) {
                    Ok(item) => {
                        let mut ctx = StageContext::for_task(task.clone(), attempt)
                            .with_outputs(outputs)
                            .with_cancel_signal(signal);
                        run_guarded(stage.as_ref(), &item, &mut ctx, policy.timeout).await
                    }
                    Err(e) => AttemptEnd::Outcome(StageOutcome::failed(format!(
                        "the stored item cannot be decoded: {e}"
                    ))),
                },
            };
            self.running().remove(&*task);
            // Usually the last reference now, so no copy is made.
            let task = Arc::try_unwrap(task).unwrap_or_else(|shared| (*shared).clone());
            if let AttemptEnd::Error { result, message } = &end {
                tracing::warn!(%result, error = %message, "attempt failed");
            }
            let facts = AttemptFacts {
                attempt,
                started_at,
                finished_at: Utc::now(),
                policy: &policy,
                random: self.random(),
            };
            let (attempt, transition) = settle(end, &facts);
            let commit = Commit {
                task,
                generation,
                attempt,
                transition,
            };
            match self.shared.store.commit(commit).await {
                Ok(_) => Ok(Finished::Committed),
                Err(Error::LeaseLost { task, generation }) => {
                    tracing::warn!(%task, generation, "claim lost before commit; result discarded");
                    Ok(Finished::Discarded)
                }
                Err(e) => Err(e),
            }
        }
        .instrument(span)
        .await
    }
}

/// Runs one attempt of `stage`, turning an `Err`, a timeout or a panic into
/// a failed attempt.
async fn run_guarded<W: WorkItem>(
    stage: &dyn Stage<W>,
    item: &W,
    ctx: &mut StageContext,
    timeout: Option<Duration>,
) -> AttemptEnd {
    let run = CatchUnwind(stage.run(item, ctx));
    let caught = match timeout {
        None => run.await,
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(caught) => caught,
            Err(_) => {
                return AttemptEnd::Error {
                    result: AttemptResult::TimedOut,
                    message: format!("timed out after {limit:?}"),
                };
            }
        },
    };
    match caught {
        Ok(Ok(outcome)) => AttemptEnd::Outcome(outcome),
        Ok(Err(error)) => AttemptEnd::Error {
            result: AttemptResult::Error,
            message: describe(&error),
        },
        Err(panic) => AttemptEnd::Error {
            result: AttemptResult::Panicked,
            message: format!("panicked: {}", panic_message(panic)),
        },
    }
}

/// Polls a future, catching a panic in it as an `Err` with the panic payload.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = std::result::Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
/// An error and its chain of sources, joined with `: `.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => (*text).to_owned(),
            Err(_) => "a non-string panic payload".to_owned(),
        },
    }
}
