//! Retention: finding items that finished for good before a cutoff,
//! removing them with everything that refers to them, and giving the freed
//! pages back.
//!
//! A prune is two steps. A read picks candidates by SQL (items submitted
//! before the cutoff, oldest first, none of whose stages can still run or
//! changed after the cutoff), off the writer thread. Then one writer job
//! loads each candidate's rows, lets [`retention::prunable`] decide, and
//! deletes the item's rows in the group commit it joins: a bounded batch,
//! so workers' transitions wait for at most one batch.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use super::codec;
use super::rows::{self, Outputs, Subtasks};
use crate::error::Result;
use crate::rules::retention;
use crate::store::Pruned;

/// Pages handed back to the file system after a prune, at most: the pages
/// one batch frees, with room to spare.
const VACUUM_PAGES: u32 = 4_096;

/// The ids of up to `batch` items that may have finished for good before
/// `cutoff`, oldest submission first. The rule has the last word.
pub(crate) fn candidates(
    conn: &Connection,
    cutoff: DateTime<Utc>,
    batch: usize,
) -> Result<Vec<String>> {
    let mut statement = conn.prepare_cached(
        "SELECT id FROM items i
         WHERE submitted_at < +?1
           AND NOT EXISTS (
               SELECT 1 FROM stages s WHERE s.item_id = i.id AND (
                   s.state IN ('running', 'retry_scheduled', 'awaiting_review')
                   OR (s.state = 'pending' AND s.waiting = 0 AND i.cancelled = 0)
                   OR s.started_at >= +?1 OR s.finished_at >= +?1))
         ORDER BY submitted_at, seq LIMIT +?2",
    )?;
    let ids = statement
        .query_map(params![codec::time(cutoff), batch], |row| row.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(ids)
}

/// Removes those of `ids` that the rule finds finished for good before
/// `cutoff`, with all their rows, and raises the watermark of removed
/// events. Runs inside the writer's transaction.
pub(crate) fn remove(conn: &Connection, ids: &[String], cutoff: DateTime<Utc>) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    let mut removed = Vec::new();
    let mut through = 0u64;
    for id in ids {
        let Some(loaded) = rows::load_item(conn, id, Subtasks::None, Outputs::Lenient)? else {
            continue;
        };
        if !retention::prunable(&loaded.record, cutoff) {
            continue;
        }
        let last: Option<u64> = conn
            .prepare_cached("SELECT max(seq) FROM events WHERE item_seq = +?1")?
            .query_row([loaded.seq], |row| row.get(0))?;
        through = through.max(last.unwrap_or(0));
        let events = conn
            .prepare_cached("DELETE FROM events WHERE item_seq = ?1")?
            .execute([loaded.seq])?;
        pruned.events += events as u64;
        for sql in [
            "DELETE FROM attempts WHERE stage_id IN (SELECT id FROM stages WHERE item_id = ?1)",
            "DELETE FROM review_decisions WHERE item_id = ?1",
            "DELETE FROM subtasks WHERE item_id = ?1",
            "DELETE FROM stages WHERE item_id = ?1",
            "DELETE FROM items WHERE id = ?1",
        ] {
            conn.prepare_cached(sql)?.execute([id])?;
        }
        pruned.items += 1;
        removed.push(id.as_str());
    }
    if removed.is_empty() {
        return Ok(pruned);
    }
    // The queues have no index by item: one pass each for the whole batch.
    let removed = codec::json(&removed, "the pruned item ids")?;
    for sql in [
        "DELETE FROM run_queue WHERE item_id IN (SELECT value FROM json_each(?1))",
        "DELETE FROM scheduled WHERE item_id IN (SELECT value FROM json_each(?1))",
    ] {
        conn.prepare_cached(sql)?.execute([&removed])?;
    }
    conn.prepare_cached("UPDATE pruned_events SET through = max(through, ?1)")?
        .execute([through])?;
    Ok(pruned)
}

/// Hands up to [`VACUUM_PAGES`] free pages back to the file system.
pub(crate) fn vacuum(conn: &Connection) -> Result<()> {
    let mut statement =
        conn.prepare_cached(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"))?;
    // The pragma frees one page per row it returns: step it to the end.
    let mut freed = statement.query([])?;
    while freed.next()?.is_some() {}
    Ok(())
}

/// The prune watermark (see [`crate::store::Store::pruned_through`]).
pub(crate) fn pruned_through(conn: &Connection) -> Result<u64> {
    let through = conn
        .prepare_cached("SELECT through FROM pruned_events WHERE id = 1")?
        .query_row([], |row| row.get(0))?;
    Ok(through)
}
