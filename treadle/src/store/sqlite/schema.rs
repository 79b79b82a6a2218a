//! The schema, its versioned migrations, and recognising our databases.
//!
//! A treadle database carries our `PRAGMA application_id` and its schema
//! version in `PRAGMA user_version`. Opening applies the pending migrations
//! in one transaction; a database of a newer version, or a file that is not
//! ours, is refused with a typed error before anything is written to it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use crate::error::{Error, Result};

/// Marks a SQLite file as a treadle database (`"TRDL"`).
pub(crate) const APPLICATION_ID: i32 = 0x5452_444C;

/// How long a connection waits for another process's write lock.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// One step of the schema: the SQL that brings version `version - 1` to `version`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    /// The version this migration produces.
    pub(crate) version: i64,
    /// The statements, run in the migration transaction.
    pub(crate) sql: &'static str,
}

/// Every migration, oldest first; the last one's version is the current schema.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: V1,
    },
    Migration {
        version: 2,
        sql: V2,
    },
    Migration {
        version: 3,
        sql: V3,
    },
    Migration {
        version: 4,
        sql: V4,
    },
    Migration {
        version: 5,
        sql: V5,
    },
    Migration {
        version: 6,
        sql: V6,
    },
    Migration {
        version: 7,
        sql: V7,
    },
    Migration {
        version: 8,
        sql: V8,
    },
];

/// Version 3: per stage and subtask, the attempts of the current run that
/// workers abandoned when they stopped mid-attempt (crash retries); per
/// stage, whether approved edits wait for a worker's check.
const V3: &str = r#"
ALTER TABLE stages ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE subtasks ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stages ADD COLUMN edits_to_check INTEGER NOT NULL DEFAULT 0
    CHECK (edits_to_check IN (0, 1));
"#;

/// Version 1: items, stages, subtasks, attempts, reviews, the run queue,
/// scheduled retries, the event log and the pipeline definition.
const V1: &str = r#"
CREATE TABLE items (
    seq          INTEGER PRIMARY KEY,           -- submission order
    id           TEXT NOT NULL UNIQUE,
    payload      TEXT NOT NULL,                 -- the item as JSON
    submitted_at TEXT NOT NULL,
    cancelled    INTEGER NOT NULL DEFAULT 0 CHECK (cancelled IN (0, 1))
) STRICT;

CREATE TABLE stages (
    item_id      TEXT NOT NULL REFERENCES items(id),
    stage        TEXT NOT NULL,
    item_seq     INTEGER NOT NULL,              -- items.seq, for ordered listings
    position     INTEGER NOT NULL,              -- topological order
    state        TEXT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    generation   INTEGER NOT NULL DEFAULT 0,    -- fencing token of the latest claim
    waiting      INTEGER NOT NULL,              -- upstream stages not yet done
    started_at   TEXT,
    finished_at  TEXT,
    next_run_at  TEXT,
    last_error   TEXT,
    output       TEXT,                          -- JSON
    lease_owner  TEXT,
    lease_expiry TEXT,                          -- NULL unless claimed by a worker
    review_round INTEGER NOT NULL DEFAULT 0,    -- 0: never asked for review
    review_request TEXT,                        -- JSON ReviewRequest of the round
    review_requested_at TEXT,
    review_deadline TEXT,                       -- the request's deadline, for lookup
    PRIMARY KEY (item_id, stage)
) STRICT, WITHOUT ROWID;

CREATE INDEX stages_by_state ON stages (stage, state, item_seq);
CREATE INDEX stages_awaiting_review ON stages (review_requested_at, item_id, stage)
    WHERE state = 'awaiting_review';
CREATE INDEX stages_review_deadline ON stages (review_deadline)
    WHERE state = 'awaiting_review' AND review_deadline IS NOT NULL;
CREATE INDEX stages_leased ON stages (lease_expiry)
    WHERE state = 'running' AND lease_expiry IS NOT NULL;

CREATE TABLE subtasks (
    item_id      TEXT NOT NULL,
    stage        TEXT NOT NULL,
    name         TEXT NOT NULL,
    position     INTEGER NOT NULL,
    state        TEXT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    generation   INTEGER NOT NULL DEFAULT 0,
    started_at   TEXT,
    finished_at  TEXT,
    next_run_at  TEXT,
    last_error   TEXT,
    output       TEXT,
    lease_owner  TEXT,
    lease_expiry TEXT,
    PRIMARY KEY (item_id, stage, name),
    FOREIGN KEY (item_id, stage) REFERENCES stages (item_id, stage)
) STRICT, WITHOUT ROWID;

CREATE INDEX subtasks_leased ON subtasks (lease_expiry)
    WHERE state = 'running' AND lease_expiry IS NOT NULL;

CREATE TABLE attempts (
    id           INTEGER PRIMARY KEY,           -- history order
    item_id      TEXT NOT NULL,
    stage        TEXT NOT NULL,
    subtask      TEXT,                          -- NULL for the stage itself
    attempt      INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT NOT NULL,
    result       TEXT NOT NULL,
    error        TEXT,
    FOREIGN KEY (item_id, stage) REFERENCES stages (item_id, stage)
) STRICT;

CREATE INDEX attempts_by_item ON attempts (item_id, id);

CREATE TABLE review_decisions (
    item_id      TEXT NOT NULL,
    stage        TEXT NOT NULL,
    round        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    decided_by   TEXT NOT NULL,
    decided_at   TEXT NOT NULL,
    note         TEXT,
    reason       TEXT,
    edits        TEXT,                          -- JSON
    PRIMARY KEY (item_id, stage, round),
    FOREIGN KEY (item_id, stage) REFERENCES stages (item_id, stage)
) STRICT, WITHOUT ROWID;

-- Units of work that may be claimable, in the order they became so.
-- Entries are hints: a claim re-checks the unit and drops stale ones.
CREATE TABLE run_queue (
    seq          INTEGER PRIMARY KEY,
    item_id      TEXT NOT NULL,
    stage        TEXT NOT NULL,
    subtask      TEXT
) STRICT;

-- Scheduled retries, moved to the run queue once due; ties are broken by
-- submission order, then stage and subtask position.
CREATE TABLE scheduled (
    id           INTEGER PRIMARY KEY,
    due          TEXT NOT NULL,
    item_id      TEXT NOT NULL,
    stage        TEXT NOT NULL,
    subtask      TEXT,
    item_seq     INTEGER NOT NULL,
    stage_position INTEGER NOT NULL,
    subtask_position INTEGER
) STRICT;

