//! A memory store split into lanes: each lane's claims, the one log of all
//! lanes, and the end of a `run_until_idle` whose lanes run in parallel.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use support::{doc, done, engine, events_of, kind_name, stage};
use treadle::store::{ClaimRequest, EventQuery, Store};
use treadle::{
    CrashRetries, DeadlineAction, ItemState, MemoryStore, Pipeline, ReviewRequest, StageOutcome,
};

fn linear() -> Pipeline<support::Doc> {
    Pipeline::builder()
        .stage(done("scan"))
        .stage(done("enrich"))
        .stage(done("export"))
        .edge("scan", "enrich")
        .edge("enrich", "export")
        .build()
        .unwrap()
}

fn claim_from(lane: Option<usize>) -> ClaimRequest {
    ClaimRequest {
        owner: "w".into(),
        limit: 1_000,
        lease: Duration::from_secs(60),
        now: Utc::now(),
        crash_retries: CrashRetries::DEFAULT,
        lane,
    }
}

#[tokio::test]
async fn each_lane_claims_only_its_own_items_and_the_lanes_together_claim_all() {
    let store = MemoryStore::with_lanes(2);
    assert_eq!(store.lanes(), 2);
    let engine = engine(linear(), store.clone());
    let ids: BTreeSet<String> = (0..40).map(|i| format!("doc-{i:02}")).collect();
    engine
        .submit_all(ids.iter().map(|id| doc(id)))
        .await
        .unwrap();

    let claimed = |lane| {
        let store = store.clone();
        async move {
            let claims = store.claim(claim_from(lane)).await.unwrap().claims;
            claims
                .into_iter()
                .map(|c| c.task.item_id.to_string())
                .collect::<BTreeSet<String>>()
        }
    };
    let first = claimed(Some(0)).await;
    let second = claimed(Some(1)).await;
    assert!(
        !first.is_empty() && !second.is_empty(),
        "both lanes hold items"
    );
    assert!(first.is_disjoint(&second), "an item is in one lane");
    let both: BTreeSet<String> = first.union(&second).cloned().collect();
    assert_eq!(both, ids, "every item is in a lane");
    assert!(claimed(None).await.is_empty(), "nothing is left to claim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_in_parallel_keep_one_gapless_log_in_each_items_order() {
    let store = MemoryStore::with_lanes(2);
    let engine = engine(linear(), store);
    let ids: Vec<String> = (0..300).map(|i| format!("doc-{i:03}")).collect();
    engine
        .submit_all(ids.iter().map(|id| doc(id)))
        .await
        .unwrap();
    let report = engine.run_until_idle().await.unwrap();
    assert_eq!(report.attempts, 900);

    let log = engine.events(EventQuery::default()).await.unwrap();
    let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
    let gapless: Vec<u64> = (1..=log.len() as u64).collect();
    assert_eq!(seqs, gapless);
    let expected = [
        "item_submitted",
        "started",
        "completed",
        "started",
        "completed",
        "started",
        "completed",
        "item_completed",
    ];
    for id in &ids {
        let kinds: Vec<String> = events_of(&engine, id)
            .await
            .iter()
            .map(|e| kind_name(&e.kind))
            .collect();
        assert_eq!(kinds, expected, "events of `{id}`");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_one_lane_makes_runnable_in_another_runs_before_the_run_ends() {
    let pipeline = Pipeline::builder()
        .stage(stage("review", |_, _| async move {
            Ok(StageOutcome::needs_review(
                ReviewRequest::new("check")
                    .proposed_output("auto")?
                    .deadline_after(Duration::from_millis(50), DeadlineAction::Approve),
            ))
        }))
        .stage(done("export"))
        .edge("review", "export")
        .build()
        .unwrap();
    let engine = engine(pipeline, MemoryStore::with_lanes(2));
    let ids: Vec<String> = (0..20).map(|i| format!("doc-{i:02}")).collect();
    engine
        .submit_all(ids.iter().map(|id| doc(id)))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    assert_eq!(engine.awaiting_review().await.unwrap().len(), ids.len());

    tokio::time::sleep(Duration::from_millis(100)).await;
    // Whichever lane finds the passed deadlines first decides every item,
    // both lanes' alike; the other lane's exports still run in this run.
    engine.run_until_idle().await.unwrap();
    for id in &ids {
        assert_eq!(
            engine.status(id).await.unwrap().state,
            ItemState::Completed,
            "`{id}`"
        );
    }
}
