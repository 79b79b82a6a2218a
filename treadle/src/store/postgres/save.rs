//! Saving what the rules did in a batch: every changed row written once,
//! set-based (`unnest` arrays, by primary key), then the event counter
//! (updated last, so transactions take sequence numbers in commit order)
//! and the events, and one NOTIFY as a hint for other processes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use super::batch::Slot;
use super::codec::{self, int};
use super::conn::{Db, Statement};
use tokio_postgres::types::ToSql;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::rules::{Effects, UnitRecord};
use crate::status::AttemptRecord;

/// Everything a batch changed, gathered transition by transition.
#[derive(Debug, Default)]
pub(super) struct Changes {
    /// The events appended, in log order, not yet numbered.
    pub(super) events: Vec<Event>,
    /// Run-queue entries the batch's claims consumed.
    pub(super) consumed: Vec<i64>,
    items: BTreeSet<String>,
    /// Stage rows to write, each with whether it may be new (then it is
    /// inserted or updated; otherwise updated by key).
    stages: BTreeMap<(String, String), bool>,
    /// Subtask rows to write, each with whether it may be new.
    subtasks: BTreeMap<(String, String, u32), bool>,
    purged: Vec<(String, String)>,
    refanned: Vec<(String, String)>,
    attempts: Vec<(String, String, Option<u32>, AttemptRecord)>,
    decisions: Vec<(String, String, i64, String)>,
    queue: Vec<(String, String, Option<i64>)>,
    scheduled: Vec<Scheduled>,
}

/// A scheduled retry to store.
#[derive(Debug)]
struct Scheduled {
    due: DateTime<Utc>,
    item_seq: i64,
    item: String,
    stage: String,
    position: i64,
    subtask: Option<i64>,
}

impl Changes {
    /// Records the effects `fx` of a rule on `slot` (already changed).
    /// `fresh`: the item was created by it, so every stage row is new.
    pub(super) fn record(&mut self, slot: &Slot, fx: Effects, fresh: bool) -> Result<()> {
        let record = &slot.record;
        let id = &record.id;
        let name = |stage: usize| String::from(&*record.stages[stage].unit.name);
        self.events
            .extend(fx.events.iter().map(|e| e.resolve(record, 0)));
        if fx.item_changed && !fresh {
            self.items.insert(id.clone());
        }
        for &stage in &fx.fanned_out {
            let stage_name = name(stage);
            self.attempts
                .retain(|(i, s, sub, _)| !(i == id && *s == stage_name && sub.is_some()));
            self.subtasks
                .retain(|(i, s, _), _| !(i == id && *s == stage_name));
            self.refanned.push((id.clone(), stage_name.clone()));
            for sub in record.stages[stage].fan_out.iter().flat_map(|f| &f.rows) {
                self.subtasks
                    .insert((id.clone(), stage_name.clone(), sub.position), true);
            }
        }
        if fresh || fx.restructured {
            for stage in &record.stages {
                self.stages
                    .insert((id.clone(), String::from(&*stage.unit.name)), true);
            }
        }
        for unit in &fx.changed {
            match unit.subtask {
                None => self
                    .stages
                    .entry((id.clone(), name(unit.stage)))
                    .or_insert(false),
                Some(sub) => self
                    .subtasks
                    .entry((id.clone(), name(unit.stage), sub))
                    .or_insert(false),
            };
        }
        for (unit, attempt) in fx.attempts {
            self.attempts
                .push((id.clone(), name(unit.stage), unit.subtask, attempt));
        }
        if let Some(stage) = fx.decided {
            let row = &record.stages[stage];
            if let Some((review, decision)) = row
                .review
                .as_ref()
                .and_then(|r| Some((r, r.decision.as_ref()?)))
            {
                let text = codec::json(decision, "a review decision")?;
                self.decisions
                    .push((id.clone(), name(stage), int(review.round), text));
            }
        }
        for unit in &fx.runnable {
            self.queue
                .push((id.clone(), name(unit.stage), unit.subtask.map(i64::from)));
        }
        for (due, unit) in &fx.scheduled {
            self.scheduled.push(Scheduled {
                due: *due,
                item_seq: slot.seq,
                item: id.clone(),
                stage: name(unit.stage),
                position: unit.stage as i64,
                subtask: unit.subtask.map(i64::from),
            });
        }
        Ok(())
    }