CREATE INDEX scheduled_by_due
    ON scheduled (due, item_seq, stage_position, subtask_position);

CREATE TABLE events (
    seq          INTEGER PRIMARY KEY,           -- gapless: max + 1 at insert
    at           TEXT NOT NULL,
    item_id      TEXT NOT NULL REFERENCES items(id),
    stage        TEXT,
    subtask      TEXT,
    kind         TEXT NOT NULL                  -- JSON EventKind
) STRICT;

CREATE INDEX events_by_item ON events (item_id, seq);

CREATE TABLE pipeline (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    definition   TEXT NOT NULL                  -- JSON PipelineDef
) STRICT;
"#;

/// Version 2: numbered pipeline versions (the single stored definition
/// becomes version 1), the version each item moves on, and fan-out
/// counters on stage rows so a subtask's end is decided without reading
/// every sibling.
const V2: &str = r#"
CREATE TABLE pipeline_versions (
    version       INTEGER PRIMARY KEY,
    definition    TEXT NOT NULL,                -- JSON PipelineDef
    registered_at TEXT NOT NULL
) STRICT;

INSERT INTO pipeline_versions (version, definition, registered_at)
    SELECT 1, definition, strftime('%Y-%m-%dT%H:%M:%S.000000000Z', 'now') FROM pipeline;
DROP TABLE pipeline;

ALTER TABLE items ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
CREATE INDEX items_unfinished_by_version ON items (version, seq) WHERE cancelled = 0;

ALTER TABLE stages ADD COLUMN fan_total INTEGER;   -- NULL: never fanned out
ALTER TABLE stages ADD COLUMN fan_open INTEGER;    -- subtasks not yet ended
ALTER TABLE stages ADD COLUMN fan_failed INTEGER;  -- subtasks that failed

UPDATE stages SET
    fan_total = (SELECT count(*) FROM subtasks t
                 WHERE t.item_id = stages.item_id AND t.stage = stages.stage),
    fan_open = (SELECT count(*) FROM subtasks t
                WHERE t.item_id = stages.item_id AND t.stage = stages.stage
                  AND t.state NOT IN ('completed', 'skipped', 'failed', 'cancelled')),
    fan_failed = (SELECT count(*) FROM subtasks t
                  WHERE t.item_id = stages.item_id AND t.stage = stages.stage
                    AND t.state = 'failed')
WHERE EXISTS (SELECT 1 FROM subtasks t
              WHERE t.item_id = stages.item_id AND t.stage = stages.stage);
"#;

/// Version 4, for retention: event sequence numbers are never reused (the
/// log becomes `AUTOINCREMENT`, so removing the newest events of a pruned
/// item cannot hand their numbers out again), the prune watermark, and an
/// index that finds old items by submission time. Freed pages are reused
/// through incremental vacuum, switched on by [`open`].
const V4: &str = r#"
CREATE TABLE events_v4 (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused
    at           TEXT NOT NULL,
    item_id      TEXT NOT NULL REFERENCES items(id),
    stage        TEXT,
    subtask      TEXT,
    kind         TEXT NOT NULL                  -- JSON EventKind
) STRICT;
INSERT INTO events_v4 (seq, at, item_id, stage, subtask, kind)
    SELECT seq, at, item_id, stage, subtask, kind FROM events;
DROP TABLE events;
ALTER TABLE events_v4 RENAME TO events;
CREATE INDEX events_by_item ON events (item_id, seq);

-- The highest seq of an event a prune removed: no gaps above it.
CREATE TABLE pruned_events (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    through      INTEGER NOT NULL
) STRICT;
INSERT INTO pruned_events (id, through) VALUES (1, 0);

CREATE INDEX items_by_submission ON items (submitted_at, seq);
"#;

/// Version 5: no index is rewritten on every state change. Every stage
/// passes through `pending`, `running` and `completed`, so an index over
/// its state changed with each claim and each end; the stage's items are
/// now listed by submission order (an index never rewritten), and only the
/// other states, which few transitions enter, keep an index by state.
/// `read::items_in` repeats this condition to use it. (Comparisons, not
/// `NOT IN (...)`: a list of three is a temporary table built each time
/// the condition is checked, on every write of a stage row.)
const V5: &str = r#"
DROP INDEX stages_by_state;
CREATE INDEX stages_by_stage ON stages (stage, item_seq);
CREATE INDEX stages_in_rare_states ON stages (stage, state, item_seq)
    WHERE state <> 'pending' AND state <> 'running' AND state <> 'completed';
"#;

/// Version 6: stage and subtask rows live in rowid tables, with their key
/// in a unique index. A transition rewrites its row (it grows as the
/// attempt records times, a lease, an output); in a `WITHOUT ROWID` table
/// that deleted and re-inserted the whole row in the key's B-tree, in a
/// rowid table it is written in place. A stage row has an integer `id`
/// (stable: an `INTEGER PRIMARY KEY` survives `VACUUM`), which the writer
/// keeps with a loaded item and updates the row by, instead of seeking
/// the text key. Rows are copied in submission order, so an item's rows
/// stay together.
///
/// The rows every transition appends refer to integers too: an attempt to
/// its stage row's `id`, an event to its item's `seq`. Their indexes and
/// foreign keys then compare integers, not text (the names are read
/// through a join). Foreign keys are off while the tables are
/// swapped and checked before the migration commits (see [`migrate`]).
const V6: &str = r#"
CREATE TABLE stages_v6 (
    id           INTEGER PRIMARY KEY,           -- what a transition updates by
    item_id      TEXT NOT NULL REFERENCES items(id),
    stage        TEXT NOT NULL,
    item_seq     INTEGER NOT NULL,              -- items.seq, for ordered listings
    position     INTEGER NOT NULL,              -- topological order
    state        TEXT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    generation   INTEGER NOT NULL DEFAULT 0,    -- fencing token of the latest claim
    waiting      INTEGER NOT NULL,              -- upstream stages not yet done
    started_at   TEXT,
    finished_at  TEXT,
    next_run_at  TEXT,
    last_error   TEXT,
    output       TEXT,                          -- JSON
    lease_owner  TEXT,
    lease_expiry TEXT,                          -- NULL unless claimed by a worker
    review_round INTEGER NOT NULL DEFAULT 0,    -- 0: never asked for review
    review_request TEXT,                        -- JSON ReviewRequest of the round
    review_requested_at TEXT,
    review_deadline TEXT,                       -- the request's deadline, for lookup
    fan_total    INTEGER,                       -- NULL: never fanned out
    fan_open     INTEGER,                       -- subtasks not yet ended
    fan_failed   INTEGER,                       -- subtasks that failed
    crashes      INTEGER NOT NULL DEFAULT 0,
    edits_to_check INTEGER NOT NULL DEFAULT 0 CHECK (edits_to_check IN (0, 1))
) STRICT;
INSERT INTO stages_v6
    SELECT NULL, item_id, stage, item_seq, position, state, attempt, generation, waiting,
           started_at, finished_at, next_run_at, last_error, output, lease_owner,
           lease_expiry, review_round, review_request, review_requested_at,
           review_deadline, fan_total, fan_open, fan_failed, crashes, edits_to_check
    FROM stages ORDER BY item_seq, position;
