//! The transitions, run by the writer thread: each loads the rows it
//! touches, asks the rules in [`crate::rules`] what happens, and saves the
//! effects. No rule is decided here.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use super::appends::Appends;
use super::cache::ItemCache;
use super::codec::{self, Param};
use super::rows::{self, Loaded, Outputs, Subtasks};
use super::statements::Statements;
use super::versions::{self, Versions};
use super::writer::Session;
use crate::definition::{PipelineDef, PipelineDrift};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::rules::{
    self, Claim, ClaimRequest, Commit, DecisionCommit, Effects, ItemRecord, MigrateOutcome,
    NewItem, SubtaskSource, UnitRecord, VersionGraph,
};
use crate::store::{ClaimBatch, check_payload};
use crate::task::TaskKey;

/// One transition in progress: the connection and its held statements,
/// the writer's cache of items, the group commit's pending appends, the
/// pipeline versions and the events appended so far.
pub(crate) struct Tx<'t, 'c> {
    conn: &'c Connection,
    statements: &'t mut Statements<'c>,
    items: &'t mut ItemCache,
    appends: &'t mut Appends,
    versions: &'t Versions,
    events: Vec<Event>,
}

/// Loads every subtask row of a stage for a rule that needs them all.
struct SubtaskRows<'c>(&'c Connection);

impl SubtaskSource for SubtaskRows<'_> {
    fn subtasks(&mut self, item: &ItemRecord, stage: usize) -> Result<Vec<UnitRecord>> {
        rows::subtask_rows(self.0, &item.id, &item.stages[stage].unit.name, None)
    }
}