    /// Records that item `id` no longer has the stages `names` (a
    /// migration): their rows, history and decisions go.
    pub(super) fn purge(&mut self, id: &str, names: &[String]) {
        for stage in names {
            let gone = |i: &String, s: &String| i == id && s == stage;
            self.attempts.retain(|(i, s, _, _)| !gone(i, s));
            self.decisions.retain(|(i, s, _, _)| !gone(i, s));
            self.stages.retain(|(i, s), _| !gone(i, s));
            self.subtasks.retain(|(i, s, _), _| !gone(i, s));
            self.queue.retain(|(i, s, _)| !gone(i, s));
            self.scheduled.retain(|e| !gone(&e.item, &e.stage));
            self.purged.push((id.to_owned(), stage.clone()));
        }
    }

    /// Whether the batch wrote nothing at all.
    pub(super) fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.consumed.is_empty()
            && self.items.is_empty()
            && self.stages.is_empty()
            && self.subtasks.is_empty()
            && self.purged.is_empty()
            && self.refanned.is_empty()
            && self.attempts.is_empty()
            && self.queue.is_empty()
            && self.scheduled.is_empty()
    }

    /// Writes every change with the final rows of `slots`, then numbers
    /// and writes the events, updating the counter last, and sends one
    /// NOTIFY on `channel`: every statement in one round trip. Returns the
    /// transaction id, for resolving a commit whose answer was lost.
    pub(super) async fn write(
        &mut self,
        db: Db<'_>,
        slots: &HashMap<String, Slot>,
        channel: &str,
    ) -> Result<String> {
        let purged = pairs(&self.purged);
        let refanned = pairs(&self.refanned);
        let items = self.item_columns(slots);
        let (new_stages, stages) = (
            self.stage_columns(slots, true)?,
            self.stage_columns(slots, false)?,
        );
        let (new_subtasks, subtasks) = (
            self.subtask_columns(slots, true)?,
            self.subtask_columns(slots, false)?,
        );
        let attempts = self.attempt_columns();
        let decisions = self.decision_columns();
        let queue = self.queue_columns();
        let scheduled = self.scheduled_columns();
        let events = self.event_columns()?;
        let n = self.events.len() as i64;
        let purged_params: [&(dyn ToSql + Sync); 2] = [&purged.0, &purged.1];
        let refanned_params: [&(dyn ToSql + Sync); 2] = [&refanned.0, &refanned.1];
        let items_params: [&(dyn ToSql + Sync); 3] = [&items.0, &items.1, &items.2];
        let new_stages_params = new_stages.params();
        let stages_params = stages.params();
        let new_subtasks_params = new_subtasks.params();
        let subtasks_params = subtasks.params();
        let a = &attempts;
        let attempts_params: [&(dyn ToSql + Sync); 8] =
            [&a.0, &a.1, &a.2, &a.3, &a.4, &a.5, &a.6, &a.7];
        let d = &decisions;
        let decisions_params: [&(dyn ToSql + Sync); 4] = [&d.0, &d.1, &d.2, &d.3];
        let consumed_params: [&(dyn ToSql + Sync); 1] = [&self.consumed];
        let queue_params: [&(dyn ToSql + Sync); 3] = [&queue.0, &queue.1, &queue.2];
        let q = &scheduled;
        let scheduled_params: [&(dyn ToSql + Sync); 6] = [&q.0, &q.1, &q.2, &q.3, &q.4, &q.5];
        let e = &events;
        let events_params: [&(dyn ToSql + Sync); 7] = [&n, &e.0, &e.1, &e.2, &e.3, &e.4, &channel];
        // In order: deletions before the rows that may replace them (a
        // fan-out done again), the counter last.
        let mut statements: Vec<Statement<'_>> = Vec::new();
        if !self.purged.is_empty() {
            statements.extend(PURGE_SQL.map(|sql| (sql, &purged_params[..])));
        }
        if !self.refanned.is_empty() {
            statements.extend(REFAN_SQL.map(|sql| (sql, &refanned_params[..])));
        }
        let writes: [(bool, &str, &[&(dyn ToSql + Sync)]); 10] = [
            (!items.0.is_empty(), ITEMS_SQL, &items_params),
            (
                !new_stages.items.is_empty(),
                NEW_STAGES_SQL,
                &new_stages_params,
            ),
            (!stages.items.is_empty(), STAGES_SQL, &stages_params),
            (
                !new_subtasks.items.is_empty(),
                NEW_SUBTASKS_SQL,
                &new_subtasks_params,
            ),
            (!subtasks.items.is_empty(), SUBTASKS_SQL, &subtasks_params),
            (!a.0.is_empty(), ATTEMPTS_SQL, &attempts_params),
            (!d.0.is_empty(), DECISIONS_SQL, &decisions_params),
            (!self.consumed.is_empty(), CONSUMED_SQL, &consumed_params),
            (!queue.0.is_empty(), QUEUE_SQL, &queue_params),
            (!q.0.is_empty(), SCHEDULED_SQL, &scheduled_params),
        ];
        statements.extend(
            writes
                .into_iter()
                .filter(|(any, ..)| *any)
                .map(|(_, sql, params)| (sql, params)),
        );
        statements.push((EVENTS_SQL, &events_params));
        let rows = db.pipeline(&statements).await?;
        let Some(row) = rows.last().and_then(|rows| rows.first()) else {
            return Err(Error::Corrupt {
                location: "the PostgreSQL store's event counter".to_owned(),
                detail: "taking sequence numbers returned no row".to_owned(),
            });
        };
        let (last, xid): (i64, String) = (row.get(0), row.get(1));
        let first = last - n + 1;
        for (i, event) in self.events.iter_mut().enumerate() {
            event.seq = (first + i as i64) as u64;
        }
        Ok(xid)
    }

    fn item_columns(&self, slots: &HashMap<String, Slot>) -> (Vec<&str>, Vec<bool>, Vec<i64>) {
        let mut columns = (Vec::new(), Vec::new(), Vec::new());
        for id in &self.items {
            let record = &slots[id].record;
            columns.0.push(id.as_str());
            columns.1.push(record.cancelled);
            columns.2.push(int(record.version));
        }
        columns
    }

    /// The stage rows that may be new (`new`), or the others.
    fn stage_columns<'s>(
        &'s self,
        slots: &HashMap<String, Slot>,
        new: bool,
    ) -> Result<StageColumns<'s>> {
        let mut columns = StageColumns::default();
        for ((id, stage), _) in self.stages.iter().filter(|(_, n)| **n == new) {
            let slot = &slots[id];
            let Some(position) = slot.record.stage_position(stage) else {
                continue; // dropped by a later migration in the batch
            };
            let row = &slot.record.stages[position];
            columns.units.push(&row.unit, id, stage)?;
            columns.items.push(id.as_str());
            columns.seqs.push(slot.seq);
            columns.waiting.push(int(row.waiting));
            columns.reviews.push(
                row.review
                    .as_ref()
                    .map(|r| codec::json(r, "a review"))
                    .transpose()?,
            );
            columns
                .requested
                .push(row.review.as_ref().map(|r| r.requested_at));
            columns.deadlines.push(
                row.review
                    .as_ref()
                    .and_then(|r| Some(r.request.deadline.as_ref()?.at)),
            );
            let fan = row.fan_out.as_ref();
            columns.totals.push(fan.map(|f| int(f.total)));
            columns.open.push(fan.map(|f| int(f.open)));
            columns.failed.push(fan.map(|f| int(f.failed)));
            columns.edits.push(row.edits_to_check);
        }
        Ok(columns)
    }

    /// The subtask rows that may be new (`new`), or the others.
    fn subtask_columns<'s>(
        &'s self,
        slots: &HashMap<String, Slot>,
        new: bool,
    ) -> Result<SubtaskColumns<'s>> {
        let mut columns = SubtaskColumns::default();
        for ((id, stage, position), _) in self.subtasks.iter().filter(|(_, n)| **n == new) {
            let record = &slots[id].record;
            let Some(row) = record
                .stage_position(stage)
                .and_then(|p| record.stages[p].fan_out.as_ref()?.row(*position))
            else {
                continue; // replaced by a later fan-out, or dropped
            };
            columns.units.push(row, id, stage)?;
            columns.items.push(id.as_str());
            columns.stages.push(stage.as_str());
        }
        Ok(columns)
    }

    fn attempt_columns(&self) -> AttemptColumns<'_> {
        let mut columns = AttemptColumns::default();
        let (items, stages, subtasks, numbers, started, finished, results, errors) = &mut columns;
        for (item, stage, subtask, a) in &self.attempts {
            items.push(item.as_str());
            stages.push(stage.as_str());
            subtasks.push(subtask.map(i64::from));
            numbers.push(int(a.attempt));
            started.push(a.started_at);
            finished.push(a.finished_at);
            results.push(a.result.as_str());
            errors.push(a.error.as_deref());
        }
        columns
    }

    fn decision_columns(&self) -> (Vec<&str>, Vec<&str>, Vec<i64>, Vec<&str>) {
        let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (item, stage, round, text) in &self.decisions {
            columns.0.push(item.as_str());
            columns.1.push(stage.as_str());
            columns.2.push(*round);
            columns.3.push(text.as_str());
        }
        columns
    }

    fn queue_columns(&self) -> (Vec<&str>, Vec<&str>, Vec<Option<i64>>) {
        let mut columns = (Vec::new(), Vec::new(), Vec::new());
        for (item, stage, subtask) in &self.queue {
            columns.0.push(item.as_str());
            columns.1.push(stage.as_str());
            columns.2.push(*subtask);
        }
        columns
    }

    fn scheduled_columns(&self) -> ScheduledColumns<'_> {
        let mut columns = ScheduledColumns::default();
        let (due, seqs, items, stages, positions, subtasks) = &mut columns;
        for e in &self.scheduled {
            due.push(e.due);
            seqs.push(e.item_seq);
            items.push(e.item.as_str());
            stages.push(e.stage.as_str());
            positions.push(e.position);
            subtasks.push(e.subtask);
        }
        columns
    }

    fn event_columns(&self) -> Result<EventColumns<'_>> {
        let mut columns = EventColumns::default();
        for event in &self.events {
            columns.0.push(event.at);
            columns.1.push(event.item_id.as_str());
            columns.2.push(event.stage.as_deref());
            columns.3.push(event.subtask.as_deref());
            columns.4.push(codec::json(&event.kind, "an event")?);
        }
        Ok(columns)
    }
}

