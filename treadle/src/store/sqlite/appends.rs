//! The rows a group commit's transitions append (events, attempt records,
//! run queue entries), held by the writer and written together with a few
//! multi-row `INSERT`s instead of one statement per row.
//!
//! Every append is in the same transaction as the rows its transition
//! updated, so the guarantees stay those of the group commit:
//!
//! - the writer writes them before `COMMIT` ([`Appends::flush`]); a failed
//!   flush rolls the whole group back and it runs again with a savepoint
//!   per transition, each flushing its own rows inside its savepoint;
//! - a transition that fails drops what it appended ([`Appends::rollback`]
//!   to the [`Mark`] taken before it ran);
//! - event sequence numbers are handed out here, gaplessly, after the
//!   highest one the log ever held (`AUTOINCREMENT`'s rule), and given back
//!   with the appends of a transition that failed;
//! - a claim takes run queue entries appended earlier in the same group
//!   after those already in the table ([`Appends::take_runnable`]), so the
//!   queue stays first in, first out, and such an entry is never written;
//! - a statement that reads or deletes these tables on the writer's
//!   connection runs after a flush (see [`super::writer::Session::settled`]).

use rusqlite::Connection;
use rusqlite::types::Value;

use super::codec::Param;
use super::statements::Statements;
use crate::error::Result;
use crate::task::TaskKey;

