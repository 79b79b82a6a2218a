//! Retention on PostgreSQL: candidates picked by SQL, the final word per
//! item from [`retention::prunable`] on its locked rows, and one short
//! transaction per batch that removes the items with everything that
//! refers to them and raises the prune watermark.

use chrono::{DateTime, Utc};

use super::conn::Db;
use super::load::{self, Lock};
use crate::error::Result;
use crate::rules::retention;
use crate::store::Pruned;

/// Prunes up to `batch` items that finished for good before `cutoff`.
/// Items other transactions hold are skipped (a later batch takes them).
pub(super) async fn prune(db: Db<'_>, cutoff: DateTime<Utc>, batch: usize) -> Result<Pruned> {
    let limit = i64::try_from(batch).unwrap_or(i64::MAX);
    let candidates: Vec<String> = db
        .query(
            "SELECT id FROM items i
             WHERE submitted_at < $1
               AND NOT EXISTS (
                   SELECT 1 FROM stages s WHERE s.item_id = i.id AND (
                       s.state IN ('running', 'retry_scheduled', 'awaiting_review')
                       OR (s.state = 'pending' AND s.waiting = 0 AND NOT i.cancelled)
                       OR s.started_at >= $1 OR s.finished_at >= $1))
             ORDER BY submitted_at, seq LIMIT $2",
            &[&cutoff, &limit],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let loaded = load::items(db, &candidates, Lock::Skip).await?;
    let removed: Vec<String> = loaded
        .iter()
        .filter(|l| retention::prunable(&l.record, cutoff))
        .map(|l| l.record.id.clone())
        .collect();
    if removed.is_empty() {
        return Ok(Pruned::default());
    }
    let through: i64 = db
        .query(
            "SELECT coalesce(max(seq), 0) FROM events WHERE item_id = ANY($1)",
            &[&removed],
        )
        .await?[0]
        .get(0);
    let events = db
        .execute("DELETE FROM events WHERE item_id = ANY($1)", &[&removed])
        .await?;
    for sql in [
        "DELETE FROM attempts WHERE item_id = ANY($1)",
        "DELETE FROM review_decisions WHERE item_id = ANY($1)",
        "DELETE FROM subtasks WHERE item_id = ANY($1)",
        "DELETE FROM run_queue WHERE item_id = ANY($1)",
        "DELETE FROM scheduled WHERE item_id = ANY($1)",
        "DELETE FROM stages WHERE item_id = ANY($1)",
        "DELETE FROM items WHERE id = ANY($1)",
    ] {
        db.execute(sql, &[&removed]).await?;
    }
    db.execute(
        "UPDATE pruned_events SET through = greatest(through, $1)",
        &[&through],
    )
    .await?;
    Ok(Pruned {
        items: removed.len() as u64,
        events,
        more: candidates.len() == batch,
    })
}

/// The prune watermark (see [`crate::store::Store::pruned_through`]).
pub(super) async fn pruned_through(db: Db<'_>) -> Result<u64> {
    let through: i64 = db
        .query("SELECT through FROM pruned_events WHERE id = 1", &[])
        .await?[0]
        .get(0);
    Ok(u64::try_from(through).unwrap_or(0))
}
