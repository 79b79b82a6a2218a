//! Typed outputs survive a restart: one process writes them to a SQLite
//! file and exits, and a stage run by the next process reads them typed.

mod support;

use serde::{Deserialize, Serialize};
use serde_json::json;
use treadle::{Decision, ItemState, ReviewRequest, SqliteStore, StageOutcome, StageState, Store};
use treadle::{pipeline, stage};

use crate::support::*;

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    pages: u32,
    title: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Verdict {
    ok: bool,
}

#[stage]
async fn scan(doc: &Doc) -> treadle::Result<Report> {
    Ok(Report {
        pages: doc.pages,
        title: format!("{} (scanned)", doc.id),
    })
}

#[stage]
async fn check(
    _doc: &Doc,
    #[from(scan)] report: &Report,
) -> treadle::Result<StageOutcome<Verdict>> {
    let request = ReviewRequest::new(format!("{} pages right?", report.pages))
        .proposed_output(Verdict { ok: true })?;
    Ok(StageOutcome::needs_review(request))
}

#[stage]
async fn export(
    _doc: &Doc,
    #[from(scan)] report: &Report,
    #[from(check)] verdict: &Verdict,
) -> treadle::Result<String> {
    Ok(format!(
        "{}: {} pages, ok={}",
        report.title, report.pages, verdict.ok
    ))
}

/// Where the first process writes: set only for the child process.
const FIRST_RUN_DB: &str = "TREADLE_TYPED_RESTART_DB";

/// Not a test on its own: the first process of
/// `typed_outputs_written_before_a_restart_are_read_after_it`. Without the
/// environment variable it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_process_writes_typed_outputs() {
    let Ok(path) = std::env::var(FIRST_RUN_DB) else {
        return;
    };
    let store = SqliteStore::open(&path).await.unwrap();
    let engine = engine(pipeline! { scan -> check -> export }, store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.stages[1].state, StageState::AwaitingReview);
    assert_eq!(
        status.stages[0].output,
        Some(json!({"pages": 3, "title": "d (scanned)"}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_outputs_written_before_a_restart_are_read_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typed.db");
    let first = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "first_process_writes_typed_outputs",
            "--test-threads=1",
        ])
        .env(FIRST_RUN_DB, &path)
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "the first process failed: {}",
        String::from_utf8_lossy(&first.stdout)
    );
    // The first process has exited: this one starts from the file alone.
    let store = SqliteStore::open(&path).await.unwrap();
    let status = store.status("d").await.unwrap();
    assert_eq!(
        status.stages[1].state,
        StageState::AwaitingReview,
        "{status}"
    );
    let engine = engine(pipeline! { scan -> check -> export }, store);
    engine
        .approve("d", "check", Decision::by("alice"))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    // `scan` ran only in the first process; `export` read its output here.
    assert_eq!(status.stages[0].attempts.len(), 1);
    assert_eq!(
        status.stages[2].output,
        Some(json!("d (scanned): 3 pages, ok=true"))
    );
}