/// Attempt history rows to write, as the columns of [`ATTEMPTS_SQL`].
type AttemptColumns<'a> = (
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<Option<i64>>,
    Vec<i64>,
    Vec<DateTime<Utc>>,
    Vec<DateTime<Utc>>,
    Vec<&'static str>,
    Vec<Option<&'a str>>,
);

/// Scheduled retries to write, as the columns of [`SCHEDULED_SQL`].
type ScheduledColumns<'a> = (
    Vec<DateTime<Utc>>,
    Vec<i64>,
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<i64>,
    Vec<Option<i64>>,
);

/// Events to write, as the columns of [`EVENTS_SQL`] after the count.
type EventColumns<'a> = (
    Vec<DateTime<Utc>>,
    Vec<&'a str>,
    Vec<Option<&'a str>>,
    Vec<Option<&'a str>>,
    Vec<String>,
);

/// `(item, stage)` pairs as two columns.
fn pairs(pairs: &[(String, String)]) -> (Vec<&str>, Vec<&str>) {
    pairs
        .iter()
        .map(|(item, stage)| (item.as_str(), stage.as_str()))
        .unzip()
}

/// Removes the rows of stages an item no longer has (`$1`, `$2`: items
/// and stage names).
const PURGE_SQL: [&str; 4] = [
    "DELETE FROM stages WHERE (item_id, name) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    "DELETE FROM subtasks WHERE (item_id, stage) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    "DELETE FROM attempts WHERE (item_id, stage) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    "DELETE FROM review_decisions WHERE (item_id, stage) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
];

