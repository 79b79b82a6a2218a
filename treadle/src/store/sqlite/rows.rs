//! Loading an item's rows into the records the rules work on, and saving
//! back what a rule changed.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::codec::{self, Loc};
use crate::error::Result;
use crate::review::{DecisionRecord, ReviewRequest, ReviewStatus};
use crate::rules::{Effects, FanOut, ItemRecord, Lease, StageRecord, UnitRecord, UnitRef};
use crate::status::AttemptRecord;

/// Which subtask rows to load with an item.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Subtasks<'a> {
    /// None: only the counters of each fan-out.
    None,
    /// The one subtask of stage `.0` named `.1`.
    One(&'a str, &'a str),
    /// Every subtask of every fanned-out stage.
    All,
}

/// An item's rows as loaded: its submission sequence number and its record.
pub(crate) struct Loaded {
    /// `items.seq`: submission order.
    pub(crate) seq: i64,
    /// The rows.
    pub(crate) record: ItemRecord,
}

/// Loads item `id` with every stage row and the subtask rows `subtasks`
/// asks for; `None` if there is no such item.
pub(crate) fn load_item(
    conn: &Connection,
    id: &str,
    subtasks: Subtasks<'_>,
) -> Result<Option<Loaded>> {
    let loc = Loc::item(id);
    let head = conn
        .prepare_cached(
            "SELECT seq, payload, submitted_at, cancelled, version FROM items WHERE id = ?1",
        )?
        .query_row([id], |row| {
            Ok((|| -> Result<(i64, String, _, bool, u32)> {
                let cancelled = match loc.get::<i64>(row, 3, "cancelled")? {
                    0 => false,
                    1 => true,
                    n => return Err(loc.corrupt("cancelled", format!("{n} is not 0 or 1"))),
                };
                Ok((
                    loc.get(row, 0, "seq")?,
                    loc.get(row, 1, "payload")?,
                    loc.time(row, 2, "submitted_at")?,
                    cancelled,
                    loc.count(row, 4, "version")?,
                ))
            })())
        })
        .optional()?
        .transpose()?;
    let Some((seq, payload, submitted_at, cancelled, version)) = head else {
        return Ok(None);
    };
    let mut statement = conn.prepare_cached(
        "SELECT stage, position, state, attempt, generation, started_at, finished_at,
                next_run_at, last_error, output, lease_owner, lease_expiry, waiting,
                review_round, review_request, review_requested_at,
                fan_total, fan_open, fan_failed
         FROM stages WHERE item_id = ?1 ORDER BY position",
    )?;
    let rows = statement.query_map([id], |row| Ok(stage_row(conn, id, row)))?;
    let mut stages = Vec::new();
    for row in rows {
        stages.push(row??);
    }
    if stages.is_empty() {
        return Err(loc.corrupt("stages", "the item has no stage rows"));
    }
    let mut record = ItemRecord {
        id: id.to_owned(),
        version,
        payload: payload.into(),
        submitted_at,
        cancelled,
        stages,
    };
    match subtasks {
        Subtasks::None => {}
        Subtasks::One(stage, name) => {
            if let Some(position) = record.stage_position(stage)
                && let Some(fan) = &mut record.stages[position].fan_out
            {
                fan.rows.extend(subtask_rows(conn, id, stage, Some(name))?);
            }
        }
        Subtasks::All => {
            for position in 0..record.stages.len() {
                let name = record.stages[position].unit.name.clone();
                if let Some(fan) = &mut record.stages[position].fan_out {
                    fan.rows = subtask_rows(conn, id, &name, None)?;
                    fan.complete = true;
                }
            }
        }
    }
    Ok(Some(Loaded { seq, record }))
}

