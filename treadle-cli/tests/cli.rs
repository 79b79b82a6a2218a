//! The `treadle` binary against SQLite databases written by a real engine
//! run: tag -> review -> export, where `review` parks every item with a
//! proposed output and `tag` fails while an item's gate file is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use treadle::store::SqliteStore;
use treadle::{Engine, Pipeline, ReviewRequest, StageContext, StageOutcome, WorkItem};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Doc {
    id: String,
    /// `tag` fails for good while this file does not exist.
    gate: Option<PathBuf>,
}

impl WorkItem for Doc {
    fn id(&self) -> &str {
        &self.id
    }
}

#[treadle::stage]
async fn tag(doc: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    if let Some(gate) = &doc.gate
        && !gate.exists()
    {
        return Ok(StageOutcome::failed("gate closed"));
    }
    StageOutcome::complete_with(vec![format!("tag-of-{}", doc.id)])
}

#[treadle::stage]
async fn review(doc: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    let tags: Vec<String> = ctx.output_of("tag")?;
    Ok(StageOutcome::needs_review(
        ReviewRequest::new(format!("Check the tags of {}", doc.id))
            .details(serde_json::json!({ "count": tags.len() }))?
            .proposed_output(&tags)?,
    ))
}

#[treadle::stage]
async fn export(_doc: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    let tags: Value = ctx.output_of("review")?;
    StageOutcome::complete_with(serde_json::json!({ "exported": tags }))
}

struct Fixture {
    dir: tempfile::TempDir,
    db: PathBuf,
    engine: Engine<Doc, SqliteStore>,
}

/// Items `a`, `b`, `c` wait for review; `d`'s tag failed (its gate is closed).
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("pipeline.db");
    let store = SqliteStore::open(&db).await.unwrap();
    let pipeline: Pipeline<Doc> = treadle::pipeline! { tag -> review -> export };
    let engine = Engine::new(pipeline, store);
    let gate = dir.path().join("gate-d");
    let docs = ["a", "b", "c"].map(|id| Doc {
        id: id.into(),
        gate: None,
    });
    engine.submit_all(docs).await.unwrap();
    engine
        .submit(Doc {
            id: "d".into(),
            gate: Some(gate),
        })
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    Fixture { dir, db, engine }
}

/// What a run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }

    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "stderr: {}\nstdout: {}",
            self.stderr, self.stdout
        );
        self
    }

    /// Asserts the exit code and a one-line message containing `message`.
    #[track_caller]
    fn fails(self, code: i32, message: &str) -> Self {
        assert_eq!(
            self.code, code,
            "stderr: {}\nstdout: {}",
            self.stderr, self.stdout
        );
        assert!(self.stderr.contains(message), "stderr: {}", self.stderr);
        assert_eq!(self.stderr.trim_end().lines().count(), 1, "{}", self.stderr);
        assert!(self.stdout.is_empty(), "stdout: {}", self.stdout);
        self
    }
}

fn finish(output: Output) -> Run {
    Run {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

fn treadle(db: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_treadle"))
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .unwrap();
    finish(output)
}

/// Everything the CLI can read: every item's status and the event log.
fn snapshot(db: &Path) -> Value {
    let items: Vec<Value> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| treadle(db, &["status", id, "--json"]).ok().json())
        .collect();
    let events = treadle(db, &["events", "--json"]).ok().json();
    let overview = treadle(db, &["status", "--json"]).ok().json();
    serde_json::json!({ "items": items, "events": events, "overview": overview })
}

fn stage<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {status}"))
}