/// Removes the subtasks and their history of stages fanned out again.
const REFAN_SQL: [&str; 2] = [
    "DELETE FROM subtasks WHERE (item_id, stage) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    "DELETE FROM attempts WHERE subtask IS NOT NULL
     AND (item_id, stage) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
];

const ITEMS_SQL: &str = "UPDATE items SET cancelled = u.cancelled, version = u.version
     FROM unnest($1::text[], $2::bool[], $3::int8[]) AS u(id, cancelled, version)
     WHERE items.id = u.id";

/// Writes stage rows that may be new: inserted, or updated if they exist.
const NEW_STAGES_SQL: &str = "INSERT INTO stages (name, position, state, attempt, generation,
        started_at, finished_at, next_run_at, last_error, output, lease_owner, lease_expiry,
        item_id, item_seq, waiting, review, review_requested_at, review_deadline,
        fan_total, fan_open, fan_failed, crashes, edits_to_check)
     SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[],
        $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[],
        $11::text[], $12::timestamptz[], $13::text[], $14::int8[], $15::int8[],
        $16::text[], $17::timestamptz[], $18::timestamptz[], $19::int8[], $20::int8[],
        $21::int8[], $22::int8[], $23::bool[])
     ON CONFLICT (item_id, name) DO UPDATE SET position = excluded.position,
        state = excluded.state, attempt = excluded.attempt,
        generation = excluded.generation, started_at = excluded.started_at,
        finished_at = excluded.finished_at, next_run_at = excluded.next_run_at,
        last_error = excluded.last_error, output = excluded.output,
        lease_owner = excluded.lease_owner, lease_expiry = excluded.lease_expiry,
        waiting = excluded.waiting, review = excluded.review,
        review_requested_at = excluded.review_requested_at,
        review_deadline = excluded.review_deadline, fan_total = excluded.fan_total,
        fan_open = excluded.fan_open, fan_failed = excluded.fan_failed,
        crashes = excluded.crashes, edits_to_check = excluded.edits_to_check";

