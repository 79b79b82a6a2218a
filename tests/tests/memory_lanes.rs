//! A memory store split into lanes: whose work a claim takes, the one log
//! of all lanes, and the end of a `run_until_idle` whose lanes run in
//! parallel.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use chrono::Utc;
use support::{doc, done, engine, events_of, kind_name, stage, then_publish};
use treadle::store::{Claim, ClaimRequest, Commit, EventQuery, Store, Transition};
use treadle::{
    AttemptRecord, AttemptResult, CrashRetries, DeadlineAction, Engine, Error, ItemState,
    MemoryStore, Pipeline, ReviewRequest, StageOutcome, StageState,
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

/// `count` documents, `doc-000` on, submitted to `engine`; their ids.
async fn submit_docs<S: Store>(engine: &Engine<support::Doc, S>, count: usize) -> Vec<String> {
    let ids: Vec<String> = (0..count).map(|i| format!("doc-{i:03}")).collect();
    engine
        .submit_all(ids.iter().map(|id| doc(id)))
        .await
        .unwrap();
    ids
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

/// The ids of `count` documents submitted to a fresh two-lane store, and
/// the items a claim starting at `lane` takes from it, in claim order.
async fn claimed_from(lane: usize, count: usize) -> (Vec<String>, Vec<String>) {
    let store = MemoryStore::with_lanes(2);
    assert_eq!(store.lanes(), 2);
    let engine = engine(linear(), store.clone());
    let ids = submit_docs(&engine, count).await;
    let claims = store.claim(claim_from(Some(lane))).await.unwrap().claims;
    assert!(
        store
            .claim(claim_from(None))
            .await
            .unwrap()
            .claims
            .is_empty(),
        "nothing is left to claim"
    );
    let claimed = claims
        .into_iter()
        .map(|c| c.task.item_id.to_string())
        .collect();
    (ids, claimed)
}

#[tokio::test]
async fn a_claim_takes_its_own_lanes_work_first_then_the_other_lanes() {
    let (ids, from_first) = claimed_from(0, 40).await;
    let (_, from_second) = claimed_from(1, 40).await;
    let all: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(from_first.iter().collect::<BTreeSet<_>>(), all);
    assert_eq!(from_second.iter().collect::<BTreeSet<_>>(), all);
    // Each lane's items in submission order, own lane first: lane 1's
    // claim is lane 0's turned around at the boundary between the lanes.
    let boundary = (1..ids.len())
        .find(|&k| from_second == [&from_first[k..], &from_first[..k]].concat())
        .expect("the second claim is the first one with the lanes swapped");
    for lane in [&from_first[..boundary], &from_first[boundary..]] {
        assert!(
            lane.is_sorted(),
            "a lane's work in the order it became runnable"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_in_parallel_keep_one_gapless_log_in_each_items_order() {
    let store = MemoryStore::with_lanes(2);
    let engine = engine(linear(), store);
    let ids = submit_docs(&engine, 300).await;
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
    let ids = submit_docs(&engine, 20).await;
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

/// Runs one item whose first stage, in the first poll of its attempt (which
/// a lane makes inline, before the engine registers the attempt for
/// cancellation), cancels the item and then waits 30 s. The run must stop
/// that attempt rather than wait it out.
async fn cancel_during_an_inline_first_poll(store: MemoryStore) {
    type Slot = std::sync::Mutex<Option<Engine<support::Doc, MemoryStore>>>;
    let slot: Arc<Slot> = Arc::default();
    let in_stage = slot.clone();
    let pipeline = then_publish(stage("transcode", move |_, _| {
        let engine = in_stage.lock().unwrap().take();
        async move {
            let engine = engine.expect("the stage runs once");
            // The memory store's cancel ends in its first poll.
            let mut cancel = std::pin::pin!(engine.cancel("d"));
            let polled = cancel
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()));
            assert!(matches!(polled, Poll::Ready(Ok(()))), "{polled:?}");
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(StageOutcome::complete())
        }
    }));
    let engine = engine(pipeline, store);
    *slot.lock().unwrap() = Some(engine.clone());
    engine.submit(doc("d")).await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(5), engine.run_until_idle())
        .await
        .expect("the cancelled attempt was stopped, not waited out")
        .unwrap();
    assert_eq!((report.attempts, report.discarded), (0, 1));
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Cancelled);
    assert!(
        slot.lock().unwrap().is_none(),
        "the stage ran and took the engine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_a_lanes_inline_first_poll_stops_the_attempt() {
    cancel_during_an_inline_first_poll(MemoryStore::with_lanes(2)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_cancel_during_an_inline_first_poll_on_one_thread_stops_the_attempt() {
    cancel_during_an_inline_first_poll(MemoryStore::new()).await;
}

/// `commit_at_once` with one batch whose commits go back and forth
/// between the two lanes answers each commit in order: the one whose
/// claim is stale is refused as lost, and every other one commits.
#[tokio::test]
async fn a_batch_committed_at_once_across_lanes_answers_each_commit_in_order() {
    let store = MemoryStore::with_lanes(2);
    let engine = engine(linear(), store.clone());
    let ids = submit_docs(&engine, 16).await;
    // Lane 0's items in submission order, then lane 1's.
    let claims = store.claim(claim_from(Some(0))).await.unwrap().claims;
    assert_eq!(claims.len(), ids.len());
    let second_lane = (1..claims.len())
        .find(|&i| claims[i].task.item_id < claims[i - 1].task.item_id)
        .expect("both lanes hold items");
    let (first, second) = claims.split_at(second_lane);
    let mut interleaved: Vec<&Claim> = Vec::new();
    for i in 0..first.len().max(second.len()) {
        interleaved.extend(first.get(i).into_iter().chain(second.get(i)));
    }
    let stale = 3;
    let commits = interleaved
        .iter()
        .enumerate()
        .map(|(i, claim)| Commit {
            task: claim.task.clone(),
            generation: claim.generation + u64::from(i == stale),
            attempt: AttemptRecord {
                attempt: claim.attempt,
                started_at: claim.started_at,
                finished_at: Utc::now(),
                result: AttemptResult::Completed,
                error: None,
            },
            transition: Transition::Complete { output: None },
        })
        .collect();
    let answers = store.commit_at_once(commits).expect("commits at once");
    assert_eq!(answers.len(), interleaved.len());
    for (i, (answer, claim)) in answers.iter().zip(&interleaved).enumerate() {
        let scan = engine.status(&claim.task.item_id).await.unwrap().stages[0].state;
        if i == stale {
            assert!(matches!(answer, Err(Error::LeaseLost { .. })), "{answer:?}");
            assert_eq!(
                scan,
                StageState::Running,
                "the stale commit changed nothing"
            );
        } else {
            assert!(answer.is_ok(), "commit {i}: {answer:?}");
            assert_eq!(scan, StageState::Completed, "commit {i}");
        }
    }
}