fn stage_row(conn: &Connection, item_id: &str, row: &Row<'_>) -> Result<StageRecord> {
    let name: String = row.get(0)?;
    let loc = Loc::stage(item_id, &name);
    let unit = UnitRecord {
        position: loc.count(row, 1, "position")?,
        state: loc.parse(row, 2, "state")?,
        attempt: loc.count(row, 3, "attempt")?,
        generation: loc.count(row, 4, "generation")?,
        started_at: loc.time_opt(row, 5, "started_at")?,
        finished_at: loc.time_opt(row, 6, "finished_at")?,
        next_run_at: loc.time_opt(row, 7, "next_run_at")?,
        last_error: loc.get(row, 8, "last_error")?,
        output: loc.json_opt(row, 9, "output")?,
        lease: lease(&loc, row, 10)?,
        name: name.clone(),
    };
    let review = review(conn, &loc, row, 13, (item_id, &name))?;
    let total: Option<u32> = loc.count_opt(row, 16, "fan_total")?;
    let fan_out = match total {
        None => None,
        Some(total) => Some(FanOut {
            total,
            open: loc.count(row, 17, "fan_open")?,
            failed: loc.count(row, 18, "fan_failed")?,
            rows: Vec::new(),
            complete: total == 0,
        }),
    };
    Ok(StageRecord {
        unit,
        waiting: loc.count(row, 12, "waiting")?,
        review,
        fan_out,
    })
}

/// The review of a stage from its columns (`round`, request, requested at)
/// starting at `column`; `None` if it never asked.
pub(crate) fn review(
    conn: &Connection,
    loc: &Loc,
    row: &Row<'_>,
    column: usize,
    (item_id, stage): (&str, &str),
) -> Result<Option<ReviewStatus>> {
    let round: u64 = loc.count(row, column, "review_round")?;
    if round == 0 {
        return Ok(None);
    }
    let request: Option<ReviewRequest> = loc.json_opt(row, column + 1, "review_request")?;
    let requested_at = loc.time_opt(row, column + 2, "review_requested_at")?;
    let (Some(request), Some(requested_at)) = (request, requested_at) else {
        return Err(loc.corrupt(
            "review_request",
            format!("review round {round} has no request or request time"),
        ));
    };
    Ok(Some(ReviewStatus {
        round,
        request,
        requested_at,
        decision: decision(conn, item_id, stage, round)?,
    }))
}

/// The lease in columns `column` (owner) and `column + 1` (expiry).
fn lease(loc: &Loc, row: &Row<'_>, column: usize) -> Result<Option<Lease>> {
    let owner: Option<String> = loc.get(row, column, "lease_owner")?;
    let expiry = loc.time_opt(row, column + 1, "lease_expiry")?;
    Ok(match (owner, expiry) {
        (Some(owner), Some(expiry)) => Some(Lease { owner, expiry }),
        (None, None) => None,
        _ => return Err(loc.corrupt("lease_expiry", "a lease needs both owner and expiry")),
    })
}

/// The subtask rows of `stage` (only `name`, if given), by position.
pub(crate) fn subtask_rows(
    conn: &Connection,
    item_id: &str,
    stage: &str,
    name: Option<&str>,
) -> Result<Vec<UnitRecord>> {
    let mut statement = conn.prepare_cached(
        "SELECT name, position, state, attempt, generation, started_at, finished_at,
                next_run_at, last_error, output, lease_owner, lease_expiry
         FROM subtasks WHERE item_id = ?1 AND stage = ?2 AND (?3 IS NULL OR name = ?3)
         ORDER BY position",
    )?;
    let rows = statement.query_map(params![item_id, stage, name], |row| {
        Ok((|| -> Result<UnitRecord> {
            let name: String = row.get(0)?;
            let loc = Loc::subtask(item_id, stage, &name);
            Ok(UnitRecord {
                position: loc.count(row, 1, "position")?,
                state: loc.parse(row, 2, "state")?,
                attempt: loc.count(row, 3, "attempt")?,
                generation: loc.count(row, 4, "generation")?,
                started_at: loc.time_opt(row, 5, "started_at")?,
                finished_at: loc.time_opt(row, 6, "finished_at")?,
                next_run_at: loc.time_opt(row, 7, "next_run_at")?,
                last_error: loc.get(row, 8, "last_error")?,
                output: loc.json_opt(row, 9, "output")?,
                lease: lease(&loc, row, 10)?,
                name,
            })
        })())
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row??);
    }
    Ok(out)
}

