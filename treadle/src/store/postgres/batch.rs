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
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::codec::{int, micros};
use super::conn::{Db, Statement};
use super::graphs::Graphs;
use super::load::{self, Lock, Subtasks};
use super::save::Changes;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::rules::{self, Effects, ItemRecord, SubtaskSource, UnitRecord, UnitRef, VersionGraph};
use crate::store::{
    ClaimBatch, ClaimRequest, Commit, DecisionCommit, MigrateOutcome, NewItem, TaskKey, Transition,
    check_payload,
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

    /// The subtask rows this transition names, as (item, stage, name).
    fn subtasks<'a>(&'a self) -> Vec<(&'a str, &'a str, &'a str)> {
        let named = |k: &'a TaskKey| Some((&*k.item_id, &*k.stage, k.subtask.as_deref()?));
        match self {
            Op::Commit(c) => named(&c.task).into_iter().collect(),
            Op::Renew { claims, .. } => claims.iter().filter_map(|(k, _)| named(k)).collect(),
            _ => Vec::new(),
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
            Op::Renew { claims, .. } => claims.iter().map(|(k, _)| &*k.item_id).collect(),
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
    /// What each claim of the batch (by op index) read in the first round trip.
    claim_reads: HashMap<usize, ClaimReads>,
}

/// The rows a claim reads before it locks anything: expired leases and
/// the run queue's head.
#[derive(Debug, Default)]
struct ClaimReads {
    expired: Vec<Row>,
    head: Vec<Row>,
}

/// The statements that move due retries to the back of the run queue, list
/// expired leases and take the run queue's head, for a claim.
const EXPIRED_SQL: &str = "(SELECT lease_expiry, item_id, name, NULL::int8 FROM stages
      WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_expiry <= $1
      ORDER BY lease_expiry LIMIT $2)
     UNION ALL
     (SELECT lease_expiry, item_id, stage, position FROM subtasks
      WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_expiry <= $1
      ORDER BY lease_expiry LIMIT $2)
     ORDER BY 1 LIMIT $2";

/// Moves the retries that fell due (at `$1`) to the back of the run queue.
const DUE_SQL: &str = "WITH due AS (
        DELETE FROM scheduled WHERE id IN (
            SELECT id FROM scheduled WHERE due <= $1
            ORDER BY due, item_seq, stage_position, subtask NULLS FIRST
            FOR UPDATE SKIP LOCKED)
        RETURNING *)
     INSERT INTO run_queue (item_id, stage, subtask)
     SELECT item_id, stage, subtask FROM due
     ORDER BY due, item_seq, stage_position, subtask NULLS FIRST";

/// The run queue's first `$2` entries after `$1` that no other
/// transaction holds.
const HEAD_SQL: &str = "SELECT seq, item_id, stage, subtask FROM run_queue WHERE seq > $1
     ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED";

/// Inserts the item rows of submissions; existing ids are left alone.
const INSERT_ITEMS_SQL: &str = "INSERT INTO items (id, version, payload, submitted_at)
     SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::timestamptz[])
     ON CONFLICT (id) DO NOTHING RETURNING id, seq";

/// The item rows the batch's submissions insert, as columns.
#[derive(Debug, Default)]
struct Submitted {
    ids: Vec<String>,
    versions: Vec<i64>,
    payloads: Vec<String>,
    times: Vec<DateTime<Utc>>,
    /// The index of the op that submits each id (the first one).
    owners: HashMap<String, usize>,
}

impl<'a> Batch<'a> {
    /// An empty batch on the connection `db`; [`Batch::apply`] begins the
    /// transaction.
    pub(super) fn new(db: Db<'a>, graphs: &'a Graphs) -> Self {
        Batch {
            db,
            graphs,
            slots: HashMap::new(),
            changes: Changes::default(),
            claim_reads: HashMap::new(),
        }
    }

    /// Begins the transaction and applies `ops` in order. The first round
    /// trip begins it, locks and loads the items the ops address (with the
    /// subtask rows they name), inserts submitted items and makes every
    /// claim's first reads; a claim then locks what it found in one more.
    /// Each answer's events carry sequence number 0 until [`super::save`]
    /// numbers them. On an error the transaction may be open: the caller
    /// rolls it back.
    pub(super) async fn apply(&mut self, ops: &[Op]) -> Result<Vec<Result<Answer>>> {
        let mut ids: Vec<String> = ops.iter().flat_map(Op::items).map(str::to_owned).collect();
        ids.sort_unstable();
        ids.dedup();
        let submitted = self.submitted(ops).await;
        let inserted = self.open(ops, &ids, &submitted).await?;
        let mut answers = Vec::with_capacity(ops.len());
        for (index, op) in ops.iter().enumerate() {
            match self.apply_one(index, op, &inserted).await {
                Err(e) if is_database_error(&e) => return Err(e),
                answer => answers.push(answer),
            }
        }
        Ok(answers)
    }