DROP TABLE stages;
ALTER TABLE stages_v6 RENAME TO stages;
CREATE UNIQUE INDEX stages_by_key ON stages (item_id, stage);
CREATE INDEX stages_by_stage ON stages (stage, item_seq);
CREATE INDEX stages_in_rare_states ON stages (stage, state, item_seq)
    WHERE state <> 'pending' AND state <> 'running' AND state <> 'completed';
CREATE INDEX stages_awaiting_review ON stages (review_requested_at, item_id, stage)
    WHERE state = 'awaiting_review';
CREATE INDEX stages_review_deadline ON stages (review_deadline)
    WHERE state = 'awaiting_review' AND review_deadline IS NOT NULL;
CREATE INDEX stages_leased ON stages (lease_expiry)
    WHERE state = 'running' AND lease_expiry IS NOT NULL;

CREATE TABLE subtasks_v6 (
    item_id      TEXT NOT NULL,
    stage        TEXT NOT NULL,
    name         TEXT NOT NULL,
    position     INTEGER NOT NULL,
    state        TEXT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 0,
    generation   INTEGER NOT NULL DEFAULT 0,
    started_at   TEXT,
    finished_at  TEXT,
    next_run_at  TEXT,
    last_error   TEXT,
    output       TEXT,
    lease_owner  TEXT,
    lease_expiry TEXT,
    crashes      INTEGER NOT NULL DEFAULT 0,
    FOREIGN KEY (item_id, stage) REFERENCES stages (item_id, stage)
) STRICT;
INSERT INTO subtasks_v6
    SELECT t.item_id, t.stage, t.name, t.position, t.state, t.attempt, t.generation,
           t.started_at, t.finished_at, t.next_run_at, t.last_error, t.output,
           t.lease_owner, t.lease_expiry, t.crashes
    FROM subtasks t LEFT JOIN stages s ON s.item_id = t.item_id AND s.stage = t.stage
    ORDER BY s.item_seq, s.position, t.position;
DROP TABLE subtasks;
ALTER TABLE subtasks_v6 RENAME TO subtasks;
CREATE UNIQUE INDEX subtasks_by_key ON subtasks (item_id, stage, name);
CREATE INDEX subtasks_leased ON subtasks (lease_expiry)
    WHERE state = 'running' AND lease_expiry IS NOT NULL;

CREATE TABLE attempts_v6 (
    id           INTEGER PRIMARY KEY,           -- history order
    stage_id     INTEGER NOT NULL REFERENCES stages(id),
    subtask      TEXT,                          -- NULL for the stage itself
    attempt      INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT NOT NULL,
    result       TEXT NOT NULL,
    error        TEXT
) STRICT;
-- LEFT JOIN: a row whose stage is missing fails the migration (NOT NULL).
INSERT INTO attempts_v6
    SELECT a.id, s.id, a.subtask, a.attempt, a.started_at, a.finished_at, a.result, a.error
    FROM attempts a LEFT JOIN stages s ON s.item_id = a.item_id AND s.stage = a.stage
    ORDER BY a.id;
DROP TABLE attempts;
ALTER TABLE attempts_v6 RENAME TO attempts;
CREATE INDEX attempts_by_stage ON attempts (stage_id, id);

CREATE TABLE events_v6 (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused
    at           TEXT NOT NULL,
    item_seq     INTEGER NOT NULL REFERENCES items(seq),
    stage        TEXT,
    subtask      TEXT,
    kind         TEXT NOT NULL                  -- JSON EventKind
) STRICT;
INSERT INTO events_v6 (seq, at, item_seq, stage, subtask, kind)
    SELECT e.seq, e.at, i.seq, e.stage, e.subtask, e.kind
    FROM events e LEFT JOIN items i ON i.id = e.item_id
    ORDER BY e.seq;
-- Every number the log handed out stays handed out, pruned ones included.
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'events_v6', coalesce(max(seq), 0) FROM sqlite_sequence
    WHERE name IN ('events', 'events_v6');
DELETE FROM sqlite_sequence WHERE name = 'events_v6'
    AND rowid <> (SELECT max(rowid) FROM sqlite_sequence WHERE name = 'events_v6');
DROP TABLE events;
ALTER TABLE events_v6 RENAME TO events;
CREATE INDEX events_by_item ON events (item_seq, seq);
"#;

/// Version 7: the indexes over the states few transitions enter are not
/// touched by the others. A partial index whose condition names `state`
/// is opened and its condition evaluated, for the row before and after,
/// on every write that changes `state`: each claim and each end of an
/// attempt, though no such row is in the index. Their condition is now
/// on `rare_state`, the state when it is one of those (not `pending`,
/// `running` or `completed`) and NULL otherwise, which the writer sets
/// with `state` (`rows::rare_state`), so a stage moving between the common
/// states leaves it, and them, alone. `read` selects the rows by it.
const V7: &str = r#"
ALTER TABLE stages ADD COLUMN rare_state TEXT;  -- state, unless pending, running or completed
UPDATE stages SET rare_state = state
    WHERE state <> 'pending' AND state <> 'running' AND state <> 'completed';
DROP INDEX stages_in_rare_states;
DROP INDEX stages_awaiting_review;
DROP INDEX stages_review_deadline;
CREATE INDEX stages_in_rare_states ON stages (stage, rare_state, item_seq)
    WHERE rare_state IS NOT NULL;