/// The decision recorded for `round` of a stage's review, if any.
pub(crate) fn decision(
    conn: &Connection,
    item_id: &str,
    stage: &str,
    round: u64,
) -> Result<Option<DecisionRecord>> {
    let loc = Loc::row(
        "review_decisions",
        format!("item={item_id}, stage={stage}, round={round}"),
    );
    conn.prepare_cached(
        "SELECT kind, decided_by, decided_at, note, reason, edits FROM review_decisions
         WHERE item_id = ?1 AND stage = ?2 AND round = ?3",
    )?
    .query_row(params![item_id, stage, round], |row| {
        Ok((|| {
            Ok(DecisionRecord {
                kind: loc.parse(row, 0, "kind")?,
                by: loc.get(row, 1, "decided_by")?,
                at: loc.time(row, 2, "decided_at")?,
                note: loc.get(row, 3, "note")?,
                reason: loc.get(row, 4, "reason")?,
                edits: loc.json_opt(row, 5, "edits")?,
            })
        })())
    })
    .optional()?
    .transpose()
}

/// Every attempt of an item, in history order, filed by unit.
pub(crate) fn attempts(
    conn: &Connection,
    record: &ItemRecord,
) -> Result<Vec<(UnitRef, AttemptRecord)>> {
    let mut statement = conn.prepare_cached(
        "SELECT id, stage, subtask, attempt, started_at, finished_at, result, error
         FROM attempts WHERE item_id = ?1 ORDER BY id",
    )?;
    let rows = statement.query_map([&record.id], |row| {
        Ok((|| -> Result<Option<(UnitRef, AttemptRecord)>> {
            let id: i64 = row.get(0)?;
            let loc = Loc::row("attempts", format!("id={id}"));
            let key = crate::task::TaskKey {
                item_id: record.id.clone(),
                stage: loc.get(row, 1, "stage")?,
                subtask: loc.get(row, 2, "subtask")?,
            };
            let attempt = AttemptRecord {
                attempt: loc.count(row, 3, "attempt")?,
                started_at: loc.time(row, 4, "started_at")?,
                finished_at: loc.time(row, 5, "finished_at")?,
                result: loc.parse(row, 6, "result")?,
                error: loc.get(row, 7, "error")?,
            };
            Ok(record.locate(&key).map(|unit| (unit, attempt)))
        })())
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.extend(row??);
    }
    Ok(out)
}

/// Inserts the stage rows of a new item.
pub(crate) fn insert_stages(conn: &Connection, seq: i64, record: &ItemRecord) -> Result<()> {
    for stage in &record.stages {
        conn.prepare_cached(
            "INSERT INTO stages (item_id, stage, item_seq, position, state, waiting)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            record.id,
            stage.unit.name,
            seq,
            stage.unit.position,
            stage.unit.state.as_str(),
            stage.waiting
        ])?;
    }
    Ok(())
}

