//! One group commit: the transitions in flight, applied in one transaction.
//!
//! The items the batch touches are locked and loaded first (in id order,
//! `FOR NO KEY UPDATE`), each transition is decided by [`crate::rules`] on
//! those rows in Rust, in batch order, and what the rules changed is
//! written set-based at the end ([`super::save`]). A transition the rules
//! refuse changes nothing (it ran on a copy of the rows) and the others go
//! on; no savepoints are needed.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use super::codec::{int, micros};
use super::conn::Db;
use super::graphs::Graphs;
use super::load::{self, Lock, Subtasks};
use super::save::Changes;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::rules::{self, Effects, ItemRecord, SubtaskSource, UnitRecord, UnitRef, VersionGraph};
use crate::store::{
    ClaimBatch, ClaimRequest, Commit, DecisionCommit, MigrateOutcome, NewItem, TaskKey, Transition,
    check_json,
};

/// A transition for the writer to apply.
#[derive(Debug, Clone)]
pub(super) enum Op {
    /// Store new items.
    Submit(Vec<NewItem>),
    /// Claim runnable work.
    Claim(ClaimRequest),
    /// End an attempt.
    Commit(Commit),
    /// Decide a review.
    Decide(DecisionCommit),
    /// Retry a failed stage.
    Retry {
        /// The item.
        item_id: String,
        /// The stage.
        stage: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Run a finished or failed stage again, with everything downstream.
    Rerun {
        /// The item.
        item_id: String,
        /// The stage.
        stage: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Cancel an item.
    Cancel {
        /// The item.
        item_id: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Renew leases.
    Renew {
        /// The claims, with their generations.
        claims: Vec<(TaskKey, u64)>,
        /// The new expiry.
        until: DateTime<Utc>,
    },
    /// Move an item to another pipeline version.
    Migrate {
        /// The item.
        item_id: String,
        /// The target version.
        version: u32,
        /// When.
        at: DateTime<Utc>,
    },
}

/// What a transition answers.
#[derive(Debug)]
pub(super) enum Answer {
    /// The committed events.
    Events(Vec<Event>),
    /// Claimed work and its events.
    Claimed(ClaimBatch),
    /// The units that were running and lost their claim (a cancel, a
    /// rerun), and the events.
    Stopped(Vec<TaskKey>, Vec<Event>),
    /// The claims whose lease was lost.
    Lost(Vec<TaskKey>),
    /// What a migration did, and the events.
    Migrated(MigrateOutcome, Vec<Event>),
}

impl Op {
    /// The transition with every time truncated to the microsecond, as the
    /// database keeps it, so the events it returns equal the stored ones.
    pub(super) fn truncated(self) -> Op {
        match self {
            Op::Submit(mut items) => {
                for item in &mut items {
                    item.at = micros(item.at);
                }
                Op::Submit(items)
            }
            Op::Claim(mut request) => {
                request.now = micros(request.now);
                Op::Claim(request)
            }
            Op::Commit(mut commit) => {
                commit.attempt.started_at = micros(commit.attempt.started_at);
                commit.attempt.finished_at = micros(commit.attempt.finished_at);
                match &mut commit.transition {
                    Transition::RetryAt { at } => *at = micros(*at),
                    Transition::AwaitReview(request) => {
                        if let Some(deadline) = &mut request.deadline {
                            deadline.at = micros(deadline.at);
                        }
                    }
                    _ => {}
                }
                Op::Commit(commit)
            }
            Op::Decide(mut decision) => {
                decision.at = micros(decision.at);
                Op::Decide(decision)
            }
            Op::Retry { item_id, stage, at } => Op::Retry {
                item_id,
                stage,
                at: micros(at),
            },
            Op::Rerun { item_id, stage, at } => Op::Rerun {
                item_id,
                stage,
                at: micros(at),
            },
            Op::Cancel { item_id, at } => Op::Cancel {
                item_id,
                at: micros(at),
            },
            Op::Renew { claims, until } => Op::Renew {
                claims,
                until: micros(until),
            },
            Op::Migrate {
                item_id,
                version,
                at,
            } => Op::Migrate {
                item_id,
                version,
                at: micros(at),
            },
        }
    }

    /// The existing items this transition addresses.
    fn items(&self) -> Vec<&str> {
        match self {
            Op::Submit(_) | Op::Claim(_) => Vec::new(),
            Op::Commit(c) => vec![&c.task.item_id],
            Op::Decide(d) => vec![&d.item_id],
            Op::Retry { item_id, .. }
            | Op::Rerun { item_id, .. }
            | Op::Cancel { item_id, .. }
            | Op::Migrate { item_id, .. } => vec![item_id],
            Op::Renew { claims, .. } => claims.iter().map(|(k, _)| k.item_id.as_str()).collect(),
        }
    }
}

/// An item's rows as the batch holds them (locked).
#[derive(Debug)]
pub(super) struct Slot {
    /// The rows, as changed by the transitions so far.
    pub(super) record: ItemRecord,
    /// `items.seq`.
    pub(super) seq: i64,
}

/// Asks the batch to load every subtask of a stage: the rules ran on a
/// copy, so the transition is simply run again once they are loaded.
#[derive(Debug, Default)]
struct Deferred {
    wanted: Option<usize>,
}

impl SubtaskSource for Deferred {
    fn subtasks(&mut self, item: &ItemRecord, stage: usize) -> Result<Vec<UnitRecord>> {
        self.wanted = Some(stage);
        Err(Error::Corrupt {
            location: format!("subtasks(item={}, stage={stage})", item.id),
            detail: "not loaded yet".to_owned(),
        })
    }
}

/// Hands over rows already fetched.
struct Fetched(Option<Vec<UnitRecord>>);

impl SubtaskSource for Fetched {
    fn subtasks(&mut self, item: &ItemRecord, stage: usize) -> Result<Vec<UnitRecord>> {
        self.0.take().ok_or_else(|| Error::Corrupt {
            location: format!("subtasks(item={}, stage={stage})", item.id),
            detail: "asked twice".to_owned(),
        })
    }
}

/// The work of one transaction: the locked items and what changed.
pub(super) struct Batch<'a> {
    db: Db<'a>,
    graphs: &'a Graphs,
    /// The locked items, by id.
    pub(super) slots: HashMap<String, Slot>,
    /// Everything to write at the end.
    pub(super) changes: Changes,
}

impl<'a> Batch<'a> {
    /// An empty batch on the open transaction `db`.
    pub(super) fn new(db: Db<'a>, graphs: &'a Graphs) -> Self {
        Batch {
            db,
            graphs,
            slots: HashMap::new(),
            changes: Changes::default(),
        }
    }

    /// Applies `ops` in order: rows of the items they address are locked
    /// first, all together. Each answer's events carry sequence number 0
    /// until [`super::save`] numbers them.
    pub(super) async fn apply(&mut self, ops: &[Op]) -> Result<Vec<Result<Answer>>> {
        let mut ids: Vec<String> = ops.iter().flat_map(Op::items).map(str::to_owned).collect();
        ids.sort_unstable();
        ids.dedup();
        self.lock(&ids, Lock::Wait).await?;
        let inserted = self.insert_items(ops).await?;
        let mut answers = Vec::with_capacity(ops.len());
        for (index, op) in ops.iter().enumerate() {
            match self.apply_one(index, op, &inserted).await {
                Err(e) if is_database_error(&e) => return Err(e),
                answer => answers.push(answer),
            }
        }
        Ok(answers)
    }

    /// Locks (per `lock`) and loads the items `ids` not yet in the batch.
    async fn lock(&mut self, ids: &[String], lock: Lock) -> Result<()> {
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !self.slots.contains_key(id.as_str()))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        for loaded in load::items(self.db, &missing, lock).await? {
            self.slots.insert(
                loaded.record.id.clone(),
                Slot {
                    record: loaded.record,
                    seq: loaded.seq,
                },
            );
        }
        Ok(())
    }

    /// Inserts the item rows of every valid submission (the first of each
    /// id; existing ids are left alone) and returns, per inserted id, the
    /// index of the op that inserted it and its `seq`.
    async fn insert_items(&mut self, ops: &[Op]) -> Result<HashMap<String, (usize, i64)>> {
        let (mut ids, mut versions, mut payloads, mut times, mut owners) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            HashMap::new(),
        );
        for (index, op) in ops.iter().enumerate() {
            let Op::Submit(items) = op else { continue };
            if self.check_submission(items).await.is_err() {
                continue; // answered when the op is applied
            }
            for item in items {
                if owners.contains_key(item.id.as_str()) {
                    continue;
                }
                owners.insert(item.id.clone(), index);
                ids.push(item.id.clone());
                versions.push(int(item.version));
                payloads.push(item.payload.clone());
                times.push(item.at);
            }
        }
        let mut inserted = HashMap::new();
        if ids.is_empty() {
            return Ok(inserted);
        }
        let rows = self
            .db
            .query(
                "INSERT INTO items (id, version, payload, submitted_at)
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::timestamptz[])
                 ON CONFLICT (id) DO NOTHING RETURNING id, seq",
                &[&ids, &versions, &payloads, &times],
            )
            .await?;
        for row in rows {
            let id: String = row.get(0);
            let index = owners[&id];
            inserted.insert(id, (index, row.get(1)));
        }
        Ok(inserted)
    }

    /// Checks a submission before anything of it is written: every payload
    /// is JSON and every version is registered.
    async fn check_submission(&self, items: &[NewItem]) -> Result<()> {
        for item in items {
            check_json(&item.payload, &format!("the payload of item `{}`", item.id))?;
            self.graphs.get(self.db, item.version).await?;
        }
        Ok(())
    }

    async fn apply_one(
        &mut self,
        index: usize,
        op: &Op,
        inserted: &HashMap<String, (usize, i64)>,
    ) -> Result<Answer> {
        let start = self.changes.events.len();
        match op {
            Op::Submit(items) => {
                self.check_submission(items).await?;
                for item in items {
                    let Some(&(owner, seq)) = inserted.get(&item.id) else {
                        continue;
                    };
                    if owner != index || self.slots.contains_key(&item.id) {
                        continue;
                    }
                    let graph = self.graphs.get(self.db, item.version).await?;
                    let (record, fx) = rules::new_item(&graph, item.clone());
                    let slot = Slot { record, seq };
                    self.changes.record(&slot, fx, true)?;
                    self.slots.insert(item.id.clone(), slot);
                }
                Ok(Answer::Events(self.events_since(start)))
            }
            Op::Claim(request) => self.claim(request).await.map(Answer::Claimed),
            Op::Commit(commit) => {
                if let Some(name) = &commit.task.subtask {
                    self.load_subtask(&commit.task.item_id, &commit.task.stage, name)
                        .await?;
                }
                self.run(&commit.task.item_id, |graph, record, source, fx| {
                    rules::commit(graph, record, commit.clone(), source, fx)
                })
                .await?;
                Ok(Answer::Events(self.events_since(start)))
            }
            Op::Decide(decision) => {
                self.run(&decision.item_id, |graph, record, _, fx| {
                    rules::decide(graph, record, decision.clone(), fx)
                })
                .await?;
                Ok(Answer::Events(self.events_since(start)))
            }
            Op::Retry { item_id, stage, at } => {
                self.run(item_id, |_, record, source, fx| {
                    rules::retry(record, stage, *at, source, fx)
                })
                .await?;
                Ok(Answer::Events(self.events_since(start)))
            }
            Op::Rerun { item_id, stage, at } => {
                let running = self
                    .run(item_id, |graph, record, source, fx| {
                        rules::rerun(graph, record, stage, *at, source, fx)
                    })
                    .await?;
                Ok(Answer::Stopped(running, self.events_since(start)))
            }
            Op::Cancel { item_id, at } => {
                let running = self
                    .run(item_id, |_, record, source, fx| {
                        rules::cancel(record, *at, source, fx)
                    })
                    .await?;
                Ok(Answer::Stopped(running, self.events_since(start)))
            }
            Op::Renew { claims, until } => {
                let mut lost = Vec::new();
                for (key, generation) in claims {
                    if !self.slots.contains_key(&key.item_id) {
                        lost.push(key.clone());
                        continue;
                    }
                    if let Some(name) = &key.subtask {
                        self.load_subtask(&key.item_id, &key.stage, name).await?;
                    }
                    let held = self
                        .run(&key.item_id, |_, record, _, fx| {
                            Ok(rules::renew(record, key, *generation, *until, fx))
                        })
                        .await?;
                    if !held {
                        lost.push(key.clone());
                    }
                }
                Ok(Answer::Lost(lost))
            }
            Op::Migrate {
                item_id,
                version,
                at,
            } => {
                let to = self.graphs.get(self.db, *version).await?;
                let outcome = self
                    .run(item_id, |from, record, _, fx| {
                        Ok(rules::migrate(from, &to, record, *at, fx))
                    })
                    .await?;
                Ok(Answer::Migrated(outcome, self.events_since(start)))
            }
        }
    }

    /// The events appended since index `start`.
    fn events_since(&self, start: usize) -> Vec<Event> {
        self.changes.events[start..].to_vec()
    }

    /// Runs `rule` on a copy of item `id`'s rows; keeps the copy and records
    /// the effects if the rule succeeds. A rule that needs every subtask of
    /// a stage gets them loaded and runs again.
    async fn run<R>(
        &mut self,
        id: &str,
        rule: impl Fn(&VersionGraph, &mut ItemRecord, &mut dyn SubtaskSource, &mut Effects) -> Result<R>,
    ) -> Result<R> {
        loop {
            let slot = self
                .slots
                .get(id)
                .ok_or_else(|| Error::UnknownItem(id.to_owned()))?;
            let graph = self.graphs.get(self.db, slot.record.version).await?;
            let mut record = slot.record.clone();
            let mut fx = Effects::default();
            let mut source = Deferred::default();
            match rule(&graph, &mut record, &mut source, &mut fx) {
                Ok(answer) => {
                    let slot = self.slots.get_mut(id).expect("checked above");
                    if fx.restructured {
                        let removed: Vec<String> = slot
                            .record
                            .stages
                            .iter()
                            .map(|s| s.unit.name.clone())
                            .filter(|name| record.stage_position(name).is_none())
                            .collect();
                        self.changes.purge(id, &removed);
                    }
                    slot.record = record;
                    self.changes.record(slot, fx, false)?;
                    return Ok(answer);
                }
                Err(error) => match source.wanted {
                    Some(stage) => self.load_all(id, stage).await?,
                    None => return Err(error),
                },
            }
        }
    }

    /// Loads every subtask row of `stage` of item `id`; rows already
    /// loaded (perhaps changed in this batch) win.
    async fn load_all(&mut self, id: &str, stage: usize) -> Result<()> {
        let slot = self.slots.get_mut(id).expect("loaded by the caller");
        let name = slot.record.stages[stage].unit.name.clone();
        let rows = load::subtasks(self.db, id, &name, Subtasks::All).await?;
        rules::load_all_subtasks(&mut slot.record, stage, &mut Fetched(Some(rows)))
    }

    /// Makes sure subtask `name` of `stage` of item `id` is loaded, if
    /// the item and its fan-out exist.
    async fn load_subtask(&mut self, id: &str, stage: &str, name: &str) -> Result<()> {
        let Some(slot) = self.slots.get(id) else {
            return Ok(());
        };
        let Some(position) = slot.record.stage_position(stage) else {
            return Ok(());
        };
        let Some(fan) = &slot.record.stages[position].fan_out else {
            return Ok(());
        };
        if fan.complete || fan.rows.iter().any(|r| r.name == name) {
            return Ok(());
        }
        let rows = load::subtasks(self.db, id, stage, Subtasks::Named(name)).await?;
        self.add_subtasks(id, position, rows);
        Ok(())
    }

    /// Adds fetched subtask rows of stage `position` of item `id` that are
    /// not loaded yet.
    fn add_subtasks(&mut self, id: &str, position: usize, rows: Vec<UnitRecord>) {
        let slot = self.slots.get_mut(id).expect("loaded by the caller");
        if let Some(fan) = &mut slot.record.stages[position].fan_out {
            for row in rows {
                if fan.row(row.position).is_none() {
                    fan.rows.push(row);
                }
            }
        }
    }

    /// Claims up to `request.limit` units: first those whose lease expired,
    /// then the run queue's head (retries that fell due join its back).
    /// Items another transaction holds are passed over, their hints kept.
    async fn claim(&mut self, request: &ClaimRequest) -> Result<ClaimBatch> {
        let mut claims = Vec::new();
        let limit = int(request.limit as u64);
        // Expired leases and due retries are independent: pipelined.
        let (expiring, now): ([&(dyn ToSql + Sync); 2], [&(dyn ToSql + Sync); 1]) =
            ([&request.now, &limit], [&request.now]);
        let (expired, _) = tokio::try_join!(
            self.db.query(
                "(SELECT lease_expiry, item_id, name, NULL::int8 FROM stages
                  WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_expiry <= $1
                  ORDER BY lease_expiry LIMIT $2)
                 UNION ALL
                 (SELECT lease_expiry, item_id, stage, position FROM subtasks
                  WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_expiry <= $1
                  ORDER BY lease_expiry LIMIT $2)
                 ORDER BY 1 LIMIT $2",
                &expiring,
            ),
            // Retries that fell due join the back of the run queue.
            self.db.execute(
                "WITH due AS (
                    DELETE FROM scheduled WHERE id IN (
                        SELECT id FROM scheduled WHERE due <= $1
                        ORDER BY due, item_seq, stage_position, subtask NULLS FIRST
                        FOR UPDATE SKIP LOCKED)
                    RETURNING *)
                 INSERT INTO run_queue (item_id, stage, subtask)
                 SELECT item_id, stage, subtask FROM due
                 ORDER BY due, item_seq, stage_position, subtask NULLS FIRST",
                &now,
            ),
        )?;
        let hints: Vec<Hint> = expired
            .iter()
            .map(|row| Hint {
                seq: None,
                item: row.get(1),
                stage: row.get(2),
                subtask: row.get(3),
            })
            .collect();
        self.claim_hints(&hints, request, &mut claims).await?;
        let mut after = 0i64;
        while claims.len() < request.limit {
            let wanted = int((request.limit - claims.len()) as u64);
            let head = self
                .db
                .query(
                    "SELECT seq, item_id, stage, subtask FROM run_queue WHERE seq > $1
                     ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED",
                    &[&after, &wanted],
                )
                .await?;
            let Some(last) = head.last() else { break };
            after = last.get(0);
            let exhausted = (head.len() as i64) < wanted;
            let hints: Vec<Hint> = head
                .iter()
                .map(|row| Hint {
                    seq: Some(row.get(0)),
                    item: row.get(1),
                    stage: row.get(2),
                    subtask: row.get(3),
                })
                .collect();
            self.claim_hints(&hints, request, &mut claims).await?;
            if exhausted {
                break;
            }
        }
        Ok(ClaimBatch { claims })
    }

    /// Tries to claim each hinted unit, in order; consumes the hints of
    /// items it could lock.
    async fn claim_hints(
        &mut self,
        hints: &[Hint],
        request: &ClaimRequest,
        claims: &mut Vec<rules::Claim>,
    ) -> Result<()> {
        let mut ids: Vec<String> = hints.iter().map(|h| h.item.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        self.lock(&ids, Lock::Skip).await?;
        let mut wanted: HashMap<(String, usize), Vec<i64>> = HashMap::new();
        for hint in hints {
            let (Some(slot), Some(subtask)) = (self.slots.get(&hint.item), hint.subtask) else {
                continue;
            };
            let Some(stage) = slot.record.stage_position(&hint.stage) else {
                continue;
            };
            let fan = slot.record.stages[stage].fan_out.as_ref();
            if fan.is_some_and(|f| f.row(subtask as u32).is_none()) {
                wanted
                    .entry((hint.item.clone(), stage))
                    .or_default()
                    .push(subtask);
            }
        }
        for ((id, stage), positions) in wanted {
            let name = self.slots[&id].record.stages[stage].unit.name.clone();
            let rows = load::subtasks(self.db, &id, &name, Subtasks::At(positions)).await?;
            self.add_subtasks(&id, stage, rows);
        }
        for hint in hints {
            if claims.len() >= request.limit {
                break;
            }
            let Some(slot) = self.slots.get_mut(&hint.item) else {
                continue; // another transaction holds the item: keep the hint
            };
            if let Some(seq) = hint.seq {
                self.changes.consumed.push(seq);
            }
            let Some(stage) = slot.record.stage_position(&hint.stage) else {
                continue;
            };
            let unit = UnitRef {
                stage,
                subtask: hint.subtask.and_then(|s| u32::try_from(s).ok()),
            };
            let mut fx = Effects::default();
            if let Some(claim) = rules::claim(&mut slot.record, unit, request, &mut fx) {
                claims.push(claim);
            }
            self.changes.record(slot, fx, false)?;
        }
        Ok(())
    }
}

/// A unit that may be claimable: from the run queue (`seq`) or an expired lease.
#[derive(Debug)]
struct Hint {
    seq: Option<i64>,
    item: String,
    stage: String,
    subtask: Option<i64>,
}

/// Whether `error` came from the database (the batch is then replayed or
/// failed as a whole) rather than from a rule.
pub(super) fn is_database_error(error: &Error) -> bool {
    matches!(
        error,
        Error::Store {
            backend: "PostgreSQL",
            ..
        }
    )
}