impl<'t, 'c> Tx<'t, 'c> {
    pub(crate) fn new(session: &'t mut Session<'c>, versions: &'t Versions) -> Self {
        Tx {
            conn: session.conn,
            statements: &mut session.statements,
            items: &mut session.items,
            appends: &mut session.appends,
            versions,
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

    fn graph(&self, version: u32) -> Result<Arc<VersionGraph>> {
        self.versions.get(self.conn, version)
    }

    fn load(&mut self, item_id: &str, subtasks: Subtasks<'_>) -> Result<Loaded> {
        self.find(item_id, subtasks)?
            .ok_or_else(|| Error::UnknownItem(item_id.to_owned()))
    }

    /// The rows of `item_id` a transition starts from: the writer's cached
    /// record when it has one (topped up with the subtask row asked for),
    /// else loaded.
    fn find(&mut self, item_id: &str, subtasks: Subtasks<'_>) -> Result<Option<Loaded>> {
        // Taken out either way (the transition puts its record back); a
        // rule that reads every subtask row gets them fresh.
        let cached = self
            .items
            .take(item_id)
            .filter(|_| !matches!(subtasks, Subtasks::All));
        let Some(mut loaded) = cached else {
            return rows::load_item(self.conn, item_id, subtasks, Outputs::Lenient);
        };
        if let Subtasks::One(stage, name) = subtasks
            && let Some(position) = loaded.record.stage_position(stage)
            && let Some(fan) = &mut loaded.record.stages[position].fan_out
            && !fan.rows.iter().any(|row| *row.name == *name)
        {
            fan.rows
                .extend(rows::subtask_rows(self.conn, item_id, stage, Some(name))?);
        }
        Ok(Some(loaded))
    }

    /// Runs `rule` on the loaded item and saves what it did.
    fn apply<R>(
        &mut self,
        loaded: Loaded,
        rule: impl FnOnce(&VersionGraph, &mut ItemRecord, &mut Effects) -> Result<R>,
    ) -> Result<R> {
        let Loaded {
            seq,
            mut record,
            mut stage_ids,
        } = loaded;
        let graph = self.graph(record.version)?;
        let before = record.stages.clone();
        let mut fx = Effects::default();
        let answer = rule(&graph, &mut record, &mut fx)?;
        let row_ids = (seq, &mut stage_ids);
        rows::save(
            self.statements,
            self.appends,
            row_ids,
            &record,
            &before,
            &fx,
        )?;
        self.append(seq, &record, &fx)?;
        // Only now does the record match its rows again.
        self.items.keep(Loaded {
            seq,
            record,
            stage_ids,
        });
        Ok(answer)
    }

    /// Appends the rule's events to the log (`seq`: the item's `items.seq`).
    fn append(&mut self, seq: i64, record: &ItemRecord, fx: &Effects) -> Result<()> {
        use rusqlite::types::Value as Sql;
        for new in &fx.events {
            let (stage, subtask) = match new.unit.map(|unit| rows::unit_names(record, unit)) {
                None => (Param::Value(Sql::Null), Param::Value(Sql::Null)),
                Some((stage, subtask)) => {
                    (Param::Shared(stage.clone()), Param::shared_opt(subtask))
                }
            };
            let logged = self.appends.event(
                self.conn,
                [
                    Param::Time(codec::time_text(new.at)),
                    Param::int(seq),
                    stage,
                    subtask,
                    Param::Value(Sql::Text(codec::json(&new.kind, "an event")?)),
                ],
            )?;
            self.events.push(new.resolve(record, logged));
        }
        Ok(())
    }

    // ---- transitions ----

    pub(crate) fn register_pipeline(&mut self, definition: &PipelineDef) -> Result<PipelineDrift> {
        let stored = versions::all(self.conn)?;
        let version = match stored.iter().find(|(_, d)| d == definition) {
            Some((version, _)) => *version,
            None => {
                let version = stored.last().map_or(1, |(v, _)| v + 1);
                self.conn
                    .prepare_cached(
                        "INSERT INTO pipeline_versions (version, definition, registered_at)
                         VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![
                        version,
                        codec::json(definition, "the pipeline definition")?,
                        codec::time(Utc::now()),
                    ])?;
                version
            }
        };
        let previous = stored.last().map(|(_, d)| d);
        super::read::drift(self.conn, version, definition, previous, &stored)
    }

    pub(crate) fn submit(&mut self, items: &[NewItem]) -> Result<()> {
        for item in items {
            check_payload(item)?;
            let graph = self.graph(item.version)?;
            // Not `RETURNING seq`, which buffers the row in a temporary table.
            let inserted = self
                .statements
                .get(
                    "INSERT INTO items (id, payload, submitted_at, version) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (id) DO NOTHING",
                )?
                .execute(params![
                    item.id,
                    item.payload,
                    codec::time(item.at),
                    item.version
                ])?;
            if inserted == 0 {
                continue;
            }
            let seq = self.conn.last_insert_rowid();
            let (record, fx) = rules::new_item(&graph, item.clone());
            let mut stage_ids = rows::insert_stages(self.statements, seq, &record)?;
            let fx = Effects {
                item_changed: false,
                ..fx
            };
            let row_ids = (seq, &mut stage_ids);
            rows::save(self.statements, self.appends, row_ids, &record, &[], &fx)?;
            self.append(seq, &record, &fx)?;
            // Its first claim comes next: it starts from these rows.
            self.items.keep(Loaded {
                seq,
                record,
                stage_ids,
            });
        }
        Ok(())
    }

    pub(crate) fn claim(&mut self, request: &ClaimRequest) -> Result<ClaimBatch> {
        let mut batch = ClaimBatch::default();
        let now = codec::time(request.now);
        // Work whose worker vanished: its lease ran out while it was running.
        for key in self.expired(&now, request.limit)? {
            batch.claims.extend(self.claim_one(&key, request)?);
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
            self.appends.runnable(key);
        }
        // Pop the queue's head in batches; stale entries are dropped and the
        // next batch tops the claims up. The entries appended in this group
        // commit, not written yet, come after the table's.
        while batch.claims.len() < request.limit {
            let wanted = request.limit - batch.claims.len();
            let head = self.queued_units(
                "SELECT seq, item_id, stage, subtask FROM run_queue ORDER BY seq LIMIT +?1",
                &wanted,
            )?;
            let keys: Vec<TaskKey> = match head.last() {
                Some(&(last, _)) => {
                    self.statements
                        .get("DELETE FROM run_queue WHERE seq <= ?1")?
                        .execute([last])?;
                    head.into_iter().map(|(_, key)| key).collect()
                }
                None => self.appends.take_runnable(wanted),
            };
            if keys.is_empty() {
                break;
            }
            for key in keys {
                batch.claims.extend(self.claim_one(&key, request)?);
            }
        }
        Ok(batch)
    }

    /// Rows of a queue table (`scheduled` or `run_queue`): their id and the
    /// unit of work they name, from `sql` with one parameter.
    fn queued_units(
        &mut self,
        sql: &'static str,
        param: &dyn rusqlite::ToSql,
    ) -> Result<Vec<(i64, TaskKey)>> {
        let units = self
            .statements
            .get(sql)?
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
    fn expired(&mut self, now: &str, limit: usize) -> Result<Vec<TaskKey>> {
        let mut found: Vec<(String, TaskKey)> = Vec::new();
        for sql in [
            "SELECT lease_expiry, item_id, stage, NULL FROM stages
             WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_expiry <= +?1
             ORDER BY lease_expiry LIMIT +?2",
            "SELECT lease_expiry, item_id, stage, name FROM subtasks
             WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_expiry <= +?1
             ORDER BY lease_expiry LIMIT +?2",
        ] {
            let mut statement = self.statements.get(sql)?;
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
        let Some(loaded) = self.find(&key.item_id, Self::subtasks_for(key))? else {
            return Ok(None);
        };
        let Some(unit) = loaded.record.locate(key) else {
            return Ok(None);
        };
        // A payload that does not decode is not checked here: the attempt
        // decodes it and fails this unit alone, naming the column.
        self.apply(loaded, |_, record, fx| {
            Ok(rules::claim(record, unit, request, fx))
        })
    }

    /// The subtask rows a rule about `key` needs loaded up front: the unit
    /// itself (the rest is fetched through [`SubtaskRows`] if needed).
    fn subtasks_for(key: &TaskKey) -> Subtasks<'_> {
        match &key.subtask {
            None => Subtasks::None,
            Some(name) => Subtasks::One(&key.stage, name),
        }
    }

    pub(crate) fn commit(&mut self, c: Commit) -> Result<()> {
        let loaded = self.load(&c.task.item_id, Self::subtasks_for(&c.task))?;
        let conn = self.conn;
        self.apply(loaded, |graph, record, fx| {
            rules::commit(graph, record, c, &mut SubtaskRows(conn), fx)
        })
    }

    pub(crate) fn decide(&mut self, d: DecisionCommit) -> Result<()> {
        let loaded = self.load(&d.item_id, Subtasks::None)?;
        self.apply(loaded, |graph, record, fx| {
            rules::decide(graph, record, d, fx)
        })
    }

    pub(crate) fn retry(&mut self, item_id: &str, stage: &str, at: DateTime<Utc>) -> Result<()> {
        let loaded = self.load(item_id, Subtasks::None)?;
        let conn = self.conn;
        self.apply(loaded, |_, record, fx| {
            rules::retry(record, stage, at, &mut SubtaskRows(conn), fx)
        })
    }

    pub(crate) fn renew(
        &mut self,
        claims: &[(TaskKey, u64)],
        until: DateTime<Utc>,
    ) -> Result<Vec<TaskKey>> {
        let mut lost = Vec::new();
        for (key, generation) in claims {
            let held = match self.find(&key.item_id, Self::subtasks_for(key))? {
                None => false,
                Some(loaded) => self.apply(loaded, |_, record, fx| {
                    Ok(rules::renew(record, key, *generation, until, fx))
                })?,
            };
            if !held {
                lost.push(key.clone());
            }
        }
        Ok(lost)
    }

    pub(crate) fn release_claims(&mut self, owner: &str, now: DateTime<Utc>) -> Result<u64> {
        // Leases change outside the rules: the writer's cache goes.
        self.items.clear();
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

    pub(crate) fn rerun(
        &mut self,
        item_id: &str,
        stage: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<TaskKey>> {
        let loaded = self.load(item_id, Subtasks::None)?;
        let conn = self.conn;
        self.apply(loaded, |graph, record, fx| {
            rules::rerun(graph, record, stage, at, &mut SubtaskRows(conn), fx)
        })
    }

    pub(crate) fn cancel(&mut self, item_id: &str, at: DateTime<Utc>) -> Result<Vec<TaskKey>> {
        let loaded = self.load(item_id, Subtasks::None)?;
        let conn = self.conn;
        self.apply(loaded, |_, record, fx| {
            rules::cancel(record, at, &mut SubtaskRows(conn), fx)
        })
    }

    pub(crate) fn migrate(
        &mut self,
        item_id: &str,
        version: u32,
        at: DateTime<Utc>,
    ) -> Result<MigrateOutcome> {
        let loaded = self.load(item_id, Subtasks::None)?;
        let to = self.graph(version)?;
        self.apply(loaded, |from, record, fx| {
            Ok(rules::migrate(from, &to, record, at, fx))
        })
    }
}
