//! The embedded SQLite store: durable, shared between the tasks of a process
//! and between processes on one machine.
//!
//! # Design
//!
//! - One **writer thread** owns the write connection. Transitions queue on
//!   it and are committed in groups: one `BEGIN IMMEDIATE` transaction per
//!   batch and one `COMMIT`, and only then are callers answered and events
//!   broadcast, in log order. A transition that is refused (e.g.
//!   [`Error::LeaseLost`]) is refused by its rule before it writes anything;
//!   one that fails after writing makes the writer replay the batch with a
//!   `SAVEPOINT` per transition, so it rolls back alone.
//! - **Reads** run in `spawn_blocking` on separate read connections, each in
//!   one read transaction (a consistent snapshot; WAL lets them run beside
//!   the writer). An in-memory database has a single connection, so its
//!   reads go through the writer thread.
//! - The database uses WAL, `synchronous = FULL` (a commit survives power
//!   loss), `foreign_keys = ON` and a busy timeout so several processes can
//!   share it. Claims take a lease (owner, expiry) and bump a fencing
//!   generation that every write for the claim must match.
//! - Statements are prepared once and reused: the writer holds those of its
//!   transitions (see `statements`), the rest come from the connection's
//!   cache.
//!   A parameter SQLite would plan against (one compared with a partial
//!   index's condition, or a `LIMIT`) is written `+?N`: SQLite then plans
//!   without its value, instead of compiling the statement again on every
//!   reuse (a unit test holds every statement to this).
//! - Stored values are decoded strictly: an unknown state, malformed JSON or
//!   a missing row is [`Error::Corrupt`] naming the table, key and column.
//!
//! # Transitions
//!
//! Each transition loads the rows of the item it touches (the stage rows of
//! the item's pipeline version, and only the subtask rows it needs: fan-out
//! counters on the stage row decide a fan-in without reading every sibling),
//! runs the rule of [`crate::rules`], and writes back exactly the rows the
//! rule changed, the attempts, the events and the queue entries.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::broadcast;

use super::{
    ClaimBatch, ClaimRequest, Commit, DecisionCommit, EVENT_FEED_CAPACITY, EventQuery,
    MigrateOutcome, NewItem, PipelineDrift, Pruned, StageCount, Store, TaskKey,
};
use crate::definition::PipelineDef;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::state::StageState;
use crate::status::{AwaitingReview, ItemStatus};

mod appends;
mod cache;
mod codec;
mod prune;
mod read;
mod reply;
mod rows;
mod schema;
mod statements;
mod tx;
mod versions;
mod writer;

#[cfg(test)]
mod tests;

use tx::Tx;
use versions::Versions;
use writer::Writer;

/// Read connections kept open for reuse.
const MAX_IDLE_READERS: usize = 4;

/// A [`Store`] in a SQLite database file. Cheap to clone: clones share the
/// same connections and writer thread, which stops when the last clone is
/// dropped.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    feed: broadcast::Sender<Event>,
    /// The registered pipeline versions, as far as they were read.
    versions: Arc<Versions>,
    /// `None` for an in-memory database, whose reads go through the writer.
    readers: Option<Readers>,
    writer: Writer,
}

#[derive(Debug)]
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// Open the file read-only (a store from [`SqliteStore::open_read_only`]).
    read_only: bool,
}

