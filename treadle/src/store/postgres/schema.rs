//! The schema, its versioned migrations, and recognising our schemas.
//!
//! A treadle schema carries a `treadle_meta` table naming the application
//! and the schema version. Opening takes an advisory lock for the schema
//! (so processes starting together migrate once), creates the schema if
//! it is missing and applies the pending migrations in one transaction; a
//! schema of a newer version, or one holding tables that are not ours, is
//! refused with a typed error before anything is written to it.

use deadpool_postgres::Client;

use crate::error::{Error, Result};

/// The version of the newest migration.
pub(super) const SCHEMA_VERSION: i64 = 3;

/// Marks a schema as treadle's in `treadle_meta`.
const APPLICATION: &str = "treadle";

/// Every migration, oldest first: migration `n` brings version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[V1, V2, V3];

/// Version 1: items, stage and subtask rows, attempts, review decisions, the
/// run queue, scheduled retries, the event log with its counter, and the
/// pipeline versions. Hot tables leave room for HOT updates (`fillfactor`)
/// and are vacuumed early.
const V1: &str = r#"
CREATE TABLE treadle_meta (
    key          text PRIMARY KEY,
    value        text NOT NULL
);

CREATE TABLE pipeline_versions (
    version      bigint PRIMARY KEY,
    definition   text NOT NULL                  -- JSON PipelineDef
);

CREATE TABLE items (
    id           text PRIMARY KEY,
    seq          bigint GENERATED ALWAYS AS IDENTITY UNIQUE,  -- submission order
    version      bigint NOT NULL,
    payload      text NOT NULL,                 -- the item as JSON, byte-exact
    submitted_at timestamptz NOT NULL,
    cancelled    boolean NOT NULL DEFAULT false
) WITH (fillfactor = 90);

CREATE TABLE stages (
    item_id      text NOT NULL,
    name         text NOT NULL,
    item_seq     bigint NOT NULL,
    position     bigint NOT NULL,
    state        text NOT NULL,
    attempt      bigint NOT NULL,
    crashes      bigint NOT NULL,               -- attempts abandoned by a stopped worker
    generation   bigint NOT NULL,
    waiting      bigint NOT NULL,
    started_at   timestamptz,
    finished_at  timestamptz,
    next_run_at  timestamptz,
    last_error   text,
    output       text,                          -- JSON
    lease_owner  text,
    lease_expiry timestamptz,
    review       text,                          -- JSON ReviewStatus of the latest round
    review_requested_at timestamptz,
    review_deadline timestamptz,
    fan_total    bigint,                        -- NULL until the stage fans out
    fan_open     bigint,
    fan_failed   bigint,
    edits_to_check boolean NOT NULL DEFAULT false,  -- CLI edits a worker must check
    PRIMARY KEY (item_id, name)
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02,
        autovacuum_analyze_scale_factor = 0.02);

CREATE INDEX stages_by_state ON stages (name, state, item_seq);
CREATE INDEX stages_awaiting_review ON stages (review_requested_at)
    WHERE state = 'awaiting_review';
CREATE INDEX stages_leased ON stages (lease_expiry)
    WHERE state = 'running' AND lease_expiry IS NOT NULL;

CREATE TABLE subtasks (
    item_id      text NOT NULL,
    stage        text NOT NULL,
    position     bigint NOT NULL,
    name         text NOT NULL,
    state        text NOT NULL,
    attempt      bigint NOT NULL,
    crashes      bigint NOT NULL,
    generation   bigint NOT NULL,
    started_at   timestamptz,
    finished_at  timestamptz,
    next_run_at  timestamptz,
    last_error   text,
    output       text,
    lease_owner  text,
    lease_expiry timestamptz,
    PRIMARY KEY (item_id, stage, position)
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02);

CREATE INDEX subtasks_leased ON subtasks (lease_expiry)
    WHERE state = 'running' AND lease_expiry IS NOT NULL;

CREATE TABLE attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- history order
    item_id      text NOT NULL,
    stage        text NOT NULL,
    subtask      bigint,                        -- subtask position; NULL for the stage
    attempt      bigint NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    result       text NOT NULL,
    error        text
);

CREATE INDEX attempts_by_item ON attempts (item_id, id);

CREATE TABLE review_decisions (
    item_id      text NOT NULL,
    stage        text NOT NULL,
    round        bigint NOT NULL,
    decision     text NOT NULL,                 -- JSON DecisionRecord
    PRIMARY KEY (item_id, stage, round)
);

-- Units that may be claimable, in the order they became so. Hints: a
-- claim re-checks the unit on its locked rows and drops stale ones.
CREATE TABLE run_queue (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    item_id      text NOT NULL,
    stage        text NOT NULL,
    subtask      bigint
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_threshold = 1000);

-- Scheduled retries, moved to the run queue once due.
CREATE TABLE scheduled (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    due          timestamptz NOT NULL,
    item_seq     bigint NOT NULL,
    item_id      text NOT NULL,
    stage        text NOT NULL,
    stage_position bigint NOT NULL,
    subtask      bigint
) WITH (autovacuum_vacuum_scale_factor = 0.01);

