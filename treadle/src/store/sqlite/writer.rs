//! The writer thread: owns the write connection and commits transitions in
//! groups.
//!
//! Callers queue jobs on a channel. The thread takes every job waiting and
//! runs them all in one `BEGIN IMMEDIATE` transaction, commits once, and
//! only then answers the jobs and broadcasts their events, in commit order,
//! waking the waiting callers with one cross-thread wake-up (see `reply`).
//! rusqlite never runs on an async worker thread.
//!
//! A job checks before it writes, so a job that fails (a lost lease, a
//! decision on the wrong state) normally fails having written nothing, and
//! the batch goes on without it. If a job fails or panics *after* writing,
//! the whole transaction is rolled back and the batch is replayed with each
//! job in its own `SAVEPOINT`, so that job's writes are undone alone and the
//! others commit. Jobs are therefore closures that can run twice.
//!
//! The thread also keeps the [`ItemCache`] of the items it wrote last; it
//! checks the cache once it holds the write lock and empties it whenever a
//! transaction or savepoint is rolled back.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::broadcast;

use super::appends::Appends;
use super::cache::ItemCache;
use super::reply::{self, Answer, Wake};
use super::statements::Statements;
use crate::error::{Error, Result};
use crate::event::Event;

/// The most jobs committed in one transaction.
const MAX_BATCH: usize = 512;

/// What a job works with: the write connection and its held statements,
/// the writer's cache and the rows the group commit appended so far.
pub(crate) struct Session<'c> {
    /// The write connection, inside the group commit's transaction.
    pub(crate) conn: &'c Connection,
    /// The statements of the transitions, held prepared.
    pub(crate) statements: Statements<'c>,
    /// The items the writer wrote last.
    pub(crate) items: ItemCache,
    /// Events, attempts and run queue entries not written yet.
    pub(crate) appends: Appends,
}

impl<'c> Session<'c> {
    /// The connection once every pending append is written, for a job that
    /// reads or deletes rows outside a transition's own.
    pub(crate) fn settled(&mut self) -> Result<&'c Connection> {
        self.appends.flush(&mut self.statements)?;
        Ok(self.conn)
    }
}

/// A queued transition.
trait Job: Send {
    /// Runs the transition, returning the events it appended. It may be run
    /// again, from scratch, after its transaction was rolled back.
    fn run(&mut self, session: &mut Session<'_>) -> Result<Vec<Event>>;

    /// Answers the caller: with the value of the last run if `outcome` is
    /// `Ok`, else with the error. Returns the caller's task to wake, if it
    /// is waiting.
    fn answer(self: Box<Self>, outcome: Result<()>) -> Option<Wake>;
}

/// A job returning a `T` to a waiting caller.
struct Transition<T: Send + 'static, F> {
    work: F,
    value: Option<T>,
    reply: Answer<T>,
}