impl Readers {
    fn take(&self) -> Result<Connection> {
        if let Some(conn) = self.lock().pop() {
            return Ok(conn);
        }
        let flags = if self.read_only {
            schema::read_only_flags()
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(&self.path, flags)?;
        schema::configure(&conn)?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // The list holds only idle connections; a panic cannot corrupt it.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SqliteStore {
    /// The schema version this build writes, kept in `PRAGMA user_version`.
    pub const SCHEMA_VERSION: i64 = 8;

    /// Opens (or creates) the database at `path`, applying any pending
    /// schema migrations.
    ///
    /// Fails with [`Error::SchemaTooNew`] if a newer treadle wrote it, and
    /// with [`Error::NotATreadleDatabase`] if the file is not SQLite or is
    /// another application's database; neither case writes to the file.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        blocking(move || {
            let conn = schema::open(Some(&path), schema::MIGRATIONS)?;
            Self::start(conn, Some(path), false)
        })
        .await
    }

    /// A private database in memory, gone when the store is dropped.
    pub async fn open_in_memory() -> Result<Self> {
        blocking(|| Self::start(schema::open(None, schema::MIGRATIONS)?, None, false)).await
    }

    /// Opens the existing database at `path` for inspection only: it is
    /// never created, migrated or locked, so reads answer at once while
    /// workers write. Every transition fails with the store's read-only
    /// error. The file must have this build's schema version:
    /// [`Error::SchemaTooOld`] if an older treadle wrote it, besides the
    /// errors of [`SqliteStore::open`].
    pub async fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        blocking(move || {
            let conn = schema::open_read_only(&path, schema::MIGRATIONS)?;
            Self::start(conn, Some(path), true)
        })
        .await
    }

    fn start(conn: Connection, path: Option<PathBuf>, read_only: bool) -> Result<Self> {
        let feed = broadcast::channel(EVENT_FEED_CAPACITY).0;
        let writer = Writer::start(conn, feed.clone())?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                feed,
                versions: Arc::default(),
                readers: path.map(|path| Readers {
                    path,
                    idle: Mutex::new(Vec::new()),
                    read_only,
                }),
                writer,
            }),
        })
    }

    /// Runs a transition on the writer thread; answered after its commit.
    async fn write<T, F>(&self, transition: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Tx<'_, '_>) -> Result<T> + Send + 'static,
    {
        let mut transition = transition;
        let versions = self.inner.versions.clone();
        self.inner
            .writer
            .write(move |session| {
                let mut tx = Tx::new(session, &versions);
                let value = transition(&mut tx)?;
                Ok((value, tx.into_events()))
            })
            .await
    }

    /// Runs a query in one read transaction, off the async threads.
    async fn read<T, F>(&self, query: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T> + Send + 'static,
    {
        let mut query = query;
        if self.inner.readers.is_none() {
            return self
                .inner
                .writer
                .write(move |session| Ok((query(session.settled()?)?, Vec::new())))
                .await;
        }
        let inner = self.inner.clone();
        blocking(move || {
            let readers = inner.readers.as_ref().ok_or(Error::StoreClosed)?;
            let conn = readers.take()?;
            let value = {
                let snapshot = conn.unchecked_transaction()?;
                let value = query(&snapshot)?;
                snapshot.commit()?;
                value
            };
            readers.put(conn);
            Ok(value)
        })
        .await
    }
}

/// Runs blocking SQLite work on tokio's blocking pool.
async fn blocking<T, F>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(Error::StoreClosed),
    }
}

#[async_trait]
impl Store for SqliteStore {
    /// Group commit: with more attempts in flight, each transaction (and
    /// its fsync) carries more transitions. At 1,024 rather than 512, a
    /// linear run of 20,000 items needs 44% fewer commits (292 against
    /// 520) and writes 9% fewer log pages.
    fn suggested_concurrency(&self) -> usize {
        1_024
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.feed.subscribe()
    }

    async fn register_pipeline(&self, definition: &PipelineDef) -> Result<PipelineDrift> {
        let definition = definition.clone();
        self.write(move |tx| tx.register_pipeline(&definition))
            .await
    }

    async fn submit(&self, items: Vec<NewItem>) -> Result<usize> {
        self.write(move |tx| {
            tx.submit(&items)?;
            Ok(tx.events().len())
        })
        .await
    }

    async fn claim(&self, request: ClaimRequest) -> Result<ClaimBatch> {
        self.write(move |tx| tx.claim(&request)).await
    }

    async fn commit(&self, commit: Commit) -> Result<()> {
        self.write(move |tx| tx.commit(commit.clone())).await
    }

    async fn decide(&self, decision: DecisionCommit) -> Result<Vec<Event>> {
        self.write(move |tx| {
            tx.decide(decision.clone())?;
            Ok(tx.events().to_vec())
        })
        .await
    }

    async fn retry(&self, item_id: &str, stage: &str, at: DateTime<Utc>) -> Result<Vec<Event>> {
        let (item_id, stage) = (item_id.to_owned(), stage.to_owned());
        self.write(move |tx| {
            tx.retry(&item_id, &stage, at)?;
            Ok(tx.events().to_vec())
        })
        .await
    }

    async fn renew(&self, claims: &[(TaskKey, u64)], until: DateTime<Utc>) -> Result<Vec<TaskKey>> {
        let claims = claims.to_vec();
        self.write(move |tx| tx.renew(&claims, until)).await
    }

