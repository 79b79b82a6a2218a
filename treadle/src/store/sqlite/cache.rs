//! The writer's cache of the items it wrote last, so that the next
//! transition of an item in flight (its claim after it was submitted, its
//! commit after its claim) starts from the rows in hand instead of loading
//! them again.
//!
//! A cached record is exactly what the database holds, because every change
//! to it goes through the writer and is kept only once it succeeded:
//!
//! - a transition takes its item's record out of the cache and puts it back
//!   only after its rule ran and its rows were written, so a refused or
//!   failed transition leaves nothing behind;
//! - a rolled-back transaction (a job failing after it wrote, a failed
//!   `COMMIT`) and any write that bypasses the rules (a prune, released
//!   claims) empty the cache;
//! - an item is kept only while it has work in flight, and only while the
//!   cache has room;
//! - another connection's commit (another process sharing the file, or the
//!   CLI) changes `PRAGMA data_version`, which each group commit checks
//!   right after it took the write lock, and empties the cache.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

use rusqlite::Connection;

use super::rows::Loaded;
use crate::fast_hash::FastSet;
use crate::rules::ItemRecord;
use crate::state::StageState;

/// How many items with a stage ready to be claimed the cache holds at
/// most. Once full it admits no other such item until one it holds leaves
/// (it is claimed, finishes or parks): work is claimed in the order it was
/// queued, so with more items waiting than this, the cache serves the same
/// ones every time instead of evicting each before its next claim, and
/// about this many of every backlog's claims start from memory; the others
/// load their item (some 40,000 instructions each). A linear item costs
/// the cache about 0.85 KB (the bench's 20,000 linear items: peak RSS
/// 26 MB with room for 8,192, 36 MB with this), so a full cache is some
/// 28 MB.
const READY_CAPACITY: usize = 32_768;

/// How many items with running work (claimed, so their commit comes next)
/// the cache holds at most, besides the ready ones.
const RUNNING_CAPACITY: usize = 4096;

/// Items by id, as last written by the writer.
#[derive(Default)]
pub(crate) struct ItemCache {
    /// Each item, found by its id (the record's own: no copy is kept).
    items: FastSet<Cached>,
    /// How many of `items` have running work.
    running: usize,
    /// `PRAGMA data_version` when the cache was last known to be current.
    data_version: Option<i64>,
}

impl ItemCache {
    /// Called once the writer holds the write lock: forgets everything if
    /// another connection committed since the last check.
    pub(crate) fn check(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let version: i64 = conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |row| row.get(0))?;
        if self.data_version != Some(version) {
            self.clear();
            self.data_version = Some(version);
        }
        Ok(())
    }

    /// Forgets every item (after a rollback, or a write outside the rules).
    pub(crate) fn clear(&mut self) {
        self.items.clear();
        self.running = 0;
    }

    /// Takes the record of `item_id` out of the cache, if it is there.
    pub(crate) fn take(&mut self, item_id: &str) -> Option<Loaded> {
        let Cached { loaded, running } = self.items.take(item_id)?;
        self.running -= usize::from(running);
        Some(loaded)
    }

    /// Keeps a record just written, if the item has work in flight and the
    /// cache room for it. Any other item (finished, cancelled, awaiting a
    /// review or a retry's time) is not kept: nothing runs it again soon.
    pub(crate) fn keep(&mut self, loaded: Loaded) {
        let flight = in_flight(&loaded.record);
        let room = match flight {
            None => false,
            Some(Flight::Running) => self.running < RUNNING_CAPACITY,
            Some(Flight::Ready) => self.items.len() - self.running < READY_CAPACITY,
        };
        if !room {
            return;
        }
        let running = flight == Some(Flight::Running);
        self.running += usize::from(running);
        if let Some(was) = self.items.replace(Cached { loaded, running }) {
            // Not reached (a transition takes its item first), but counted right.
            self.running -= usize::from(was.running);
        }
    }
}

