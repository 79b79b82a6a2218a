//! Saving what the rules did in a batch: every changed row written once,
//! set-based (`unnest` arrays, by primary key), then the event counter
//! (updated last, so transactions take sequence numbers in commit order)
//! and the events, and one NOTIFY as a hint for other processes.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use super::batch::Slot;
use super::codec::{self, int};
use super::conn::Db;
use crate::error::Result;
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
    stages: BTreeSet<(String, String)>,
    subtasks: BTreeSet<(String, String, u32)>,
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
        let name = |stage: usize| record.stages[stage].unit.name.clone();
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
                .retain(|(i, s, _)| !(i == id && *s == stage_name));
            self.refanned.push((id.clone(), stage_name.clone()));
            for sub in record.stages[stage].fan_out.iter().flat_map(|f| &f.rows) {
                self.subtasks
                    .insert((id.clone(), stage_name.clone(), sub.position));
            }
        }
        if fresh || fx.restructured {
            for stage in &record.stages {
                self.stages.insert((id.clone(), stage.unit.name.clone()));
            }
        }
        for unit in &fx.changed {
            match unit.subtask {
                None => self.stages.insert((id.clone(), name(unit.stage))),
                Some(sub) => self.subtasks.insert((id.clone(), name(unit.stage), sub)),
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
            self.stages.retain(|(i, s)| !gone(i, s));
            self.subtasks.retain(|(i, s, _)| !gone(i, s));
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
    /// NOTIFY on `channel`. Returns the transaction id, for
    /// resolving a commit whose answer was lost.
    pub(super) async fn write(
        &mut self,
        db: Db<'_>,
        slots: &HashMap<String, Slot>,
        channel: &str,
    ) -> Result<String> {
        self.delete(db).await?;
        // Independent tables: pipelined on the connection.
        tokio::try_join!(
            self.write_items(db, slots),
            self.write_stages(db, slots),
            self.write_subtasks(db, slots),
            self.write_history(db),
            self.write_queues(db),
        )?;
        let n = self.events.len() as i64;
        let (last, xid) = self.write_events(db, n, channel).await?;
        let first = last - n + 1;
        for (i, event) in self.events.iter_mut().enumerate() {
            event.seq = (first + i as i64) as u64;
        }
        Ok(xid)
    }

    async fn delete(&self, db: Db<'_>) -> Result<()> {
        if !self.purged.is_empty() {
            let (items, stages): (Vec<&str>, Vec<&str>) = self
                .purged
                .iter()
                .map(|(i, s)| (i.as_str(), s.as_str()))
                .unzip();
            for sql in [
                "DELETE FROM stages WHERE (item_id, name) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                "DELETE FROM subtasks WHERE (item_id, stage) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                "DELETE FROM attempts WHERE (item_id, stage) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                "DELETE FROM review_decisions WHERE (item_id, stage) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            ] {
                db.execute(sql, &[&items, &stages]).await?;
            }
        }
        if !self.refanned.is_empty() {
            let (items, stages): (Vec<&str>, Vec<&str>) = self
                .refanned
                .iter()
                .map(|(i, s)| (i.as_str(), s.as_str()))
                .unzip();
            for sql in [
                "DELETE FROM subtasks WHERE (item_id, stage) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                "DELETE FROM attempts WHERE subtask IS NOT NULL
                 AND (item_id, stage) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            ] {
                db.execute(sql, &[&items, &stages]).await?;
            }
        }
        Ok(())
    }

    async fn write_items(&self, db: Db<'_>, slots: &HashMap<String, Slot>) -> Result<()> {
        if self.items.is_empty() {
            return Ok(());
        }
        let (mut ids, mut cancelled, mut versions) = (Vec::new(), Vec::new(), Vec::new());
        for id in &self.items {
            let record = &slots[id].record;
            ids.push(id.as_str());
            cancelled.push(record.cancelled);
            versions.push(int(record.version));
        }
        db.execute(
            "UPDATE items SET cancelled = u.cancelled, version = u.version
             FROM unnest($1::text[], $2::bool[], $3::int8[]) AS u(id, cancelled, version)
             WHERE items.id = u.id",
            &[&ids, &cancelled, &versions],
        )
        .await?;
        Ok(())
    }

    async fn write_stages(&self, db: Db<'_>, slots: &HashMap<String, Slot>) -> Result<()> {
        let mut units = UnitColumns::default();
        let (mut items, mut seqs, mut waiting, mut reviews, mut requested, mut deadlines) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let (mut totals, mut open, mut failed, mut edits) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, stage) in &self.stages {
            let slot = &slots[id];
            let Some(position) = slot.record.stage_position(stage) else {
                continue; // dropped by a later migration in the batch
            };
            let row = &slot.record.stages[position];
            units.push(&row.unit, id, stage)?;
            items.push(id.as_str());
            seqs.push(slot.seq);
            waiting.push(int(row.waiting));
            reviews.push(
                row.review
                    .as_ref()
                    .map(|r| codec::json(r, "a review"))
                    .transpose()?,
            );
            requested.push(row.review.as_ref().map(|r| r.requested_at));
            deadlines.push(
                row.review
                    .as_ref()
                    .and_then(|r| Some(r.request.deadline.as_ref()?.at)),
            );
            let fan = row.fan_out.as_ref();
            totals.push(fan.map(|f| int(f.total)));
            open.push(fan.map(|f| int(f.open)));
            failed.push(fan.map(|f| int(f.failed)));
            edits.push(row.edits_to_check);
        }
        if items.is_empty() {
            return Ok(());
        }
        let u = &units;
        db.execute(
            "INSERT INTO stages (name, position, state, attempt, generation, started_at,
                finished_at, next_run_at, last_error, output, lease_owner, lease_expiry,
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
                crashes = excluded.crashes, edits_to_check = excluded.edits_to_check",
            &[
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
                &items,
                &seqs,
                &waiting,
                &reviews,
                &requested,
                &deadlines,
                &totals,
                &open,
                &failed,
                &u.crashes,
                &edits,
            ],
        )
        .await?;
        Ok(())
    }

    async fn write_subtasks(&self, db: Db<'_>, slots: &HashMap<String, Slot>) -> Result<()> {
        let mut units = UnitColumns::default();
        let (mut items, mut stages) = (Vec::new(), Vec::new());
        for (id, stage, position) in &self.subtasks {
            let record = &slots[id].record;
            let Some(row) = record
                .stage_position(stage)
                .and_then(|p| record.stages[p].fan_out.as_ref()?.row(*position))
            else {
                continue; // replaced by a later fan-out, or dropped
            };
            units.push(row, id, stage)?;
            items.push(id.as_str());
            stages.push(stage.as_str());
        }
        if items.is_empty() {
            return Ok(());
        }
        let u = &units;
        db.execute(
            "INSERT INTO subtasks (name, position, state, attempt, generation, started_at,
                finished_at, next_run_at, last_error, output, lease_owner, lease_expiry,
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
                crashes = excluded.crashes",
            &[
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
                &items,
                &stages,
                &u.crashes,
            ],
        )
        .await?;
        Ok(())
    }

    async fn write_history(&self, db: Db<'_>) -> Result<()> {
        if !self.attempts.is_empty() {
            let mut columns = (
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            );
            for (item, stage, subtask, a) in &self.attempts {
                columns.0.push(item.as_str());
                columns.1.push(stage.as_str());
                columns.2.push(subtask.map(i64::from));
                columns.3.push(int(a.attempt));
                columns.4.push(a.started_at);
                columns.5.push(a.finished_at);
                columns.6.push(a.result.as_str());
                columns.7.push(a.error.as_deref());
            }
            let c = &columns;
            db.execute(
                "INSERT INTO attempts (item_id, stage, subtask, attempt, started_at, finished_at,
                    result, error)
                 SELECT i, s, t, a, b, f, r, e FROM unnest($1::text[], $2::text[], $3::int8[],
                    $4::int8[], $5::timestamptz[], $6::timestamptz[], $7::text[], $8::text[])
                    WITH ORDINALITY AS u(i, s, t, a, b, f, r, e, n) ORDER BY n",
                &[&c.0, &c.1, &c.2, &c.3, &c.4, &c.5, &c.6, &c.7],
            )
            .await?;
        }
        if !self.decisions.is_empty() {
            let items: Vec<&str> = self.decisions.iter().map(|d| d.0.as_str()).collect();
            let stages: Vec<&str> = self.decisions.iter().map(|d| d.1.as_str()).collect();
            let rounds: Vec<i64> = self.decisions.iter().map(|d| d.2).collect();
            let texts: Vec<&str> = self.decisions.iter().map(|d| d.3.as_str()).collect();
            db.execute(
                "INSERT INTO review_decisions (item_id, stage, round, decision)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[])",
                &[&items, &stages, &rounds, &texts],
            )
            .await?;
        }
        Ok(())
    }

    async fn write_queues(&self, db: Db<'_>) -> Result<()> {
        if !self.consumed.is_empty() {
            db.execute(
                "DELETE FROM run_queue WHERE seq = ANY($1)",
                &[&self.consumed],
            )
            .await?;
        }
        if !self.queue.is_empty() {
            let items: Vec<&str> = self.queue.iter().map(|q| q.0.as_str()).collect();
            let stages: Vec<&str> = self.queue.iter().map(|q| q.1.as_str()).collect();
            let subtasks: Vec<Option<i64>> = self.queue.iter().map(|q| q.2).collect();
            db.execute(
                "INSERT INTO run_queue (item_id, stage, subtask)
                 SELECT i, s, t FROM unnest($1::text[], $2::text[], $3::int8[])
                    WITH ORDINALITY AS u(i, s, t, n) ORDER BY n",
                &[&items, &stages, &subtasks],
            )
            .await?;
        }
        if !self.scheduled.is_empty() {
            let s = &self.scheduled;
            let due: Vec<DateTime<Utc>> = s.iter().map(|e| e.due).collect();
            let seqs: Vec<i64> = s.iter().map(|e| e.item_seq).collect();
            let items: Vec<&str> = s.iter().map(|e| e.item.as_str()).collect();
            let stages: Vec<&str> = s.iter().map(|e| e.stage.as_str()).collect();
            let positions: Vec<i64> = s.iter().map(|e| e.position).collect();
            let subtasks: Vec<Option<i64>> = s.iter().map(|e| e.subtask).collect();
            db.execute(
                "INSERT INTO scheduled (due, item_seq, item_id, stage, stage_position, subtask)
                 SELECT * FROM unnest($1::timestamptz[], $2::int8[], $3::text[], $4::text[],
                    $5::int8[], $6::int8[])",
                &[&due, &seqs, &items, &stages, &positions, &subtasks],
            )
            .await?;
        }
        Ok(())
    }

    /// Takes `n` sequence numbers from the counter (locking its row until
    /// commit, so transactions number their events in commit order), writes
    /// the events with them and notifies `channel`, in one statement.
    /// Returns the last number taken and the transaction id.
    async fn write_events(&self, db: Db<'_>, n: i64, channel: &str) -> Result<(i64, String)> {
        let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for event in &self.events {
            columns.0.push(event.at);
            columns.1.push(event.item_id.as_str());
            columns.2.push(event.stage.as_deref());
            columns.3.push(event.subtask.as_deref());
            columns.4.push(codec::json(&event.kind, "an event")?);
        }
        let c = &columns;
        let row = db
            .one(
                "WITH counter AS (
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
                 FROM counter",
                &[&n, &c.0, &c.1, &c.2, &c.3, &c.4, &channel],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
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
        self.name.push(unit.name.clone());
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
            .push(unit.lease.as_ref().map(|l| l.owner.clone()));
        self.lease_expiry
            .push(unit.lease.as_ref().map(|l| l.expiry));
        Ok(())
    }
}