CREATE INDEX stages_awaiting_review ON stages (review_requested_at, item_id, stage)
    WHERE rare_state = 'awaiting_review';
CREATE INDEX stages_review_deadline ON stages (review_deadline)
    WHERE rare_state = 'awaiting_review' AND review_deadline IS NOT NULL;
"#;

/// Version 8: the event log's index by item keys an event by its item
/// alone. Every index of a rowid table ends with the row's rowid, which for
/// `events` is `seq`, so `(item_seq, seq)` stored `seq` twice: a fifth more
/// index pages for each group commit to write. The order, and the range
/// `seq > ?` within an item, are the same.
const V8: &str = r#"
DROP INDEX events_by_item;
CREATE INDEX events_by_item ON events (item_seq);
"#;

/// Sets up a freshly opened connection: waits for other writers instead of
/// failing, enforces foreign keys, and makes commits durable.
pub(crate) fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Room for every statement the store prepares, so none is re-parsed.
    conn.set_prepared_statement_cache_capacity(128);
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Each transition runs in a savepoint, whose sub-journal would otherwise
    // be a temporary file written on every page it touches.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 4 MiB of page cache (negative: KiB); other pages come from the
    // operating system's cache. A larger one made commits slower: a B-tree
    // split that reorders pages keys one for a moment by the pending-byte
    // page number, so the commit after it walks the whole page cache to drop
    // pages past the end of the database (with 64 MiB: 8% of the time at
    // 200,000 items; 1,000,000 items ran at 50k transitions/s, now 80k).
    conn.pragma_update(None, "cache_size", -4_096)?;
    // Checkpoints every 16k WAL pages: fewer, larger copies into the database.
    conn.pragma_update(None, "wal_autocheckpoint", 16_384)?;
    Ok(())
}

/// Opens the database at `path` (`None`: a private one in memory), checks
/// that it is a treadle database (or empty), brings its schema up to date
/// with `migrations` in one transaction, and switches it to WAL. Nothing is
/// written to a file that is not ours.
pub(crate) fn open(path: Option<&Path>, migrations: &[Migration]) -> Result<Connection> {
    let name = path.unwrap_or(Path::new(":memory:"));
    let context = format!("cannot open `{}`", name.display());
    if let Some(dir) = path
        .and_then(Path::parent)
        .filter(|dir| !dir.as_os_str().is_empty() && !dir.is_dir())
    {
        let missing = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("the directory `{}` does not exist", dir.display()),
        );
        return Err(Error::sqlite(context, Arc::new(missing)));
    }
    let opened = (|| {
        let mut conn = match path {
            Some(path) => Connection::open(path)?,
            None => Connection::open_in_memory()?,
        };
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            let denied = std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the file is readonly: the store needs to write to it",
            );
            return Err(Error::sqlite("cannot open for writing", Arc::new(denied)));
        }
        configure(&conn)?;
        // Takes effect only on a database without tables yet; an older one
        // is converted by `incremental_vacuum` below.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        migrate(&mut conn, migrations, name)?;
        incremental_vacuum(&conn)?;
        // Not inside the transaction: the journal mode cannot change there.
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        tracing::debug!(path = %name.display(), journal_mode = %mode, "opened treadle database");
        Ok(conn)
    })();
    opened.map_err(|error| match error {
        Error::Store { cause, .. } => {
            let code = cause
                .downcast_ref::<rusqlite::Error>()
                .and_then(rusqlite::Error::sqlite_error_code);
            if code == Some(ErrorCode::NotADatabase) {
                not_ours(name)
            } else {
                Error::sqlite(context, cause)
            }
        }
        other => other,
    })
}

/// `PRAGMA auto_vacuum` for incremental vacuum.
const AUTO_VACUUM_INCREMENTAL: i64 = 2;

/// Makes sure the database gives pages freed by a prune back through
/// `PRAGMA incremental_vacuum`: a database created before schema version 4
/// is rewritten once with `VACUUM` (not in a transaction, which it cannot
/// run in; until it is done, the next open tries again).
fn incremental_vacuum(conn: &Connection) -> Result<()> {
    let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |row| row.get(0))?;
    if mode != AUTO_VACUUM_INCREMENTAL {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.execute_batch("VACUUM")?;
        tracing::info!("switched the treadle database to incremental vacuum");
    }
    Ok(())
}

fn not_ours(name: &Path) -> Error {
    Error::NotATreadleDatabase {
        location: name.display().to_string(),
    }
}

fn version_lost(name: &Path) -> Error {
    Error::SchemaVersionLost {
        location: name.display().to_string(),
    }
}

/// Opens the existing database at `path` for reading only: nothing is
/// written to the file and no lock is taken, so a reader never waits for a
/// writer. The file must be a treadle database of exactly this build's
/// schema version (only a writable open migrates).
pub(crate) fn open_read_only(path: &Path, migrations: &[Migration]) -> Result<Connection> {
    let supported = migrations.last().map_or(0, |m| m.version);
    let checked = (|| {
        let conn = Connection::open_with_flags(path, read_only_flags())?;
        configure(&conn)?;
        let application_id: i32 =
            conn.pragma_query_value(None, "application_id", |row| row.get(0))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if application_id != APPLICATION_ID {
            return Err(not_ours(path));
        }
        match version {
            0 => Err(version_lost(path)),
            v if v > supported => Err(Error::SchemaTooNew {
                found: v,
                supported,
            }),
            v if v < supported => Err(Error::SchemaTooOld {
                found: v,
                supported,
            }),
            _ => Ok(conn),
        }
    })();
    checked.map_err(|error| match error {
        Error::Store { cause, .. } => {
            let code = cause
                .downcast_ref::<rusqlite::Error>()
                .and_then(rusqlite::Error::sqlite_error_code);
            if code == Some(ErrorCode::NotADatabase) {
                not_ours(path)
            } else {
                Error::sqlite(format!("cannot open `{}` to read", path.display()), cause)
            }
        }
        other => other,
    })
}

/// How read-only connections open a database file: never creating it.
pub(crate) fn read_only_flags() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
}

