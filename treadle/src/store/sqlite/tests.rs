//! Unit tests of the SQLite store internals: every statement the store runs
//! is planned against the real schema, and none scans a whole table.

use super::schema;

/// Every SQL statement written as a string literal in the store's sources.
fn statements() -> Vec<String> {
    let mut found = Vec::new();
    for source in [
        include_str!("tx.rs"),
        include_str!("appends.rs"),
        include_str!("read.rs"),
        include_str!("rows.rs"),
        include_str!("versions.rs"),
        include_str!("prune.rs"),
    ] {
        let mut rest = source;
        while let Some(start) = rest.find('"') {
            let after = &rest[start + 1..];
            let Some(end) = after.find('"') else { break };
            let literal = &after[..end];
            let head = literal.trim_start();
            // A `{...}` template is completed at run time (the column
            // updates of `rows::write_unit`); its complete forms are below.
            let template = literal.contains('{');
            if !template
                && ["SELECT", "UPDATE", "INSERT", "DELETE"]
                    .iter()
                    .any(|k| head.starts_with(k))
            {
                found.push(literal.to_owned());
            }
            rest = &after[end + 1..];
        }
    }
    // The shapes `rows::write_unit` builds: changed columns, by key.
    found.push("UPDATE stages SET state = ?2, waiting = ?3 WHERE id = ?1".into());
    found.push(
        "UPDATE subtasks SET state = ?4 WHERE item_id = ?1 AND stage = ?2 AND name = ?3".into(),
    );
    found
}

/// The lines of `EXPLAIN QUERY PLAN` for `sql`.
fn plan(conn: &rusqlite::Connection, sql: &str) -> Vec<String> {
    let mut statement = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap_or_else(|e| panic!("{e}: {sql}"));
    let mut rows = statement.raw_query();
    let mut lines = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        lines.push(row.get::<_, String>(3).unwrap());
    }
    lines
}

#[test]
fn no_statement_scans_a_whole_table() {
    let conn = schema::open(None, schema::MIGRATIONS).unwrap();
    let statements = statements();
    assert!(
        statements.len() > 40,
        "found only {} statements",
        statements.len()
    );
    let mut scans = Vec::new();
    for sql in &statements {
        for line in plan(&conn, sql) {
            // Reading the run queue's first rows in key order stops at the
            // limit: it reads only what it returns.
            let queue_head = line == "SCAN run_queue" && sql.contains("ORDER BY seq LIMIT");
            let constant = line == "SCAN CONSTANT ROW";
            // One row per registered pipeline version: read whole on purpose.
            let versions = line == "SCAN pipeline_versions";
            // A prune clears queue rows its items cannot have (they are
            // finished): a scan of the small queues, once per batch; and
            // `pruned_events` is one row.
            let prune = (line == "SCAN run_queue" || line == "SCAN scheduled")
                && sql.contains("json_each")
                || line == "SCAN pruned_events";
            // Counting the stages in each state reads every row anyway.
            let counts = line == "SCAN stages" && sql.contains("count(*) FROM stages GROUP BY");
            // One row per table with `AUTOINCREMENT`: the event log alone.
            let sequence = line == "SCAN sqlite_sequence";
            if line.starts_with("SCAN ")
                && !line.contains("INDEX")
                && !queue_head
                && !constant
                && !versions
                && !prune
                && !sequence
                && !counts
            {
                scans.push(format!("{line}\n    in: {}", sql.trim()));
            }
        }
    }
    assert!(scans.is_empty(), "full scans:\n{}", scans.join("\n"));
}

#[test]
fn hot_queries_use_their_indexes() {
    let conn = schema::open(None, schema::MIGRATIONS).unwrap();
    let uses = |needle: &str, index: &str| {
        let statements = statements();
        let sql = statements
            .iter()
            .find(|s| s.contains(needle))
            .unwrap_or_else(|| panic!("no statement contains `{needle}`"));
        let lines = plan(&conn, sql);
        assert!(
            lines.iter().any(|l| l.contains(index)),
            "`{needle}` does not use {index}: {lines:?}"
        );
    };
    uses("AND state = +?2 ORDER BY item_seq", "stages_by_stage");
    uses(
        "AND rare_state IS NOT NULL\n             ORDER BY item_seq",
        "stages_in_rare_states",
    );
    uses("ORDER BY s.review_requested_at", "stages_awaiting_review");
    uses("ORDER BY review_deadline", "stages_review_deadline");
    uses("ORDER BY due, item_seq", "scheduled_by_due");
    uses(
        "FROM stages\n             WHERE state = 'running'",
        "stages_leased",
    );
    uses("WHERE i.id = +?1 AND e.seq > +?2", "events_by_item");
    uses("JOIN attempts a ON a.stage_id = s.id", "attempts_by_stage");
    uses("UPDATE stages SET state = ?2", "INTEGER PRIMARY KEY");
}

/// SQLite plans some statements against the values bound to them (a
/// parameter compared with a partial index's condition, say); such a
/// statement is compiled again each time it is taken from the statement
/// cache, which made loading an item cost as much as parsing its SQL.
#[test]
fn no_statement_is_compiled_again_when_reused() {
    use rusqlite::StatementStatus;
    use rusqlite::types::Null;
    let mut conn = schema::open(None, schema::MIGRATIONS).unwrap();
    let tx = conn.transaction().unwrap();
    let mut recompiled = Vec::new();
    for sql in statements() {
        let mut count = 0;
        for _ in 0..3 {
            let mut statement = tx.prepare_cached(&sql).unwrap();
            for index in 1..=statement.parameter_count() {
                statement.raw_bind_parameter(index, Null).unwrap();
            }
            // Errors (constraints on NULL) and rows do not matter: a step
            // compiles the statement again first if it must.
            let _ = statement.raw_execute();
            count = statement.get_status(StatementStatus::RePrepare);
        }
        if count > 0 {
            recompiled.push(sql.trim().to_owned());
        }
    }
    assert!(
        recompiled.is_empty(),
        "compiled again on every reuse:\n{}",
        recompiled.join("\n\n")
    );
}
