//! Loading an item's rows into the rules' [`ItemRecord`]: the item, every
//! stage row of its version, and the subtask rows a transition needs.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Row;

use super::conn::Db;

use super::codec::{self, Loc, UNIT_COLUMNS, UNIT_WIDTH};
use crate::error::Result;
use crate::rules::{FanOut, ItemRecord, StageRecord, UnitRecord, UnitRef};
use crate::status::AttemptRecord;

/// How rows are read: to look at, or locked for a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lock {
    /// Plain read.
    None,
    /// Lock the item rows, waiting for other writers.
    Wait,
    /// Lock the item rows that no other transaction holds; skip the rest.
    Skip,
}

/// A loaded item: its rows and its submission order.
#[derive(Debug, Clone)]
pub(super) struct Loaded {
    /// The rows, every stage; subtasks only as loaded.
    pub(super) record: ItemRecord,
    /// `items.seq`.
    pub(super) seq: i64,
}

/// Which subtask rows of one stage to load.
#[derive(Debug, Clone)]
pub(super) enum Subtasks<'a> {
    /// Every one.
    All,
    /// The one of this name.
    Named(&'a str),
}

/// Decodes the stage row whose columns ([`UNIT_COLUMNS`], `waiting,
/// review, fan_total, fan_open, fan_failed, edits_to_check`) start at
/// column `at`.
fn stage(loc: &Loc, row: &Row, at: usize) -> Result<StageRecord> {
    let unit = codec::unit(loc, row, at)?;
    let extra = at + UNIT_WIDTH;
    let total: Option<u32> = loc.count_opt(row, extra + 2, "fan_total")?;
    let fan_out = match total {
        None => None,
        Some(total) => Some(Box::new(FanOut {
            total,
            open: loc.count(row, extra + 3, "fan_open")?,
            failed: loc.count(row, extra + 4, "fan_failed")?,
            rows: Vec::new(),
            complete: total == 0,
        })),
    };
    Ok(StageRecord {
        waiting: loc.count(row, extra, "waiting")?,
        review: loc.json_opt(row, extra + 1, "review")?.map(Box::new),
        fan_out,
        edits_to_check: loc.get(row, extra + 5, "edits_to_check")?,
        unit,
    })
}

/// The statement that reads the item rows `$1` (and per `lock`, locks
/// them, in id order). The stage rows are read by a statement of their own
/// ([`stages_sql`]) after it, in the same pipeline: under READ COMMITTED
/// that one reads them as the previous holder of a lock committed them (a
/// join in the locking statement would read them as of before the wait).
pub(super) fn items_sql(lock: Lock) -> &'static str {
    match lock {
        Lock::None => {
            "SELECT id, seq, version, payload, submitted_at, cancelled FROM items
             WHERE id = ANY($1)"
        }
        Lock::Wait => {
            "SELECT id, seq, version, payload, submitted_at, cancelled FROM items
             WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE"
        }
        Lock::Skip => {
            "SELECT id, seq, version, payload, submitted_at, cancelled FROM items
             WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE SKIP LOCKED"
        }
    }
}

/// The statement that reads every stage row of the items `$1`.
pub(super) fn stages_sql() -> String {
    format!(
        "SELECT {UNIT_COLUMNS}, waiting, review, fan_total, fan_open, fan_failed,
            edits_to_check, item_id
         FROM stages WHERE item_id = ANY($1)"
    )
}

/// Loads (and, per `lock`, locks, in id order) the items `ids` with every
/// stage row, in one round trip; see [`decode_items`]. Unknown ids are
/// left out.
pub(super) async fn items(db: Db<'_>, ids: &[String], lock: Lock) -> Result<Vec<Loaded>> {
    let stages = stages_sql();
    let rows = db
        .pipeline(&[(items_sql(lock), &[&ids]), (&stages, &[&ids])])
        .await?;
    match &rows[..] {
        [items, stages] => decode_items(items, stages),
        _ => Ok(Vec::new()),
    }
}

/// Decodes the rows of [`items_sql`] and [`stages_sql`]: fanned-out stages
/// come with their counters and no subtask rows (`complete` only for an
/// empty fan-out). Stage rows of items not among `item_rows` (skipped
/// locks) are passed over.
pub(super) fn decode_items(item_rows: &[Row], stage_rows: &[Row]) -> Result<Vec<Loaded>> {
    let mut loaded = Vec::with_capacity(item_rows.len());
    let mut index = HashMap::with_capacity(item_rows.len());
    for row in item_rows {
        let id: String = row.get(0);
        let loc = Loc::new("items", format!("id={id}"));
        let payload: String = loc.get(row, 3, "payload")?;
        serde_json::from_str::<serde::de::IgnoredAny>(&payload)
            .map_err(|e| loc.corrupt("payload", format!("invalid JSON: {e}")))?;
        index.insert(id.clone(), loaded.len());
        loaded.push(Loaded {
            seq: loc.get(row, 1, "seq")?,
            record: ItemRecord {
                version: loc.count(row, 2, "version")?,
                payload: Arc::from(payload),
                submitted_at: loc.get(row, 4, "submitted_at")?,
                cancelled: loc.get(row, 5, "cancelled")?,
                stages: Vec::new(),
                // Outputs are decoded strictly here: a corrupt one is an
                // error of the transition that loads it.
                unreadable_outputs: Vec::new(),
                id,
            },
        });
    }
    for row in stage_rows {
        let item: &str = row.get(UNIT_WIDTH + 6);
        let Some(&at) = index.get(item) else {
            continue;
        };
        let name: &str = row.get(0);
        let loc = Loc::new("stages", format!("item={item}, stage={name}"));
        let stage = stage(&loc, row, 0)?;
        loaded[at].record.stages.push(stage);
    }
    for item in &mut loaded {
        let stages = &mut item.record.stages;
        stages.sort_by_key(|s| s.unit.position);
        if let Some((i, s)) = stages
            .iter()
            .enumerate()
            .find(|(i, s)| s.unit.position as usize != *i)
        {
            let loc = Loc::new(
                "stages",
                format!("item={}, stage={}", item.record.id, s.unit.name),
            );
            return Err(loc.corrupt("position", format!("expected position {i}")));
        }
    }
    Ok(loaded)
}