#[tokio::test]
async fn review_list_then_approve_lets_a_worker_complete_the_item() {
    let f = fixture().await;
    let list = treadle(&f.db, &["review", "list"]).ok();
    for id in ["a", "b", "c"] {
        assert!(
            list.stdout.contains(&format!(
                "{id} review (pipeline version 1, round 1, requested "
            )),
            "{}",
            list.stdout
        );
        assert!(list.stdout.contains(&format!("Check the tags of {id}")));
    }
    assert!(
        list.stdout.contains("details: {\"count\":1}"),
        "{}",
        list.stdout
    );
    assert!(list.stdout.contains("proposed output: [\"tag-of-a\"]"));
    assert!(!list.stdout.contains("d review"), "d never reached review");

    let json = treadle(&f.db, &["review", "list", "--json"]).ok().json();
    let ids: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["item_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b", "c"]);

    let approved = treadle(
        &f.db,
        &[
            "approve",
            "a",
            "review",
            "--by",
            "alice",
            "--note",
            "looks right",
        ],
    )
    .ok();
    assert_eq!(approved.stdout, "approved item `a` stage `review`\n");

    // The item waits for a worker: the export has not run yet.
    let status = treadle(&f.db, &["status", "a", "--json"]).ok().json();
    assert_eq!(stage(&status, "review")["state"], "completed");
    assert_eq!(stage(&status, "export")["state"], "pending");

    f.engine.run_until_idle().await.unwrap();
    let status = treadle(&f.db, &["status", "a", "--json"]).ok().json();
    assert_eq!(status["state"], "completed");
    assert_eq!(
        stage(&status, "export")["output"],
        serde_json::json!({ "exported": ["tag-of-a"] })
    );
    let decision = &stage(&status, "review")["review"]["decision"];
    assert_eq!(decision["kind"], "approved");
    assert_eq!(decision["by"], "alice");
    assert_eq!(decision["note"], "looks right");

    let text = treadle(&f.db, &["status", "a"]).ok().stdout;
    assert!(text.starts_with("item a — completed"), "{text}");
    assert!(text.contains("decision: approved by alice"), "{text}");
    assert!(
        !treadle(&f.db, &["review", "list"])
            .ok()
            .stdout
            .contains("a review"),
        "a no longer awaits review"
    );
}

