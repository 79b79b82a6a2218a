//! Loading an item's rows into the records the rules work on, and saving
//! back what a rule changed.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::types::{Value as Sql, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::appends::Appends;
use super::codec::{self, Loc, Param};
use super::statements::Statements;
use crate::error::{Error, Result};
use crate::review::{DecisionRecord, ReviewRequest, ReviewStatus};
use crate::rules::{Effects, FanOut, ItemRecord, Lease, StageRecord, UnitRecord, UnitRef};
use crate::state::StageState;
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

/// An item's rows as loaded: its submission sequence number, its record
/// and the ids of its stage rows.
pub(crate) struct Loaded {
    /// `items.seq`: submission order.
    pub(crate) seq: i64,
    /// The rows.
    pub(crate) record: ItemRecord,
    /// `stages.id` of each of `record.stages`, by position: what a changed
    /// stage row is updated by.
    pub(crate) stage_ids: Vec<i64>,
}

/// How strictly stored outputs are decoded when an item is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outputs {
    /// An output that does not decode is an error (inspection).
    Strict,
    /// An output that does not decode is noted in
    /// [`ItemRecord::unreadable_outputs`] and left as it is stored
    /// (transitions: the rules fail only the work that reads it).
    Lenient,
}

/// Loads item `id` with every stage row and the subtask rows `subtasks`
/// asks for; `None` if there is no such item.
pub(crate) fn load_item(
    conn: &Connection,
    id: &str,
    subtasks: Subtasks<'_>,
    outputs: Outputs,
) -> Result<Option<Loaded>> {
    let loc = Loc::item(id);
    let mut statement = conn.prepare_cached(
        "SELECT s.stage, s.position, s.state, s.attempt, s.generation, s.started_at,
                s.finished_at, s.next_run_at, s.last_error, s.output, s.lease_owner,
                s.lease_expiry, s.waiting, s.review_round, s.review_request,
                s.review_requested_at, s.fan_total, s.fan_open, s.fan_failed,
                i.seq, i.payload, i.submitted_at, i.cancelled, i.version,
                s.crashes, s.edits_to_check, s.id
         FROM items i JOIN stages s ON s.item_id = i.id
         WHERE i.id = +?1",
    )?;
    let mut rows = statement.query([id])?;
    let mut head = None;
    let mut stages = Vec::new();
    let mut unreadable_outputs = Vec::new();
    while let Some(row) = rows.next()? {
        if head.is_none() {
            head = Some(item_columns(&loc, row, 19)?);
        }
        let (stage, unreadable) = stage_row(conn, id, row, outputs)?;
        stages.push((stage, row.get::<_, i64>(26)?));
        unreadable_outputs.extend(unreadable);
    }
    let Some((seq, payload, submitted_at, cancelled, version)) = head else {
        let exists = conn
            .prepare_cached("SELECT 1 FROM items WHERE id = ?1")?
            .query_row([id], |_| Ok(()))
            .optional()?;
        return match exists {
            Some(()) => Err(loc.corrupt("stages", "the item has no stage rows")),
            None => Ok(None),
        };
    };
    // Sorted here rather than by the query, which would need a temporary B-tree.
    stages.sort_by_key(|(s, _)| s.unit.position);
    let (stages, stage_ids) = stages.into_iter().unzip();
    let mut record = ItemRecord {
        id: id.to_owned(),
        version,
        payload: payload.into(),
        submitted_at,
        cancelled,
        stages,
        unreadable_outputs,
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
    Ok(Some(Loaded {
        seq,
        record,
        stage_ids,
    }))
}

/// The item's own columns (`seq, payload, submitted_at, cancelled, version`)
/// starting at `column`.
fn item_columns(
    loc: &Loc,
    row: &Row<'_>,
    column: usize,
) -> Result<(i64, String, DateTime<Utc>, bool, u32)> {
    let cancelled = match loc.get::<i64>(row, column + 3, "cancelled")? {
        0 => false,
        1 => true,
        n => return Err(loc.corrupt("cancelled", format!("{n} is not 0 or 1"))),
    };
    Ok((
        loc.get(row, column, "seq")?,
        loc.get(row, column + 1, "payload")?,
        loc.time(row, column + 2, "submitted_at")?,
        cancelled,
        loc.count(row, column + 4, "version")?,
    ))
}

/// One stage row, and the reason its output could not be decoded if it
/// could not (only with [`Outputs::Lenient`]).
fn stage_row(
    conn: &Connection,
    item_id: &str,
    row: &Row<'_>,
    outputs: Outputs,
) -> Result<(StageRecord, Option<String>)> {
    let name: Arc<str> = row.get(0)?;
    let loc = Loc::stage(item_id, &name);
    let (output, unreadable) = match loc.json_opt(row, 9, "output") {
        Ok(output) => (output, None),
        Err(error @ Error::Corrupt { .. }) if outputs == Outputs::Lenient => {
            (None, Some(error.to_string()))
        }
        Err(error) => return Err(error),
    };
    let unit = UnitRecord {
        position: loc.count(row, 1, "position")?,
        state: loc.parse(row, 2, "state")?,
        attempt: loc.count(row, 3, "attempt")?,
        generation: loc.count(row, 4, "generation")?,
        started_at: loc.time_opt(row, 5, "started_at")?,
        finished_at: loc.time_opt(row, 6, "finished_at")?,
        next_run_at: loc.time_opt(row, 7, "next_run_at")?,
        last_error: loc.get(row, 8, "last_error")?,
        output,
        lease: lease(&loc, row, 10)?,
        crashes: loc.count(row, 24, "crashes")?,
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
    let edits_to_check = match loc.get::<i64>(row, 25, "edits_to_check")? {
        0 => false,
        1 => true,
        n => return Err(loc.corrupt("edits_to_check", format!("{n} is not 0 or 1"))),
    };
    let stage = StageRecord {
        unit,
        waiting: loc.count(row, 12, "waiting")?,
        review: review.map(Box::new),
        fan_out: fan_out.map(Box::new),
        edits_to_check,
    };
    Ok((stage, unreadable))
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
        (Some(owner), Some(expiry)) => Some(Lease {
            owner: owner.into(),
            expiry,
        }),
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
    // Two statements, so looking up one subtask seeks its key instead of
    // reading every sibling.
    let mut statement = conn.prepare_cached(match name {
        None => {
            "SELECT name, position, state, attempt, generation, started_at, finished_at,
                    next_run_at, last_error, output, lease_owner, lease_expiry, crashes
             FROM subtasks WHERE item_id = +?1 AND stage = +?2 AND +?3 IS NULL
             ORDER BY position"
        }
        Some(_) => {
            "SELECT name, position, state, attempt, generation, started_at, finished_at,
                    next_run_at, last_error, output, lease_owner, lease_expiry, crashes
             FROM subtasks WHERE item_id = ?1 AND stage = ?2 AND name = ?3"
        }
    })?;
    let rows = statement.query_map(params![item_id, stage, name], |row| {
        Ok((|| -> Result<UnitRecord> {
            let name: Arc<str> = row.get(0)?;
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
                crashes: loc.count(row, 12, "crashes")?,
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
        "SELECT a.id, s.stage, a.subtask, a.attempt, a.started_at, a.finished_at, a.result,
                a.error
         FROM stages s JOIN attempts a ON a.stage_id = s.id
         WHERE s.item_id = +?1 ORDER BY a.id",
    )?;
    let rows = statement.query_map([&record.id], |row| {
        Ok((|| -> Result<Option<(UnitRef, AttemptRecord)>> {
            let id: i64 = row.get(0)?;
            let loc = Loc::row("attempts", format!("id={id}"));
            let key = crate::task::TaskKey {
                item_id: record.id.as_str().into(),
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

/// Inserts the stage rows of a new item (loaded with `seq`) and returns
/// their ids, by position.
pub(crate) fn insert_stages(
    db: &mut Statements<'_>,
    seq: i64,
    record: &ItemRecord,
) -> Result<Vec<i64>> {
    let conn = db.conn();
    let mut statement = db.get(
        "INSERT INTO stages (item_id, stage, item_seq, position, state, waiting, rare_state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut ids = Vec::with_capacity(record.stages.len());
    for stage in &record.stages {
        statement.execute(new_stage_row(record, seq, stage))?;
        ids.push(conn.last_insert_rowid());
    }
    Ok(ids)
}

/// The columns a stage row is created with, in the order the `INSERT`s
/// of [`insert_stages`] and [`restructure`] name them.
fn new_stage_row<'a>(
    record: &'a ItemRecord,
    seq: i64,
    stage: &'a StageRecord,
) -> impl rusqlite::Params + 'a {
    (
        record.id.as_str(),
        &*stage.unit.name,
        seq,
        stage.unit.position,
        stage.unit.state.as_str(),
        stage.waiting,
        rare_state(stage.unit.state),
    )
}

/// What a stage row's `rare_state` holds for `state`: the state, unless
/// it is one every stage passes through (`pending`, `running`,
/// `completed`), which no index lists by state (schema versions 5 and 7).
pub(crate) fn rare_state(state: StageState) -> Option<&'static str> {
    match state {
        StageState::Pending | StageState::Running | StageState::Completed => None,
        rare => Some(rare.as_str()),
    }
}

/// Saves what a rule did to `record` (loaded with `seq` and the stage row
/// ids `stage_ids`, which a restructure renews; its stage rows before the
/// rule ran were `before`), except the events: queue hints and attempts
/// (to `appends`), decisions and the changed columns of every changed row.
pub(crate) fn save(
    db: &mut Statements<'_>,
    appends: &mut Appends,
    (seq, stage_ids): (i64, &mut Vec<i64>),
    record: &ItemRecord,
    before: &[StageRecord],
    fx: &Effects,
) -> Result<()> {
    let conn = db.conn();
    if fx.item_changed {
        conn.prepare_cached("UPDATE items SET cancelled = ?2, version = ?3 WHERE id = ?1")?
            .execute(params![record.id, record.cancelled, record.version])?;
    }
    if fx.restructured || !fx.fanned_out.is_empty() {
        // Attempts are deleted below: the pending ones must be rows first.
        appends.flush(db)?;
    }
    if fx.restructured {
        *stage_ids = restructure(conn, seq, record, before)?;
    }
    for &stage in &fx.fanned_out {
        let name = &record.stages[stage].unit.name;
        conn.prepare_cached("DELETE FROM attempts WHERE stage_id = ?1 AND subtask IS NOT NULL")?
            .execute([stage_id(record, stage_ids, stage)?])?;
        conn.prepare_cached("DELETE FROM subtasks WHERE item_id = ?1 AND stage = ?2")?
            .execute(params![record.id, name])?;
        // No fan-out: a rerun dropped the subtasks; a new fan-out makes them.
        for sub in record.stages[stage].fan_out.iter().flat_map(|f| &f.rows) {
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
        // After a migration positions moved: compare nothing, write all.
        let old = if fx.restructured {
            None
        } else {
            old_unit(before, unit)
        };
        write_unit(db, record, stage_ids, unit, old)?;
    }
    for (unit, attempt) in &fx.attempts {
        let (_, subtask) = unit_names(record, *unit);
        appends.attempt([
            Param::int(stage_id(record, stage_ids, unit.stage)?),
            Param::shared_opt(subtask),
            Param::int(attempt.attempt.into()),
            Param::Time(codec::time_text(attempt.started_at)),
            Param::Time(codec::time_text(attempt.finished_at)),
            Param::Borrowed(attempt.result.as_str().into()),
            Param::Value(attempt.error.clone().map_or(Sql::Null, Sql::Text)),
        ]);
    }
    if let Some(stage) = fx.decided {
        insert_decision(conn, record, stage)?;
    }
    for &unit in &fx.runnable {
        appends.runnable(record.key(unit));
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

/// The names of the stage and subtask of `unit`, as [`ItemRecord::key`]
/// has them, borrowed.
pub(crate) fn unit_names(record: &ItemRecord, unit: UnitRef) -> (&Arc<str>, Option<&Arc<str>>) {
    let stage = &record.stages[unit.stage];
    let subtask = unit
        .subtask
        .and_then(|p| Some(&stage.fan_out.as_ref()?.row(p)?.name));
    (&stage.unit.name, subtask)
}

/// The id of the row of stage `position` of `record`.
fn stage_id(record: &ItemRecord, stage_ids: &[i64], position: usize) -> Result<i64> {
    stage_ids.get(position).copied().ok_or_else(|| {
        let name = record.stages.get(position).map_or("?", |s| &*s.unit.name);
        Loc::stage(&record.id, name).corrupt("id", "the stage row has no id")
    })
}

/// The row of `unit` as it was loaded, if it was.
fn old_unit(before: &[StageRecord], unit: UnitRef) -> Option<(&StageRecord, &UnitRecord)> {
    let stage = before.get(unit.stage)?;
    match unit.subtask {
        None => Some((stage, &stage.unit)),
        Some(position) => Some((stage, stage.fan_out.as_ref()?.row(position)?)),
    }
}

/// A column `write_unit` may write, in the order it writes them (which
/// numbers the bits of a set of columns).
#[derive(Debug, Clone, Copy)]
enum Column {
    State,
    Attempt,
    Generation,
    StartedAt,
    FinishedAt,
    NextRunAt,
    LastError,
    Output,
    LeaseOwner,
    LeaseExpiry,
    Crashes,
    Waiting,
    ReviewRound,
    ReviewRequest,
    ReviewRequestedAt,
    ReviewDeadline,
    FanTotal,
    FanOpen,
    FanFailed,
    EditsToCheck,
    RareState,
}

/// The names of the [`Column`]s, in their order.
const UNIT_COLUMNS: [&str; 21] = [
    "state",
    "attempt",
    "generation",
    "started_at",
    "finished_at",
    "next_run_at",
    "last_error",
    "output",
    "lease_owner",
    "lease_expiry",
    "crashes",
    "waiting",
    "review_round",
    "review_request",
    "review_requested_at",
    "review_deadline",
    "fan_total",
    "fan_open",
    "fan_failed",
    "edits_to_check",
    "rare_state",
];

/// The `UPDATE` of the stage row with id `?1`.
const UPDATE_STAGE: &str = "UPDATE stages SET {} WHERE id = ?1";

/// The `UPDATE` of the subtask row keyed `?1, ?2, ?3`.
const UPDATE_SUBTASK: &str =
    "UPDATE subtasks SET {} WHERE item_id = ?1 AND stage = ?2 AND name = ?3";

/// `template` (one of [`UPDATE_STAGE`] and [`UPDATE_SUBTASK`], whose key
/// takes `keys` parameters) setting the columns of `mask` (bits by
/// [`Column`]) to the parameters after the key, in [`Column`] order.
fn update_sql(template: &str, keys: usize, mask: u32) -> String {
    let sets: Vec<String> = UNIT_COLUMNS
        .iter()
        .enumerate()
        .filter(|&(bit, _)| mask & 1 << bit != 0)
        .enumerate()
        .map(|(i, (_, name))| format!("{name} = ?{}", keys + i + 1))
        .collect();
    template.replace("{}", &sets.join(", "))
}

/// Writes the columns of one stage or subtask row that differ from `old`
/// (every column when there is no `old` row): an unchanged column is not in
/// the statement, so the indexes over it are not touched.
fn write_unit<'r>(
    db: &mut Statements<'_>,
    record: &'r ItemRecord,
    stage_ids: &[i64],
    unit: UnitRef,
    old: Option<(&StageRecord, &UnitRecord)>,
) -> Result<()> {
    let stage = &record.stages[unit.stage];
    let row = record.unit(unit).ok_or_else(|| {
        Loc::stage(&record.id, &stage.unit.name)
            .corrupt("subtasks", "a changed subtask row was not loaded")
    })?;
    // Text the record holds is bound borrowed, and timestamps from a
    // buffer, not copied to a String first.
    let text = |v: Option<String>| Param::Value(v.map_or(Sql::Null, Sql::Text));
    let borrowed = |v: Option<&'r str>| Param::Borrowed(v.map_or(ValueRef::Null, ValueRef::from));
    let int = |v: Option<i64>| Param::Value(v.map_or(Sql::Null, Sql::Integer));
    // The values of the changed columns, and which columns they are.
    let mut values: Vec<Param<'r>> = Vec::with_capacity(UNIT_COLUMNS.len() + 3);
    let mut mask = 0u32;
    let mut set =
        |changed: bool, column: Column, value: &dyn Fn() -> Result<Param<'r>>| -> Result<()> {
            if changed {
                values.push(value()?);
                mask |= 1 << column as u32;
            }
            Ok(())
        };
    let was = old.map(|(_, u)| u);
    let differs = |f: &dyn Fn(&UnitRecord) -> bool| was.is_none_or(f);
    set(differs(&|o| o.state != row.state), Column::State, &|| {
        Ok(borrowed(Some(row.state.as_str())))
    })?;
    set(
        differs(&|o| o.attempt != row.attempt),
        Column::Attempt,
        &|| Ok(int(Some(row.attempt.into()))),
    )?;
    set(
        differs(&|o| o.generation != row.generation),
        Column::Generation,
        &|| Ok(int(Some(row.generation as i64))),
    )?;
    set(
        differs(&|o| o.started_at != row.started_at),
        Column::StartedAt,
        &|| Ok(Param::time_opt(row.started_at)),
    )?;
    set(
        differs(&|o| o.finished_at != row.finished_at),
        Column::FinishedAt,
        &|| Ok(Param::time_opt(row.finished_at)),
    )?;
    set(
        differs(&|o| o.next_run_at != row.next_run_at),
        Column::NextRunAt,
        &|| Ok(Param::time_opt(row.next_run_at)),
    )?;
    set(
        differs(&|o| o.last_error != row.last_error),
        Column::LastError,
        &|| Ok(borrowed(row.last_error.as_deref())),
    )?;
    set(
        differs(&|o| o.output != row.output),
        Column::Output,
        &|| Ok(text(codec::json_opt(row.output.as_ref(), "an output")?)),
    )?;
    let lease_changed = differs(&|o| o.lease != row.lease);
    set(lease_changed, Column::LeaseOwner, &|| {
        Ok(borrowed(row.lease.as_ref().map(|l| &*l.owner)))
    })?;
    set(lease_changed, Column::LeaseExpiry, &|| {
        Ok(Param::time_opt(row.lease.as_ref().map(|l| l.expiry)))
    })?;
    set(
        differs(&|o| o.crashes != row.crashes),
        Column::Crashes,
        &|| Ok(int(Some(row.crashes.into()))),
    )?;
    let (template, key_count, keys) = match unit.subtask {
        None => {
            let old_stage = old.map(|(s, _)| s);
            let stage_differs = |f: &dyn Fn(&StageRecord) -> bool| old_stage.is_none_or(f);
            set(
                stage_differs(&|o| o.waiting != stage.waiting),
                Column::Waiting,
                &|| Ok(int(Some(stage.waiting.into()))),
            )?;
            let review = stage.review.as_ref();
            let review_changed = stage_differs(&|o| o.review != stage.review);
            set(review_changed, Column::ReviewRound, &|| {
                Ok(int(Some(review.map_or(0, |r| r.round as i64))))
            })?;
            set(review_changed, Column::ReviewRequest, &|| {
                Ok(text(codec::json_opt(
                    review.map(|r| &r.request),
                    "the review request",
                )?))
            })?;
            set(review_changed, Column::ReviewRequestedAt, &|| {
                Ok(Param::time_opt(review.map(|r| r.requested_at)))
            })?;
            set(review_changed, Column::ReviewDeadline, &|| {
                let deadline = review.and_then(|r| Some(r.request.deadline.as_ref()?.at));
                Ok(Param::time_opt(deadline))
            })?;
            let fan = stage.fan_out.as_ref().map(|f| (f.total, f.open, f.failed));
            let fan_changed =
                stage_differs(&|o| o.fan_out.as_ref().map(|f| (f.total, f.open, f.failed)) != fan);
            set(fan_changed, Column::FanTotal, &|| {
                Ok(int(fan.map(|f| f.0.into())))
            })?;
            set(fan_changed, Column::FanOpen, &|| {
                Ok(int(fan.map(|f| f.1.into())))
            })?;
            set(fan_changed, Column::FanFailed, &|| {
                Ok(int(fan.map(|f| f.2.into())))
            })?;
            set(
                stage_differs(&|o| o.edits_to_check != stage.edits_to_check),
                Column::EditsToCheck,
                &|| Ok(int(Some(stage.edits_to_check.into()))),
            )?;
            let rare = rare_state(row.state);
            set(
                stage_differs(&|o| rare_state(o.unit.state) != rare),
                Column::RareState,
                &|| Ok(borrowed(rare)),
            )?;
            let id = stage_id(record, stage_ids, unit.stage)?;
            (
                UPDATE_STAGE,
                1,
                [int(Some(id)), borrowed(None), borrowed(None)],
            )
        }
        Some(_) => (
            UPDATE_SUBTASK,
            3,
            [
                borrowed(Some(&record.id)),
                borrowed(Some(&stage.unit.name)),
                borrowed(Some(&row.name)),
            ],
        ),
    };
    if mask == 0 {
        return Ok(());
    }
    let keys = &keys[..key_count];
    let mut statement = db.built(template, mask, || update_sql(template, key_count, mask))?;
    for (i, value) in keys.iter().chain(&values).enumerate() {
        statement.raw_bind_parameter(i + 1, value)?;
    }
    statement.raw_execute()?;
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
/// stage row. Returns the stage row ids, by the new positions.
fn restructure(
    conn: &Connection,
    seq: i64,
    record: &ItemRecord,
    before: &[StageRecord],
) -> Result<Vec<i64>> {
    for name in before
        .iter()
        .map(|s| &s.unit.name)
        .filter(|name| record.stage_position(name).is_none())
    {
        for sql in [
            "DELETE FROM attempts
             WHERE stage_id = (SELECT id FROM stages WHERE item_id = ?1 AND stage = ?2)",
            "DELETE FROM review_decisions WHERE item_id = ?1 AND stage = ?2",
            "DELETE FROM subtasks WHERE item_id = ?1 AND stage = ?2",
            "DELETE FROM stages WHERE item_id = ?1 AND stage = ?2",
        ] {
            conn.prepare_cached(sql)?
                .execute(params![record.id, name])?;
        }
    }
    // The rows it keeps keep their columns but their position.
    let mut upsert = conn.prepare_cached(
        "INSERT INTO stages (item_id, stage, item_seq, position, state, waiting, rare_state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (item_id, stage) DO UPDATE SET position = excluded.position
         RETURNING id",
    )?;
    let mut ids = Vec::with_capacity(record.stages.len());
    for stage in &record.stages {
        let row = new_stage_row(record, seq, stage);
        ids.push(upsert.query_row(row, |row| row.get(0))?);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_sets_the_columns_of_its_mask_after_the_key() {
        let mask = |columns: &[Column]| columns.iter().fold(0, |m, &c| m | 1 << c as u32);
        // The shapes `super::super::tests` plans against the schema.
        assert_eq!(
            update_sql(UPDATE_STAGE, 1, mask(&[Column::State, Column::Waiting])),
            "UPDATE stages SET state = ?2, waiting = ?3 WHERE id = ?1"
        );
        assert_eq!(
            update_sql(UPDATE_SUBTASK, 3, mask(&[Column::State])),
            "UPDATE subtasks SET state = ?4 WHERE item_id = ?1 AND stage = ?2 AND name = ?3"
        );
        assert_eq!(
            update_sql(
                UPDATE_STAGE,
                1,
                mask(&[Column::EditsToCheck, Column::Attempt])
            ),
            "UPDATE stages SET attempt = ?2, edits_to_check = ?3 WHERE id = ?1"
        );
    }
}
