//! Crash retries on SQLite: an attempt abandoned by a worker that stopped
//! mid-attempt does not spend the stage's own attempts. With real processes,
//! a stage without `retries` that is SIGKILLed mid-attempt completes after
//! a restart with no human action; in-process, a unit abandoned more often
//! than the crash-retry limit fails, saying so, with every abandoned attempt
//! in its history.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use support::{Doc, doc, done};
use treadle::store::{ClaimRequest, SqliteStore, Store};
use treadle::{
    AttemptResult, Backoff, CrashRetries, Engine, EngineConfig, Event, EventKind, ItemState,
    Pipeline, StageState,
};

const WORKER: &str = env!("CARGO_BIN_EXE_crash-worker");

#[test]
fn a_stage_without_retries_killed_mid_attempt_completes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let mut first = Command::new(WORKER)
        .arg("--db")
        .arg(&db)
        .args(["--items", "1", "--prefix", "job", "--worker-id", "first"])
        .args([
            "--retries",
            "0",
            "--stage-ms",
            "600000",
            "--lease-ms",
            "60000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(first.stdout.take().unwrap()).lines();
    for line in lines.map_while(Result::ok) {
        let event: Event = serde_json::from_str(&line).unwrap();
        if matches!(event.kind, EventKind::Started { .. }) {
            break;
        }
    }
    first.kill().unwrap(); // SIGKILL, mid-attempt
    first.wait().unwrap();

    let restart = Command::new(WORKER)
        .arg("--db")
        .arg(&db)
        .args(["--items", "0", "--worker-id", "second", "--retries", "0"])
        .args(["--stage-ms", "5", "--lease-ms", "60000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(restart.success());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let store = SqliteStore::open(&db).await.unwrap();
        store.status("job-0000").await.unwrap()
    });
    assert_eq!(status.state, ItemState::Completed, "{status}");
    let fetch = &status.stages[0];
    let results: Vec<AttemptResult> = fetch.attempts.iter().map(|a| a.result).collect();
    assert_eq!(
        results,
        [AttemptResult::Abandoned, AttemptResult::Completed],
        "{status}"
    );
}

fn one_stage() -> Pipeline<Doc> {
    Pipeline::builder().stage(done("a")).build().unwrap()
}

#[tokio::test]
async fn a_unit_abandoned_more_often_than_the_limit_fails_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("limit.db"))
        .await
        .unwrap();
    let crash_retries = CrashRetries {
        limit: 1,
        backoff: Backoff::Fixed(Duration::ZERO),
    };
    let engine = Engine::with_config(
        one_stage(),
        store.clone(),
        EngineConfig {
            worker_id: "survivor".into(),
            idle_poll: Duration::from_millis(5),
            crash_retries,
            ..EngineConfig::default()
        },
    );
    engine.submit(doc("d")).await.unwrap();
    // A worker that claims and dies, twice: its lease runs out each time.
    let ghost = || ClaimRequest {
        owner: "ghost".into(),
        limit: 1,
        lease: Duration::from_millis(20),
        now: Utc::now(),
        crash_retries,
        lane: None,
    };
    assert_eq!(store.claim(ghost()).await.unwrap().claims.len(), 1);
    tokio::time::sleep(Duration::from_millis(40)).await;
    let second = store.claim(ghost()).await.unwrap().claims;
    assert_eq!(
        second.len(),
        1,
        "one crash is within the limit: it runs again"
    );
    assert_eq!((second[0].attempt, second[0].crashes), (2, 1));

    // The engine waits for the ghost's lease, then finds the limit spent.
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    let a = &status.stages[0];
    assert_eq!(a.state, StageState::Failed, "{status}");
    let reason = a.last_error.as_deref().unwrap();
    assert!(
        reason.contains("abandoned 2 times by workers that stopped mid-attempt")
            && reason.contains("crash-retry limit is 1"),
        "{reason}"
    );
    let results: Vec<AttemptResult> = a.attempts.iter().map(|r| r.result).collect();
    assert_eq!(
        results,
        [
            AttemptResult::Abandoned,
            AttemptResult::Abandoned,
            AttemptResult::Failed
        ]
    );
}