/// Saves what a rule did to `record` (loaded with `seq`; its stage names
/// before the rule ran were `before`), except the events: queue hints,
/// attempts, decisions and every changed row.
pub(crate) fn save(
    conn: &Connection,
    seq: i64,
    record: &ItemRecord,
    before: &[String],
    fx: &Effects,
) -> Result<()> {
    if fx.item_changed {
        conn.prepare_cached("UPDATE items SET cancelled = ?2, version = ?3 WHERE id = ?1")?
            .execute(params![record.id, record.cancelled, record.version])?;
    }
    if fx.restructured {
        restructure(conn, seq, record, before)?;
    }
    for &stage in &fx.fanned_out {
        let name = &record.stages[stage].unit.name;
        conn.prepare_cached(
            "DELETE FROM attempts WHERE item_id = ?1 AND stage = ?2 AND subtask IS NOT NULL",
        )?
        .execute(params![record.id, name])?;
        conn.prepare_cached("DELETE FROM subtasks WHERE item_id = ?1 AND stage = ?2")?
            .execute(params![record.id, name])?;
        let fan = record.stages[stage]
            .fan_out
            .as_ref()
            .expect("a fanned-out stage has its subtasks");
        for sub in &fan.rows {
            conn.prepare_cached(
                "INSERT INTO subtasks (item_id, stage, name, position, state)
                 VALUES (?1, ?2, ?3, ?4, 'pending')",
            )?
            .execute(params![record.id, name, sub.name, sub.position])?;
        }
    }
    let mut written: Vec<UnitRef> = Vec::with_capacity(fx.changed.len());
    let all_stages: Vec<UnitRef> = if fx.restructured {
        (0..record.stages.len()).map(UnitRef::stage).collect()
    } else {
        Vec::new()
    };
    for &unit in fx.changed.iter().chain(&all_stages) {
        if written.contains(&unit) {
            continue;
        }
        written.push(unit);
        write_unit(conn, record, unit)?;
    }
    for (unit, attempt) in &fx.attempts {
        let key = record.key(*unit);
        conn.prepare_cached(
            "INSERT INTO attempts
                (item_id, stage, subtask, attempt, started_at, finished_at, result, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            key.item_id,
            key.stage,
            key.subtask,
            attempt.attempt,
            codec::time(attempt.started_at),
            codec::time(attempt.finished_at),
            attempt.result.as_str(),
            attempt.error,
        ])?;
    }
    if let Some(stage) = fx.decided {
        insert_decision(conn, record, stage)?;
    }
    for &unit in &fx.runnable {
        let key = record.key(unit);
        conn.prepare_cached("INSERT INTO run_queue (item_id, stage, subtask) VALUES (?1, ?2, ?3)")?
            .execute(params![key.item_id, key.stage, key.subtask])?;
    }
    for &(due, unit) in &fx.scheduled {
        let key = record.key(unit);
        conn.prepare_cached(
            "INSERT INTO scheduled
                (due, item_id, stage, subtask, item_seq, stage_position, subtask_position)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            codec::time(due),
            key.item_id,
            key.stage,
            key.subtask,
            seq,
            unit.stage,
            unit.subtask
        ])?;
    }
    Ok(())
}

