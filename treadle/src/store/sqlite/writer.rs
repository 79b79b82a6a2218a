//! The writer thread: owns the write connection and commits transitions in
//! groups.
//!
//! Callers queue jobs on a channel. The thread takes every job waiting,
//! opens one `BEGIN IMMEDIATE` transaction, runs each job inside its own
//! `SAVEPOINT` (a failing job rolls back to it, touching no other job),
//! commits once, and only then answers the jobs and broadcasts their events,
//! in commit order. rusqlite never runs on an async worker thread.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{broadcast, oneshot};

use crate::error::{Error, Result};
use crate::event::Event;

/// The most jobs committed in one transaction.
const MAX_BATCH: usize = 512;

/// What a job leaves behind once it has run: whether it succeeded, the
/// events to broadcast if its batch commits, and how to answer its caller.
struct Done {
    ok: bool,
    events: Vec<Event>,
    reply: Box<dyn FnOnce(Option<Error>) + Send>,
}

/// A queued job: given the connection (or the error that keeps it from
/// running), it runs and says how to answer.
type Work = Box<dyn FnOnce(std::result::Result<&Connection, Error>) -> Done + Send>;

/// The handle on the writer thread. Dropping it stops the thread once every
/// queued job is answered, and waits for it so the database is closed.
pub(crate) struct Writer {
    jobs: Option<mpsc::Sender<Work>>,
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
        let (jobs, queue) = mpsc::channel::<Work>();
        let batches = Arc::new(AtomicUsize::new(0));
        let counter = batches.clone();
        let thread = std::thread::Builder::new()
            .name("treadle-sqlite-writer".into())
            .spawn(move || run(conn, queue, feed, &counter))?;
        Ok(Writer {
            jobs: Some(jobs),
            thread: Some(thread),
            batches,
        })
    }

    /// Runs `job` in the next group commit and returns its value once the
    /// group is committed. The job returns its value and the events it
    /// appended; on error everything it wrote is rolled back.
    pub(crate) async fn write<T, F>(&self, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<(T, Vec<Event>)> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel::<Result<T>>();
        let work: Work = Box::new(move |conn| match conn.and_then(job) {
            Ok((value, events)) => Done {
                ok: true,
                events,
                reply: Box::new(move |failed| {
                    let _ = answer.send(match failed {
                        None => Ok(value),
                        Some(error) => Err(error),
                    });
                }),
            },
            Err(error) => Done {
                ok: false,
                events: Vec::new(),
                reply: Box::new(move |_| {
                    let _ = answer.send(Err(error));
                }),
            },
        });
        let jobs = self.jobs.as_ref().ok_or(Error::StoreClosed)?;
        jobs.send(work).map_err(|_| Error::StoreClosed)?;
        answered.await.map_err(|_| Error::StoreClosed)?
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
    conn: Connection,
    queue: mpsc::Receiver<Work>,
    feed: broadcast::Sender<Event>,
    batches: &AtomicUsize,
) {
    while let Ok(first) = queue.recv() {
        batches.fetch_add(1, Ordering::Relaxed);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
        commit_batch(&conn, batch, &feed);
    }
}

fn commit_batch(conn: &Connection, batch: Vec<Work>, feed: &broadcast::Sender<Event>) {
    if let Err(error) = exec(conn, "BEGIN IMMEDIATE") {
        let error = Arc::new(error);
        for work in batch {
            (work(Err(Error::Sqlite(error.clone()))).reply)(None);
        }
        return;
    }
    let done: Vec<Done> = batch.into_iter().map(|work| run_job(conn, work)).collect();
    let failed = exec(conn, "COMMIT").err().map(|error| {
        tracing::error!(%error, "treadle SQLite group commit failed");
        // Leave no transaction open for the next batch.
        let _ = exec(conn, "ROLLBACK");
        Arc::new(error)
    });
    for Done { ok, events, reply } in done {
        match &failed {
            Some(error) if ok => reply(Some(Error::Sqlite(error.clone()))),
            _ => {
                for event in &events {
                    // No subscribers is fine: the log keeps every event.
                    let _ = feed.send(event.clone());
                }
                reply(None);
            }
        }
    }
}

/// Runs one job inside its own savepoint, rolled back if the job fails.
fn run_job(conn: &Connection, work: Work) -> Done {
    if let Err(error) = exec(conn, "SAVEPOINT job") {
        return work(Err(error.into()));
    }
    // A panicking job must not take the writer (and every later transition)
    // down with it: its savepoint is rolled back and its caller, whose
    // answer channel was dropped in the unwind, sees the store as closed.
    let done = std::panic::catch_unwind(AssertUnwindSafe(|| work(Ok(conn)))).unwrap_or_else(|_| {
        tracing::error!("a treadle SQLite transition panicked; it was rolled back");
        Done {
            ok: false,
            events: Vec::new(),
            reply: Box::new(|_| {}),
        }
    });
    let mut end = Ok(());
    if !done.ok {
        end = exec(conn, "ROLLBACK TO job");
    }
    if let Err(error) = end.and_then(|()| exec(conn, "RELEASE job")) {
        // The batch will fail to commit cleanly or has rolled back; the
        // COMMIT result reports it to the jobs that succeeded.
        tracing::error!(%error, "treadle SQLite savepoint failed");
    }
    done
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_transitions_share_one_commit_and_fail_alone() {
        let writer = Arc::new(writer());
        // The first job holds the writer while the others queue up.
        let slow = {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .write(|conn| {
                        std::thread::sleep(Duration::from_millis(200));
                        conn.execute("INSERT INTO t (n) VALUES (0)", [])?;
                        Ok(((), Vec::new()))
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let jobs: Vec<_> = (1..=100)
            .map(|n: i64| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    writer
                        .write(move |conn| {
                            conn.execute("INSERT INTO t (n) VALUES (?1)", [n])?;
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
            .write(|conn| {
                let counted = conn.query_row("SELECT count(*), sum(n) FROM t", [], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })?;
                Ok((counted, Vec::new()))
            })
            .await
            .unwrap();
        assert_eq!(rows, 91, "the failed jobs' rows were rolled back");
        assert_eq!(sum, (1..=100).filter(|n| n % 10 != 0).sum::<i64>());
    }
}
