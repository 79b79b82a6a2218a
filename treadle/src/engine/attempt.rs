//! One attempt of a claimed unit of work, from claim to settled end: decode
//! the item, run the stage under its timeout, turn an `Err`, a timeout or a
//! panic into a failed attempt, and settle the end by the stage's policy
//! into the record and transition to commit. Nothing here writes to the
//! store; the run loop ([`super::executor`]) commits what this returns.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::settle::{AttemptEnd, AttemptFacts, settle};
use crate::context::{AttemptUnit, StageContext};
use crate::error::Error;
use crate::item::WorkItem;
use crate::outcome::StageOutcome;
use crate::stage::{Stage, StagePolicy};
use crate::state::AttemptResult;
use crate::status::AttemptRecord;
use crate::store::{Claim, Commit, Transition};

/// A claimed unit of work about to run: the claim, with its unit shared
/// between the attempt, its context and the engine's running-work registry.
pub(super) struct Attempt {
    pub(super) unit: Arc<AttemptUnit>,
    pub(super) attempt: u32,
    pub(super) generation: u64,
    started_at: DateTime<Utc>,
    payload: Arc<str>,
    outputs: BTreeMap<String, Value>,
    /// The pipeline version the item moves on.
    version: u32,
    /// Attempts of this run that workers abandoned mid-attempt.
    crashes: u32,
    /// Why the unit fails without running (see [`Claim::cannot_run`]).
    cannot_run: Option<String>,
    /// Approved edits to check instead of running the stage.
    edits_to_check: Option<Value>,
}

impl From<Claim> for Attempt {
    fn from(claim: Claim) -> Self {
        Attempt {
            unit: AttemptUnit::new(claim.task),
            attempt: claim.attempt,
            generation: claim.generation,
            started_at: claim.started_at,
            payload: claim.payload,
            outputs: claim.outputs,
            version: claim.version,
            crashes: claim.crashes,
            cannot_run: claim.cannot_run,
            edits_to_check: claim.edits_to_check,
        }
    }
}

/// An attempt that has ended, settled by its stage's policy: what to commit.
pub(super) struct Settled {
    /// The unit of work (perhaps still shared with the running-work
    /// registry).
    pub(super) unit: Arc<AttemptUnit>,
    /// The generation of the claim the attempt ran under.
    pub(super) generation: u64,
    /// The record to append to the attempt history.
    pub(super) record: AttemptRecord,
    /// The unit's next state.
    pub(super) transition: Transition,
}

impl Settled {
    /// The commit of this end; it takes the key without a copy when no one
    /// else holds it any more.
    pub(super) fn into_commit(self) -> Commit {
        Commit {
            task: Arc::try_unwrap(self.unit)
                .map_or_else(|shared| shared.key.clone(), |unit| unit.key),
            generation: self.generation,
            attempt: self.record,
            transition: self.transition,
        }
    }
}

/// The pipeline's stages as one run loop hands them to its attempts: each
/// loop has its own table, so the loops of a store's lanes, running in
/// parallel, never share the reference count an attempt takes.
pub(super) type StageTable<W> = Arc<[Arc<dyn Stage<W>>]>;

/// One stage of a [`StageTable`].
pub(super) struct StageRef<W: WorkItem> {
    table: StageTable<W>,
    index: usize,
}

impl<W: WorkItem> StageRef<W> {
    /// Stage `index` of `table` (which must have it).
    pub(super) fn new(table: StageTable<W>, index: usize) -> Self {
        debug_assert!(index < table.len());
        StageRef { table, index }
    }
}

impl<W: WorkItem> std::ops::Deref for StageRef<W> {
    type Target = dyn Stage<W>;

    fn deref(&self) -> &Self::Target {
        &*self.table[self.index]
    }
}

/// What an attempt needs from the engine besides its claim.
pub(super) struct AttemptSettings<W: WorkItem> {
    /// The claimed stage as this build defines it; `None` if this build
    /// lacks it.
    pub(super) stage: Option<StageRef<W>>,
    /// The timeout of a stage whose policy sets none.
    pub(super) default_timeout: Option<Duration>,
    /// Uniform in `[0, 1)`, for backoff jitter.
    pub(super) random: f64,
}

/// An attempt about to run its stage, or already ended without running it.
enum Prepared<W: WorkItem> {
    /// The stage runs on the decoded item.
    Run {
        stage: StageRef<W>,
        item: W,
        ctx: StageContext,
    },
    /// Nothing runs: this is the attempt's end.
    Ended(AttemptEnd),
}