    /// The first round trip: BEGIN, the locked items `ids` with their stage
    /// rows and the subtask rows `ops` name, the insertion of `submitted`,
    /// and each claim's reads. Returns, per inserted id, the index of the
    /// op that inserted it and its `seq`.
    async fn open(
        &mut self,
        ops: &[Op],
        ids: &[String],
        submitted: &Submitted,
    ) -> Result<HashMap<String, (usize, i64)>> {
        let (mut sub_items, mut sub_stages, mut sub_names) = (Vec::new(), Vec::new(), Vec::new());
        for (item, stage, name) in ops.iter().flat_map(Op::subtasks) {
            sub_items.push(item);
            sub_stages.push(stage);
            sub_names.push(name);
        }
        let claims: Vec<(usize, &ClaimRequest, i64)> = ops
            .iter()
            .enumerate()
            .filter_map(|(index, op)| match op {
                Op::Claim(request) => Some((index, request, int(request.limit as u64))),
                _ => None,
            })
            .collect();
        let (stages_sql, named_sql) = (load::stages_sql(), load::subtasks_named_sql());
        let id_params: [&(dyn ToSql + Sync); 1] = [&ids];
        let named_params: [&(dyn ToSql + Sync); 3] = [&sub_items, &sub_stages, &sub_names];
        let s = submitted;
        let insert_params: [&(dyn ToSql + Sync); 4] = [&s.ids, &s.versions, &s.payloads, &s.times];
        let claim_params: Vec<_> = claims
            .iter()
            .map(|(_, request, limit)| {
                let expired: [&(dyn ToSql + Sync); 2] = [&request.now, limit];
                let due: [&(dyn ToSql + Sync); 1] = [&request.now];
                let head: [&(dyn ToSql + Sync); 2] = [&0i64, limit];
                (expired, due, head)
            })
            .collect();
        let mut statements: Vec<Statement<'_>> = vec![("BEGIN", &[])];
        if !ids.is_empty() {
            statements.push((load::items_sql(Lock::Wait), &id_params));
            statements.push((&stages_sql, &id_params));
        }
        if !sub_items.is_empty() {
            statements.push((&named_sql, &named_params));
        }
        if !s.ids.is_empty() {
            statements.push((INSERT_ITEMS_SQL, &insert_params));
        }
        for (expired, due, head) in &claim_params {
            statements.push((EXPIRED_SQL, expired));
            statements.push((DUE_SQL, due));
            statements.push((HEAD_SQL, head));
        }
        let mut rows = self.db.pipeline(&statements).await?.into_iter().skip(1);
        let mut next = || rows.next().unwrap_or_default();
        self.add_loaded(&mut next, !ids.is_empty(), !sub_items.is_empty())?;
        let mut inserted = HashMap::new();
        if !s.ids.is_empty() {
            for row in next() {
                let id: String = row.get(0);
                let index = s.owners[&id];
                inserted.insert(id, (index, row.get(1)));
            }
        }
        for (index, _, _) in &claims {
            let (expired, _, head) = (next(), next(), next());
            self.claim_reads
                .insert(*index, ClaimReads { expired, head });
        }
        Ok(inserted)
    }

    /// Keeps loaded (and locked) items in the batch.
    fn add_items(&mut self, loaded: Vec<load::Loaded>) {
        for loaded in loaded {
            self.slots.insert(
                loaded.record.id.clone(),
                Slot {
                    record: loaded.record,
                    seq: loaded.seq,
                },
            );
        }
    }

    /// Adds fetched subtask rows (each with its item and stage) to the
    /// items of the batch that have them fanned out and not loaded yet.
    fn add_keyed_subtasks(&mut self, rows: Vec<(String, String, UnitRecord)>) {
        for (item, stage, row) in rows {
            let Some(position) = self
                .slots
                .get(&item)
                .and_then(|s| s.record.stage_position(&stage))
            else {
                continue; // an item this batch could not lock
            };
            self.add_subtasks(&item, position, vec![row]);
        }
    }

    /// The item rows of every valid submission in `ops` (the first of each
    /// id); an invalid one is answered when its op is applied.
    async fn submitted(&self, ops: &[Op]) -> Submitted {
        let mut submitted = Submitted::default();
        for (index, op) in ops.iter().enumerate() {
            let Op::Submit(items) = op else { continue };
            if self.check_submission(items).await.is_err() {
                continue;
            }
            for item in items {
                if submitted.owners.contains_key(item.id.as_str()) {
                    continue;
                }
                submitted.owners.insert(item.id.clone(), index);
                submitted.ids.push(item.id.clone());
                submitted.versions.push(int(item.version));
                submitted.payloads.push(item.payload.clone());
                submitted.times.push(item.at);
            }
        }
        submitted
    }

