//! The transitions, as SQL run by the writer thread inside one savepoint
//! each. They mirror the in-memory store step for step, so both stores
//! append the same events in the same order for the same transition.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::codec::{self, Loc};
use crate::definition::PipelineDef;
use crate::error::{Error, Result};
use crate::event::{Event, EventKind};
use crate::state::{AttemptResult, DecisionKind, StageState};
use crate::status::AttemptRecord;
use crate::store::{
    Claim, ClaimBatch, ClaimRequest, Commit, DecisionCommit, FanIn, NewItem, PipelineDrift,
    SubtaskTransition, TaskKey, Transition, Verdict, check_json, fan_in,
};

/// One transition in progress: the connection and the events appended so far.
pub(crate) struct Tx<'c> {
    conn: &'c Connection,
    events: Vec<Event>,
}

/// The fields of a stage or subtask a transition checks.
#[derive(Debug)]
struct Unit {
    state: StageState,
    attempt: u32,
    generation: u64,
    waiting: u32,
    next_run_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    lease_expiry: Option<DateTime<Utc>>,
    lease_owner: Option<String>,
    /// The item's payload (JSON text, not yet checked), unless the item is
    /// cancelled: read with the unit so a claim needs no second query.
    payload: Option<String>,
}

fn unit_loc(key: &TaskKey) -> Loc {
    match &key.subtask {
        None => Loc::stage(&key.item_id, &key.stage),
        Some(sub) => Loc::subtask(&key.item_id, &key.stage, sub),
    }
}

