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
    // 64 MiB of page cache (negative: KiB) keeps the hot indexes in memory.
    conn.pragma_update(None, "cache_size", -65_536)?;
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

fn migrate(conn: &mut Connection, migrations: &[Migration], name: &Path) -> Result<()> {
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
    tx.commit()?;
    Ok(())
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

        let conn = open(Some(&path), MIGRATIONS).unwrap();
        assert_eq!(version(&conn), 5);
        let items_in = |stage, state| super::super::read::items_in(&conn, stage, state).unwrap();
        assert_eq!(items_in("s", StageState::AwaitingReview), ["b", "c"]);
        assert_eq!(items_in("s", StageState::Running), ["a"]);
        assert_eq!(items_in("t", StageState::Pending), ["c"]);
        assert!(items_in("s", StageState::Completed).is_empty());
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'stages' AND name LIKE 'stages_by%' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(indexes, ["stages_by_stage"], "stages_by_state is gone");
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
