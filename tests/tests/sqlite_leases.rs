//! Leases and fencing on a shared SQLite file: a claim whose lease expired
//! is recovered by another worker with an event, the stale worker's writes
//! are rejected with `LeaseLost`, long stages keep their lease by renewal,
//! and review deadlines survive a restart.

mod support;

use std::time::Duration;

use chrono::Utc;
use support::{Counter, Doc, doc, done, engine, stage};
use treadle::store::{ClaimRequest, Commit, EventQuery, SqliteStore, Store, Transition};
use treadle::{
    AttemptRecord, AttemptResult, DEADLINE_REVIEWER, DeadlineAction, Engine, EngineConfig, Error,
    EventKind, ItemState, Pipeline, ReviewRequest, StageOutcome, StagePolicy, StageState,
};

/// A claim whose recovered work runs again at once (no crash backoff).
fn claim_request(owner: &str, lease_ms: u64) -> ClaimRequest {
    ClaimRequest {
        owner: owner.into(),
        limit: 10,
        lease: Duration::from_millis(lease_ms),
        now: Utc::now(),
        crash_retries: treadle::CrashRetries {
            backoff: treadle::Backoff::Fixed(Duration::ZERO),
            ..treadle::CrashRetries::DEFAULT
        },
        lane: None,
    }
}

#[tokio::test]
async fn an_expired_lease_is_recovered_and_the_stale_worker_is_fenced_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let pipeline = Pipeline::builder().stage(done("only")).build().unwrap();
    let setup = engine(pipeline, SqliteStore::open(&path).await.unwrap());
    setup.submit(doc("d")).await.unwrap();

    let stale = SqliteStore::open(&path).await.unwrap();
    let fresh = SqliteStore::open(&path).await.unwrap();
    let first = stale
        .claim(claim_request("stale", 50))
        .await
        .unwrap()
        .claims
        .remove(0);
    assert_eq!((first.attempt, &*first.task.stage), (1, "only"));
    assert!(
        fresh
            .claim(claim_request("fresh", 50))
            .await
            .unwrap()
            .claims
            .is_empty(),
        "a live lease is respected"
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    let logged = fresh.events(EventQuery::default()).await.unwrap().len();
    let batch = fresh.claim(claim_request("fresh", 30_000)).await.unwrap();
    let second = &batch.claims[0];
    assert_eq!(second.attempt, 2, "the abandoned attempt counts");
    assert!(second.generation > first.generation);
    let claimed = fresh.events(EventQuery::default()).await.unwrap();
    let recovered: Vec<_> = claimed[logged..].iter().map(|e| &e.kind).collect();
    assert!(
        matches!(
            recovered[0],
            EventKind::Recovered { previous_owner, attempt: 1 } if previous_owner == "stale"
        ),
        "{recovered:?}"
    );

    let before = fresh.status("d").await.unwrap();
    let now = Utc::now();
    let write = |claim: &treadle::store::Claim| Commit {
        task: claim.task.clone(),
        generation: claim.generation,
        attempt: AttemptRecord {
            attempt: claim.attempt,
            started_at: claim.started_at,
            finished_at: now,
            result: AttemptResult::Completed,
            error: None,
        },
        transition: Transition::Complete {
            output: Some(serde_json::json!("from stale")),
        },
    };
    let err = stale.commit(write(&first)).await.unwrap_err();
    assert!(
        matches!(err, Error::LeaseLost { generation, .. } if generation == first.generation),
        "{err:?}"
    );
    assert_eq!(
        fresh.status("d").await.unwrap(),
        before,
        "the stale write changed nothing"
    );
    let renewed_lost = stale
        .renew(&[(first.task.clone(), first.generation)], Utc::now())
        .await
        .unwrap();
    assert_eq!(
        renewed_lost,
        std::slice::from_ref(&first.task),
        "the stale worker learns it lost the claim"
    );

    fresh.commit(write(second)).await.unwrap();
    let status = fresh.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed);
    let results: Vec<_> = status.stages[0].attempts.iter().map(|a| a.result).collect();
    assert_eq!(
        results,
        [AttemptResult::Abandoned, AttemptResult::Completed]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stage_keeps_its_lease_by_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("renew.db");
    let runs = Counter::default();
    let long_stage = |runs: Counter| {
        Pipeline::builder()
            .stage(stage("transcode", move |_, _| {
                let runs = runs.clone();
                async move {
                    runs.bump();
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    Ok(StageOutcome::complete())
                }
            }))
            .build()
            .unwrap()
    };
    let config = |id: &str| EngineConfig {
        max_concurrency: 4,
        lease: Duration::from_millis(150),
        worker_id: id.into(),
        idle_poll: Duration::from_millis(10),
        ..EngineConfig::default()
    };
    let a: Engine<Doc, _> = Engine::with_config(
        long_stage(runs.clone()),
        SqliteStore::open(&path).await.unwrap(),
        config("a"),
    );
    let b: Engine<Doc, _> = Engine::with_config(
        long_stage(runs.clone()),
        SqliteStore::open(&path).await.unwrap(),
        config("b"),
    );
    a.submit(doc("movie")).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thief = tokio::spawn(async move { b.run(async { stopped.await.unwrap_or(()) }).await });
    a.run_until_idle().await.unwrap();
    stop.send(()).unwrap();
    thief.await.unwrap().unwrap();
    assert_eq!(runs.get(), 1, "the other worker never took the stage over");
    let status = a.status("movie").await.unwrap();
    assert_eq!(status.stages[0].state, StageState::Completed);
    assert_eq!(status.stages[0].attempt, 1);
}

