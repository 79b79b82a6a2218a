//! The PostgreSQL store: workers in many processes on many machines share
//! one database with the guarantees of the SQLite store.
//!
//! Every transition is decided by [`crate::rules`] on rows loaded and
//! locked in a short transaction; the transitions a process has in flight
//! are committed together ([`writer`]). The event log is one gapless
//! sequence in commit order, and every process's live feed carries the
//! events of all of them ([`feed`]).

mod batch;
mod codec;
mod conn;
mod feed;
mod graphs;
mod lease;
mod load;
mod prune;
mod read;
mod save;
mod schema;
mod writer;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use self::batch::{Answer, Op};
use self::conn::Db;
use self::feed::Feed;
use self::graphs::Graphs;
use self::writer::Writer;
use super::{
    ClaimBatch, ClaimRequest, Commit, DecisionCommit, EventQuery, MigrateOutcome, NewItem,
    PipelineDrift, Pruned, StageCount, Store, TaskKey,
};
use crate::definition::{PipelineChanges, PipelineDef, VersionInFlight};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::state::StageState;
use crate::status::{AwaitingReview, ItemStatus};

/// How to reach the database and where the store keeps its tables.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    url: String,
    schema: String,
    application_name: String,
    pool_size: usize,
    writers: usize,
    create: bool,
}

impl PostgresOptions {
    /// The server at `url` (`postgres://user@host:port/database`), schema
    /// `treadle`.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            schema: "treadle".to_owned(),
            application_name: "treadle".to_owned(),
            pool_size: 8,
            writers: 2,
            create: true,
        }
    }

    /// Keeps the tables in schema `schema` (created if missing), so several
    /// pipelines can share one database: lowercase letters, digits and `_`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The `application_name` of every connection, e.g. the worker's id,
    /// to tell the workers' sessions apart on the server.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// Refuses a schema that does not exist yet instead of creating it
    /// ([`Error::NotATreadleDatabase`]): for tools that only look at and act
    /// on what workers store.
    pub fn existing_only(mut self) -> Self {
        self.create = false;
        self
    }

    /// At most this many connections (at least 2: one writes while another reads).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(2);
        self
    }
}

/// A [`Store`] on PostgreSQL. Cheap to clone: clones share the connections.
///
/// Claims lock the rows they take and skip rows other workers hold, so
/// processes never claim the same unit; a worker whose lease expired is
/// fenced out by the claim's generation; every process's
/// [`Store::subscribe`] feed carries the events of all of them.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
    writer: Writer,
}

/// What the store's handles and its background tasks share.
#[derive(Debug)]
struct Shared {
    pool: deadpool_postgres::Pool,
    graphs: Graphs,
    /// The schema holding the store's tables.
    schema: String,
    /// The NOTIFY channel of this schema's event log.
    channel: String,
    feed: Feed,
}

impl PostgresStore {
    /// The schema version this build writes, kept in `treadle_meta`.
    pub const SCHEMA_VERSION: i64 = schema::SCHEMA_VERSION;

    /// Connects to the server at `url` with the default options.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(PostgresOptions::new(url)).await
    }

    /// Connects as `options` say, creating or migrating the schema.
    pub async fn open(options: PostgresOptions) -> Result<Self> {
        schema::check_schema_name(&options.schema)?;
        let config = conn::config(&options.url, &options.schema, &options.application_name)?;
        let pool = conn::pool(config.clone(), options.pool_size)?;
        let mut client = conn::get(&pool).await?;
        schema::migrate(&mut client, &options.schema, options.create).await?;
        drop(client);
        let channel = format!("treadle_{}", options.schema);
        let feed = Feed::start(pool.clone(), config, channel.clone()).await?;
        let shared = Arc::new(Shared {
            pool,
            graphs: Graphs::default(),
            schema: options.schema,
            channel,
            feed,
        });
        let writer = Writer::spawn(shared.clone(), options.writers);
        Ok(PostgresStore { shared, writer })
    }

    /// Deletes the store's schema with every table and row in it: for
    /// throwaway schemas (benchmarks). Every handle on it fails afterwards.
    pub async fn drop_schema(&self) -> Result<()> {
        let client = conn::get(&self.shared.pool).await?;
        let sql = format!("DROP SCHEMA {} CASCADE", self.shared.schema);
        client.batch_execute(&sql).await?;
        Ok(())
    }

    /// Runs `read` on a pooled connection.
    async fn read<T>(&self, read: impl AsyncFnOnce(Db<'_>) -> Result<T>) -> Result<T> {
        let client = conn::get(&self.shared.pool).await?;
        read(Db::client(&client)).await
    }

    async fn events_of(&self, op: Op) -> Result<Vec<Event>> {
        match self.writer.apply(op).await? {
            Answer::Events(events) => Ok(events),
            other => Err(unexpected(other)),
        }
    }
}

