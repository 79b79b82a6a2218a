//! Faults and repairs every store must handle the same way: rerunning a
//! finished stage with everything downstream of it.

use serde_json::json;
use treadle::store::Store;
use treadle::{Decision, Error, EventKind, ItemState, Pipeline, StageOutcome, StageState};

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