impl<T, F> Job for Transition<T, F>
where
    T: Send + 'static,
    F: FnMut(&mut Session<'_>) -> Result<(T, Vec<Event>)> + Send,
{
    fn run(&mut self, session: &mut Session<'_>) -> Result<Vec<Event>> {
        let (value, events) = (self.work)(session)?;
        self.value = Some(value);
        Ok(events)
    }

    fn answer(self: Box<Self>, outcome: Result<()>) -> Option<Wake> {
        let Transition { value, reply, .. } = *self;
        let answer = outcome.and_then(|()| value.ok_or(Error::StoreClosed));
        // A caller that stopped waiting is not an error.
        reply.send(answer)
    }
}

/// The handle on the writer thread. Dropping it stops the thread once every
/// queued job is answered, and waits for it so the database is closed.
pub(crate) struct Writer {
    jobs: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
    /// Group commits run so far (shown by `Debug`; tests check batching).
    batches: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("group_commits", &self.batches.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts the thread that owns `conn`, broadcasting committed events on `feed`.
    pub(crate) fn start(conn: Connection, feed: broadcast::Sender<Event>) -> Result<Self> {
        let (jobs, queue) = mpsc::channel::<Box<dyn Job>>();
        let batches = Arc::new(AtomicUsize::new(0));
        let counter = batches.clone();
        let thread = std::thread::Builder::new()
            .name("treadle-sqlite-writer".into())
            .spawn(move || {
                let session = Session {
                    conn: &conn,
                    statements: Statements::new(&conn),
                    items: ItemCache::default(),
                    appends: Appends::default(),
                };
                run(session, queue, feed, &counter)
            })?;
        Ok(Writer {
            jobs: Some(jobs),
            thread: Some(thread),
            batches,
        })
    }

    /// Runs `work` in the next group commit and returns its value once the
    /// group is committed. The work returns its value and the events it
    /// appended; on error everything it wrote is rolled back. It must be
    /// safe to run twice (see the module docs).
    pub(crate) async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Session<'_>) -> Result<(T, Vec<Event>)> + Send + 'static,
    {
        let (reply, answered) = reply::channel::<T>();
        let job = Box::new(Transition {
            work,
            value: None,
            reply,
        });
        let jobs = self.jobs.as_ref().ok_or(Error::StoreClosed)?;
        jobs.send(job).map_err(|_| Error::StoreClosed)?;
        answered.await
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            // The queue is closed: the thread finishes its batch and exits.
            if thread.join().is_err() {
                tracing::error!("the treadle SQLite writer thread panicked");
            }
        }
    }
}

fn run(
    mut session: Session<'_>,
    queue: mpsc::Receiver<Box<dyn Job>>,
    feed: broadcast::Sender<Event>,
    batches: &AtomicUsize,
) {
    while let Ok(first) = queue.recv() {
        batches.fetch_add(1, Ordering::Relaxed);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcomes = run_batch(&mut session, &mut batch, false)
            .or_else(|| run_batch(&mut session, &mut batch, true))
            .unwrap_or_else(|| {
                // Unreachable in practice: with savepoints no job poisons the batch.
                batch.iter().map(|_| Err(Error::StoreClosed)).collect()
            });
        let mut waiting = Vec::with_capacity(batch.len());
        for (job, outcome) in batch.into_iter().zip(outcomes) {
            let answered = match outcome {
                Ok(events) => {
                    for event in events {
                        // No subscribers is fine: the log keeps every event.
                        let _ = feed.send(event);
                    }
                    job.answer(Ok(()))
                }
                Err(error) => job.answer(Err(error)),
            };
            waiting.extend(answered);
        }
        reply::wake_all(waiting);
    }
}

/// Runs every job of `batch` in one transaction and commits it, returning
/// each job's events or error. Without `savepoints`, returns `None` (having
/// rolled everything back) as soon as a job fails after writing, or the
/// rows the jobs appended cannot be written.
fn run_batch(
    session: &mut Session<'_>,
    batch: &mut [Box<dyn Job>],
    savepoints: bool,
) -> Option<Vec<Result<Vec<Event>>>> {
    let outcomes = run_jobs(session, batch, savepoints);
    // Whatever happened, the next transaction starts with nothing pending.
    session.appends.clear();
    outcomes
}

/// [`run_batch`] but for forgetting the appends afterwards.
fn run_jobs(
    session: &mut Session<'_>,
    batch: &mut [Box<dyn Job>],
    savepoints: bool,
) -> Option<Vec<Result<Vec<Event>>>> {
    let began = exec(session.conn, "BEGIN IMMEDIATE");
    if let Err(error) = began.and_then(|()| session.items.check(session.conn)) {
        if !session.conn.is_autocommit() {
            let _ = exec(session.conn, "ROLLBACK");
        }
        let error: Arc<dyn std::error::Error + Send + Sync> = Arc::new(error);
        return Some(
            batch
                .iter()
                .map(|_| Err(Error::sqlite("beginning a transaction", error.clone())))
                .collect(),
        );
    }
    let mut outcomes = Vec::with_capacity(batch.len());
    for job in batch.iter_mut() {
        let outcome = if savepoints {
            run_in_savepoint(session, job.as_mut())
        } else {
            let before = session.conn.total_changes();
            let mark = session.appends.mark();
            match catch(session, job.as_mut()) {
                // A failed job that wrote rows (or flushed others' appends)
                // takes the whole batch back; one that did not drops its
                // own appends and fails alone.
                Err(_)
                    if session.conn.total_changes() != before
                        || !session.appends.rollback(mark) =>
                {
                    let _ = exec(session.conn, "ROLLBACK");
                    session.items.clear();
                    return None;
                }
                outcome => outcome,
            }
        };
        outcomes.push(outcome);
    }
    if !savepoints && session.appends.flush(&mut session.statements).is_err() {
        // Some job's appended rows cannot be written: find it with savepoints.
        let _ = exec(session.conn, "ROLLBACK");
        session.items.clear();
        return None;
    }
    if let Err(error) = exec(session.conn, "COMMIT") {
        tracing::error!(%error, "treadle SQLite group commit failed");
        // Leave no transaction open for the next batch.
        let _ = exec(session.conn, "ROLLBACK");
        session.items.clear();
        let error: Arc<dyn std::error::Error + Send + Sync> = Arc::new(error);
        for outcome in outcomes.iter_mut().filter(|o| o.is_ok()) {
            *outcome = Err(Error::sqlite("committing a transaction", error.clone()));
        }
    }
    Some(outcomes)
}

/// Runs one job inside its own savepoint, with the rows it appended
/// written there; rolled back if the job or those rows fail.
fn run_in_savepoint(session: &mut Session<'_>, job: &mut dyn Job) -> Result<Vec<Event>> {
    exec(session.conn, "SAVEPOINT job")?;
    let mark = session.appends.mark();
    let outcome = catch(session, job).and_then(|events| {
        session.appends.flush(&mut session.statements)?;
        Ok(events)
    });
    let mut end = Ok(());
    if outcome.is_err() {
        end = exec(session.conn, "ROLLBACK TO job");
        session.items.clear();
        // Anything flushed since the mark was undone by the savepoint.
        let _ = session.appends.rollback(mark);
    }
    if let Err(error) = end.and_then(|()| exec(session.conn, "RELEASE job")) {
        // The batch will fail to commit cleanly or has rolled back; the
        // COMMIT result reports it to the jobs that succeeded.
        tracing::error!(%error, "treadle SQLite savepoint failed");
    }
    outcome
}

/// Runs a job; a panic in it is an error of that job, not of the writer
/// (and every later transition).
fn catch(session: &mut Session<'_>, job: &mut dyn Job) -> Result<Vec<Event>> {
    std::panic::catch_unwind(AssertUnwindSafe(|| job.run(session))).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        tracing::error!(%message, "a treadle SQLite transition panicked; it was rolled back");
        Err(Error::TransitionPanicked {
            backend: "SQLite",
            message,
        })
    })
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn writer() -> Writer {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER NOT NULL)")
            .unwrap();
        Writer::start(conn, broadcast::channel(16).0).unwrap()
    }

    /// A job that holds the writer for 200 ms (writing the row 0), so the
    /// jobs queued meanwhile share the next group commit.
    fn hold(writer: &Arc<Writer>) -> tokio::task::JoinHandle<Result<()>> {
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .write(|session| {
                    std::thread::sleep(Duration::from_millis(200));
                    session.conn.execute("INSERT INTO t (n) VALUES (0)", [])?;
                    Ok(((), Vec::new()))
                })
                .await
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_transitions_share_one_commit_and_fail_alone() {
        let writer = Arc::new(writer());
        let slow = hold(&writer);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let jobs: Vec<_> = (1..=100)
            .map(|n: i64| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    writer
                        .write(move |session| {
                            session.conn.execute("INSERT INTO t (n) VALUES (?1)", [n])?;
                            if n % 10 == 0 {
                                // Fails after writing: only this job rolls back.
                                return Err(Error::stage(format!("job {n} fails")));
                            }
                            Ok((n, Vec::new()))
                        })
                        .await
                })
            })
            .collect();
        slow.await.unwrap().unwrap();
        let mut failed = 0;
        for job in jobs {
            if job.await.unwrap().is_err() {
                failed += 1;
            }
        }
        assert_eq!(failed, 10);
        let batches = writer.batches.load(Ordering::Relaxed);
        assert!(batches <= 5, "{batches} transactions for 101 jobs");
        let (rows, sum) = writer
            .write(|session| {
                let counted =
                    session
                        .conn
                        .query_row("SELECT count(*), sum(n) FROM t", [], |r| {
                            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                        })?;
                Ok((counted, Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(rows, 91, "the failed jobs' rows were rolled back");
        assert_eq!(sum, (1..=100).filter(|n| n % 10 != 0).sum::<i64>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_that_stop_waiting_do_not_hold_up_the_others_of_their_commit() {
        let writer = Arc::new(writer());
        let slow = hold(&writer);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let callers: Vec<_> = (0..60_i64)
            .map(|n| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    writer
                        .write(move |session| {
                            session.conn.execute("INSERT INTO t (n) VALUES (?1)", [n])?;
                            Ok((n, Vec::new()))
                        })
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Every third caller stops waiting before its commit answers, the
        // last one among them.
        for caller in callers.iter().skip(2).step_by(3) {
            caller.abort();
        }
        slow.await.unwrap().unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(10), async {
            let mut answered = Vec::new();
            for (n, caller) in callers.into_iter().enumerate() {
                match caller.await {
                    Ok(answer) => answered.push(answer.unwrap()),
                    Err(join) => assert!(join.is_cancelled(), "caller {n}: {join}"),
                }
            }
            answered
        })
        .await
        .expect("every caller still waiting was answered");
        let expected: Vec<i64> = (0..60).filter(|n| n % 3 != 2).collect();
        assert_eq!(answered, expected);
    }
}