    /// Checks a submission before anything of it is written: every payload
    /// is JSON and every version is registered.
    async fn check_submission(&self, items: &[NewItem]) -> Result<()> {
        for item in items {
            check_payload(item)?;
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
            Op::Claim(request) => {
                let reads = self.claim_reads.remove(&index).unwrap_or_default();
                self.claim(request, reads).await.map(Answer::Claimed)
            }
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
                    if !self.slots.contains_key(&*key.item_id) {
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
                            .map(|s| String::from(&*s.unit.name))
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
        if fan.complete || fan.rows.iter().any(|r| *r.name == *name) {
            return Ok(());
        }
        let rows = load::subtasks(self.db, id, stage, Subtasks::Named(name)).await?;
        self.add_subtasks(id, position, rows);
        Ok(())
    }

    /// Adds what a pipeline read, in its order: the items and their stage
    /// rows (if `items` were asked for), then keyed subtask rows (if
    /// `subtasks` were).
    fn add_loaded(
        &mut self,
        next: &mut dyn FnMut() -> Vec<Row>,
        items: bool,
        subtasks: bool,
    ) -> Result<()> {
        if items {
            let (items, stages) = (next(), next());
            self.add_items(load::decode_items(&items, &stages)?);
        }
        if subtasks {
            self.add_keyed_subtasks(load::decode_keyed_subtasks(&next())?);
        }
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
    /// then the run queue's head (retries that fell due join its back), as
    /// `reads` found them. Items another transaction holds are passed over,
    /// their hints kept; while hints run out before the limit, the queue is
    /// read further.
    async fn claim(&mut self, request: &ClaimRequest, reads: ClaimReads) -> Result<ClaimBatch> {
        let mut claims = Vec::new();
        let hint = |row: &Row, queued: bool| Hint {
            seq: queued.then(|| row.get(0)),
            item: row.get(1),
            stage: row.get(2),
            subtask: row.get(3),
        };
        let mut hints: Vec<Hint> = reads.expired.iter().map(|r| hint(r, false)).collect();
        let mut head = reads.head;
        let mut wanted = request.limit;
        loop {
            let exhausted = head.len() < wanted;
            let after: i64 = head.last().map_or(0, |row| row.get(0));
            hints.extend(head.iter().map(|r| hint(r, true)));
            self.claim_hints(&hints, request, &mut claims).await?;
            if exhausted || claims.len() >= request.limit {
                break;
            }
            wanted = request.limit - claims.len();
            let limit = int(wanted as u64);
            head = self.db.query(HEAD_SQL, &[&after, &limit]).await?;
            hints.clear();
        }
        Ok(ClaimBatch { claims })
    }

    /// Tries to claim each hinted unit, in order; consumes the hints of
    /// items it could lock. Locks and loads the items not in the batch yet,
    /// with the subtask rows hinted at, in one round trip.
    async fn claim_hints(
        &mut self,
        hints: &[Hint],
        request: &ClaimRequest,
        claims: &mut Vec<rules::Claim>,
    ) -> Result<()> {
        let mut ids: Vec<&str> = hints
            .iter()
            .map(|h| h.item.as_str())
            .filter(|id| !self.slots.contains_key(*id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let (mut sub_items, mut sub_stages, mut sub_positions) =
            (Vec::new(), Vec::new(), Vec::new());
        for hint in hints {
            if let Some(position) = hint.subtask {
                sub_items.push(hint.item.as_str());
                sub_stages.push(hint.stage.as_str());
                sub_positions.push(position);
            }
        }
        let (stages_sql, at_sql) = (load::stages_sql(), load::subtasks_at_sql());
        let id_params: [&(dyn ToSql + Sync); 1] = [&ids];
        let at_params: [&(dyn ToSql + Sync); 3] = [&sub_items, &sub_stages, &sub_positions];
        let mut statements: Vec<Statement<'_>> = Vec::new();
        if !ids.is_empty() {
            statements.push((load::items_sql(Lock::Skip), &id_params));
            statements.push((&stages_sql, &id_params));
        }
        if !sub_items.is_empty() {
            statements.push((&at_sql, &at_params));
        }
        let mut rows = self.db.pipeline(&statements).await?.into_iter();
        let mut next = || rows.next().unwrap_or_default();
        self.add_loaded(&mut next, !ids.is_empty(), !sub_items.is_empty())?;
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