/// How version `version` of `versions` stands: how it differs from
/// `previous` and the unfinished items of other versions.
async fn drift(
    db: Db<'_>,
    versions: &[(u32, PipelineDef)],
    version: u32,
    previous: Option<&PipelineDef>,
) -> Result<PipelineDrift> {
    let definition_of = |wanted: u32| {
        versions
            .iter()
            .find(|(v, _)| *v == wanted)
            .map(|(_, d)| d)
            .ok_or(Error::UnknownVersion(wanted))
    };
    let current = definition_of(version)?;
    let mut in_flight = Vec::new();
    for (old, items) in read::in_flight(db, version).await? {
        in_flight.push(VersionInFlight {
            version: old,
            items,
            changes: PipelineChanges::between(definition_of(old)?, current),
        });
    }
    Ok(PipelineDrift {
        version,
        changes: previous
            .map(|p| PipelineChanges::between(p, current))
            .unwrap_or_default(),
        in_flight,
    })
}

/// An answer of the wrong kind: a bug, reported rather than panicked on.
fn unexpected(answer: Answer) -> Error {
    Error::Corrupt {
        location: "the PostgreSQL store's writer".to_owned(),
        detail: format!("unexpected answer {answer:?}"),
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.feed.subscribe()
    }

    /// More work in flight makes bigger group commits: each round trip and
    /// each fsync then carries more transitions.
    fn suggested_concurrency(&self) -> usize {
        512
    }

    async fn register_pipeline(&self, definition: &PipelineDef) -> Result<PipelineDrift> {
        let mut client = conn::get(&self.shared.pool).await?;
        let tx = client.transaction().await?;
        let db = Db::tx(&tx);
        db.execute(
            "LOCK TABLE pipeline_versions IN SHARE ROW EXCLUSIVE MODE",
            &[],
        )
        .await?;
        let mut versions = read::versions(db).await?;
        let latest = versions.last().map(|(_, d)| d.clone());
        let version = match versions.iter().find(|(_, d)| d == definition) {
            Some((known, _)) => *known,
            None => {
                let next = versions.last().map_or(1, |(v, _)| v + 1);
                let text = codec::json(definition, "the pipeline definition")?;
                db.execute(
                    "INSERT INTO pipeline_versions (version, definition) VALUES ($1, $2)",
                    &[&codec::int(next), &text],
                )
                .await?;
                versions.push((next, definition.clone()));
                next
            }
        };
        let drift = drift(db, &versions, version, latest.as_ref()).await?;
        tx.commit().await?;
        Ok(drift)
    }

    async fn pipeline_drift(&self) -> Result<Option<PipelineDrift>> {
        self.read(async |db| {
            let versions = read::versions(db).await?;
            let Some((latest, _)) = versions.last() else {
                return Ok(None);
            };
            let previous = versions.iter().rev().nth(1).map(|(_, d)| d);
            drift(db, &versions, *latest, previous).await.map(Some)
        })
        .await
    }

    async fn submit(&self, items: Vec<NewItem>) -> Result<usize> {
        Ok(self.events_of(Op::Submit(items)).await?.len())
    }

    async fn claim(&self, request: ClaimRequest) -> Result<ClaimBatch> {
        match self.writer.apply(Op::Claim(request)).await? {
            Answer::Claimed(batch) => Ok(batch),
            other => Err(unexpected(other)),
        }
    }

    async fn commit(&self, commit: Commit) -> Result<()> {
        self.events_of(Op::Commit(commit)).await.map(drop)
    }

    async fn decide(&self, decision: DecisionCommit) -> Result<Vec<Event>> {
        self.events_of(Op::Decide(decision)).await
    }

    async fn retry(&self, item_id: &str, stage: &str, at: DateTime<Utc>) -> Result<Vec<Event>> {
        self.events_of(Op::Retry {
            item_id: item_id.to_owned(),
            stage: stage.to_owned(),
            at,
        })
        .await
    }

    async fn renew(&self, claims: &[(TaskKey, u64)], until: DateTime<Utc>) -> Result<Vec<TaskKey>> {
        let op = Op::Renew {
            claims: claims.to_vec(),
            until,
        };
        match self.writer.apply(op).await? {
            Answer::Lost(lost) => Ok(lost),
            other => Err(unexpected(other)),
        }
    }

    async fn rerun(
        &self,
        item_id: &str,
        stage: &str,
        at: DateTime<Utc>,
    ) -> Result<(Vec<TaskKey>, Vec<Event>)> {
        let op = Op::Rerun {
            item_id: item_id.to_owned(),
            stage: stage.to_owned(),
            at,
        };
        match self.writer.apply(op).await? {
            Answer::Stopped(running, events) => Ok((running, events)),
            other => Err(unexpected(other)),
        }
    }

    async fn cancel(&self, item_id: &str, at: DateTime<Utc>) -> Result<(Vec<TaskKey>, Vec<Event>)> {
        let op = Op::Cancel {
            item_id: item_id.to_owned(),
            at,
        };
        match self.writer.apply(op).await? {
            Answer::Stopped(running, events) => Ok((running, events)),
            other => Err(unexpected(other)),
        }
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        self.read(read::next_due).await
    }

    async fn next_review_deadline(&self) -> Result<Option<DateTime<Utc>>> {
        self.read(read::next_review_deadline).await
    }

    async fn due_reviews(&self, now: DateTime<Utc>) -> Result<Vec<AwaitingReview>> {
        self.read(async |db| read::due_reviews(db, now).await).await
    }

    async fn release_claims(&self, owner: &str, now: DateTime<Utc>) -> Result<u64> {
        let mut client = conn::get(&self.shared.pool).await?;
        lease::release(&mut client, owner, codec::micros(now)).await
    }

    async fn next_lease_expiry(&self) -> Result<Option<DateTime<Utc>>> {
        self.read(read::next_lease_expiry).await
    }

    async fn lease_owners(&self) -> Result<Vec<String>> {
        self.read(read::lease_owners).await
    }

    async fn migrate(
        &self,
        item_id: &str,
        version: u32,
        at: DateTime<Utc>,
    ) -> Result<(MigrateOutcome, Vec<Event>)> {
        let op = Op::Migrate {
            item_id: item_id.to_owned(),
            version,
            at,
        };
        match self.writer.apply(op).await? {
            Answer::Migrated(outcome, events) => Ok((outcome, events)),
            other => Err(unexpected(other)),
        }
    }

    async fn items_before_version(&self, version: u32) -> Result<Vec<String>> {
        self.read(async |db| read::items_before_version(db, version).await)
            .await
    }

    async fn prune(&self, finished_before: DateTime<Utc>, batch: usize) -> Result<Pruned> {
        let mut client = conn::get(&self.shared.pool).await?;
        let tx = client.transaction().await?;
        let pruned = prune::prune(Db::tx(&tx), finished_before, batch).await?;
        tx.commit().await?;
        Ok(pruned)
    }

    async fn pruned_through(&self) -> Result<u64> {
        self.read(prune::pruned_through).await
    }

    async fn pipeline_definition(&self) -> Result<Option<PipelineDef>> {
        let mut versions = self.read(read::versions).await?;
        Ok(versions.pop().map(|(_, definition)| definition))
    }

    async fn pipeline_version(&self, version: u32) -> Result<Option<PipelineDef>> {
        let found = self
            .read(async |db| self.shared.graphs.get(db, version).await)
            .await;
        match found {
            Ok(graph) => Ok(Some(graph.definition().clone())),
            Err(Error::UnknownVersion(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn stage_counts(&self) -> Result<Vec<StageCount>> {
        self.read(read::stage_counts).await
    }

    async fn status(&self, item_id: &str) -> Result<ItemStatus> {
        self.read(async |db| read::status(db, item_id).await).await
    }

    async fn items_in(&self, stage: &str, state: StageState) -> Result<Vec<String>> {
        self.read(async |db| read::items_in(db, stage, state).await)
            .await
    }

    async fn awaiting_review(&self) -> Result<Vec<AwaitingReview>> {
        self.read(read::awaiting_review).await
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>> {
        self.read(async |db| read::events(db, &query).await).await
    }
}
