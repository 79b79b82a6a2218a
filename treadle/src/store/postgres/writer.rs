//! Group commit: the transitions a process has in flight are applied
//! together, one transaction per batch ([`super::batch`]).
//!
//! A few writer tasks each take every job waiting in the queue (up to
//! [`MAX_BATCH`]) and commit them at once. A serialization failure,
//! deadlock, lock timeout or lost connection replays the batch; any other
//! database error replays each job alone, so one bad job fails alone. A
//! connection lost during `COMMIT` is resolved with `pg_xact_status`
//! before anyone is answered.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};

use super::Shared;
use super::batch::{Answer, Batch, Op};
use super::conn::{self, Db};
use crate::error::{Error, Result};
use crate::event::Event;

/// The most transitions one transaction applies.
pub(super) const MAX_BATCH: usize = 512;

/// How often a batch is replayed after a transient error before it fails.
const MAX_REPLAYS: u32 = 10;

/// A transition waiting for its batch, and where to send its answer.
#[derive(Debug)]
pub(super) struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Answer>>,
}

/// The queue of jobs the writer tasks take their batches from.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Writer {
    /// Starts `tasks` writer tasks for `shared`; they stop when every
    /// [`Writer`] is gone.
    pub(super) fn spawn(shared: Arc<Shared>, tasks: usize) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..tasks.max(1) {
            tokio::spawn(run(shared.clone(), queue.clone()));
        }
        Writer { jobs }
    }

    /// Applies `op` in the next batch and waits for its answer.
    pub(super) async fn apply(&self, op: Op) -> Result<Answer> {
        let (reply, answer) = oneshot::channel();
        let op = op.truncated();
        self.jobs
            .send(Job { op, reply })
            .map_err(|_| Error::StoreClosed)?;
        answer.await.map_err(|_| Error::StoreClosed)?
    }
}

/// One writer task: takes batches until the queue closes.
async fn run(shared: Arc<Shared>, queue: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>) {
    loop {
        let jobs = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            jobs
        };
        let (ops, replies): (Vec<Op>, Vec<_>) = jobs.into_iter().map(|j| (j.op, j.reply)).unzip();
        let answers = commit_batch(&shared, &ops).await;
        for (reply, answer) in replies.into_iter().zip(answers) {
            // A caller that stopped waiting is not an error: the work is committed.
            let _ = reply.send(answer);
        }
    }
}

/// Commits `ops` as one batch, replaying it after transient errors and
/// each job alone after any other database error.
async fn commit_batch(shared: &Shared, ops: &[Op]) -> Vec<Result<Answer>> {
    match commit_with_replays(shared, ops).await {
        Ok(answers) => answers,
        Err(error) if ops.len() == 1 => vec![Err(error)],
        Err(error) => {
            tracing::warn!(%error, jobs = ops.len(), "batch failed; replaying each job alone");
            let mut answers = Vec::with_capacity(ops.len());
            for op in ops {
                answers.push(
                    match commit_with_replays(shared, std::slice::from_ref(op)).await {
                        Ok(mut one) => one.pop().expect("one answer per job"),
                        Err(error) => Err(error),
                    },
                );
            }
            answers
        }
    }
}

/// Commits `ops` in one transaction, replaying it after transient errors.
async fn commit_with_replays(shared: &Shared, ops: &[Op]) -> Result<Vec<Result<Answer>>> {
    let mut replays = 0;
    loop {
        match commit_once(shared, ops).await {
            Err(error) if transient(&error) && replays < MAX_REPLAYS => {
                replays += 1;
                tracing::debug!(%error, replays, "replaying a batch");
                tokio::time::sleep(Duration::from_millis(5 << replays.min(7))).await;
            }
            result => return result,
        }
    }
}

/// One try at committing `ops` together: the batch's round trips (it
/// begins the transaction in its first), then `COMMIT`.
async fn commit_once(shared: &Shared, ops: &[Op]) -> Result<Vec<Result<Answer>>> {
    let session = Session(Some(conn::get(&shared.pool).await?));
    let client = session.client()?;
    let db = Db::client(client);
    let mut batch = Batch::new(db, &shared.graphs);
    let applied = match batch.apply(ops).await {
        Ok(answers) if batch.changes.is_empty() => Ok((answers, None)),
        Ok(answers) => {
            let slots = std::mem::take(&mut batch.slots);
            match batch.changes.write(db, &slots, &shared.channel).await {
                Ok(xid) => Ok((answers, Some(xid))),
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    };
    let events = std::mem::take(&mut batch.changes.events);
    drop(batch);
    let (mut answers, xid) = match applied {
        Ok(applied) => applied,
        Err(error) => {
            // A connection that cannot even roll back is closed, not pooled.
            if client.batch_execute("ROLLBACK").await.is_ok() {
                session.release();
            }
            return Err(error);
        }
    };
    match client.batch_execute("COMMIT").await {
        Ok(()) => session.release(),
        Err(error) => {
            let committed = match &xid {
                Some(xid) if error.code().is_none() => resolve(shared, xid).await?,
                _ => false,
            };
            if !committed {
                return Err(error.into());
            }
        }
    }
    number(&mut answers, &events);
    shared.feed.committed(events);
    Ok(answers)
}

/// A pooled connection on which the writer runs a transaction of its own
/// making (`BEGIN` rides in a batch's first round trip). Unless released
/// once the transaction is over, it is closed when dropped instead of going
/// back to the pool, and the server rolls the transaction back.
struct Session(Option<deadpool_postgres::Client>);

impl Session {
    fn client(&self) -> Result<&deadpool_postgres::Client> {
        self.0.as_ref().ok_or(Error::StoreClosed)
    }

    /// The transaction is over: the connection goes back to the pool.
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Client::take(client));
        }
    }
}

/// Gives the answers' events the numbers the log gave them: answers hold
/// the batch's events in the same order, each once.
fn number(answers: &mut [Result<Answer>], logged: &[Event]) {
    let mut numbers = logged.iter().map(|e| e.seq);
    for answer in answers.iter_mut().flatten() {
        let events: &mut [Event] = match answer {
            Answer::Events(events) | Answer::Stopped(_, events) | Answer::Migrated(_, events) => {
                events
            }
            Answer::Claimed(_) | Answer::Lost(_) => &mut [],
        };
        for event in events {
            event.seq = numbers.next().unwrap_or_default();
        }
    }
}

/// Whether the transaction `xid`, whose `COMMIT` got no answer, committed.
/// Waits while the server still has it in progress.
async fn resolve(shared: &Shared, xid: &str) -> Result<bool> {
    for _ in 0..100 {
        let client = conn::get(&shared.pool).await?;
        let row = Db::client(&client)
            .one("SELECT pg_xact_status($1::text::xid8)", &[&xid])
            .await?;
        match row.get::<_, Option<&str>>(0) {
            Some("committed") => return Ok(true),
            Some("in progress") => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => return Ok(false),
        }
    }
    Ok(false)
}

/// Whether `error` may pass if the batch is tried again: a serialization
/// failure, a deadlock, a lock timeout, or a lost connection.
fn transient(error: &Error) -> bool {
    let Error::Store {
        backend: "PostgreSQL",
        cause,
        ..
    } = error
    else {
        return false;
    };
    let Some(e) = cause.downcast_ref::<tokio_postgres::Error>() else {
        return true; // the pool could not hand out a connection
    };
    match e.code() {
        Some(code) => ["40001", "40P01", "55P03", "57P01"].contains(&code.code()),
        None => {
            e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        }
    }
}