    async fn rerun(
        &self,
        item_id: &str,
        stage: &str,
        at: DateTime<Utc>,
    ) -> Result<(Vec<TaskKey>, Vec<Event>)> {
        let (item_id, stage) = (item_id.to_owned(), stage.to_owned());
        self.write(move |tx| {
            let running = tx.rerun(&item_id, &stage, at)?;
            Ok((running, tx.events().to_vec()))
        })
        .await
    }

    async fn cancel(&self, item_id: &str, at: DateTime<Utc>) -> Result<(Vec<TaskKey>, Vec<Event>)> {
        let item_id = item_id.to_owned();
        self.write(move |tx| {
            let running = tx.cancel(&item_id, at)?;
            Ok((running, tx.events().to_vec()))
        })
        .await
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        self.read(read::next_due).await
    }

    async fn next_review_deadline(&self) -> Result<Option<DateTime<Utc>>> {
        self.read(read::next_review_deadline).await
    }

    async fn due_reviews(&self, now: DateTime<Utc>) -> Result<Vec<AwaitingReview>> {
        self.read(move |conn| read::due_reviews(conn, now)).await
    }

    async fn release_claims(&self, owner: &str, now: DateTime<Utc>) -> Result<u64> {
        let owner = owner.to_owned();
        self.write(move |tx| tx.release_claims(&owner, now)).await
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
        let item_id = item_id.to_owned();
        self.write(move |tx| {
            let outcome = tx.migrate(&item_id, version, at)?;
            Ok((outcome, tx.events().to_vec()))
        })
        .await
    }

    async fn items_before_version(&self, version: u32) -> Result<Vec<String>> {
        self.read(move |conn| read::items_before_version(conn, version))
            .await
    }

    async fn pipeline_drift(&self) -> Result<Option<PipelineDrift>> {
        self.read(read::latest_drift).await
    }

    async fn pipeline_definition(&self) -> Result<Option<PipelineDef>> {
        self.read(|conn| Ok(versions::all(conn)?.pop().map(|(_, d)| d)))
            .await
    }

    async fn pipeline_version(&self, version: u32) -> Result<Option<PipelineDef>> {
        self.read(move |conn| versions::definition(conn, version))
            .await
    }

    async fn stage_counts(&self) -> Result<Vec<StageCount>> {
        self.read(read::stage_counts).await
    }

    async fn status(&self, item_id: &str) -> Result<ItemStatus> {
        let item_id = item_id.to_owned();
        self.read(move |conn| read::status(conn, &item_id)).await
    }

    async fn items_in(&self, stage: &str, state: StageState) -> Result<Vec<String>> {
        let stage = stage.to_owned();
        self.read(move |conn| read::items_in(conn, &stage, state))
            .await
    }

    async fn awaiting_review(&self) -> Result<Vec<AwaitingReview>> {
        self.read(read::awaiting_review).await
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>> {
        self.read(move |conn| read::events(conn, &query)).await
    }

    /// Candidates are read off the writer thread; the removal is one job in
    /// a group commit, followed by an incremental vacuum.
    async fn prune(&self, finished_before: DateTime<Utc>, batch: usize) -> Result<Pruned> {
        if batch == 0 {
            return Ok(Pruned::default());
        }
        let ids = self
            .read(move |conn| prune::candidates(conn, finished_before, batch))
            .await?;
        if ids.is_empty() {
            return Ok(Pruned::default());
        }
        let full = ids.len() == batch;
        let pruned = self
            .inner
            .writer
            .write(move |session| {
                // Rows change outside the rules: the writer's cache goes.
                session.items.clear();
                Ok((
                    prune::remove(session.settled()?, &ids, finished_before)?,
                    Vec::new(),
                ))
            })
            .await?;
        if pruned.items > 0 {
            self.inner
                .writer
                .write(|session| Ok((prune::vacuum(session.settled()?)?, Vec::new())))
                .await?;
        }
        // A full batch may have more behind it, unless the rule kept every
        // candidate (then the next call would find the same ones).
        let more = full && pruned.items > 0;
        Ok(Pruned { more, ..pruned })
    }

    async fn pruned_through(&self) -> Result<u64> {
        self.read(prune::pruned_through).await
    }
}