impl<'c> Tx<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Tx {
            conn,
            events: Vec::new(),
        }
    }

    /// The events appended so far, in log order.
    pub(crate) fn events(&self) -> &[Event] {
        &self.events
    }

    /// The events appended, in log order.
    pub(crate) fn into_events(self) -> Vec<Event> {
        self.events
    }

    /// Appends an event to the log.
    fn append(
        &mut self,
        at: DateTime<Utc>,
        item_id: &str,
        stage: Option<&str>,
        subtask: Option<&str>,
        kind: EventKind,
    ) -> Result<Event> {
        let json = codec::json(&kind, "an event")?;
        self.conn
            .prepare_cached(
                "INSERT INTO events (at, item_id, stage, subtask, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![codec::time(at), item_id, stage, subtask, json])?;
        // `seq` is the rowid: the row just inserted on this connection.
        let seq = self.conn.last_insert_rowid() as u64;
        let event = Event {
            seq,
            at,
            item_id: item_id.to_owned(),
            stage: stage.map(str::to_owned),
            subtask: subtask.map(str::to_owned),
            kind,
        };
        self.events.push(event.clone());
        Ok(event)
    }

    /// An event about a stage (`stage_level`) or the key's subtask.
    fn unit_event(
        &mut self,
        at: DateTime<Utc>,
        key: &TaskKey,
        stage_level: bool,
        kind: EventKind,
    ) -> Result<Event> {
        let subtask = if stage_level {
            None
        } else {
            key.subtask.as_deref()
        };
        self.append(at, &key.item_id, Some(&key.stage), subtask, kind)
    }

    fn item_cancelled(&self, item_id: &str) -> Result<Option<bool>> {
        let loc = Loc::item(item_id);
        self.conn
            .prepare_cached("SELECT cancelled FROM items WHERE id = ?1")?
            .query_row([item_id], |row| Ok(loc.count::<u8>(row, 0, "cancelled")))
            .optional()?
            .transpose()?
            .map(|flag| match flag {
                0 => Ok(false),
                1 => Ok(true),
                n => Err(loc.corrupt("cancelled", format!("{n} is not 0 or 1"))),
            })
            .transpose()
    }

    /// Resolves an item and stage for a transition addressed by a caller.
    fn require_stage(&self, item_id: &str, stage: &str) -> Result<(bool, Unit)> {
        let cancelled = self
            .item_cancelled(item_id)?
            .ok_or_else(|| Error::UnknownItem(item_id.to_owned()))?;
        let unit =
            self.load(&TaskKey::stage(item_id, stage))?
                .ok_or_else(|| Error::UnknownStage {
                    item: item_id.to_owned(),
                    stage: stage.to_owned(),
                })?;
        Ok((cancelled, unit))
    }

    /// The state and fencing generation of a unit: all a commit checks.
    fn fence(&self, key: &TaskKey) -> Result<Option<(StageState, u64)>> {
        let loc = unit_loc(key);
        let read = |row: &rusqlite::Row<'_>| -> Result<(StageState, u64)> {
            Ok((
                loc.parse(row, 0, "state")?,
                loc.count(row, 1, "generation")?,
            ))
        };
        let found = match &key.subtask {
            None => self
                .conn
                .prepare_cached(
                    "SELECT state, generation FROM stages WHERE item_id = ?1 AND stage = ?2",
                )?
                .query_row(params![key.item_id, key.stage], |row| Ok(read(row)))
                .optional()?,
            Some(sub) => self
                .conn
                .prepare_cached(
                    "SELECT state, generation FROM subtasks
                     WHERE item_id = ?1 AND stage = ?2 AND name = ?3",
                )?
                .query_row(params![key.item_id, key.stage, sub], |row| Ok(read(row)))
                .optional()?,
        };
        found.transpose()
    }

    fn load(&self, key: &TaskKey) -> Result<Option<Unit>> {
        let loc = unit_loc(key);
        let read = |row: &rusqlite::Row<'_>| -> Result<Unit> {
            Ok(Unit {
                state: loc.parse(row, 0, "state")?,
                attempt: loc.count(row, 1, "attempt")?,
                generation: loc.count(row, 2, "generation")?,
                waiting: loc.count(row, 3, "waiting")?,
                next_run_at: loc.time_opt(row, 4, "next_run_at")?,
                started_at: loc.time_opt(row, 5, "started_at")?,
                lease_expiry: loc.time_opt(row, 6, "lease_expiry")?,
                lease_owner: loc.get(row, 7, "lease_owner")?,
                payload: loc.get(row, 8, "payload")?,
            })
        };
        let found = match &key.subtask {
            None => self
                .conn
                .prepare_cached(
                    "SELECT s.state, s.attempt, s.generation, s.waiting, s.next_run_at,
                            s.started_at, s.lease_expiry, s.lease_owner,
                            CASE WHEN i.cancelled = 0 THEN i.payload END
                     FROM stages s JOIN items i ON i.id = s.item_id
                     WHERE s.item_id = ?1 AND s.stage = ?2",
                )?
                .query_row(params![key.item_id, key.stage], |row| Ok(read(row)))
                .optional()?,
            Some(sub) => self
                .conn
                .prepare_cached(
                    "SELECT t.state, t.attempt, t.generation, 0, t.next_run_at, t.started_at,
                            t.lease_expiry, t.lease_owner,
                            CASE WHEN i.cancelled = 0 THEN i.payload END
                     FROM subtasks t JOIN items i ON i.id = t.item_id
                     WHERE t.item_id = ?1 AND t.stage = ?2 AND t.name = ?3",
                )?
                .query_row(params![key.item_id, key.stage, sub], |row| Ok(read(row)))
                .optional()?,
        };
        found.transpose()
    }

    /// Sets a stage's state, releasing any lease unless it stays running.
    fn set_stage_state(&self, key: &TaskKey, state: StageState) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE stages SET state = ?3,
                    lease_owner = CASE WHEN ?3 = 'running' THEN lease_owner END,
                    lease_expiry = CASE WHEN ?3 = 'running' THEN lease_expiry END
                 WHERE item_id = ?1 AND stage = ?2",
            )?
            .execute(params![key.item_id, key.stage, state.as_str()])?;
        Ok(())
    }

    fn set_stage_column(&self, key: &TaskKey, sql: &str, value: Option<String>) -> Result<()> {
        self.conn
            .prepare_cached(sql)?
            .execute(params![key.item_id, key.stage, value])?;
        Ok(())
    }

    fn enqueue(&self, item_id: &str, stage: &str, subtask: Option<&str>) -> Result<()> {
        self.conn
            .prepare_cached("INSERT INTO run_queue (item_id, stage, subtask) VALUES (?1, ?2, ?3)")?
            .execute(params![item_id, stage, subtask])?;
        Ok(())
    }

    fn schedule(&self, due: DateTime<Utc>, key: &TaskKey) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO scheduled
                    (due, item_id, stage, subtask, item_seq, stage_position, subtask_position)
                 SELECT ?1, s.item_id, s.stage, ?4, s.item_seq, s.position,
                        (SELECT position FROM subtasks
                         WHERE item_id = s.item_id AND stage = s.stage AND name = ?4)
                 FROM stages s WHERE s.item_id = ?2 AND s.stage = ?3",
            )?
            .execute(params![
                codec::time(due),
                key.item_id,
                key.stage,
                key.subtask
            ])?;
        Ok(())
    }

    /// Appends to the attempt history; a failed attempt's error becomes the
    /// unit's last error.
    fn record_attempt(&self, key: &TaskKey, attempt: &AttemptRecord) -> Result<()> {
        self.conn
            .prepare_cached(
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
        if attempt.result.is_failure() {
            self.set_last_error(key, attempt.error.as_deref())?;
        }
        Ok(())
    }

    fn set_last_error(&self, key: &TaskKey, error: Option<&str>) -> Result<()> {
        match &key.subtask {
            None => self.conn.prepare_cached(
                "UPDATE stages SET last_error = ?3 WHERE item_id = ?1 AND stage = ?2",
            )?
            .execute(params![key.item_id, key.stage, error])?,
            Some(sub) => self.conn.prepare_cached(
                "UPDATE subtasks SET last_error = ?4 WHERE item_id = ?1 AND stage = ?2 AND name = ?3",
            )?
            .execute(params![key.item_id, key.stage, sub, error])?,
        };
        Ok(())
    }

    /// Completes a stage with `output` (one update of its row), records the
    /// `Completed` event, and unblocks its dependents.
    fn complete_stage(
        &mut self,
        key: &TaskKey,
        output: Option<&Value>,
        dependents: &[String],
        at: DateTime<Utc>,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE stages SET state = 'completed', output = ?3, finished_at = ?4,
                    lease_owner = NULL, lease_expiry = NULL
                 WHERE item_id = ?1 AND stage = ?2",
            )?
            .execute(params![
                key.item_id,
                key.stage,
                codec::json_opt(output, "the stage output")?,
                codec::time(at),
            ])?;
        self.unit_event(at, key, true, EventKind::Completed)?;
        self.unblock_dependents(key, dependents, at)
    }

    /// Marks a stage skipped and unblocks its dependents.
    fn skip_stage(
        &mut self,
        key: &TaskKey,
        dependents: &[String],
        at: DateTime<Utc>,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE stages SET state = 'skipped', finished_at = ?3,
                    lease_owner = NULL, lease_expiry = NULL
                 WHERE item_id = ?1 AND stage = ?2",
            )?
            .execute(params![key.item_id, key.stage, codec::time(at)])?;
        self.unblock_dependents(key, dependents, at)
    }

    /// After a stage completed or skipped: makes dependents whose upstream
    /// stages are all done runnable, and records `ItemCompleted` after the
    /// item's last stage.
    fn unblock_dependents(
        &mut self,
        key: &TaskKey,
        dependents: &[String],
        at: DateTime<Utc>,
    ) -> Result<()> {
        for dependent in dependents {
            self.conn
                .prepare_cached(
                    "UPDATE stages SET waiting = max(waiting - 1, 0)
                     WHERE item_id = ?1 AND stage = ?2",
                )?
                .execute(params![key.item_id, dependent])?;
            // Queue it if that was its last upstream stage.
            self.conn
                .prepare_cached(
                    "INSERT INTO run_queue (item_id, stage, subtask)
                     SELECT item_id, stage, NULL FROM stages
                     WHERE item_id = ?1 AND stage = ?2 AND waiting = 0 AND state = 'pending'",
                )?
                .execute(params![key.item_id, dependent])?;
        }
        // Only a stage no other stage waits for can be an item's last.
        if !dependents.is_empty() {
            return Ok(());
        }
        let all_done: bool = self
            .conn
            .prepare_cached(
                "SELECT NOT EXISTS (SELECT 1 FROM stages WHERE item_id = ?1
                                    AND state NOT IN ('completed', 'skipped'))",
            )?
            .query_row([&key.item_id], |row| row.get(0))?;
        if all_done {
            self.append(at, &key.item_id, None, None, EventKind::ItemCompleted)?;
        }
        Ok(())
    }

    fn fail_stage(&mut self, key: &TaskKey, reason: String, at: DateTime<Utc>) -> Result<()> {
        self.set_stage_state(key, StageState::Failed)?;
        self.conn
            .prepare_cached(
                "UPDATE stages SET finished_at = ?3, last_error = ?4
                 WHERE item_id = ?1 AND stage = ?2",
            )?
            .execute(params![key.item_id, key.stage, codec::time(at), reason])?;
        self.unit_event(at, key, true, EventKind::Failed { reason })?;
        Ok(())
    }

    // ---- transitions ----

    pub(crate) fn register_pipeline(&mut self, definition: &PipelineDef) -> Result<PipelineDrift> {
        let drift = super::read::pipeline_definition(self.conn)?
            .map(|stored| PipelineDrift::between(&stored, definition))
            .unwrap_or_default();
        self.conn
            .prepare_cached(
                "INSERT INTO pipeline (id, definition) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET definition = excluded.definition",
            )?
            .execute([codec::json(definition, "the pipeline definition")?])?;
        Ok(drift)
    }

    pub(crate) fn submit(&mut self, items: &[NewItem]) -> Result<()> {
        for item in items {
            check_json(&item.payload, &format!("the payload of item `{}`", item.id))?;
            let payload = &item.payload;
            let seq: Option<i64> = self
                .conn
                .prepare_cached(
                    "INSERT INTO items (id, payload, submitted_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (id) DO NOTHING
                     RETURNING seq",
                )?
                .query_row(params![item.id, payload, codec::time(item.at)], |row| {
                    row.get(0)
                })
                .optional()?;
            let Some(seq) = seq else { continue };
            for (position, seed) in item.stages.iter().enumerate() {
                self.conn
                    .prepare_cached(
                        "INSERT INTO stages (item_id, stage, item_seq, position, state, waiting)
                         VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
                    )?
                    .execute(params![item.id, seed.name, seq, position, seed.upstream])?;
                if seed.upstream == 0 {
                    self.enqueue(&item.id, &seed.name, None)?;
                }
            }
            self.append(item.at, &item.id, None, None, EventKind::ItemSubmitted)?;
        }
        Ok(())
    }

    pub(crate) fn claim(&mut self, request: &ClaimRequest) -> Result<ClaimBatch> {
        let mut batch = ClaimBatch::default();
        let now = codec::time(request.now);
        // Work whose worker vanished: its lease ran out while it was running.
        for key in self.expired(&now, request.limit)? {
            if let Some(claim) = self.claim_one(&key, request)? {
                batch.claims.push(claim);
            }
        }
        // Retries that fell due join the back of the run queue.
        let due = self.queued_units(
            "SELECT id, item_id, stage, subtask FROM scheduled WHERE due <= ?1
             ORDER BY due, item_seq, stage_position, subtask_position",
            &now,
        )?;
        for (id, key) in due {
            self.conn
                .prepare_cached("DELETE FROM scheduled WHERE id = ?1")?
                .execute([id])?;
            self.enqueue(&key.item_id, &key.stage, key.subtask.as_deref())?;
        }
        // Pop the queue's head in batches; stale entries are dropped and the
        // next batch tops the claims up.
        while batch.claims.len() < request.limit {
            let wanted = request.limit - batch.claims.len();
            let head = self.queued_units(
                "SELECT seq, item_id, stage, subtask FROM run_queue ORDER BY seq LIMIT ?1",
                &wanted,
            )?;
            let Some(&(last, _)) = head.last() else { break };
            self.conn
                .prepare_cached("DELETE FROM run_queue WHERE seq <= ?1")?
                .execute([last])?;
            for (_, key) in head {
                if let Some(claim) = self.claim_one(&key, request)? {
                    batch.claims.push(claim);
                }
            }
        }
        batch.events = self.events.clone();
        Ok(batch)
    }

    /// Rows of a queue table (`scheduled` or `run_queue`): their id and the
    /// unit of work they name, from `sql` with one parameter.
    fn queued_units(&self, sql: &str, param: &dyn rusqlite::ToSql) -> Result<Vec<(i64, TaskKey)>> {
        let units = self
            .conn
            .prepare_cached(sql)?
            .query_map([param], |row| {
                Ok((
                    row.get(0)?,
                    TaskKey {
                        item_id: row.get(1)?,
                        stage: row.get(2)?,
                        subtask: row.get(3)?,
                    },
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(units)
    }

    /// Running units whose lease expired before `now`, oldest expiry first.
    fn expired(&self, now: &str, limit: usize) -> Result<Vec<TaskKey>> {
        let mut found: Vec<(String, TaskKey)> = Vec::new();
        for sql in [
            "SELECT lease_expiry, item_id, stage, NULL FROM stages
             WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_expiry <= ?1
             ORDER BY lease_expiry LIMIT ?2",
            "SELECT lease_expiry, item_id, stage, name FROM subtasks
             WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_expiry <= ?1
             ORDER BY lease_expiry LIMIT ?2",
        ] {
            let mut statement = self.conn.prepare_cached(sql)?;
            let rows = statement.query_map(params![now, limit], |row| {
                Ok((
                    row.get(0)?,
                    TaskKey {
                        item_id: row.get(1)?,
                        stage: row.get(2)?,
                        subtask: row.get(3)?,
                    },
                ))
            })?;
            for row in rows {
                found.push(row?);
            }
        }
        found.sort();
        Ok(found.into_iter().take(limit).map(|(_, key)| key).collect())
    }

    fn claim_one(&mut self, key: &TaskKey, request: &ClaimRequest) -> Result<Option<Claim>> {
        let Some(unit) = self.load(key)? else {
            return Ok(None);
        };
        if unit.waiting != 0 {
            return Ok(None);
        }
        let abandoned = unit.state == StageState::Running
            && unit.lease_expiry.is_some_and(|until| until <= request.now);
        let runnable = match unit.state {
            StageState::Pending => true,
            StageState::RetryScheduled => unit.next_run_at.is_none_or(|at| at <= request.now),
            _ => abandoned,
        };
        if !runnable {
            return Ok(None);
        }
        let Some(text) = unit.payload.as_deref() else {
            return Ok(None); // the item was cancelled
        };
        // Decoded strictly here, so a corrupt payload is the store's typed error.
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| {
            Loc::item(&key.item_id).corrupt("payload", format!("invalid JSON: {e}"))
        })?;
        let payload: Arc<str> = Arc::from(text);
        if abandoned {
            let expired = unit.lease_expiry.unwrap_or(request.now);
            let previous_owner = unit.lease_owner.clone().unwrap_or_default();
            tracing::warn!(
                item_id = %key.item_id, stage = %key.stage, subtask = ?key.subtask,
                attempt = unit.attempt, previous_owner = %previous_owner,
                "recovering work whose lease expired"
            );
            self.record_attempt(
                key,
                &AttemptRecord {
                    attempt: unit.attempt,
                    started_at: unit.started_at.unwrap_or(expired),
                    finished_at: expired,
                    result: AttemptResult::Abandoned,
                    error: Some(format!("the lease of worker `{previous_owner}` expired")),
                },
            )?;
            let kind = EventKind::Recovered {
                previous_owner,
                attempt: unit.attempt,
            };
            self.unit_event(request.now, key, false, kind)?;
        }
        let attempt = unit.attempt.saturating_add(1);
        let generation = unit.generation.saturating_add(1);
        let lease = TimeDelta::from_std(request.lease).unwrap_or(TimeDelta::MAX);
        let expiry = request
            .now
            .checked_add_signed(lease)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let values = params![
            key.item_id,
            key.stage,
            key.subtask,
            attempt,
            generation,
            codec::time(request.now),
            request.owner,
            codec::time(expiry),
        ];
        let sql = match key.subtask {
            None => {
                "UPDATE stages SET state = 'running', attempt = ?4, generation = ?5,
                    started_at = ?6, next_run_at = NULL, lease_owner = ?7, lease_expiry = ?8
                 WHERE item_id = ?1 AND stage = ?2 AND ?3 IS NULL"
            }
            Some(_) => {
                "UPDATE subtasks SET state = 'running', attempt = ?4, generation = ?5,
                    started_at = ?6, next_run_at = NULL, lease_owner = ?7, lease_expiry = ?8
                 WHERE item_id = ?1 AND stage = ?2 AND name = ?3"
            }
        };
        self.conn.prepare_cached(sql)?.execute(values)?;
        let outputs = self.outputs(&key.item_id)?;
        self.unit_event(
            request.now,
            key,
            false,
            EventKind::Started {
                attempt,
                owner: request.owner.clone(),
            },
        )?;
        Ok(Some(Claim {
            task: key.clone(),
            attempt,
            generation,
            started_at: request.now,
            payload,
            outputs,
        }))
    }

    fn outputs(&self, item_id: &str) -> Result<BTreeMap<String, Value>> {
        let mut statement = self.conn.prepare_cached(
            "SELECT stage, output FROM stages
             WHERE item_id = ?1 AND state = 'completed' AND output IS NOT NULL",
        )?;
        let rows = statement.query_map([item_id], |row| {
            let stage: String = row.get(0)?;
            let value = Loc::stage(item_id, &stage).json(row, 1, "output");
            Ok(value.map(|v| (stage, v)))
        })?;
        let mut outputs = BTreeMap::new();
        for row in rows {
            let (stage, value) = row??;
            outputs.insert(stage, value);
        }
        Ok(outputs)
    }

    pub(crate) fn commit(&mut self, c: Commit) -> Result<()> {
        let lease_lost = || Error::LeaseLost {
            task: c.task.clone(),
            generation: c.generation,
        };
        let Some((state, generation)) = self.fence(&c.task)? else {
            // Say which of item, stage or subtask is unknown.
            self.require_stage(&c.task.item_id, &c.task.stage)?;
            return Err(lease_lost());
        };
        if state != StageState::Running || generation != c.generation {
            return Err(lease_lost());
        }
        self.record_attempt(&c.task, &c.attempt)?;
        match c.task.subtask.clone() {
            None => self.commit_stage(c),
            Some(name) => self.commit_subtask(c, &name),
        }
    }

    fn commit_stage(&mut self, c: Commit) -> Result<()> {
        let key = &c.task;
        let at = c.attempt.finished_at;
        match c.transition {
            Transition::Complete { output } => {
                self.complete_stage(key, output.as_ref(), &c.dependents, at)?;
            }
            Transition::Skip { reason } => {
                self.unit_event(at, key, true, EventKind::Skipped { reason })?;
                self.skip_stage(key, &c.dependents, at)?;
            }
            Transition::AwaitReview(request) => {
                let summary = request.summary.clone();
                self.conn
                    .prepare_cached(
                        "UPDATE stages SET review_round = review_round + 1, review_request = ?3,
                            review_requested_at = ?4, finished_at = ?4, review_deadline = ?5
                         WHERE item_id = ?1 AND stage = ?2",
                    )?
                    .execute(params![
                        key.item_id,
                        key.stage,
                        codec::json(&request, "the review request")?,
                        codec::time(at),
                        codec::time_opt(request.deadline.as_ref().map(|d| d.at)),
                    ])?;
                self.set_stage_state(key, StageState::AwaitingReview)?;
                self.unit_event(at, key, true, EventKind::ReviewRequested { summary })?;
            }
            Transition::RetryAt { at: due } => {
                self.set_stage_state(key, StageState::RetryScheduled)?;
                self.set_stage_column(
                    key,
                    "UPDATE stages SET next_run_at = ?3 WHERE item_id = ?1 AND stage = ?2",
                    Some(codec::time(due)),
                )?;
                self.schedule(due, key)?;
                let kind = EventKind::RetryScheduled {
                    at: due,
                    error: c.attempt.error,
                };
                self.unit_event(at, key, true, kind)?;
            }
            Transition::Fail { reason } => self.fail_stage(key, reason, at)?,
            Transition::FanOut { subtasks } => {
                // A fanned-out stage stays running, without a lease: its
                // subtasks hold the leases, and it is never recovered itself.
                self.conn
                    .prepare_cached(
                        "UPDATE stages SET lease_owner = NULL, lease_expiry = NULL
                         WHERE item_id = ?1 AND stage = ?2",
                    )?
                    .execute(params![key.item_id, key.stage])?;
                self.conn
                    .prepare_cached(
                        "DELETE FROM attempts
                         WHERE item_id = ?1 AND stage = ?2 AND subtask IS NOT NULL",
                    )?
                    .execute(params![key.item_id, key.stage])?;
                self.conn
                    .prepare_cached("DELETE FROM subtasks WHERE item_id = ?1 AND stage = ?2")?
                    .execute(params![key.item_id, key.stage])?;
                for (position, name) in subtasks.iter().enumerate() {
                    self.conn
                        .prepare_cached(
                            "INSERT INTO subtasks (item_id, stage, name, position, state)
                             VALUES (?1, ?2, ?3, ?4, 'pending')",
                        )?
                        .execute(params![key.item_id, key.stage, name, position])?;
                }
                self.unit_event(
                    at,
                    key,
                    true,
                    EventKind::FannedOut {
                        subtasks: subtasks.clone(),
                    },
                )?;
                if subtasks.is_empty() {
                    let empty = Value::Object(Default::default());
                    self.complete_stage(key, Some(&empty), &c.dependents, at)?;
                }
                for name in &subtasks {
                    self.enqueue(&key.item_id, &key.stage, Some(name))?;
                }
            }
        }
        Ok(())
    }

    fn commit_subtask(&mut self, c: Commit, name: &str) -> Result<()> {
        let key = &c.task;
        let at = c.attempt.finished_at;
        let (state, output, next_run_at, error, kind) = match c.transition.for_subtask() {
            SubtaskTransition::Complete { output } => (
                StageState::Completed,
                codec::json_opt(output.as_ref(), "the subtask output")?,
                None,
                None,
                EventKind::Completed,
            ),
            SubtaskTransition::Skip { reason } => (
                StageState::Skipped,
                None,
                None,
                None,
                EventKind::Skipped { reason },
            ),
            SubtaskTransition::RetryAt { at: due } => (
                StageState::RetryScheduled,
                None,
                Some(due),
                None,
                EventKind::RetryScheduled {
                    at: due,
                    error: c.attempt.error.clone(),
                },
            ),
            SubtaskTransition::Fail { reason } => (
                StageState::Failed,
                None,
                None,
                Some(reason.clone()),
                EventKind::Failed { reason },
            ),
        };
        // Terminal states record when they ended, a scheduled retry its due
        // time, a failure its reason; only a completion stores an output.
        self.conn
            .prepare_cached(
                "UPDATE subtasks SET state = ?4, lease_owner = NULL, lease_expiry = NULL,
                    output = CASE WHEN ?4 = 'completed' THEN ?5 ELSE output END,
                    finished_at = CASE WHEN ?4 = 'retry_scheduled' THEN finished_at ELSE ?6 END,
                    next_run_at = CASE WHEN ?4 = 'retry_scheduled' THEN ?7 ELSE next_run_at END,
                    last_error = CASE WHEN ?4 = 'failed' THEN ?8 ELSE last_error END
                 WHERE item_id = ?1 AND stage = ?2 AND name = ?3",
            )?
            .execute(params![
                key.item_id,
                key.stage,
                name,
                state.as_str(),
                output,
                codec::time(at),
                codec::time_opt(next_run_at),
                error,
            ])?;
        if state == StageState::RetryScheduled
            && let Some(due) = next_run_at
        {
            self.schedule(due, key)?;
        }
        self.unit_event(at, key, false, kind)?;
        let subtasks = self.subtask_states(&key.item_id, &key.stage)?;
        match fan_in(subtasks.iter().map(|(n, s)| (n.as_str(), *s))) {
            FanIn::Waiting => {}
            FanIn::Completed => {
                let output = self.subtask_outputs(&key.item_id, &key.stage)?;
                self.complete_stage(key, Some(&output), &c.dependents, at)?;
            }
            FanIn::Failed(failed) => {
                self.fail_stage(key, FanIn::failure_reason(&failed), at)?;
            }
        }
        Ok(())
    }

    fn subtask_states(&self, item_id: &str, stage: &str) -> Result<Vec<(String, StageState)>> {
        let mut statement = self.conn.prepare_cached(
            "SELECT name, state FROM subtasks WHERE item_id = ?1 AND stage = ?2 ORDER BY position",
        )?;
        let rows = statement.query_map(params![item_id, stage], |row| {
            let name: String = row.get(0)?;
            let state = Loc::subtask(item_id, stage, &name).parse(row, 1, "state");
            Ok(state.map(|s| (name, s)))
        })?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row??);
        }
        Ok(out)
    }

    fn subtask_outputs(&self, item_id: &str, stage: &str) -> Result<Value> {
        let mut statement = self.conn.prepare_cached(
            "SELECT name, output FROM subtasks WHERE item_id = ?1 AND stage = ?2 ORDER BY position",
        )?;
        let rows = statement.query_map(params![item_id, stage], |row| {
            let name: String = row.get(0)?;
            let output: Result<Option<Value>> =
                Loc::subtask(item_id, stage, &name).json_opt(row, 1, "output");
            Ok(output.map(|o| (name, o.unwrap_or(Value::Null))))
        })?;
        let mut map = serde_json::Map::new();
        for row in rows {
            let (name, output) = row??;
            map.insert(name, output);
        }
        Ok(Value::Object(map))
    }

    pub(crate) fn decide(&mut self, d: DecisionCommit) -> Result<()> {
        let (_, unit) = self.require_stage(&d.item_id, &d.stage)?;
        let loc = Loc::stage(&d.item_id, &d.stage);
        let (round, request): (u64, Option<crate::review::ReviewRequest>) = self
            .conn
            .prepare_cached(
                "SELECT review_round, review_request FROM stages WHERE item_id = ?1 AND stage = ?2",
            )?
            .query_row(params![d.item_id, d.stage], |row| {
                Ok(
                    (|| -> Result<(u64, Option<crate::review::ReviewRequest>)> {
                        Ok((
                            loc.count(row, 0, "review_round")?,
                            loc.json_opt(row, 1, "review_request")?,
                        ))
                    })(),
                )
            })??;
        if unit.state != StageState::AwaitingReview || round == 0 {
            return Err(Error::NotAwaitingReview {
                item: d.item_id,
                stage: d.stage,
                state: unit.state,
            });
        }
        let request = request
            .ok_or_else(|| loc.corrupt("review_request", "awaiting review without a request"))?;
        if let Some(answered) = d.decision.round.filter(|&r| r != round) {
            return Err(Error::StaleDecision {
                item: d.item_id,
                stage: d.stage,
                answered,
                current: round,
            });
        }
        let key = TaskKey::stage(d.item_id.clone(), d.stage.clone());
        let (kind, reason, edits) = match d.verdict {
            Verdict::Approve => (DecisionKind::Approved, None, None),
            Verdict::ApproveWithEdits(v) => (DecisionKind::ApprovedWithEdits, None, Some(v)),
            Verdict::Reject { reason } => (DecisionKind::Rejected, Some(reason), None),
        };
        self.conn
            .prepare_cached(
                "INSERT INTO review_decisions
                    (item_id, stage, round, kind, decided_by, decided_at, note, reason, edits)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                d.item_id,
                d.stage,
                round,
                kind.as_str(),
                d.decision.by,
                codec::time(d.at),
                d.decision.note,
                reason,
                codec::json_opt(edits.as_ref(), "the edited output")?,
            ])?;
        self.unit_event(
            d.at,
            &key,
            true,
            EventKind::ReviewDecided {
                decision: kind,
                by: d.decision.by.clone(),
            },
        )?;
        match reason {
            Some(reason) => {
                let reason = format!("rejected by {}: {reason}", d.decision.by);
                self.fail_stage(&key, reason, d.at)?;
            }
            None => {
                let output = edits.or(request.proposed_output);
                self.complete_stage(&key, output.as_ref(), &d.dependents, d.at)?;
            }
        }
        Ok(())
    }

    pub(crate) fn retry(&mut self, item_id: &str, stage: &str, at: DateTime<Utc>) -> Result<()> {
        let (cancelled, unit) = self.require_stage(item_id, stage)?;
        if cancelled {
            return Err(Error::ItemCancelled(item_id.to_owned()));
        }
        if unit.state != StageState::Failed {
            return Err(Error::NotRetryable {
                item: item_id.to_owned(),
                stage: stage.to_owned(),
                state: unit.state,
            });
        }
        let key = TaskKey::stage(item_id, stage);
        self.conn
            .prepare_cached(
                "UPDATE stages SET attempt = 0, finished_at = NULL
                 WHERE item_id = ?1 AND stage = ?2",
            )?
            .execute(params![item_id, stage])?;
        let failed: Vec<String> = self
            .subtask_states(item_id, stage)?
            .into_iter()
            .filter(|(_, state)| *state == StageState::Failed)
            .map(|(name, _)| name)
            .collect();
        for name in &failed {
            self.conn
                .prepare_cached(
                    "UPDATE subtasks SET state = 'pending', attempt = 0, finished_at = NULL
                     WHERE item_id = ?1 AND stage = ?2 AND name = ?3",
                )?
                .execute(params![item_id, stage, name])?;
            self.enqueue(item_id, stage, Some(name))?;
        }
        if failed.is_empty() {
            self.set_stage_state(&key, StageState::Pending)?;
            self.enqueue(item_id, stage, None)?;
        } else {
            self.set_stage_state(&key, StageState::Running)?;
        }
        self.unit_event(at, &key, true, EventKind::RetryRequested)?;
        Ok(())
    }

    pub(crate) fn renew(
        &mut self,
        claims: &[(TaskKey, u64)],
        until: DateTime<Utc>,
    ) -> Result<Vec<TaskKey>> {
        let mut lost = Vec::new();
        let until = codec::time(until);
        for (key, generation) in claims {
            let held = self
                .fence(key)?
                .is_some_and(|(state, held)| state == StageState::Running && held == *generation);
            if !held {
                lost.push(key.clone());
                continue;
            }
            let sql = match key.subtask {
                None => {
                    "UPDATE stages SET lease_expiry = ?4
                     WHERE item_id = ?1 AND stage = ?2 AND ?3 IS NULL AND lease_expiry IS NOT NULL"
                }
                Some(_) => {
                    "UPDATE subtasks SET lease_expiry = ?4
                     WHERE item_id = ?1 AND stage = ?2 AND name = ?3 AND lease_expiry IS NOT NULL"
                }
            };
            self.conn.prepare_cached(sql)?.execute(params![
                key.item_id,
                key.stage,
                key.subtask,
                until
            ])?;
        }
        Ok(lost)
    }

    pub(crate) fn release_claims(&mut self, owner: &str, now: DateTime<Utc>) -> Result<u64> {
        let mut released = 0;
        for sql in [
            "UPDATE stages SET lease_expiry = ?2
             WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_owner = ?1",
            "UPDATE subtasks SET lease_expiry = ?2
             WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_owner = ?1",
        ] {
            let changed = self
                .conn
                .prepare_cached(sql)?
                .execute(params![owner, codec::time(now)])?;
            released += changed as u64;
        }
        Ok(released)
    }

    pub(crate) fn cancel(&mut self, item_id: &str, at: DateTime<Utc>) -> Result<Vec<TaskKey>> {
        let cancelled = self
            .item_cancelled(item_id)?
            .ok_or_else(|| Error::UnknownItem(item_id.to_owned()))?;
        if cancelled {
            return Ok(Vec::new());
        }
        let mut stages: Vec<(String, StageState)> = Vec::new();
        {
            let mut statement = self.conn.prepare_cached(
                "SELECT stage, state FROM stages WHERE item_id = ?1 ORDER BY position",
            )?;
            let rows = statement.query_map([item_id], |row| {
                let stage: String = row.get(0)?;
                let state = Loc::stage(item_id, &stage).parse(row, 1, "state");
                Ok(state.map(|s| (stage, s)))
            })?;
            for row in rows {
                stages.push(row??);
            }
        }
        let mut running = Vec::new();
        for (stage, state) in &stages {
            let subtasks = self.subtask_states(item_id, stage)?;
            if *state == StageState::Running && subtasks.is_empty() {
                running.push(TaskKey::stage(item_id, stage.clone()));
            }
            for (name, _) in subtasks.iter().filter(|(_, s)| *s == StageState::Running) {
                running.push(TaskKey {
                    item_id: item_id.to_owned(),
                    stage: stage.clone(),
                    subtask: Some(name.clone()),
                });
            }
        }
        for (stage, state) in &stages {
            if state.is_terminal() {
                continue;
            }
            self.conn
                .prepare_cached(
                    "UPDATE stages SET state = 'cancelled', generation = generation + 1,
                        finished_at = ?3, lease_owner = NULL, lease_expiry = NULL
                     WHERE item_id = ?1 AND stage = ?2",
                )?
                .execute(params![item_id, stage, codec::time(at)])?;
            self.conn
                .prepare_cached(
                    "UPDATE subtasks SET state = 'cancelled', generation = generation + 1,
                        lease_owner = NULL, lease_expiry = NULL
                     WHERE item_id = ?1 AND stage = ?2
                       AND state NOT IN ('completed', 'failed', 'skipped', 'cancelled')",
                )?
                .execute(params![item_id, stage])?;
        }
        self.conn
            .prepare_cached("UPDATE items SET cancelled = 1 WHERE id = ?1")?
            .execute([item_id])?;
        self.append(at, item_id, None, None, EventKind::ItemCancelled)?;
        Ok(running)
    }
}