/// An event row: `seq, at, item_seq, stage, subtask, kind`.
pub(crate) type EventRow = [Param<'static>; 6];

/// An attempt row: `stage_id, subtask, attempt, started_at, finished_at,
/// result, error`.
pub(crate) type AttemptRow = [Param<'static>; 7];

/// Rows appended and not written yet, and the next event sequence number.
#[derive(Default)]
pub(crate) struct Appends {
    events: Vec<EventRow>,
    attempts: Vec<AttemptRow>,
    /// Run queue entries, oldest first; those before `taken` were claimed.
    runnable: Vec<TaskKey>,
    taken: usize,
    /// The sequence number of the next event, once read in this transaction.
    next_seq: Option<i64>,
}

/// Where the appends stood before a transition ran.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark {
    events: usize,
    attempts: usize,
    runnable: usize,
    taken: usize,
    next_seq: Option<i64>,
}

/// Rows per multi-row `INSERT`, largest first; the last must be 1.
const CHUNKS: [usize; 4] = [64, 16, 4, 1];

impl Appends {
    /// Appends an event row (without its `seq`) and returns its sequence number.
    pub(crate) fn event(&mut self, conn: &Connection, row: [Param<'static>; 5]) -> Result<u64> {
        let seq = match self.next_seq {
            Some(seq) => seq,
            None => conn
                .prepare_cached(
                    "SELECT max(
                         coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),
                         coalesce((SELECT max(seq) FROM events), 0)) + 1",
                )?
                .query_row([], |row| row.get(0))?,
        };
        self.next_seq = Some(seq + 1);
        let [at, item_seq, stage, subtask, kind] = row;
        self.events
            .push([Param::int(seq), at, item_seq, stage, subtask, kind]);
        Ok(seq as u64)
    }

    /// Appends an attempt record.
    pub(crate) fn attempt(&mut self, row: AttemptRow) {
        self.attempts.push(row);
    }

    /// Appends a run queue entry.
    pub(crate) fn runnable(&mut self, key: TaskKey) {
        self.runnable.push(key);
    }

    /// Takes up to `limit` of the run queue entries appended and not yet
    /// taken, oldest first.
    pub(crate) fn take_runnable(&mut self, limit: usize) -> Vec<TaskKey> {
        let end = self.runnable.len().min(self.taken + limit);
        let taken = self.runnable[self.taken..end].to_vec();
        self.taken = end;
        taken
    }

    /// Where the appends stand now.
    pub(crate) fn mark(&self) -> Mark {
        Mark {
            events: self.events.len(),
            attempts: self.attempts.len(),
            runnable: self.runnable.len(),
            taken: self.taken,
            next_seq: self.next_seq,
        }
    }

    /// Drops what was appended (and gives back what was taken) since
    /// `mark`; `false` if rows from before it were flushed since (the
    /// transaction must roll back to undo them).
    pub(crate) fn rollback(&mut self, mark: Mark) -> bool {
        let held = self.events.len() >= mark.events
            && self.attempts.len() >= mark.attempts
            && self.runnable.len() >= mark.runnable;
        self.events.truncate(mark.events);
        self.attempts.truncate(mark.attempts);
        self.runnable.truncate(mark.runnable);
        self.taken = mark.taken;
        self.next_seq = mark.next_seq;
        held
    }

    /// Forgets everything, at the end of a transaction (committed or not).
    pub(crate) fn clear(&mut self) {
        let _ = self.rollback(Mark {
            events: 0,
            attempts: 0,
            runnable: 0,
            taken: 0,
            next_seq: None,
        });
    }

    /// Writes every row appended (run queue entries not taken), leaving
    /// nothing pending; the next event sequence number is kept.
    pub(crate) fn flush(&mut self, statements: &mut Statements<'_>) -> Result<()> {
        insert(
            statements,
            "INSERT INTO events (seq, at, item_seq, stage, subtask, kind)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            self.events.drain(..),
        )?;
        insert(
            statements,
            "INSERT INTO attempts
                (stage_id, subtask, attempt, started_at, finished_at, result, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            self.attempts.drain(..),
        )?;
        let queued = self.runnable.drain(..).skip(self.taken).map(|key| {
            [
                Param::Shared(key.item_id),
                Param::Shared(key.stage),
                key.subtask.map_or(Param::Value(Value::Null), Param::Shared),
            ]
        });
        insert(
            statements,
            "INSERT INTO run_queue (item_id, stage, subtask) VALUES (?1, ?2, ?3)",
            queued,
        )?;
        self.taken = 0;
        Ok(())
    }
}

/// Inserts `rows` with `sql` (`INSERT INTO t (columns) VALUES (?1, ...)`,
/// for one row), in order, in multi-row statements of [`CHUNKS`] rows
/// (held in `statements`).
fn insert<const N: usize>(
    statements: &mut Statements<'_>,
    sql: &'static str,
    rows: impl ExactSizeIterator<Item = [Param<'static>; N]>,
) -> Result<()> {
    let mut left = rows.len();
    let mut rows = rows;
    for chunk in CHUNKS {
        if left < chunk {
            continue;
        }
        let mut statement = statements.built(sql, chunk as u32, || values_sql(sql, N, chunk))?;
        while left >= chunk {
            for (i, value) in rows.by_ref().take(chunk).flatten().enumerate() {
                statement.raw_bind_parameter(i + 1, value)?;
            }
            statement.raw_execute()?;
            left -= chunk;
        }
    }
    Ok(())
}

/// `sql`, which inserts one row of `columns` parameters, extended to insert
/// `rows` rows.
fn values_sql(sql: &str, columns: usize, rows: usize) -> String {
    let mut extended = String::with_capacity(sql.len() + rows * columns * 6);
    extended.push_str(sql);
    for row in 1..rows {
        let params: Vec<String> = (1..=columns)
            .map(|column| format!("?{}", row * columns + column))
            .collect();
        extended.push_str(&format!(", ({})", params.join(", ")));
    }
    extended
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUEUE_INSERT: &str =
        "INSERT INTO run_queue (item_id, stage, subtask) VALUES (?1, ?2, ?3)";

    fn key(n: usize) -> TaskKey {
        TaskKey {
            item_id: format!("i{n}").into(),
            stage: "s".into(),
            subtask: None,
        }
    }

    #[test]
    fn values_are_numbered_row_by_row() {
        assert_eq!(
            values_sql(QUEUE_INSERT, 3, 2),
            format!("{QUEUE_INSERT}, (?4, ?5, ?6)")
        );
    }

    #[test]
    fn a_flush_writes_in_chunks_in_order_all_but_what_was_taken() {
        for count in [0, 1, 5, 21, 64, 150] {
            let conn = super::super::schema::open(None, super::super::schema::MIGRATIONS).unwrap();
            let mut statements = Statements::new(&conn);
            let mut appends = Appends::default();
            for n in 0..count {
                appends.runnable(key(n));
            }
            let taken = appends.take_runnable(2).len();
            appends.flush(&mut statements).unwrap();
            appends.flush(&mut statements).unwrap();
            let stored: Vec<String> = conn
                .prepare("SELECT item_id FROM run_queue ORDER BY seq LIMIT 1000")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let expected: Vec<String> = (taken..count)
                .map(|n| String::from(&*key(n).item_id))
                .collect();
            assert_eq!(stored, expected);
            assert!(appends.take_runnable(5).is_empty(), "nothing is left");
        }
    }

    #[test]
    fn a_rollback_drops_what_was_appended_and_gives_back_what_was_taken() {
        let mut appends = Appends::default();
        appends.runnable(key(0));
        appends.runnable(key(1));
        let mark = appends.mark();
        assert_eq!(appends.take_runnable(1), [key(0)]);
        appends.runnable(key(2));
        assert!(appends.rollback(mark));
        assert_eq!(appends.take_runnable(5), [key(0), key(1)]);
        assert!(appends.take_runnable(5).is_empty());
    }
}
