//! What a prune reports, and pruning a store down to a cutoff in bounded
//! steps: the loop the engine and operators' tools share.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Store;
use crate::error::Result;

/// What one [`Store::prune`] call (or [`prune_all`]) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    /// Items removed, each with its stage rows, subtasks, attempts, review
    /// decisions, queue entries and events.
    pub items: u64,
    /// Events removed with them.
    pub events: u64,
    /// Whether another call with the same cutoff may remove more: the call
    /// stopped at its batch size (or, for a store that looks at a bounded
    /// share of its items per call, before it looked at all of them).
    pub more: bool,
}

impl Pruned {
    /// The sum of two prunes (`more` from the later one).
    pub fn and(self, later: Pruned) -> Pruned {
        Pruned {
            items: self.items + later.items,
            events: self.events + later.events,
            more: later.more,
        }
    }
}

/// The instant `older_than` before now; the earliest representable instant
/// if that is further back (then nothing is old enough to prune).
pub fn cutoff(older_than: Duration) -> DateTime<Utc> {
    chrono::TimeDelta::from_std(older_than)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Prunes everything that finished for good before `finished_before`, in
/// calls of at most `batch` items (each its own short transaction), while
/// [`Pruned::more`]; yields between calls so other tasks go on.
pub async fn prune_all<S: Store + ?Sized>(
    store: &S,
    finished_before: DateTime<Utc>,
    batch: usize,
) -> Result<Pruned> {
    let mut total = Pruned::default();
    loop {
        let step = store.prune(finished_before, batch).await?;
        total = total.and(step);
        if !step.more {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}
