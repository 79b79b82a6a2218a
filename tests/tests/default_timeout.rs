//! The engine's default attempt timeout: a stage that sets no timeout and
//! hangs fails by it, so `run_until_idle` returns; a stage's own timeout
//! wins over it.

mod support;

use std::time::Duration;

use support::{Doc, doc, done, stage};
use treadle::{
    AttemptResult, Engine, EngineConfig, ItemState, MemoryStore, Pipeline, StageOutcome,
    StagePolicy, StageState,
};

fn hanging(policy: StagePolicy) -> Pipeline<Doc> {
    Pipeline::builder()
        .stage(
            stage("hang", |_, _| {
                std::future::pending::<treadle::Result<StageOutcome>>()
            })
            .policy(policy),
        )
        .stage(done("after"))
        .edge("hang", "after")
        .build()
        .unwrap()
}

fn engine(pipeline: Pipeline<Doc>, default: Option<Duration>) -> Engine<Doc, MemoryStore> {
    let config = EngineConfig {
        default_attempt_timeout: default,
        ..EngineConfig::default()
    };
    Engine::with_config(pipeline, MemoryStore::new(), config)
}

#[test]
fn the_default_is_documented_and_can_be_turned_off() {
    assert_eq!(
        EngineConfig::default().default_attempt_timeout,
        Some(EngineConfig::DEFAULT_ATTEMPT_TIMEOUT)
    );
    assert_eq!(
        EngineConfig::DEFAULT_ATTEMPT_TIMEOUT,
        Duration::from_secs(600)
    );
}

#[tokio::test]
async fn a_hanging_stage_without_a_timeout_fails_by_the_default_one() {
    let engine = engine(
        hanging(StagePolicy::new()),
        Some(Duration::from_millis(150)),
    );
    engine.submit(doc("d")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), engine.run_until_idle())
        .await
        .expect("run_until_idle returns")
        .unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Failed, "{status}");
    let hang = &status.stages[0];
    assert_eq!(hang.state, StageState::Failed);
    assert_eq!(hang.attempts.len(), 1);
    assert_eq!(hang.attempts[0].result, AttemptResult::TimedOut);
    assert!(
        hang.last_error
            .as_deref()
            .unwrap()
            .contains("timed out after 150ms"),
        "{status}"
    );
}

#[tokio::test]
async fn a_stages_own_timeout_wins_over_the_default() {
    let engine = engine(
        hanging(StagePolicy::new().timeout(Duration::from_millis(100))),
        Some(Duration::from_secs(3600)),
    );
    engine.submit(doc("d")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), engine.run_until_idle())
        .await
        .expect("run_until_idle returns")
        .unwrap();
    let status = engine.status("d").await.unwrap();
    assert!(
        status.stages[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("timed out after 100ms"),
        "{status}"
    );
}