#[tokio::test]
async fn approve_with_edits_replaces_the_output() {
    let f = fixture().await;
    let edits = f.dir.path().join("edits.json");
    std::fs::write(&edits, r#"["fixed-tag"]"#).unwrap();
    let edits = edits.to_str().unwrap();
    treadle(
        &f.db,
        &["approve", "b", "review", "--by", "carol", "--edits", edits],
    )
    .ok();
    f.engine.run_until_idle().await.unwrap();
    let status = treadle(&f.db, &["status", "b", "--json"]).ok().json();
    assert_eq!(
        stage(&status, "export")["output"],
        serde_json::json!({ "exported": ["fixed-tag"] })
    );
    assert_eq!(
        stage(&status, "review")["review"]["decision"]["kind"],
        "approved_with_edits"
    );

    let before = snapshot(&f.db);
    let bad = f.dir.path().join("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    treadle(
        &f.db,
        &[
            "approve",
            "c",
            "review",
            "--by",
            "x",
            "--edits",
            bad.to_str().unwrap(),
        ],
    )
    .fails(2, "not JSON");
    assert_eq!(snapshot(&f.db), before);
}

#[tokio::test]
async fn reject_fails_the_stage_with_the_reason() {
    let f = fixture().await;
    let rejected = treadle(
        &f.db,
        &[
            "reject",
            "c",
            "review",
            "--by",
            "bob",
            "--reason",
            "wrong tags",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(rejected["action"], "rejected");
    let kinds: Vec<&str> = rejected["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"]["type"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"review_decided"), "{kinds:?}");

    f.engine.run_until_idle().await.unwrap();
    let status = treadle(&f.db, &["status", "c", "--json"]).ok().json();
    assert_eq!(status["state"], "failed");
    let review = stage(&status, "review");
    assert_eq!(review["state"], "failed");
    assert_eq!(review["review"]["decision"]["reason"], "wrong tags");
    assert_eq!(stage(&status, "export")["state"], "pending");
    let failed = treadle(&f.db, &["items", "--stage", "review", "--state", "failed"]).ok();
    assert_eq!(failed.stdout, "c\n");
}

#[tokio::test]
async fn retry_runs_a_failed_stage_again() {
    let f = fixture().await;
    let failed = treadle(&f.db, &["items", "--stage", "tag", "--state", "failed"]).ok();
    assert_eq!(failed.stdout, "d\n");
    let status = treadle(&f.db, &["status", "d"]).ok().stdout;
    assert!(status.contains("error: gate closed"), "{status}");

    std::fs::write(f.dir.path().join("gate-d"), "open").unwrap();
    treadle(&f.db, &["retry", "d", "tag"]).ok();
    f.engine.run_until_idle().await.unwrap();
    let status = treadle(&f.db, &["status", "d", "--json"]).ok().json();
    assert_eq!(stage(&status, "tag")["state"], "completed");
    assert_eq!(stage(&status, "review")["state"], "awaiting_review");
    let attempts = stage(&status, "tag")["attempts"].as_array().unwrap().len();
    assert_eq!(attempts, 2, "the failed attempt is kept in the history");
}

#[tokio::test]
async fn cancel_stops_the_item_and_later_decisions_conflict() {
    let f = fixture().await;
    treadle(&f.db, &["cancel", "b"]).ok();
    let status = treadle(&f.db, &["status", "b", "--json"]).ok().json();
    assert_eq!(status["state"], "cancelled");
    assert_eq!(stage(&status, "review")["state"], "cancelled");
    let before = snapshot(&f.db);
    treadle(&f.db, &["approve", "b", "review", "--by", "alice"]).fails(4, "not awaiting review");
    assert_eq!(snapshot(&f.db), before);
    f.engine.run_until_idle().await.unwrap();
    assert_eq!(snapshot(&f.db), before, "a worker runs nothing for it");
}

#[tokio::test]
async fn graph_is_valid_dot_and_mermaid_from_the_stored_pipeline() {
    let f = fixture().await;
    let dot = treadle(&f.db, &["graph", "--format", "dot"]).ok().stdout;
    assert!(dot.trim_start().starts_with("digraph"), "{dot}");
    assert_eq!(dot.matches('{').count(), dot.matches('}').count(), "{dot}");
    assert!(dot.trim_end().ends_with('}'));
    for edge in [r#""tag" -> "review";"#, r#""review" -> "export";"#] {
        assert_eq!(dot.lines().filter(|l| l.trim() == edge).count(), 1, "{dot}");
    }
    assert_eq!(dot.matches("->").count(), 2, "no other edges: {dot}");

    let mermaid = treadle(&f.db, &["graph", "--format", "mermaid"])
        .ok()
        .stdout;
    assert!(mermaid.starts_with("flowchart"), "{mermaid}");
    let edges: Vec<&str> = mermaid
        .lines()
        .filter(|l| l.contains("-->"))
        .map(str::trim)
        .collect();
    assert_eq!(edges, ["tag --> review", "review --> export"]);

    let counted = treadle(&f.db, &["graph", "--counts"]).ok().stdout;
    assert!(
        counted.contains(r#""tag" [label="tag\n3 completed, 1 failed"];"#),
        "{counted}"
    );
    assert!(counted.contains(r#""review" [label="review\n1 pending, 3 awaiting_review"];"#));
    assert!(counted.contains(r#""tag" -> "review";"#));
    let counted = treadle(&f.db, &["graph", "--format", "mermaid", "--counts"])
        .ok()
        .stdout;
    assert!(
        counted.contains("export[\"export<br/>4 pending\"]"),
        "{counted}"
    );
}

#[tokio::test]
async fn every_read_command_prints_parseable_json() {
    let f = fixture().await;
    let overview = treadle(&f.db, &["status", "--json"]).ok().json();
    let names: Vec<&str> = overview["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tag", "review", "export"], "topological order");
    assert_eq!(overview["stages"][1]["counts"]["awaiting_review"], 3);
    assert_eq!(overview["stages"][0]["counts"]["failed"], 1);

    assert_eq!(overview["pipeline"]["version"], 1);
    let table = treadle(&f.db, &["status"]).ok().stdout;
    assert_eq!(table.lines().next(), Some("pipeline version 1"));
    let header: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["stage", "pending", "completed", "failed", "awaiting_review"]
    );
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().eq(["review", "1", "0", "0", "3"])),
        "{table}"
    );

    let item = treadle(&f.db, &["status", "a", "--json"]).ok().json();
    assert_eq!(item["item_id"], "a");
    assert_eq!(item["state"], "awaiting_review");

    let items = treadle(
        &f.db,
        &[
            "items",
            "--stage",
            "review",
            "--state",
            "awaiting_review",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(items["items"], serde_json::json!(["a", "b", "c"]));

    let reviews = treadle(&f.db, &["review", "list", "--json"]).ok().json();
    assert_eq!(reviews.as_array().unwrap().len(), 3);

    let events = treadle(&f.db, &["events", "--json"]).ok().json();
    let events = events.as_array().unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let of_d = treadle(&f.db, &["events", "d", "--json"]).ok().json();
    assert!(of_d.as_array().unwrap().iter().all(|e| e["item_id"] == "d"));
    assert!(
        of_d.as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"]["type"] == "failed")
    );
    let page = treadle(&f.db, &["events", "--after", "2", "--limit", "3", "--json"])
        .ok()
        .json();
    let page: Vec<u64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(page, [3, 4, 5]);

    let graph = treadle(&f.db, &["graph", "--counts", "--json"]).ok().json();
    assert_eq!(graph["format"], "dot");
    assert!(graph["graph"].as_str().unwrap().starts_with("digraph"));
    assert_eq!(graph["counts"]["export"]["pending"], 4);
}

#[tokio::test]
async fn each_error_has_its_code_and_message_and_changes_nothing() {
    let f = fixture().await;
    let db = &f.db;
    let before = snapshot(db);

    // 3: not found.
    treadle(db, &["status", "zz"]).fails(3, "unknown item `zz`");
    treadle(db, &["approve", "zz", "review", "--by", "x"]).fails(3, "unknown item `zz`");
    treadle(db, &["events", "zz"]).fails(3, "unknown item `zz`");
    treadle(db, &["approve", "a", "nope", "--by", "x"]).fails(3, "has no stage `nope`");
    treadle(db, &["retry", "d", "nope"]).fails(3, "has no stage `nope`");
    treadle(db, &["items", "--stage", "nope", "--state", "pending"]).fails(3, "no stage `nope`");
    treadle(db, &["cancel", "zz"]).fails(3, "unknown item `zz`");

    // 4: conflict.
    treadle(db, &["approve", "a", "tag", "--by", "x"]).fails(
        4,
        "stage `tag` of item `a` is completed, not awaiting review",
    );
    treadle(db, &["reject", "d", "export", "--by", "x", "--reason", "r"])
        .fails(4, "not awaiting review");
    treadle(db, &["approve", "a", "review", "--by", "x", "--round", "2"]).fails(4, "stale");
    treadle(db, &["retry", "a", "tag"]).fails(4, "only a failed stage can be retried");

    // 2: usage.
    let bad_state = treadle(db, &["items", "--stage", "tag", "--state", "done"]);
    let bad_state = bad_state.fails(2, "unknown stage state `done`");
    assert!(
        bad_state
            .stderr
            .contains("pending, running, completed, failed")
    );
    let no_db = finish(
        Command::new(env!("CARGO_BIN_EXE_treadle"))
            .arg("status")
            .output()
            .unwrap(),
    );
    no_db.fails(2, "no database given");
    let code = treadle(db, &["approve", "a", "review"]).code;
    assert_eq!(code, 2, "clap's usage error: --by is required");

    assert_eq!(snapshot(db), before, "no failed command changed anything");
}

#[test]
fn a_missing_or_foreign_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    treadle(&missing, &["status"]).fails(5, "no database at");
    assert!(!missing.exists(), "the database was not created");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a database\n").unwrap();
    treadle(&text, &["status"]).fails(5, "is not a treadle database");
    assert_eq!(std::fs::read(&text).unwrap(), b"not a database\n");

    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    treadle(&empty, &["review", "list"]).fails(5, "is not a treadle database");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);

    let foreign = dir.path().join("other.db");
    let conn = rusqlite::Connection::open(&foreign).unwrap();
    conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('hi');")
        .unwrap();
    drop(conn);
    let bytes = std::fs::read(&foreign).unwrap();
    treadle(&foreign, &["cancel", "a"]).fails(5, "is not a treadle database");
    assert_eq!(std::fs::read(&foreign).unwrap(), bytes);
}

#[tokio::test]
async fn a_database_from_a_newer_treadle_is_refused() {
    let f = fixture().await;
    drop(f.engine);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let conn = rusqlite::Connection::open(&f.db).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    treadle(&f.db, &["status"]).fails(5, "schema version 99");
}

#[tokio::test]
async fn events_follow_prints_what_other_processes_commit() {
    let f = fixture().await;
    let last = treadle(&f.db, &["events", "--json"]).ok().json();
    let last = last.as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    let follower = Command::new(env!("CARGO_BIN_EXE_treadle"))
        .arg("--db")
        .arg(&f.db)
        .args(["events", "--follow", "--follow-for-ms", "2500", "--json"])
        .args(["--after", &last.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    treadle(&f.db, &["approve", "a", "review", "--by", "alice"]).ok();
    f.engine.run_until_idle().await.unwrap();
    let run = finish(follower.wait_with_output().unwrap()).ok();
    let events: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["kind"]["type"].as_str().unwrap())
        .collect();
    assert!(events.iter().all(|e| e["seq"].as_u64().unwrap() > last));
    assert!(kinds.contains(&"review_decided"), "{kinds:?}");
    assert!(kinds.contains(&"item_completed"), "{kinds:?}");
}

#[test]
fn help_documents_every_exit_code() {
    let help = finish(
        Command::new(env!("CARGO_BIN_EXE_treadle"))
            .arg("--help")
            .output()
            .unwrap(),
    )
    .ok()
    .stdout;
    for line in [
        "0  success",
        "2  usage error",
        "3  not found",
        "4  conflict",
        "5  no usable database",
    ] {
        assert!(help.contains(line), "{line} missing from:\n{help}");
    }
}

#[tokio::test]
async fn read_commands_answer_while_a_worker_holds_the_write_lock() {
    let f = fixture().await;
    let writer = rusqlite::Connection::open(&f.db).unwrap();
    // A worker mid-transaction: the write lock is held until it commits.
    writer.execute_batch("BEGIN IMMEDIATE").unwrap();
    writer
        .execute("UPDATE items SET cancelled = 0 WHERE id = 'a'", [])
        .unwrap();
    let status = treadle(&f.db, &["status"]).ok();
    assert!(status.stdout.contains("review"), "{}", status.stdout);
    treadle(&f.db, &["status", "a"]).ok();
    let waiting = treadle(
        &f.db,
        &["items", "--stage", "review", "--state", "awaiting_review"],
    )
    .ok();
    assert!(waiting.stdout.contains('a'), "{}", waiting.stdout);
    treadle(&f.db, &["review", "list"]).ok();
    treadle(&f.db, &["events", "--limit", "3"]).ok();
    treadle(&f.db, &["graph"]).ok();
    writer.execute_batch("COMMIT").unwrap();
}

#[tokio::test]
async fn a_read_command_opens_a_database_no_process_has_open() {
    let f = fixture().await;
    let Fixture { dir, db, engine } = f;
    drop(engine); // the last connection closes; SQLite removes the WAL files
    assert!(!db.with_extension("db-wal").exists());
    let status = treadle(&db, &["status", "--json"]).ok().json();
    assert!(status.to_string().contains("awaiting_review"), "{status}");
    drop(dir);
}

#[tokio::test]
async fn blank_or_reserved_reviewers_and_blank_reasons_are_usage_errors() {
    let f = fixture().await;
    let before = snapshot(&f.db);
    treadle(&f.db, &["approve", "a", "review", "--by", ""])
        .fails(2, "the reviewer's name; the name given is blank");
    treadle(
        &f.db,
        &["approve", "a", "review", "--by", "treadle:deadline"],
    )
    .fails(2, "reserved for the decisions the engine makes");
    treadle(
        &f.db,
        &["reject", "a", "review", "--by", "alice", "--reason", " "],
    )
    .fails(2, "a rejection needs a reason");
    assert_eq!(snapshot(&f.db), before, "nothing changed");
}

#[tokio::test]
async fn a_reset_schema_version_is_a_typed_error_for_reads_and_writes() {
    let f = fixture().await;
    let Fixture { dir, db, engine } = f;
    drop(engine);
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 0)
        .unwrap();
    treadle(&db, &["status"]).fails(5, "schema version was reset to 0");
    treadle(&db, &["approve", "a", "review", "--by", "alice"])
        .fails(5, "schema version was reset to 0");
    drop(dir);
}

#[tokio::test]
async fn a_corrupt_payload_is_named_in_status_and_events() {
    let f = fixture().await;
    rusqlite::Connection::open(&f.db)
        .unwrap()
        .execute("UPDATE items SET payload = '{\"id\": ' WHERE id = 'd'", [])
        .unwrap();
    treadle(&f.db, &["retry", "d", "tag"]).ok();
    f.engine.run_until_idle().await.unwrap();
    let status = treadle(&f.db, &["status", "d"]).ok();
    assert!(
        status
            .stdout
            .contains("corrupt stored value at items(id=d).payload"),
        "{}",
        status.stdout
    );
    let events = treadle(&f.db, &["events", "d"]).ok();
    assert!(
        events.stdout.contains("items(id=d).payload"),
        "{}",
        events.stdout
    );
    // The other items were untouched: still awaiting review.
    let waiting = treadle(
        &f.db,
        &["items", "--stage", "review", "--state", "awaiting_review"],
    )
    .ok();
    for id in ["a", "b", "c"] {
        assert!(
            waiting.stdout.lines().any(|l| l.trim() == id),
            "{}",
            waiting.stdout
        );
    }
}

#[tokio::test]
async fn rerun_reopens_a_decided_review_and_refuses_an_unfinished_stage() {
    let f = fixture().await;
    treadle(&f.db, &["approve", "a", "review", "--by", "alice"]).ok();
    f.engine.run_until_idle().await.unwrap();
    let status = treadle(&f.db, &["status", "a", "--json"]).ok().json();
    assert_eq!(status["state"], "completed", "{status}");

    let rerun = treadle(&f.db, &["rerun", "a", "review"]).ok();
    assert!(
        rerun.stdout.starts_with("rerun_requested item `a`"),
        "{}",
        rerun.stdout
    );
    f.engine.run_until_idle().await.unwrap();
    let list = treadle(&f.db, &["review", "list", "--json"]).ok().json();
    let a = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["item_id"] == "a")
        .expect("a awaits review again");
    assert_eq!(a["review"]["round"], 2, "{a}");
    let status = treadle(&f.db, &["status", "a", "--json"]).ok().json();
    assert_eq!(stage(&status, "export")["state"], "pending");

    treadle(&f.db, &["rerun", "b", "review"]).fails(4, "only a completed, skipped or failed");
}

/// A review stage whose output must be a list of tags.
struct TagList;

#[treadle::async_trait]
impl treadle::Stage<Doc> for TagList {
    fn name(&self) -> &str {
        "review"
    }

    async fn run(&self, _doc: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::needs_review(
            ReviewRequest::new("Check the tags").proposed_output(["rock"])?,
        ))
    }

    fn check_output(&self, value: &Value) -> treadle::Result<()> {
        serde_json::from_value::<Vec<String>>(value.clone())
            .map(drop)
            .map_err(|e| treadle::Error::json("the tags", e))
    }
}

#[tokio::test]
async fn edits_from_the_cli_that_do_not_fit_reopen_the_review_with_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("edits.db");
    let pipeline = Pipeline::builder().stage(TagList).build().unwrap();
    let engine = Engine::new(pipeline, SqliteStore::open(&db).await.unwrap());
    engine
        .submit(Doc {
            id: "a".into(),
            gate: None,
        })
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"tags": 3}"#).unwrap();
    let bad = bad.to_str().unwrap();
    treadle(
        &db,
        &["approve", "a", "review", "--by", "carol", "--edits", bad],
    )
    .ok();
    engine.run_until_idle().await.unwrap();

    let list = treadle(&db, &["review", "list", "--json"]).ok().json();
    assert_eq!(list[0]["item_id"], "a", "{list}");
    assert_eq!(list[0]["review"]["round"], 2, "{list}");
    let events = treadle(&db, &["events", "a", "--json"]).ok().json();
    let refused = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"]["type"] == "edits_refused")
        .unwrap_or_else(|| panic!("no edits_refused event in {events}"));
    assert_eq!(refused["kind"]["edits"], serde_json::json!({"tags": 3}));
    assert!(
        refused["kind"]["reason"]
            .as_str()
            .unwrap()
            .contains("do not fit the output of stage `review`"),
        "{refused}"
    );

    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"["jazz"]"#).unwrap();
    let good = good.to_str().unwrap();
    treadle(
        &db,
        &["approve", "a", "review", "--by", "carol", "--edits", good],
    )
    .ok();
    engine.run_until_idle().await.unwrap();
    let status = treadle(&db, &["status", "a", "--json"]).ok().json();
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(
        stage(&status, "review")["output"],
        serde_json::json!(["jazz"])
    );
}
