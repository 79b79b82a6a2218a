//! The differential script: drives a store through every kind of
//! transition with fixed times and returns a transcript of every result,
//! error, event and status, so two stores can be required to agree. Also
//! the small builders the store tests share.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use treadle::store::{
    ClaimRequest, Commit, DecisionCommit, EventQuery, NewItem, Store, TaskKey, Transition, Verdict,
};
use treadle::{AttemptRecord, AttemptResult, Decision, PipelineDef, ReviewRequest, StageState};

/// `seconds` after a fixed time. Microseconds are the finest precision
/// every store keeps (PostgreSQL's `timestamptz`), so the transcripts of
/// all stores can be compared.
pub fn t(seconds: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T10:00:00.123456Z")
        .unwrap()
        .with_timezone(&Utc)
        + TimeDelta::seconds(seconds)
}

/// An item with a linear pipeline `scan -> split -> review -> export`.
pub fn item(id: &str, at: DateTime<Utc>) -> NewItem {
    NewItem {
        id: id.to_owned(),
        payload: json!({"id": id, "pages": 3}).to_string(),
        version: 1,
        at,
    }
}

pub fn definition() -> PipelineDef {
    PipelineDef {
        stages: ["scan", "split", "review", "export"]
            .map(String::from)
            .to_vec(),
        edges: vec![
            ("scan".into(), "split".into()),
            ("split".into(), "review".into()),
            ("review".into(), "export".into()),
        ],
    }
}

/// Claims in these tests run recovered work again at once (no crash backoff).
pub const RECOVER_AT_ONCE: treadle::CrashRetries = treadle::CrashRetries {
    limit: 3,
    backoff: treadle::Backoff::Fixed(Duration::ZERO),
};

pub fn request(now: DateTime<Utc>) -> ClaimRequest {
    ClaimRequest {
        owner: "w1".into(),
        limit: 16,
        lease: Duration::from_secs(30),
        now,
        crash_retries: RECOVER_AT_ONCE,
        lane: None,
    }
}

pub fn key(item: &str, stage: &str, subtask: Option<&str>) -> TaskKey {
    TaskKey {
        item_id: item.into(),
        stage: stage.into(),
        subtask: subtask.map(Into::into),
    }
}

/// A commit for `task` at `generation`, ending an attempt started at `start`.
pub fn commit(
    task: TaskKey,
    generation: u64,
    attempt: u32,
    start: DateTime<Utc>,
    transition: Transition,
) -> Commit {
    let (result, error) = match &transition {
        Transition::Complete { .. } => (AttemptResult::Completed, None),
        Transition::Skip { .. } => (AttemptResult::Skipped, None),
        Transition::AwaitReview(_) => (AttemptResult::NeedsReview, None),
        Transition::RetryAt { .. } => (AttemptResult::Error, Some("flaky".to_owned())),
        Transition::Fail { reason } | Transition::RefuseEdits { reason } => {
            (AttemptResult::Failed, Some(reason.clone()))
        }
        Transition::FanOut { .. } => (AttemptResult::FannedOut, None),
    };
    Commit {
        task,
        generation,
        attempt: AttemptRecord {
            attempt,
            started_at: start,
            finished_at: start + TimeDelta::milliseconds(250),
            result,
            error,
        },
        transition,
    }
}

pub fn complete(output: serde_json::Value) -> Transition {
    Transition::Complete {
        output: Some(output),
    }
}

pub fn all_events_query() -> EventQuery {
    EventQuery::default()
}

pub async fn all_events<S: Store>(store: &S) -> Vec<treadle::Event> {
    store.events(all_events_query()).await.unwrap()
}

pub fn assert_gapless(events: &[treadle::Event]) {
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1, "event log has a gap or reordering");
    }
}