/// Writes every mutable column of one stage or subtask row.
fn write_unit(conn: &Connection, record: &ItemRecord, unit: UnitRef) -> Result<()> {
    let stage = &record.stages[unit.stage];
    let row = record.unit(unit).ok_or_else(|| {
        Loc::stage(&record.id, &stage.unit.name)
            .corrupt("subtasks", "a changed subtask row was not loaded")
    })?;
    let output = codec::json_opt(row.output.as_ref(), "an output")?;
    let (owner, expiry) = match &row.lease {
        Some(lease) => (Some(lease.owner.as_str()), Some(codec::time(lease.expiry))),
        None => (None, None),
    };
    match unit.subtask {
        None => {
            let review = stage.review.as_ref();
            let fan = stage.fan_out.as_ref();
            conn.prepare_cached(
                "UPDATE stages SET state = ?3, attempt = ?4, generation = ?5, started_at = ?6,
                    finished_at = ?7, next_run_at = ?8, last_error = ?9, output = ?10,
                    lease_owner = ?11, lease_expiry = ?12, waiting = ?13, review_round = ?14,
                    review_request = ?15, review_requested_at = ?16, review_deadline = ?17,
                    fan_total = ?18, fan_open = ?19, fan_failed = ?20
                 WHERE item_id = ?1 AND stage = ?2",
            )?
            .execute(params![
                record.id,
                row.name,
                row.state.as_str(),
                row.attempt,
                row.generation,
                codec::time_opt(row.started_at),
                codec::time_opt(row.finished_at),
                codec::time_opt(row.next_run_at),
                row.last_error,
                output,
                owner,
                expiry,
                stage.waiting,
                review.map_or(0, |r| r.round),
                codec::json_opt(review.map(|r| &r.request), "the review request")?,
                codec::time_opt(review.map(|r| r.requested_at)),
                codec::time_opt(review.and_then(|r| Some(r.request.deadline.as_ref()?.at))),
                fan.map(|f| f.total),
                fan.map(|f| f.open),
                fan.map(|f| f.failed),
            ])?;
        }
        Some(_) => {
            conn.prepare_cached(
                "UPDATE subtasks SET state = ?4, attempt = ?5, generation = ?6, started_at = ?7,
                    finished_at = ?8, next_run_at = ?9, last_error = ?10, output = ?11,
                    lease_owner = ?12, lease_expiry = ?13
                 WHERE item_id = ?1 AND stage = ?2 AND name = ?3",
            )?
            .execute(params![
                record.id,
                stage.unit.name,
                row.name,
                row.state.as_str(),
                row.attempt,
                row.generation,
                codec::time_opt(row.started_at),
                codec::time_opt(row.finished_at),
                codec::time_opt(row.next_run_at),
                row.last_error,
                output,
                owner,
                expiry,
            ])?;
        }
    }
    Ok(())
}

/// Records the decision of the current review round of `stage`.
fn insert_decision(conn: &Connection, record: &ItemRecord, stage: usize) -> Result<()> {
    let row = &record.stages[stage];
    let loc = Loc::stage(&record.id, &row.unit.name);
    let review = row
        .review
        .as_ref()
        .ok_or_else(|| loc.corrupt("review_round", "a decided stage has no review"))?;
    let d = review
        .decision
        .as_ref()
        .ok_or_else(|| loc.corrupt("review_round", "a decided review has no decision"))?;
    conn.prepare_cached(
        "INSERT INTO review_decisions
            (item_id, stage, round, kind, decided_by, decided_at, note, reason, edits)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        record.id,
        row.unit.name,
        review.round,
        d.kind.as_str(),
        d.by,
        codec::time(d.at),
        d.note,
        d.reason,
        codec::json_opt(d.edits.as_ref(), "the edited output")?,
    ])?;
    Ok(())
}

/// After a migration: drops the rows of stages the item no longer has
/// (with their subtasks, attempts and decisions), creates the rows of
/// stages new to it, and renumbers positions; `save` then writes every
/// stage row.
fn restructure(conn: &Connection, seq: i64, record: &ItemRecord, before: &[String]) -> Result<()> {
    for name in before
        .iter()
        .filter(|name| record.stage_position(name).is_none())
    {
        for sql in [
            "DELETE FROM attempts WHERE item_id = ?1 AND stage = ?2",
            "DELETE FROM review_decisions WHERE item_id = ?1 AND stage = ?2",
            "DELETE FROM subtasks WHERE item_id = ?1 AND stage = ?2",
            "DELETE FROM stages WHERE item_id = ?1 AND stage = ?2",
        ] {
            conn.prepare_cached(sql)?
                .execute(params![record.id, name])?;
        }
    }
    for stage in &record.stages {
        conn.prepare_cached(
            "INSERT INTO stages (item_id, stage, item_seq, position, state, waiting)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (item_id, stage) DO UPDATE SET position = excluded.position",
        )?
        .execute(params![
            record.id,
            stage.unit.name,
            seq,
            stage.unit.position,
            stage.unit.state.as_str(),
            stage.waiting
        ])?;
    }
    Ok(())
}
