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
//! - another connection's commit (another process sharing the file, or the
//!   CLI) changes `PRAGMA data_version`, which each group commit checks
//!   right after it took the write lock, and empties the cache.

use rusqlite::Connection;

use super::rows::Loaded;
use crate::fast_hash::FastMap;

/// How many items the cache holds at most; reaching it empties the cache
/// (the items in flight come back on their next transition).
const CAPACITY: usize = 8192;

/// Items by id, as last written by the writer.
#[derive(Default)]
pub(crate) struct ItemCache {
    items: FastMap<String, Loaded>,
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
    }

    /// Takes the record of `item_id` out of the cache, if it is there.
    pub(crate) fn take(&mut self, item_id: &str) -> Option<Loaded> {
        self.items.remove(item_id)
    }

    /// Keeps a record just written. A finished item is not kept: nothing
    /// runs it again unless an operator asks.
    pub(crate) fn keep(&mut self, loaded: Loaded) {
        if loaded.record.cancelled || loaded.record.all_done() {
            return;
        }
        if self.items.len() >= CAPACITY {
            self.clear();
        }
        self.items.insert(loaded.record.id.clone(), loaded);
    }
}