/// Drives a store through every kind of transition with fixed times and
/// returns a transcript of every result, error, event and status.
pub async fn script<S: Store>(store: &S) -> Vec<String> {
    let mut log = Vec::new();
    macro_rules! note {
        ($label:expr, $value:expr) => {
            log.push(format!("{}: {:?}", $label, $value))
        };
    }
    macro_rules! note_result {
        ($label:expr, $value:expr) => {
            match $value {
                Ok(v) => log.push(format!("{}: ok {:?}", $label, v)),
                Err(e) => log.push(format!("{}: error {}", $label, e)),
            }
        };
    }
    note!(
        "drift",
        store.register_pipeline(&definition()).await.unwrap()
    );
    let events = store
        .submit(vec![item("a", t(0)), item("b", t(0)), item("c", t(1))])
        .await
        .unwrap();
    note!("submit", events);
    note!(
        "resubmit",
        store.submit(vec![item("a", t(2))]).await.unwrap()
    );

    let batch = store.claim(request(t(3))).await.unwrap();
    note!("claim 1", &batch.claims);
    let generation = |task: &TaskKey| {
        batch
            .claims
            .iter()
            .find(|c| &c.task == task)
            .map(|c| c.generation)
            .unwrap()
    };
    let (a_scan, b_scan, c_scan) = (
        key("a", "scan", None),
        key("b", "scan", None),
        key("c", "scan", None),
    );
    let (ga, gb, gc) = (
        generation(&a_scan),
        generation(&b_scan),
        generation(&c_scan),
    );
    note_result!(
        "a.scan",
        store
            .commit(commit(a_scan, ga, 1, t(3), complete(json!({"pages": 3}))))
            .await
    );
    note_result!(
        "b.scan retry",
        store
            .commit(commit(
                b_scan.clone(),
                gb,
                1,
                t(3),
                Transition::RetryAt { at: t(20) }
            ))
            .await
    );
    note_result!(
        "c.scan fail",
        store
            .commit(commit(
                c_scan.clone(),
                gc,
                1,
                t(3),
                Transition::Fail {
                    reason: "unreadable".into()
                }
            ))
            .await
    );
    note_result!(
        "stale commit",
        store
            .commit(commit(b_scan.clone(), gb, 1, t(3), complete(json!(1))))
            .await
    );
    note!("next due", store.next_due().await.unwrap());

    let batch = store.claim(request(t(4))).await.unwrap();
    note!("claim 2", &batch.claims);
    let a_split = key("a", "split", None);
    note_result!(
        "a.split fan out",
        store
            .commit(commit(
                a_split.clone(),
                batch.claims[0].generation,
                1,
                t(4),
                Transition::FanOut {
                    subtasks: vec!["x".into(), "y".into(), "z".into()]
                }
            ))
            .await
    );
    let batch = store.claim(request(t(5))).await.unwrap();
    note!("claim 3", &batch.claims);
    let subs: Vec<_> = batch
        .claims
        .iter()
        .map(|c| (c.task.clone(), c.generation))
        .collect();
    note_result!(
        "x",
        store
            .commit(commit(
                subs[0].0.clone(),
                subs[0].1,
                1,
                t(5),
                complete(json!("x!"))
            ))
            .await
    );
    note_result!(
        "y retry",
        store
            .commit(commit(
                subs[1].0.clone(),
                subs[1].1,
                1,
                t(5),
                Transition::RetryAt { at: t(10) }
            ))
            .await
    );
    note_result!(
        "z skip",
        store
            .commit(commit(
                subs[2].0.clone(),
                subs[2].1,
                1,
                t(5),
                Transition::Skip {
                    reason: "empty".into()
                }
            ))
            .await
    );
    note!("status a mid fan-out", store.status("a").await.unwrap());

    // y (due t10) comes before b.scan (due t20).
    let batch = store.claim(request(t(30))).await.unwrap();
    note!("claim 4", &batch.claims);
    let y = batch
        .claims
        .iter()
        .find(|c| c.task.subtask.is_some())
        .unwrap();
    let b = batch
        .claims
        .iter()
        .find(|c| &*c.task.item_id == "b")
        .unwrap();
    let (y_task, y_gen, b_gen) = (y.task.clone(), y.generation, b.generation);
    note_result!(
        "y fail",
        store
            .commit(commit(
                y_task.clone(),
                y_gen,
                2,
                t(30),
                Transition::Fail {
                    reason: "bad page".into()
                }
            ))
            .await
    );
    note_result!("retry a.split", store.retry("a", "split", t(31)).await);
    note_result!("retry a.scan", store.retry("a", "scan", t(31)).await);
    note_result!("retry ghost", store.retry("ghost", "scan", t(31)).await);
    note_result!("retry a.nope", store.retry("a", "nope", t(31)).await);
    let batch = store.claim(request(t(32))).await.unwrap();
    note!("claim 5", &batch.claims);
    note_result!(
        "y again",
        store
            .commit(commit(
                y_task,
                batch.claims[0].generation,
                1,
                t(32),
                complete(json!("y!"))
            ))
            .await
    );
    note_result!(
        "renew",
        store
            .renew(
                &[
                    (key("b", "scan", None), b_gen),
                    (key("b", "scan", None), 99)
                ],
                t(60)
            )
            .await
    );

    let batch = store.claim(request(t(33))).await.unwrap();
    note!("claim 6", &batch.claims);
    let review = ReviewRequest::new("check the split")
        .proposed_output(json!({"ok": true}))
        .unwrap()
        .deadline_at(t(500), treadle::DeadlineAction::Approve);
    note_result!(
        "a.review asks",
        store
            .commit(commit(
                key("a", "review", None),
                batch.claims[0].generation,
                1,
                t(33),
                Transition::AwaitReview(review)
            ))
            .await
    );
    note!("awaiting", store.awaiting_review().await.unwrap());
    note!("deadline", store.next_review_deadline().await.unwrap());
    note!(
        "due reviews early",
        store.due_reviews(t(400)).await.unwrap()
    );
    note!("due reviews late", store.due_reviews(t(600)).await.unwrap());
    let decide = |verdict, decision: Decision| DecisionCommit {
        item_id: "a".into(),
        stage: "review".into(),
        verdict,
        decision,
        at: t(40),
    };
    note_result!(
        "stale decision",
        store
            .decide(decide(Verdict::Approve, Decision::by("ann").for_round(2)))
            .await
    );
    note_result!(
        "approve",
        store
            .decide(decide(
                Verdict::ApproveWithEdits(json!({"ok": "edited"})),
                Decision::by("ann").note("fine").for_round(1)
            ))
            .await
    );
    note_result!(
        "approve again",
        store
            .decide(decide(Verdict::Approve, Decision::by("bob")))
            .await
    );
    note_result!("cancel b", store.cancel("b", t(41)).await);
    note_result!("cancel b again", store.cancel("b", t(42)).await);
    note_result!(
        "b.scan after cancel",
        store
            .commit(commit(b_scan, b_gen, 2, t(30), complete(json!(2))))
            .await
    );
    note_result!("retry c.scan", store.retry("c", "scan", t(43)).await);
    let batch = store.claim(request(t(44))).await.unwrap();
    note!("claim 7", &batch.claims);
    for claim in &batch.claims {
        let transition = if &*claim.task.item_id == "c" {
            Transition::Skip {
                reason: "nothing to scan".into(),
            }
        } else {
            complete(json!({"exported": true}))
        };
        note_result!(
            format!("finish {}", claim.task),
            store
                .commit(commit(
                    claim.task.clone(),
                    claim.generation,
                    claim.attempt,
                    t(44),
                    transition
                ))
                .await
        );
    }
    for id in ["a", "b", "c"] {
        note!(format!("status {id}"), store.status(id).await.unwrap());
    }
    note_result!("status ghost", store.status("ghost").await);
    for (stage, state) in [
        ("scan", StageState::Completed),
        ("scan", StageState::Cancelled),
        ("split", StageState::Pending),
        ("export", StageState::Completed),
    ] {
        note!(
            format!("items in {stage} {state}"),
            store.items_in(stage, state).await.unwrap()
        );
    }
    note!("counts", store.stage_counts().await.unwrap());
    note!("pipeline", store.pipeline_definition().await.unwrap());
    note!("events", all_events(store).await);
    note!(
        "events of c after 5, 3 at most",
        store
            .events(EventQuery {
                after: 5,
                item_id: Some("c".into()),
                limit: Some(3),
            })
            .await
            .unwrap()
    );
    log
}