impl Attempt {
    /// Runs the attempt to its end and settles it. Never fails: whatever
    /// the stage does (or a missing stage, or an undecodable item) becomes
    /// the attempt's end.
    pub(super) async fn run<W: WorkItem>(self, settings: AttemptSettings<W>) -> Settled {
        let stage = settings.stage;
        let policy = stage.as_ref().map_or(StagePolicy::DEFAULT, |s| s.policy());
        let timeout = policy.timeout.or(settings.default_timeout);
        let unit = self.unit.clone();
        let (attempt, generation, started_at, crashes) =
            (self.attempt, self.generation, self.started_at, self.crashes);
        // Only what is needed once the stage ran is kept across its await.
        let end = match self.prepare(stage) {
            Prepared::Ended(end) => end,
            Prepared::Run {
                stage,
                item,
                mut ctx,
            } => run_guarded(&*stage, &item, &mut ctx, timeout).await,
        };
        if let AttemptEnd::Error { result, message } = &end {
            tracing::warn!(%result, error = %message, "attempt failed");
        }
        let facts = AttemptFacts {
            attempt,
            crashes,
            started_at,
            finished_at: Utc::now(),
            policy: &policy,
            random: settings.random,
        };
        let (record, transition) = settle(end, &facts);
        Settled {
            unit,
            generation,
            record,
            transition,
        }
    }

    /// Decodes the item and builds the stage's context, or says why the
    /// attempt ends without running its stage.
    fn prepare<W: WorkItem>(self, stage: Option<StageRef<W>>) -> Prepared<W> {
        let failed =
            |reason: String| Prepared::Ended(AttemptEnd::Outcome(StageOutcome::failed(reason)));
        let Some(stage) = stage else {
            return failed(
                Error::StageNotInBuild {
                    stage: String::from(&*self.unit.key.stage),
                    version: self.version,
                }
                .to_string(),
            );
        };
        if let Some(reason) = self.cannot_run {
            return failed(reason);
        }
        // Edits approved where the output type is unknown (the CLI):
        // checked here, by the stage that knows it.
        if let Some(edits) = self.edits_to_check {
            return Prepared::Ended(match stage.check_output(&edits) {
                Ok(()) => AttemptEnd::Outcome(StageOutcome::Complete {
                    output: Some(edits),
                }),
                Err(e) => AttemptEnd::EditsRefused {
                    reason: format!(
                        "the approved edits do not fit the output of stage `{}`: {}",
                        self.unit.key.stage,
                        e.with_causes()
                    ),
                },
            });
        }
        match serde_json::from_str::<W>(&self.payload) {
            Ok(item) => Prepared::Run {
                stage,
                item,
                ctx: StageContext::for_unit(self.unit, self.attempt).with_outputs(self.outputs),
            },
            // A poisoned item fails alone; after the row is repaired, a
            // retry runs it again.
            Err(e) => failed(
                Error::Corrupt {
                    location: format!("items(id={}).payload", self.unit.key.item_id),
                    detail: format!("cannot be decoded as the work item: {e}"),
                }
                .to_string(),
            ),
        }
    }
}

/// Runs one attempt of `stage`, turning an `Err`, a timeout or a panic into
/// a failed attempt.
///
/// A timeout can only stop a stage at an `.await`: a stage that blocks its
/// thread (CPU work, blocking I/O) runs on past it, which is why such work
/// belongs in `tokio::task::spawn_blocking`.
async fn run_guarded<W: WorkItem>(
    stage: &dyn Stage<W>,
    item: &W,
    ctx: &mut StageContext,
    timeout: Option<Duration>,
) -> AttemptEnd {
    let run = CatchUnwind(stage.run(item, ctx));
    let caught = match timeout {
        None => run.await,
        Some(limit) => match WithinLimit::new(run, limit).await {
            Some(caught) => caught,
            None => {
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
            message: error.with_causes().to_string(),
        },
        Err(panic) => AttemptEnd::Error {
            result: AttemptResult::Panicked,
            message: format!("panicked: {}", panic_message(panic)),
        },
    }
}

/// Polls a future for at most `limit` from its first poll (`None` once the
/// time is up). The timer is made only if the future waits: an attempt
/// that ends at its first poll never touches the runtime's timer (nor its
/// handle, which the lanes' threads would otherwise all share).
struct WithinLimit<F> {
    inner: F,
    limit: Duration,
    started: Option<tokio::time::Instant>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F> WithinLimit<F> {
    fn new(inner: F, limit: Duration) -> Self {
        WithinLimit {
            inner,
            limit,
            started: None,
            timer: None,
        }
    }
}

impl<F: Future + Unpin> Future for WithinLimit<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let started = *this.started.get_or_insert_with(tokio::time::Instant::now);
        if let Poll::Ready(output) = Pin::new(&mut this.inner).poll(cx) {
            return Poll::Ready(Some(output));
        }
        let limit = this.limit;
        let timer = this.timer.get_or_insert_with(|| {
            // A limit too far to represent never ends the attempt.
            let deadline = started.checked_add(limit).unwrap_or_else(far_future);
            Box::pin(tokio::time::sleep_until(deadline))
        });
        timer.as_mut().poll(cx).map(|()| None)
    }
}

/// About thirty years from now, as tokio's own far-off deadlines are.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365 * 30)
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

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => (*text).to_owned(),
            Err(_) => "a non-string panic payload".to_owned(),
        },
    }
}