/// Writes subtask rows that may be new: inserted, or updated if they exist.
const NEW_SUBTASKS_SQL: &str = "INSERT INTO subtasks (name, position, state, attempt, generation,
        started_at, finished_at, next_run_at, last_error, output, lease_owner, lease_expiry,
        item_id, stage, crashes)
     SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[],
        $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[],
        $11::text[], $12::timestamptz[], $13::text[], $14::text[], $15::int8[])
     ON CONFLICT (item_id, stage, position) DO UPDATE SET name = excluded.name,
        state = excluded.state, attempt = excluded.attempt,
        generation = excluded.generation, started_at = excluded.started_at,
        finished_at = excluded.finished_at, next_run_at = excluded.next_run_at,
        last_error = excluded.last_error, output = excluded.output,
        lease_owner = excluded.lease_owner, lease_expiry = excluded.lease_expiry,
        crashes = excluded.crashes";

/// Updates existing stage rows by key (cheaper than an insert that
/// conflicts): the parameters of [`NEW_STAGES_SQL`].
const STAGES_SQL: &str = "UPDATE stages AS s SET position = u.position, state = u.state,
        attempt = u.attempt, generation = u.generation, started_at = u.started_at,
        finished_at = u.finished_at, next_run_at = u.next_run_at, last_error = u.last_error,
        output = u.output, lease_owner = u.lease_owner, lease_expiry = u.lease_expiry,
        waiting = u.waiting, review = u.review, review_requested_at = u.review_requested_at,
        review_deadline = u.review_deadline, fan_total = u.fan_total, fan_open = u.fan_open,
        fan_failed = u.fan_failed, crashes = u.crashes, edits_to_check = u.edits_to_check
     FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[],
        $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[],
        $11::text[], $12::timestamptz[], $13::text[], $14::int8[], $15::int8[],
        $16::text[], $17::timestamptz[], $18::timestamptz[], $19::int8[], $20::int8[],
        $21::int8[], $22::int8[], $23::bool[])
        AS u(name, position, state, attempt, generation, started_at, finished_at,
            next_run_at, last_error, output, lease_owner, lease_expiry, item_id, item_seq,
            waiting, review, review_requested_at, review_deadline, fan_total, fan_open,
            fan_failed, crashes, edits_to_check)
     WHERE s.item_id = u.item_id AND s.name = u.name";

