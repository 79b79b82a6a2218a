//! Typed outputs survive a restart: one engine writes them to a SQLite
//! file, the store is closed, and a stage run by a new engine on the
//! reopened file reads them typed.

mod support;

use serde::{Deserialize, Serialize};
use serde_json::json;
use treadle::{Decision, ItemState, ReviewRequest, SqliteStore, StageOutcome, StageState};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_outputs_written_before_a_restart_are_read_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typed.db");
    {
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
    // The first engine and its store are gone: the file is closed.
    let store = SqliteStore::open(&path).await.unwrap();
    let engine = engine(pipeline! { scan -> check -> export }, store);
    engine
        .approve("d", "check", Decision::by("alice"))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    // `scan` ran only before the restart; `export` read its output after it.
    assert_eq!(status.stages[0].attempts.len(), 1);
    assert_eq!(
        status.stages[2].output,
        Some(json!("d (scanned): 3 pages, ok=true"))
    );
}
