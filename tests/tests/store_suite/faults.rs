//! Faults and repairs every store must handle the same way: rerunning a
//! finished stage with everything downstream of it, and edits decided where
//! the output type is unknown (the CLI), checked by the worker.

use chrono::Utc;
use serde_json::{Value, json};
use treadle::store::{DecisionCommit, Store, Verdict};
use treadle::{
    Decision, Error, EventKind, ItemState, Pipeline, ReviewRequest, Stage, StageContext,
    StageOutcome, StageState,
};

use super::review_pipeline;
use crate::support::*;

pub async fn rerun_of_a_review_stage_reopens_the_review_and_reruns_downstream<S: Store>(store: S) {
    let exported = Trace::default();
    let engine = engine(review_pipeline(exported.clone()), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    engine
        .approve_with_edits(
            "d",
            "review",
            Decision::by("alice"),
            json!({"tags": ["pop"]}),
        )
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    assert_eq!(
        engine.status("d").await.unwrap().state,
        ItemState::Completed
    );

    engine.rerun("d", "review").await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::AwaitingReview, "{status}");
    let (tag, review, export) = (&status.stages[0], &status.stages[1], &status.stages[2]);
    assert_eq!(tag.state, StageState::Completed, "upstream is kept");
    assert_eq!(tag.attempts.len(), 1);
    assert_eq!(review.state, StageState::AwaitingReview);
    assert_eq!(
        review.review.as_ref().unwrap().round,
        2,
        "a new review round"
    );
    assert_eq!(
        review.attempts.len(),
        2,
        "the first round's attempt is kept"
    );
    assert_eq!(export.state, StageState::Pending);
    assert_eq!(export.output, None);
    assert_eq!(export.attempts.len(), 1, "export's history is kept");
    let rerun = events_of(&engine, "d")
        .await
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::RerunRequested { reset } => Some((e.stage, reset)),
            _ => None,
        });
    assert_eq!(
        rerun,
        Some((Some("review".to_owned()), vec!["export".to_owned()]))
    );

    engine
        .approve("d", "review", Decision::by("bob").for_round(2))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    assert_eq!(
        exported.entries(),
        [r#"{"tags":["pop"]}"#, r#"{"tags":["rock"]}"#],
        "export ran again on the new decision"
    );
    let completed = events_of(&engine, "d")
        .await
        .iter()
        .filter(|e| e.kind == EventKind::ItemCompleted)
        .count();
    assert_eq!(completed, 2, "the item completed again after the rerun");
}

pub async fn rerun_of_a_fan_out_stage_fans_out_afresh<S: Store>(store: S) {
    let runs = Counter::default();
    let counted = runs.clone();
    let pipeline = Pipeline::builder()
        .stage(stage("split", move |_, ctx| {
            let runs = counted.clone();
            async move {
                Ok(match ctx.subtask() {
                    None => StageOutcome::fan_out(["a", "b"]),
                    Some(_) => {
                        runs.bump();
                        StageOutcome::complete_with(ctx.attempt())?
                    }
                })
            }
        }))
        .stage(done("join"))
        .edge("split", "join")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    engine.rerun("d", "split").await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    assert_eq!(runs.get(), 4, "both subtasks ran again");
    let split = &status.stages[0];
    let names: Vec<&str> = split.subtasks.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "one set of subtasks, made afresh");
    assert!(split.subtasks.iter().all(|s| s.attempt == 1));
    assert_eq!(split.output, Some(json!({"a": 1, "b": 1})));
    assert_eq!(status.stages[1].attempts.len(), 2);
}

pub async fn only_a_finished_or_failed_stage_can_be_rerun<S: Store>(store: S) {
    let engine = engine(review_pipeline(Trace::default()), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let before = engine.status("d").await.unwrap();
    for stage in ["review", "export"] {
        match engine.rerun("d", stage).await {
            Err(Error::NotRerunnable { state, .. }) => {
                assert_eq!(
                    Some(state),
                    before
                        .stages
                        .iter()
                        .find(|s| s.name == stage)
                        .map(|s| s.state)
                )
            }
            other => panic!("expected NotRerunnable, got {other:?}"),
        }
    }
    assert!(matches!(
        engine.rerun("d", "nope").await,
        Err(Error::UnknownStage { .. })
    ));
    assert_eq!(engine.status("d").await.unwrap(), before, "nothing changed");
}

/// A review stage whose output must be `{"tags": [..]}`.
struct TagReview;

#[treadle::async_trait]
impl Stage<Doc> for TagReview {
    fn name(&self) -> &str {
        "review"
    }

    async fn run(&self, _doc: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::needs_review(
            ReviewRequest::new("Check the tags").proposed_output(json!({"tags": ["rock"]}))?,
        ))
    }

    fn check_output(&self, value: &Value) -> treadle::Result<()> {
        match value.get("tags") {
            Some(Value::Array(_)) => Ok(()),
            _ => Err(Error::stage("expected an object with a `tags` list")),
        }
    }
}

/// A decision with edits as the CLI makes it: straight to the store.
fn edits_from_outside(edits: Value, by: &str) -> DecisionCommit {
    DecisionCommit {
        item_id: "d".into(),
        stage: "review".into(),
        verdict: Verdict::ApproveWithEditsToCheck(edits),
        decision: Decision::by(by),
        at: Utc::now(),
    }
}

pub async fn edits_decided_outside_are_checked_by_the_worker_and_refused_ones_reopen_the_review<
    S: Store,
>(
    store: S,
) {
    let exported = Trace::default();
    let trace = exported.clone();
    let pipeline = Pipeline::builder()
        .stage(TagReview)
        .stage(stage("export", move |_, ctx| {
            let trace = trace.clone();
            async move {
                let reviewed: Value = ctx.output_of("review")?;
                trace.push(reviewed.to_string());
                Ok(StageOutcome::complete())
            }
        }))
        .edge("review", "export")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();

    engine
        .store()
        .decide(edits_from_outside(json!([1, 2, 3]), "carol"))
        .await
        .unwrap();
    let waiting = engine.status("d").await.unwrap();
    assert_eq!(
        waiting.stages[0].state,
        StageState::Pending,
        "awaits the check"
    );
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::AwaitingReview, "{status}");
    let review = &status.stages[0];
    assert_eq!(review.state, StageState::AwaitingReview);
    assert_eq!(review.review.as_ref().unwrap().round, 2, "asked again");
    assert_eq!(review.output, None);
    assert!(
        exported.entries().is_empty(),
        "nothing ran on the bad edits"
    );
    let refused = events_of(&engine, "d")
        .await
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::EditsRefused { reason, edits } => Some((reason, edits)),
            _ => None,
        });
    let (reason, edits) = refused.expect("an event says why");
    assert!(
        reason.contains("do not fit the output of stage `review`")
            && reason.contains("expected an object with a `tags` list"),
        "{reason}"
    );
    assert_eq!(*edits, json!([1, 2, 3]), "the refused edits are kept");

    engine
        .store()
        .decide(edits_from_outside(json!({"tags": ["jazz"]}), "carol"))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    assert_eq!(status.stages[0].output, Some(json!({"tags": ["jazz"]})));
    assert_eq!(exported.entries(), [r#"{"tags":["jazz"]}"#]);
}