CREATE INDEX scheduled_by_due ON scheduled (due, item_seq, stage_position, subtask);

CREATE TABLE events (
    seq          bigint PRIMARY KEY,            -- gapless, in commit order
    at           timestamptz NOT NULL,
    item_id      text NOT NULL,
    stage        text,
    subtask      text,
    kind         text NOT NULL                  -- JSON EventKind
);

CREATE INDEX events_by_item ON events (item_id, seq);

-- The last sequence number handed out; every writing transaction updates
-- it last, so commits take numbers in commit order.
CREATE TABLE event_counter (
    id           integer PRIMARY KEY CHECK (id = 1),
    last         bigint NOT NULL
) WITH (fillfactor = 10);

INSERT INTO event_counter VALUES (1, 0);
"#;

/// Version 2: the prune watermark, the highest event sequence number a
/// prune removed (sequence numbers come from the counter and are never
/// reused).
const V2: &str = r#"
CREATE TABLE pruned_events (
    id           integer PRIMARY KEY CHECK (id = 1),
    through      bigint NOT NULL
);

INSERT INTO pruned_events VALUES (1, 0);

CREATE INDEX items_by_submission ON items (submitted_at, seq);
"#;

/// Version 3: review deadlines by time, so an idle worker's look at the
/// next deadline and the due ones reads only reviews that have one (not
/// every review awaiting a person).
const V3: &str = r#"
CREATE INDEX stages_review_deadline ON stages (review_deadline)
    WHERE state = 'awaiting_review' AND review_deadline IS NOT NULL;
"#;

/// Whether `name` may be used as a schema name: lowercase ASCII letters,
/// digits and `_`, starting with a letter or `_`, at most 48 bytes (so
/// its NOTIFY channel name fits too). Such a name needs no quoting anywhere.
pub(super) fn check_schema_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = (1..=48).contains(&name.len())
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with("pg_");
    if valid {
        Ok(())
    } else {
        Err(Error::PostgresConfig {
            setting: "schema",
            detail: format!(
                "`{name}` is not a plain schema name (lowercase letters, digits and `_`, \
                 not starting with a digit or `pg_`, at most 48 bytes)"
            ),
        })
    }
}

/// Creates schema `schema` if needed and brings it to [`SCHEMA_VERSION`],
/// under an advisory lock held for the transaction. A schema of a newer
/// version is [`Error::SchemaTooNew`]; one with tables that are not ours is
/// [`Error::NotATreadleDatabase`], and so is a missing schema unless `create`.
/// Nothing is written to a schema not ours.
pub(super) async fn migrate(client: &mut Client, schema: &str, create: bool) -> Result<()> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('treadle schema ' || $1, 0))",
        &[&schema],
    )
    .await?;
    let tables: Vec<String> = tx
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = $1",
            &[&schema],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let current = if tables.iter().any(|t| t == "treadle_meta") {
        let rows = tx.query("SELECT key, value FROM treadle_meta", &[]).await?;
        let value = |key: &str| {
            rows.iter()
                .find(|r| r.get::<_, &str>(0) == key)
                .map(|r| r.get::<_, String>(1))
        };
        if value("application").as_deref() != Some(APPLICATION) {
            return Err(not_ours(
                schema,
                "its treadle_meta table names another application",
            ));
        }
        let version = value("schema_version").unwrap_or_default();
        version.parse::<i64>().map_err(|_| Error::Corrupt {
            location: format!("{schema}.treadle_meta(key=schema_version).value"),
            detail: format!("`{version}` is not a schema version"),
        })?
    } else if let Some(foreign) = tables.first() {
        return Err(not_ours(
            schema,
            &format!("it holds table {foreign}, not treadle's"),
        ));
    } else if !create {
        return Err(not_ours(
            schema,
            "it has no treadle tables: no worker has used it yet",
        ));
    } else {
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await?;
        0
    };
    if current > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    if current == SCHEMA_VERSION {
        return Ok(());
    }
    for sql in &MIGRATIONS[current as usize..] {
        tx.batch_execute(sql).await?;
    }
    tx.execute(
        "INSERT INTO treadle_meta (key, value) VALUES ('application', $1), ('schema_version', $2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[&APPLICATION, &SCHEMA_VERSION.to_string()],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// [`Error::NotATreadleDatabase`] for `schema`, saying why.
fn not_ours(schema: &str, why: &str) -> Error {
    Error::NotATreadleDatabase {
        location: format!("PostgreSQL schema {schema} ({why})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["treadle", "t_1", "_x", "pipeline_a2"] {
            assert!(check_schema_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1abc",
            "Upper",
            "a-b",
            "a b",
            "x\"y",
            "pg_x",
            &"a".repeat(49),
        ] {
            let error = check_schema_name(bad).unwrap_err();
            assert!(error.to_string().contains("schema"), "{bad}: {error}");
        }
    }
}