/// Subtask rows picked one by one, each by its item, stage and name
/// (`$1`, `$2`, `$3`), with the item and stage after the unit's columns;
/// one index lookup per key.
pub(super) fn subtasks_named_sql() -> String {
    keyed_subtasks_sql("name = k.which", "text")
}

/// Subtask rows picked one by one, each by its item, stage and position
/// (`$1`, `$2`, `$3`), as [`subtasks_named_sql`].
pub(super) fn subtasks_at_sql() -> String {
    keyed_subtasks_sql("position = k.which", "int8")
}

fn keyed_subtasks_sql(which: &str, kind: &str) -> String {
    // LIMIT keeps the subquery a lookup per key (it cannot be flattened
    // into a join the planner might run as a scan of the table).
    format!(
        "SELECT s.* FROM unnest($1::text[], $2::text[], $3::{kind}[]) AS k(item, stage, which)
         CROSS JOIN LATERAL (
            SELECT {UNIT_COLUMNS}, item_id, stage FROM subtasks
            WHERE item_id = k.item AND stage = k.stage AND {which} LIMIT 1) s"
    )
}

/// Decodes the rows of [`subtasks_named_sql`] or [`subtasks_at_sql`]:
/// each unit with its item and stage.
pub(super) fn decode_keyed_subtasks(rows: &[Row]) -> Result<Vec<(String, String, UnitRecord)>> {
    rows.iter()
        .map(|row| {
            let item: String = row.get(UNIT_WIDTH);
            let stage: String = row.get(UNIT_WIDTH + 1);
            let name: &str = row.get(0);
            let loc = Loc::new(
                "subtasks",
                format!("item={item}, stage={stage}, subtask={name}"),
            );
            let unit = codec::unit(&loc, row, 0)?;
            Ok((item, stage, unit))
        })
        .collect()
}

/// The subtask rows of `stage` of `item` that `which` names, by position.
pub(super) async fn subtasks(
    db: Db<'_>,
    item: &str,
    stage: &str,
    which: Subtasks<'_>,
) -> Result<Vec<UnitRecord>> {
    let base = format!("SELECT {UNIT_COLUMNS} FROM subtasks WHERE item_id = $1 AND stage = $2");
    let rows = match which {
        Subtasks::All => {
            db.query(&format!("{base} ORDER BY position"), &[&item, &stage])
                .await?
        }
        Subtasks::Named(name) => {
            db.query(&format!("{base} AND name = $3"), &[&item, &stage, &name])
                .await?
        }
    };
    rows.iter()
        .map(|row| {
            let name: &str = row.get(0);
            let loc = Loc::new(
                "subtasks",
                format!("item={item}, stage={stage}, subtask={name}"),
            );
            codec::unit(&loc, row, 0)
        })
        .collect()
}

/// Loads every subtask row of every fanned-out stage of `record`.
pub(super) async fn all_subtasks(db: Db<'_>, record: &mut ItemRecord) -> Result<()> {
    for position in 0..record.stages.len() {
        let complete = record.stages[position]
            .fan_out
            .as_ref()
            .is_none_or(|f| f.complete);
        if complete {
            continue;
        }
        let stage = record.stages[position].unit.name.clone();
        let rows = subtasks(db, &record.id, &stage, Subtasks::All).await?;
        let fan = record.stages[position]
            .fan_out
            .as_mut()
            .expect("checked above");
        if rows.len() != fan.total as usize
            || rows
                .iter()
                .enumerate()
                .any(|(i, r)| r.position as usize != i)
        {
            let loc = Loc::new("stages", format!("item={}, stage={stage}", record.id));
            return Err(loc.corrupt(
                "fan_total",
                format!("{} subtasks expected, rows do not match", fan.total),
            ));
        }
        fan.rows = rows;
        fan.complete = true;
    }
    Ok(())
}

/// The attempt history of `record`, oldest first, filed under its units.
pub(super) async fn attempts(
    db: Db<'_>,
    record: &ItemRecord,
) -> Result<Vec<(UnitRef, AttemptRecord)>> {
    let rows = db
        .query(
            "SELECT id, stage, subtask, attempt, started_at, finished_at, result, error
             FROM attempts WHERE item_id = $1 ORDER BY id",
            &[&record.id],
        )
        .await?;
    let mut history = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i64 = row.get(0);
        let loc = Loc::new("attempts", format!("id={id}"));
        let stage: &str = loc.get(row, 1, "stage")?;
        let Some(stage) = record.stage_position(stage) else {
            continue; // history of a stage the item's version no longer has
        };
        let unit = UnitRef {
            stage,
            subtask: loc.count_opt(row, 2, "subtask")?,
        };
        history.push((
            unit,
            AttemptRecord {
                attempt: loc.count(row, 3, "attempt")?,
                started_at: loc.get(row, 4, "started_at")?,
                finished_at: loc.get(row, 5, "finished_at")?,
                result: loc.parse(row, 6, "result")?,
                error: loc.get(row, 7, "error")?,
            },
        ));
    }
    Ok(history)
}