/// Updates existing subtask rows by key: the parameters of
/// [`NEW_SUBTASKS_SQL`].
const SUBTASKS_SQL: &str = "UPDATE subtasks AS s SET name = u.name, state = u.state,
        attempt = u.attempt, generation = u.generation, started_at = u.started_at,
        finished_at = u.finished_at, next_run_at = u.next_run_at, last_error = u.last_error,
        output = u.output, lease_owner = u.lease_owner, lease_expiry = u.lease_expiry,
        crashes = u.crashes
     FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[],
        $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[],
        $11::text[], $12::timestamptz[], $13::text[], $14::text[], $15::int8[])
        AS u(name, position, state, attempt, generation, started_at, finished_at,
            next_run_at, last_error, output, lease_owner, lease_expiry, item_id, stage, crashes)
     WHERE s.item_id = u.item_id AND s.stage = u.stage AND s.position = u.position";

const ATTEMPTS_SQL: &str = "INSERT INTO attempts (item_id, stage, subtask, attempt, started_at,
        finished_at, result, error)
     SELECT i, s, t, a, b, f, r, e FROM unnest($1::text[], $2::text[], $3::int8[],
        $4::int8[], $5::timestamptz[], $6::timestamptz[], $7::text[], $8::text[])
        WITH ORDINALITY AS u(i, s, t, a, b, f, r, e, n) ORDER BY n";

const DECISIONS_SQL: &str = "INSERT INTO review_decisions (item_id, stage, round, decision)
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[])";

const CONSUMED_SQL: &str = "DELETE FROM run_queue WHERE seq = ANY($1)";

const QUEUE_SQL: &str = "INSERT INTO run_queue (item_id, stage, subtask)
     SELECT i, s, t FROM unnest($1::text[], $2::text[], $3::int8[])
        WITH ORDINALITY AS u(i, s, t, n) ORDER BY n";

const SCHEDULED_SQL: &str = "INSERT INTO scheduled (due, item_seq, item_id, stage,
        stage_position, subtask)
     SELECT * FROM unnest($1::timestamptz[], $2::int8[], $3::text[], $4::text[],
        $5::int8[], $6::int8[])";

/// Takes `$1` sequence numbers from the counter (locking its row until
/// commit, so transactions number their events in commit order), writes
/// the events with them and notifies channel `$7`, in one statement;
/// returns the last number taken and the transaction id.
const EVENTS_SQL: &str = "WITH counter AS (
        UPDATE event_counter SET last = last + $1 WHERE id = 1
        RETURNING last, pg_current_xact_id()::text AS xid),
     logged AS (
        INSERT INTO events (seq, at, item_id, stage, subtask, kind)
        SELECT counter.last - $1 + u.n, u.at, u.item, u.stage, u.subtask, u.kind
        FROM counter, unnest($2::timestamptz[], $3::text[], $4::text[], $5::text[],
            $6::text[]) WITH ORDINALITY AS u(at, item, stage, subtask, kind, n)
        RETURNING 1)
     SELECT last, xid, CASE WHEN $1 > 0 THEN pg_notify($7, last::text) END,
        (SELECT count(*) FROM logged)
     FROM counter";