#[tokio::test]
async fn a_review_deadline_fires_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deadline.db");
    let pipeline = || {
        Pipeline::builder()
            .stage(stage("review", |_, _| async {
                Ok(StageOutcome::needs_review(
                    ReviewRequest::new("check")
                        .deadline_after(Duration::from_millis(200), DeadlineAction::Approve),
                ))
            }))
            .stage(done("export"))
            .edge("review", "export")
            .build()
            .unwrap()
    };
    {
        let first = engine(pipeline(), SqliteStore::open(&path).await.unwrap());
        first.submit(doc("d")).await.unwrap();
        first.run_until_idle().await.unwrap();
        assert_eq!(
            first.status("d").await.unwrap().state,
            ItemState::AwaitingReview
        );
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let second = engine(pipeline(), SqliteStore::open(&path).await.unwrap());
    second.run_until_idle().await.unwrap();
    let status = second.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    let decision = status.stages[0].review.clone().unwrap().decision.unwrap();
    assert_eq!(decision.by, DEADLINE_REVIEWER);
}

#[tokio::test]
async fn a_restarted_worker_recovers_its_own_claims_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("restart.db");
    // The attempt the dead worker started is a crash retry, not one of these.
    let pipeline = || {
        Pipeline::builder()
            .stage(done("only").policy(StagePolicy::new().retries(1)))
            .build()
            .unwrap()
    };
    let store = SqliteStore::open(&path).await.unwrap();
    let setup = engine(pipeline(), store);
    setup.submit(doc("d")).await.unwrap();
    // A worker called "test-worker" claims with a long lease, then "dies".
    let claimed = setup
        .store()
        .claim(claim_request("test-worker", 3_600_000))
        .await
        .unwrap();
    assert_eq!(claimed.claims.len(), 1);
    drop(setup);
    // The same worker id restarts: it does not wait an hour for its own lease.
    let restarted = engine(pipeline(), SqliteStore::open(&path).await.unwrap());
    tokio::time::timeout(Duration::from_secs(10), restarted.run_until_idle())
        .await
        .unwrap()
        .unwrap();
    let status = restarted.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    let results: Vec<_> = status.stages[0].attempts.iter().map(|a| a.result).collect();
    assert_eq!(
        results,
        [AttemptResult::Abandoned, AttemptResult::Completed]
    );
}

#[tokio::test]
async fn an_attempt_abandoned_by_a_dead_worker_spends_no_attempt_of_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("used-up.db");
    let pipeline = || Pipeline::builder().stage(done("only")).build().unwrap();
    let setup = engine(pipeline(), SqliteStore::open(&path).await.unwrap());
    setup.submit(doc("d")).await.unwrap();
    setup
        .store()
        .claim(claim_request("test-worker", 3_600_000))
        .await
        .unwrap();
    drop(setup);
    let restarted = engine(pipeline(), SqliteStore::open(&path).await.unwrap());
    restarted.run_until_idle().await.unwrap();
    let stage = restarted.status("d").await.unwrap().stages.remove(0);
    assert_eq!(
        stage.state,
        StageState::Completed,
        "a stage without retries"
    );
    let results: Vec<_> = stage.attempts.iter().map(|a| a.result).collect();
    assert_eq!(
        results,
        [AttemptResult::Abandoned, AttemptResult::Completed]
    );
}

#[tokio::test]
async fn engine_new_runs_as_many_attempts_as_the_store_suggests() {
    let pipeline = || Pipeline::builder().stage(done("only")).build().unwrap();
    let sqlite = Engine::new(pipeline(), SqliteStore::open_in_memory().await.unwrap());
    assert_eq!(
        sqlite.config().max_concurrency,
        1_024,
        "group commit wants more in flight"
    );
    let memory = Engine::new(pipeline(), treadle::MemoryStore::new());
    assert_eq!(memory.config().max_concurrency, 256);
}