/// Applies the pending `migrations` in one transaction. Foreign keys are
/// off meanwhile, so a migration can swap a parent table for a rebuilt one
/// (SQLite's procedure for changing a table: the switch is a no-op inside
/// a transaction), and every foreign key is checked before the commit: a
/// violation fails the open and rolls every migration back.
fn migrate(conn: &mut Connection, migrations: &[Migration], name: &Path) -> Result<()> {
    conn.pragma_update(None, "foreign_keys", false)?;
    let migrated = migrate_unchecked(conn, migrations, name);
    // On again whatever happened: the connection's writes are checked.
    conn.pragma_update(None, "foreign_keys", true)?;
    migrated
}

/// [`migrate`] but for switching foreign keys off and on.
fn migrate_unchecked(conn: &mut Connection, migrations: &[Migration], name: &Path) -> Result<()> {
    let supported = migrations.last().map_or(0, |m| m.version);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let application_id: i32 = tx.pragma_query_value(None, "application_id", |row| row.get(0))?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let objects: i64 = tx.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))?;
    if application_id != APPLICATION_ID {
        if application_id != 0 || version != 0 || objects != 0 {
            return Err(not_ours(name));
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    } else if version == 0 && objects != 0 {
        return Err(version_lost(name));
    }
    if version > supported {
        return Err(Error::SchemaTooNew {
            found: version,
            supported,
        });
    }
    for migration in migrations.iter().filter(|m| m.version > version) {
        tx.execute_batch(migration.sql)?;
        tx.pragma_update(None, "user_version", migration.version)?;
        tracing::info!(
            version = migration.version,
            "applied treadle schema migration"
        );
    }
    if let Some(violation) = foreign_key_violation(&tx)? {
        return Err(violation);
    }
    tx.commit()?;
    Ok(())
}