/// The columns of stage rows to write, as arrays.
#[derive(Debug, Default)]
struct StageColumns<'a> {
    units: UnitColumns,
    items: Vec<&'a str>,
    seqs: Vec<i64>,
    waiting: Vec<i64>,
    reviews: Vec<Option<String>>,
    requested: Vec<Option<DateTime<Utc>>>,
    deadlines: Vec<Option<DateTime<Utc>>>,
    totals: Vec<Option<i64>>,
    open: Vec<Option<i64>>,
    failed: Vec<Option<i64>>,
    edits: Vec<bool>,
}

impl StageColumns<'_> {
    /// The parameters of [`NEW_STAGES_SQL`] and [`STAGES_SQL`].
    fn params(&self) -> [&(dyn ToSql + Sync); 23] {
        let u = &self.units;
        [
            &u.name,
            &u.position,
            &u.state,
            &u.attempt,
            &u.generation,
            &u.started_at,
            &u.finished_at,
            &u.next_run_at,
            &u.last_error,
            &u.output,
            &u.lease_owner,
            &u.lease_expiry,
            &self.items,
            &self.seqs,
            &self.waiting,
            &self.reviews,
            &self.requested,
            &self.deadlines,
            &self.totals,
            &self.open,
            &self.failed,
            &u.crashes,
            &self.edits,
        ]
    }
}

/// The columns of subtask rows to write, as arrays.
#[derive(Debug, Default)]
struct SubtaskColumns<'a> {
    units: UnitColumns,
    items: Vec<&'a str>,
    stages: Vec<&'a str>,
}

impl SubtaskColumns<'_> {
    /// The parameters of [`NEW_SUBTASKS_SQL`] and [`SUBTASKS_SQL`].
    fn params(&self) -> [&(dyn ToSql + Sync); 15] {
        let u = &self.units;
        [
            &u.name,
            &u.position,
            &u.state,
            &u.attempt,
            &u.generation,
            &u.started_at,
            &u.finished_at,
            &u.next_run_at,
            &u.last_error,
            &u.output,
            &u.lease_owner,
            &u.lease_expiry,
            &self.items,
            &self.stages,
            &u.crashes,
        ]
    }
}

/// The columns a stage row and a subtask row share, as arrays.
#[derive(Debug, Default)]
struct UnitColumns {
    name: Vec<String>,
    position: Vec<i64>,
    state: Vec<&'static str>,
    attempt: Vec<i64>,
    crashes: Vec<i64>,
    generation: Vec<i64>,
    started_at: Vec<Option<DateTime<Utc>>>,
    finished_at: Vec<Option<DateTime<Utc>>>,
    next_run_at: Vec<Option<DateTime<Utc>>>,
    last_error: Vec<Option<String>>,
    output: Vec<Option<String>>,
    lease_owner: Vec<Option<String>>,
    lease_expiry: Vec<Option<DateTime<Utc>>>,
}

impl UnitColumns {
    fn push(&mut self, unit: &UnitRecord, item: &str, stage: &str) -> Result<()> {
        self.name.push(String::from(&*unit.name));
        self.position.push(int(unit.position));
        self.state.push(unit.state.as_str());
        self.attempt.push(int(unit.attempt));
        self.crashes.push(int(unit.crashes));
        self.generation.push(int(unit.generation));
        self.started_at.push(unit.started_at);
        self.finished_at.push(unit.finished_at);
        self.next_run_at.push(unit.next_run_at);
        self.last_error.push(unit.last_error.clone());
        let what = || {
            format!(
                "the output of {} of item `{item}` (stage {stage})",
                unit.name
            )
        };
        self.output.push(
            unit.output
                .as_ref()
                .map(|o| codec::json(o, &what()))
                .transpose()?,
        );
        self.lease_owner
            .push(unit.lease.as_ref().map(|l| String::from(&*l.owner)));
        self.lease_expiry
            .push(unit.lease.as_ref().map(|l| l.expiry));
        Ok(())
    }
}
