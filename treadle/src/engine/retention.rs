//! Retention: removing items that finished for good, on request
//! ([`Engine::prune`]) or by itself in a long-running [`Engine::run`]
//! ([`super::EngineConfig::retention`]).

use std::time::{Duration, Instant};

use super::Engine;
use crate::error::Result;
use crate::item::WorkItem;
use crate::store::{Pruned, Store, cutoff, prune_all};

/// The most items one prune transaction removes: small enough that the
/// workers' transitions queued behind it wait only briefly.
pub const PRUNE_BATCH: usize = 256;

/// How long a long-running worker with retention waits between batches
/// once a batch came back short of [`PRUNE_BATCH`].
const RETENTION_PAUSE: Duration = Duration::from_secs(10);

impl<W: WorkItem, S: Store> Engine<W, S> {
    /// Removes every item that finished for good more than `older_than` ago
    /// (completed; cancelled; or failed with no stage left that could run
    /// without an operator: see [`crate::rules::retention`]), with its stage
    /// rows, subtasks, attempts, review decisions, queue entries and
    /// events. Works in batches of [`PRUNE_BATCH`] items, each its own short
    /// transaction, so workers go on between batches; items in flight are
    /// never touched. Returns what was removed. Followers of the event log
    /// learn of removed events from [`Store::pruned_through`].
    pub async fn prune(&self, older_than: Duration) -> Result<Pruned> {
        prune_all(&self.shared.store, cutoff(older_than), PRUNE_BATCH).await
    }
}

/// When a long-running worker prunes next, and how old is old enough.
pub(super) struct Retention {
    older_than: Duration,
    next: Instant,
}

impl Retention {
    /// The schedule for a worker that runs until shut down (`forever`)
    /// with `retention` configured; `None` otherwise.
    pub(super) fn schedule(forever: bool, retention: Option<Duration>) -> Option<Self> {
        Some(Retention {
            older_than: retention.filter(|_| forever)?,
            next: Instant::now(),
        })
    }

    /// Prunes one batch if one is due. A full batch makes the next one due
    /// at once (the run loop claims work in between); a short one waits
    /// [`RETENTION_PAUSE`].
    pub(super) async fn tick<W: WorkItem, S: Store>(
        &mut self,
        engine: &Engine<W, S>,
    ) -> Result<()> {
        if Instant::now() < self.next {
            return Ok(());
        }
        let pruned = engine
            .shared
            .store
            .prune(cutoff(self.older_than), PRUNE_BATCH)
            .await?;
        if pruned.items > 0 {
            tracing::info!(
                items = pruned.items,
                events = pruned.events,
                "retention removed finished items"
            );
        }
        let pause = if pruned.more {
            Duration::ZERO
        } else {
            RETENTION_PAUSE
        };
        self.next = Instant::now() + pause;
        Ok(())
    }
}