/// The first row that breaks a foreign key, as the corruption it is.
fn foreign_key_violation(conn: &Connection) -> Result<Option<Error>> {
    let mut statement = conn.prepare("PRAGMA foreign_key_check")?;
    let mut rows = statement.query([])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let (table, rowid, parent): (String, Option<i64>, String) =
        (row.get(0)?, row.get(1)?, row.get(2)?);
    let key = rowid.map_or_else(|| "a row".to_owned(), |rowid| format!("rowid={rowid}"));
    Ok(Some(Error::Corrupt {
        location: format!("{table}({key})"),
        detail: format!("refers to a missing row of `{parent}`"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_FIXTURE: Migration = Migration {
        version: 1,
        sql: "CREATE TABLE things (id INTEGER PRIMARY KEY);",
    };
    const V2_FIXTURE: Migration = Migration {
        version: 2,
        sql: "ALTER TABLE things ADD COLUMN label TEXT NOT NULL DEFAULT 'none';",
    };
    const BROKEN_V2: Migration = Migration {
        version: 2,
        sql: "ALTER TABLE things ADD COLUMN a TEXT; ALTER TABLE nowhere ADD COLUMN b TEXT;",
    };

    /// The first column of every row of `sql`, as text.
    fn first_column(conn: &Connection, sql: &str) -> Vec<String> {
        conn.prepare(sql)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn version(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn an_older_database_is_migrated_step_by_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let conn = open(Some(&path), &[V1_FIXTURE]).unwrap();
        conn.execute("INSERT INTO things (id) VALUES (7)", [])
            .unwrap();
        assert_eq!(version(&conn), 1);
        drop(conn);

        let conn = open(Some(&path), &[V1_FIXTURE, V2_FIXTURE]).unwrap();
        assert_eq!(version(&conn), 2);
        let label: String = conn
            .query_row("SELECT label FROM things WHERE id = 7", [], |r| r.get(0))
            .unwrap();
        assert_eq!(label, "none", "v2 ran on the v1 data; v1 did not run twice");
    }

    #[test]
    fn a_failing_migration_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        drop(open(Some(&path), &[V1_FIXTURE]).unwrap());
        assert!(open(Some(&path), &[V1_FIXTURE, BROKEN_V2]).is_err());
        let conn = Connection::open(&path).unwrap();
        assert_eq!(version(&conn), 1);
        let columns: i64 = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('things')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            columns, 1,
            "the first half of the broken migration was rolled back"
        );
    }

    #[test]
    fn a_newer_database_is_refused_with_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        drop(open(Some(&path), &[V1_FIXTURE, V2_FIXTURE]).unwrap());
        match open(Some(&path), &[V1_FIXTURE]) {
            Err(Error::SchemaTooNew { found, supported }) => assert_eq!((found, supported), (2, 1)),
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    #[test]
    fn version_4_keeps_the_log_never_reuses_a_seq_and_switches_to_incremental_vacuum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.db");
        // A version 3 database as an older build left it: no auto_vacuum.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; {V1} {V2} {V3} PRAGMA user_version = 3;
             INSERT INTO items (id, payload, submitted_at) VALUES ('i', '{{}}', 't');
             INSERT INTO events (seq, at, item_id, kind) VALUES
                 (1, 't', 'i', '{{}}'), (2, 't', 'i', '{{}}'), (7, 't', 'i', '{{}}');"
        ))
        .unwrap();
        let mode = |conn: &Connection| -> i64 {
            conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(mode(&conn), 0);
        drop(conn);

        let conn = open(Some(&path), &MIGRATIONS[..4]).unwrap();
        assert_eq!(version(&conn), 4);
        assert_eq!(mode(&conn), AUTO_VACUUM_INCREMENTAL);
        let seqs = |conn: &Connection| -> Vec<i64> {
            let mut statement = conn.prepare("SELECT seq FROM events ORDER BY seq").unwrap();
            statement
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        assert_eq!(seqs(&conn), [1, 2, 7], "the log came through unchanged");
        conn.execute_batch(
            "DELETE FROM events WHERE seq = 7;
             INSERT INTO events (at, item_id, kind) VALUES ('t', 'i', '{}');",
        )
        .unwrap();
        assert_eq!(
            seqs(&conn),
            [1, 2, 8],
            "7 was handed out once and never again"
        );
        let through: i64 = conn
            .query_row("SELECT through FROM pruned_events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(through, 0);
    }

    #[test]
    fn version_5_lists_the_items_of_every_state_of_an_older_database() {
        use crate::state::StageState;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v4.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; {V1} {V2} {V3} {V4} PRAGMA user_version = 4;
             INSERT INTO items (seq, id, payload, submitted_at) VALUES
                 (1, 'b', '{{}}', 't'), (2, 'a', '{{}}', 't'), (3, 'c', '{{}}', 't');
             INSERT INTO stages (item_id, stage, item_seq, position, state, waiting) VALUES
                 ('b', 's', 1, 0, 'awaiting_review', 0), ('a', 's', 2, 0, 'running', 0),
                 ('c', 's', 3, 0, 'awaiting_review', 0), ('c', 't', 3, 1, 'pending', 1);"
        ))
        .unwrap();
        drop(conn);

        let conn = open(Some(&path), &MIGRATIONS[..5]).unwrap();
        assert_eq!(version(&conn), 5);
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'stages' AND name LIKE 'stages_by%' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(indexes, ["stages_by_stage"], "stages_by_state is gone");
        drop(conn);
        // Read as this build reads, once migrated on.
        let conn = open(Some(&path), MIGRATIONS).unwrap();
        let items_in = |stage, state| super::super::read::items_in(&conn, stage, state).unwrap();
        assert_eq!(items_in("s", StageState::AwaitingReview), ["b", "c"]);
        assert_eq!(items_in("s", StageState::Running), ["a"]);
        assert_eq!(items_in("t", StageState::Pending), ["c"]);
        assert!(items_in("s", StageState::Completed).is_empty());
    }

    /// A version 5 database holding items in every kind of row: stages
    /// (finished, leased and fanned out, waiting, under review), subtasks,
    /// attempts, a decision and events.
    fn v5_database(path: &Path) -> Connection {
        let conn = open(Some(path), &MIGRATIONS[..5]).unwrap();
        const T: &str = "2026-01-02T03:04:05.000000001Z";
        conn.execute_batch(&format!(
            "INSERT INTO items (seq, id, payload, submitted_at) VALUES
                 (1, 'b', '{{\"n\":1}}', '{T}'), (2, 'a', '{{\"n\":2}}', '{T}');
             INSERT INTO stages (item_id, stage, item_seq, position, state, attempt, generation,
                                 waiting, started_at, finished_at, output, lease_owner,
                                 lease_expiry, fan_total, fan_open, fan_failed, crashes)
             VALUES
                 ('a', 'scan', 2, 0, 'completed', 1, 1, 0, '{T}', '{T}', '{{\"pages\":3}}',
                  NULL, NULL, NULL, NULL, NULL, 0),
                 ('a', 'enrich', 2, 1, 'running', 2, 3, 0, '{T}', NULL, NULL, 'w1', '{T}',
                  2, 1, 0, 1),
                 ('a', 'review', 2, 2, 'pending', 0, 0, 1, NULL, NULL, NULL, NULL, NULL,
                  NULL, NULL, NULL, 0);
             INSERT INTO stages (item_id, stage, item_seq, position, state, attempt, generation,
                                 waiting, started_at, review_round, review_request,
                                 review_requested_at, review_deadline, edits_to_check)
             VALUES ('b', 'scan', 1, 0, 'awaiting_review', 2, 2, 0, '{T}', 2,
                     '{{\"summary\":\"check\",\"details\":null,\"proposed_output\":null}}',
                     '{T}', NULL, 1);
             INSERT INTO subtasks (item_id, stage, name, position, state, attempt, generation,
                                   started_at, finished_at, output, lease_owner, lease_expiry)
             VALUES
                 ('a', 'enrich', 'y', 1, 'running', 1, 4, '{T}', NULL, NULL, 'w2', '{T}'),
                 ('a', 'enrich', 'x', 0, 'completed', 1, 2, '{T}', '{T}', '1', NULL, NULL);
             INSERT INTO attempts (item_id, stage, subtask, attempt, started_at, finished_at,
                                   result, error)
             VALUES
                 ('a', 'scan', NULL, 1, '{T}', '{T}', 'completed', NULL),
                 ('a', 'enrich', 'x', 1, '{T}', '{T}', 'completed', NULL),
                 ('a', 'enrich', NULL, 1, '{T}', '{T}', 'abandoned', 'the lease expired'),
                 ('b', 'scan', NULL, 1, '{T}', '{T}', 'needs_review', NULL);
             INSERT INTO review_decisions (item_id, stage, round, kind, decided_by, decided_at,
                                           note, reason, edits)
             VALUES ('b', 'scan', 2, 'rejected', 'alice', '{T}', 'no', 'wrong tags', NULL);
             INSERT INTO events (at, item_id, stage, subtask, kind) VALUES
                 ('{T}', 'b', NULL, NULL, '{{\"type\":\"item_submitted\"}}'),
                 ('{T}', 'a', 'enrich', 'x', '{{\"type\":\"started\",\"attempt\":1,\"owner\":\"w\"}}'),
                 ('{T}', 'a', NULL, NULL, '{{\"type\":\"item_submitted\"}}');
             -- A pruned event: its number is never handed out again.
             DELETE FROM events WHERE seq = 3;"
        ))
        .unwrap();
        conn
    }

    #[test]
    fn version_6_keeps_every_row_of_an_older_database_in_rowid_tables() {
        use super::super::read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v5.db");
        /// Every column of every row of `table` but the new `id`, by key.
        fn rows(conn: &Connection, table: &str) -> Vec<Vec<rusqlite::types::Value>> {
            let columns: Vec<String> = conn
                .prepare(&format!(
                    "SELECT name FROM pragma_table_info('{table}') ORDER BY name"
                ))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let columns: Vec<&str> = columns
                .iter()
                .map(|c| c.as_str())
                .filter(|c| *c != "id")
                .collect();
            let sql = format!("SELECT {0} FROM {table} ORDER BY {0}", columns.join(", "));
            let mut statement = conn.prepare(&sql).unwrap();
            statement
                .query_map([], |r| (0..columns.len()).map(|i| r.get(i)).collect())
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        }
        /// Every row of `sql`, as the text of its values.
        fn texts(conn: &Connection, sql: &str) -> Vec<String> {
            let mut statement = conn.prepare(sql).unwrap();
            let columns = statement.column_count();
            statement
                .query_map([], |r| {
                    let row: Vec<rusqlite::types::Value> = (0..columns)
                        .map(|i| r.get(i))
                        .collect::<rusqlite::Result<_>>()?;
                    Ok(format!("{row:?}"))
                })
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        }
        const ATTEMPTS_V5: &str = "SELECT id, item_id, stage, subtask, attempt, started_at,
            finished_at, result, error FROM attempts ORDER BY id";
        const ATTEMPTS_V6: &str = "SELECT a.id, s.item_id, s.stage, a.subtask, a.attempt,
            a.started_at, a.finished_at, a.result, a.error
            FROM attempts a JOIN stages s ON s.id = a.stage_id ORDER BY a.id";
        let conn = v5_database(&path);
        let before = ["stages", "subtasks"].map(|table| rows(&conn, table));
        let attempts = texts(&conn, ATTEMPTS_V5);
        let events = texts(
            &conn,
            "SELECT seq, item_id, stage, subtask FROM events ORDER BY seq",
        );
        drop(conn);

        let conn = open(Some(&path), &MIGRATIONS[..6]).unwrap();
        assert_eq!(version(&conn), 6);
        assert_eq!(
            ["stages", "subtasks"].map(|table| rows(&conn, table)),
            before
        );
        assert_eq!(before[0].len(), 4);
        assert_eq!(texts(&conn, ATTEMPTS_V6), attempts);
        assert_eq!(attempts.len(), 4);
        let all = crate::store::EventQuery {
            after: 0,
            item_id: None,
            limit: None,
        };
        use rusqlite::types::Value;
        let logged: Vec<String> = read::events(&conn, &all)
            .unwrap()
            .into_iter()
            .map(|e| {
                let text = |v: Option<String>| v.map_or(Value::Null, Value::Text);
                let seq = Value::Integer(e.seq.try_into().unwrap());
                let row = vec![seq, Value::Text(e.item_id), text(e.stage), text(e.subtask)];
                format!("{row:?}")
            })
            .collect();
        assert_eq!(logged, events);
        assert_eq!(logged.len(), 2);
        conn.execute(
            "INSERT INTO events (at, item_seq, kind) VALUES ('t', 1, '{}')",
            [],
        )
        .unwrap();
        assert_eq!(
            conn.last_insert_rowid(),
            4,
            "3 was handed out before the migration"
        );
        let a = read::status(&conn, "a").unwrap();
        assert_eq!(a.stages[1].subtasks.len(), 2);
        assert_eq!(a.stages[0].output, Some(serde_json::json!({"pages": 3})));
        let b = read::status(&conn, "b").unwrap();
        let review = b.stages[0].review.as_ref().unwrap();
        assert_eq!(review.decision.as_ref().unwrap().by, "alice");
        assert_eq!(
            first_column(
                &conn,
                "SELECT item_id || '/' || stage FROM stages ORDER BY id"
            ),
            ["b/scan", "a/scan", "a/enrich", "a/review"],
            "rowid tables, rows in submission order"
        );
        assert_eq!(
            first_column(&conn, "SELECT name FROM subtasks ORDER BY rowid"),
            ["x", "y"]
        );
        let current = open(Some(&path), MIGRATIONS).unwrap();
        assert_eq!(
            read::items_in(&current, "scan", crate::state::StageState::AwaitingReview).unwrap(),
            ["b"]
        );
        drop(current);
        let keys_enforced = |sql: &str| conn.execute(sql, []).is_err();
        assert!(keys_enforced(
            "INSERT INTO stages (item_id, stage, item_seq, position, state, waiting)
             VALUES ('a', 'scan', 2, 0, 'pending', 0)"
        ));
        assert!(keys_enforced(
            "INSERT INTO subtasks (item_id, stage, name, position, state)
             VALUES ('a', 'nowhere', 'z', 0, 'pending')"
        ));
        assert!(keys_enforced(
            "INSERT INTO attempts (item_id, stage, attempt, started_at, finished_at, result)
             VALUES ('a', 'nowhere', 1, 't', 't', 'completed')"
        ));
        assert!(keys_enforced("DELETE FROM stages WHERE item_id = 'a'"));
    }

    #[test]
    fn version_7_lists_the_rare_states_and_reviews_of_an_older_database_by_rare_state() {
        use super::super::read;
        use crate::state::StageState;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v6.db");
        drop(v5_database(&path));
        let conn = open(Some(&path), &MIGRATIONS[..6]).unwrap();
        assert_eq!(version(&conn), 6);
        // Besides `b`'s review: a later one with a deadline, and a failure.
        const LATER: &str = "2026-01-02T03:04:06.000000000Z";
        const DEADLINE: &str = "2026-01-03T00:00:00.000000000Z";
        conn.execute_batch(&format!(
            "INSERT INTO items (seq, id, payload, submitted_at) VALUES (3, 'c', '{{}}', '{LATER}');
             INSERT INTO stages (item_id, stage, item_seq, position, state, waiting, attempt,
                                 generation, review_round, review_request,
                                 review_requested_at, review_deadline)
             VALUES ('c', 'scan', 3, 0, 'awaiting_review', 0, 1, 1, 1,
                     '{{\"summary\":\"look\",\"details\":null,\"proposed_output\":null}}',
                     '{LATER}', '{DEADLINE}');
             INSERT INTO stages (item_id, stage, item_seq, position, state, waiting, attempt,
                                 generation, last_error)
             VALUES ('c', 'enrich', 3, 1, 'failed', 0, 1, 1, 'boom');"
        ))
        .unwrap();
        const EVERY_ROW: &str = "SELECT item_id || '/' || stage || ' ' || state || ' ' ||
            attempt || ' ' || coalesce(review_deadline, '-') || ' ' || coalesce(lease_owner, '-')
            FROM stages ORDER BY id";
        let before = first_column(&conn, EVERY_ROW);
        drop(conn);

        let conn = open(Some(&path), &MIGRATIONS[..7]).unwrap();
        assert_eq!(version(&conn), 7);
        assert_eq!(first_column(&conn, EVERY_ROW), before, "the rows are kept");
        assert_eq!(
            first_column(
                &conn,
                "SELECT item_id || '/' || stage || ' ' || rare_state FROM stages
                 WHERE rare_state IS NOT NULL ORDER BY id"
            ),
            [
                "b/scan awaiting_review",
                "c/scan awaiting_review",
                "c/enrich failed"
            ]
        );
        let items_in = |stage, state| read::items_in(&conn, stage, state).unwrap();
        assert_eq!(items_in("scan", StageState::AwaitingReview), ["b", "c"]);
        assert_eq!(items_in("enrich", StageState::Failed), ["c"]);
        assert_eq!(items_in("enrich", StageState::Running), ["a"]);
        assert_eq!(items_in("review", StageState::Pending), ["a"]);
        assert!(items_in("scan", StageState::Failed).is_empty());
        let reviews = |found: Vec<crate::status::AwaitingReview>| -> Vec<String> {
            found.into_iter().map(|r| r.item_id).collect()
        };
        assert_eq!(reviews(read::awaiting_review(&conn).unwrap()), ["b", "c"]);
        let deadline = read::next_review_deadline(&conn).unwrap().unwrap();
        assert_eq!(super::super::codec::time(deadline), DEADLINE);
        let just_before = deadline - chrono::TimeDelta::nanoseconds(1);
        assert!(read::due_reviews(&conn, just_before).unwrap().is_empty());
        assert_eq!(reviews(read::due_reviews(&conn, deadline).unwrap()), ["c"]);
        let indexes = first_column(
            &conn,
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'stages'
               AND sql LIKE '%WHERE rare_state%' ORDER BY name",
        );
        assert_eq!(
            indexes,
            [
                "stages_awaiting_review",
                "stages_in_rare_states",
                "stages_review_deadline"
            ]
        );
    }

    #[test]
    fn version_8_finds_an_items_events_by_an_index_on_the_item_alone() {
        use super::super::read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v7.db");
        drop(v5_database(&path));
        let conn = open(Some(&path), &MIGRATIONS[..7]).unwrap();
        conn.execute_batch(
            "INSERT INTO events (at, item_seq, kind) VALUES
                 ('2026-01-02T03:04:06.000000000Z', 1, '{\"type\":\"item_completed\"}'),
                 ('2026-01-02T03:04:06.000000000Z', 2, '{\"type\":\"item_completed\"}'),
                 ('2026-01-02T03:04:07.000000000Z', 1, '{\"type\":\"item_cancelled\"}');",
        )
        .unwrap();
        let of_item = |conn: &Connection, item: &str, after: u64| -> Vec<u64> {
            let query = crate::store::EventQuery {
                after,
                item_id: Some(item.to_owned()),
                limit: None,
            };
            let events = read::events(conn, &query).unwrap();
            events.into_iter().map(|e| e.seq).collect()
        };
        let before = [of_item(&conn, "a", 0), of_item(&conn, "a", 4)];
        drop(conn);

        let conn = open(Some(&path), MIGRATIONS).unwrap();
        assert_eq!(version(&conn), 8);
        assert_eq!([of_item(&conn, "a", 0), of_item(&conn, "a", 4)], before);
        assert_eq!(before[1].len(), 1, "{before:?}");
        assert_eq!(
            first_column(
                &conn,
                "SELECT sql FROM sqlite_schema WHERE name = 'events_by_item'"
            ),
            ["CREATE INDEX events_by_item ON events (item_seq)"]
        );
        // The item's events come in `seq` order from the index itself.
        let plan: Vec<String> = conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT e.seq FROM items i JOIN events e ON e.item_seq = i.seq
                 WHERE i.id = 'a' AND e.seq > 4 ORDER BY e.seq",
            )
            .unwrap()
            .query_map([], |r| r.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter().any(|l| l.contains("events_by_item")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|l| l.contains("TEMP B-TREE")), "{plan:?}");
    }

    #[test]
    fn a_migration_that_would_keep_a_broken_foreign_key_changes_nothing() {
        let orphans = [
            "INSERT INTO subtasks (item_id, stage, name, position, state)
             VALUES ('a', 'nowhere', 'z', 0, 'pending')",
            "INSERT INTO attempts (item_id, stage, attempt, started_at, finished_at, result)
             VALUES ('a', 'nowhere', 1, 't', 't', 'completed')",
            "INSERT INTO events (at, item_id, kind) VALUES ('t', 'nobody', '{}')",
        ];
        for (n, orphan) in orphans.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("v5.db");
            let conn = v5_database(&path);
            conn.pragma_update(None, "foreign_keys", false).unwrap();
            conn.execute(orphan, []).unwrap();
            drop(conn);
            match open(Some(&path), MIGRATIONS) {
                // Copied, then found by the check before the commit.
                Err(Error::Corrupt { location, detail }) if n == 0 => {
                    assert!(location.starts_with("subtasks(rowid="), "{location}");
                    assert!(detail.contains("`stages`"), "{detail}");
                }
                // No stage or item to refer to: the copy itself fails.
                Err(Error::Store { cause, .. }) if n > 0 => {
                    assert!(cause.to_string().contains("NOT NULL"), "{cause}")
                }
                other => panic!("{orphan}: unexpected {other:?}"),
            }
            assert_eq!(version(&Connection::open(&path).unwrap()), 5);
        }
    }

    #[test]
    fn a_reset_schema_version_is_a_typed_error_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reset.db");
        drop(open(Some(&path), MIGRATIONS).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 0)
            .unwrap();
        match open(Some(&path), MIGRATIONS) {
            Err(Error::SchemaVersionLost { location }) => {
                assert_eq!(location, path.display().to_string())
            }
            other => panic!("expected SchemaVersionLost, got {other:?}"),
        }
        assert!(matches!(
            open_read_only(&path, MIGRATIONS),
            Err(Error::SchemaVersionLost { .. })
        ));
        assert_eq!(version(&Connection::open(&path).unwrap()), 0);
    }

    #[test]
    fn a_read_only_open_checks_the_version_and_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.db");
        assert!(
            open_read_only(&path, MIGRATIONS).is_err(),
            "a missing file is not created"
        );
        assert!(!path.exists());
        drop(open(Some(&path), &[V1_FIXTURE]).unwrap());
        match open_read_only(&path, &[V1_FIXTURE, V2_FIXTURE]) {
            Err(Error::SchemaTooOld { found, supported }) => assert_eq!((found, supported), (1, 2)),
            other => panic!("expected SchemaTooOld, got {other:?}"),
        }
        let conn = open_read_only(&path, &[V1_FIXTURE]).unwrap();
        assert!(
            conn.execute("INSERT INTO things (id) VALUES (1)", [])
                .is_err()
        );
    }

    #[test]
    fn the_real_schema_is_current_and_valid() {
        let conn = open(None, MIGRATIONS).unwrap();
        assert_eq!(version(&conn), MIGRATIONS.last().unwrap().version);
        assert_eq!(version(&conn), crate::store::SqliteStore::SCHEMA_VERSION);
        let id: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap();
        assert_eq!(id, APPLICATION_ID);
    }
}