/// A cached item and whether it has running work; it hashes and compares
/// as its id, so the set finds it by an `&str`.
struct Cached {
    /// The item's rows.
    loaded: Loaded,
    /// Whether it has running work.
    running: bool,
}

impl Borrow<str> for Cached {
    fn borrow(&self) -> &str {
        &self.loaded.record.id
    }
}

impl Hash for Cached {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Borrow::<str>::borrow(self).hash(state);
    }
}

impl PartialEq for Cached {
    fn eq(&self, other: &Self) -> bool {
        self.loaded.record.id == other.loaded.record.id
    }
}

impl Eq for Cached {}

/// Work an item has in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flight {
    /// A stage or subtask is running: its end is written next.
    Running,
    /// Nothing runs, a stage is ready to be claimed.
    Ready,
}

/// What the item has in flight, if anything.
fn in_flight(record: &ItemRecord) -> Option<Flight> {
    if record.cancelled {
        return None;
    }
    let states = || record.stages.iter().map(|s| (s.unit.state, s.waiting));
    if states().any(|(state, _)| state == StageState::Running) {
        Some(Flight::Running)
    } else if states().any(|(state, waiting)| state == StageState::Pending && waiting == 0) {
        Some(Flight::Ready)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::StageRecord;

    fn loaded(id: &str, state: StageState) -> Loaded {
        let mut stage = StageRecord::new("s", 0, 0);
        stage.unit.state = state;
        Loaded {
            seq: 1,
            record: ItemRecord {
                id: id.to_owned(),
                version: 1,
                payload: "{}".into(),
                submitted_at: chrono::Utc::now(),
                cancelled: false,
                stages: vec![stage, StageRecord::new("t", 1, 1)],
                unreadable_outputs: Vec::new(),
            },
            stage_ids: vec![1, 2],
        }
    }

    #[test]
    fn a_full_cache_keeps_what_it_holds_and_admits_nothing_more() {
        let mut cache = ItemCache::default();
        for n in 0..READY_CAPACITY {
            cache.keep(loaded(&format!("i{n}"), StageState::Pending));
        }
        cache.keep(loaded("late", StageState::Pending));
        assert!(cache.take("late").is_none(), "no room for it");
        // A claimed item has room of its own: its commit comes next.
        let mut claimed = cache.take("i0").expect("held");
        claimed.record.stages[0].unit.state = StageState::Running;
        cache.keep(claimed);
        cache.keep(loaded("late", StageState::Running));
        for n in 0..RUNNING_CAPACITY {
            cache.keep(loaded(&format!("r{n}"), StageState::Running));
        }
        assert!(cache.take("r0").is_some());
        assert!(cache.take(&format!("r{}", RUNNING_CAPACITY - 1)).is_none());
        let mut committed = cache.take("i0").expect("held while running");
        committed.record.stages[0].unit.state = StageState::Completed;
        committed.record.stages[1].waiting = 0;
        cache.keep(committed);
        assert!(cache.take("i0").is_some(), "back in the room it left");
        let mut committed = cache.take("late").expect("held while running");
        committed.record.stages[0].unit.state = StageState::Completed;
        committed.record.stages[1].waiting = 0;
        cache.keep(committed);
        assert!(cache.take("late").is_some(), "ready, once there was room");
        cache.clear();
        assert_eq!((cache.items.len(), cache.running), (0, 0));
    }

    #[test]
    fn only_items_with_work_in_flight_are_kept() {
        let mut cache = ItemCache::default();
        for (state, kept) in [
            (StageState::Running, true),
            (StageState::Pending, true),
            (StageState::AwaitingReview, false),
            (StageState::RetryScheduled, false),
            (StageState::Failed, false),
            (StageState::Completed, false),
        ] {
            cache.keep(loaded("i", state));
            assert_eq!(cache.take("i").is_some(), kept, "{state:?}");
        }
        let mut cancelled = loaded("i", StageState::Running);
        cancelled.record.cancelled = true;
        cache.keep(cancelled);
        assert!(cache.take("i").is_none());
    }
}
