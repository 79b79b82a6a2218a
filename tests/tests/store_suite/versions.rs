//! Changing the pipeline between runs: items keep moving on the pipeline
//! version they were submitted under, every change is reported, and no item
//! is left stuck without a word.

use treadle::store::Store;
use treadle::{Decision, Engine, EventKind, ItemState, Pipeline, ReviewRequest, StageOutcome};

use crate::support::*;

/// A pipeline of `stages` and `edges` whose stages record themselves in
/// `trace`; a stage named `review` or `check` asks for a review.
fn pipeline(stages: &[&str], edges: &[(&str, &str)], trace: &Trace) -> Pipeline<Doc> {
    let mut builder = Pipeline::builder();
    for name in stages {
        let (trace, label) = (trace.clone(), name.to_string());
        builder = builder.stage(stage(name, move |doc, _| {
            let (trace, label) = (trace.clone(), label.clone());
            async move {
                trace.push(format!("{label}:{}", doc.id));
                Ok(if label == "review" || label == "check" {
                    StageOutcome::needs_review(ReviewRequest::new("check it"))
                } else {
                    StageOutcome::complete()
                })
            }
        }));
    }
    for &(from, to) in edges {
        builder = builder.edge(from, to);
    }
    builder.build().unwrap()
}

/// Runs `ids` on a first build until they wait for review at `review`.
async fn park_at_review<S: Store + Clone>(
    store: &S,
    stages: &[&str],
    edges: &[(&str, &str)],
    ids: &[&str],
) -> Engine<Doc, S> {
    let v1 = engine(pipeline(stages, edges, &Trace::default()), store.clone());
    assert_eq!(v1.drift().await.unwrap().version, 1);
    v1.submit_all(ids.iter().map(|id| doc(id))).await.unwrap();
    v1.run_until_idle().await.unwrap();
    for id in ids {
        assert_eq!(
            v1.status(id).await.unwrap().state,
            ItemState::AwaitingReview
        );
    }
    v1
}

/// How many `ItemCompleted` events the item has.
async fn completions<S: Store>(engine: &Engine<Doc, S>, id: &str) -> usize {
    events_of(engine, id)
        .await
        .iter()
        .filter(|e| e.kind == EventKind::ItemCompleted)
        .count()
}

async fn approve_all<S: Store>(engine: &Engine<Doc, S>, stage: &str, ids: &[&str]) {
    for id in ids {
        engine
            .approve(id, stage, Decision::by("ann"))
            .await
            .unwrap();
    }
}

pub async fn a_stage_added_at_the_end_applies_to_old_items_only_when_migrated<S: Store + Clone>(
    store: S,
) {
    let v1 = [("a", "review")];
    park_at_review(&store, &["a", "review"], &v1, &["old", "moved"]).await;
    let trace = Trace::default();
    let v2 = engine(
        pipeline(
            &["a", "review", "z"],
            &[("a", "review"), ("review", "z")],
            &trace,
        ),
        store,
    );
    let drift = v2.drift().await.unwrap().clone();
    assert_eq!(drift.version, 2);
    assert_eq!(drift.changes.added_stages, ["z"]);
    assert_eq!(drift.in_flight.len(), 1, "{drift}");
    assert_eq!(
        (drift.in_flight[0].version, drift.in_flight[0].items),
        (1, 2)
    );
    assert!(
        drift
            .to_string()
            .contains("2 unfinished items on version 1"),
        "{drift}"
    );

    assert_eq!(
        v2.migrate("moved").await.unwrap(),
        treadle::store::MigrateOutcome::Moved
    );
    approve_all(&v2, "review", &["old", "moved"]).await;
    v2.run_until_idle().await.unwrap();

    let old = v2.status("old").await.unwrap();
    assert_eq!((old.state, old.version), (ItemState::Completed, 1), "{old}");
    assert_eq!(old.stages.len(), 2, "its own version has no `z`");
    let moved = v2.status("moved").await.unwrap();
    assert_eq!(
        (moved.state, moved.version),
        (ItemState::Completed, 2),
        "{moved}"
    );
    assert_eq!(trace.entries(), ["z:moved"]);
    for id in ["old", "moved"] {
        assert_eq!(completions(&v2, id).await, 1, "{id}: ItemCompleted once");
    }
    let kinds: Vec<String> = events_of(&v2, "moved")
        .await
        .iter()
        .map(|e| kind_name(&e.kind))
        .collect();
    assert!(kinds.contains(&"item_migrated".to_owned()), "{kinds:?}");
    assert!(v2.store().items_before_version(2).await.unwrap().is_empty());
}

pub async fn a_stage_inserted_in_the_middle_does_not_strand_old_items<S: Store + Clone>(store: S) {
    let v1 = [("a", "review"), ("review", "c")];
    park_at_review(&store, &["a", "review", "c"], &v1, &["d1"]).await;
    let trace = Trace::default();
    let v2 = engine(
        pipeline(
            &["a", "review", "m", "c"],
            &[("a", "review"), ("review", "m"), ("m", "c")],
            &trace,
        ),
        store,
    );
    let drift = v2.drift().await.unwrap();
    assert_eq!(drift.in_flight[0].changes.added_stages, ["m"]);
    approve_all(&v2, "review", &["d1"]).await;
    v2.run_until_idle().await.unwrap();
    let status = v2.status("d1").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    assert_eq!(trace.entries(), ["c:d1"], "moves on its own graph: no `m`");
    assert_eq!(completions(&v2, "d1").await, 1);
}

pub async fn a_removed_last_stage_fails_visibly_and_resumes_when_it_is_back<S: Store + Clone>(
    store: S,
) {
    let stages = ["a", "review", "c"];
    let edges = [("a", "review"), ("review", "c")];
    park_at_review(&store, &stages, &edges, &["d1"]).await;
    let v2 = engine(
        pipeline(&["a", "review"], &[("a", "review")], &Trace::default()),
        store.clone(),
    );
    assert_eq!(
        v2.drift().await.unwrap().in_flight[0]
            .changes
            .removed_stages,
        ["c"]
    );
    approve_all(&v2, "review", &["d1"]).await;
    v2.run_until_idle().await.unwrap();
    let status = v2.status("d1").await.unwrap();
    assert_eq!(status.state, ItemState::Failed, "{status}");
    let error = status.stages[2].last_error.clone().unwrap();
    assert_eq!(
        error,
        treadle::Error::StageNotInBuild {
            stage: "c".into(),
            version: 1
        }
        .to_string()
    );
    assert!(error.contains("`c` of pipeline version 1"), "{error}");

    // A build that has the stage again (the same definition: version 1 again).
    let trace = Trace::default();
    let back = engine(pipeline(&stages, &edges, &trace), store);
    assert_eq!(back.drift().await.unwrap().version, 1);
    back.retry("d1", "c").await.unwrap();
    back.run_until_idle().await.unwrap();
    assert_eq!(back.status("d1").await.unwrap().state, ItemState::Completed);
    assert_eq!(trace.entries(), ["c:d1"]);
    assert_eq!(completions(&back, "d1").await, 1);
}

pub async fn reordered_stages_keep_the_old_order_for_old_items<S: Store + Clone>(store: S) {
    let v1 = [("a", "review"), ("review", "c"), ("c", "d")];
    park_at_review(&store, &["a", "review", "c", "d"], &v1, &["d1"]).await;
    let trace = Trace::default();
    let v2 = engine(
        pipeline(
            &["a", "review", "d", "c"],
            &[("a", "review"), ("review", "d"), ("d", "c")],
            &trace,
        ),
        store,
    );
    let drift = v2.drift().await.unwrap();
    assert_eq!(drift.in_flight[0].changes.added_edges.len(), 2);
    assert_eq!(drift.in_flight[0].changes.removed_edges.len(), 2);
    approve_all(&v2, "review", &["d1"]).await;
    v2.run_until_idle().await.unwrap();
    assert_eq!(v2.status("d1").await.unwrap().state, ItemState::Completed);
    assert_eq!(trace.entries(), ["c:d1", "d:d1"]);
    assert_eq!(completions(&v2, "d1").await, 1);
}

pub async fn a_removed_review_stage_can_still_be_decided<S: Store + Clone>(store: S) {
    let v1 = [("a", "review"), ("review", "c")];
    park_at_review(&store, &["a", "review", "c"], &v1, &["d1"]).await;
    let trace = Trace::default();
    let v2 = engine(pipeline(&["a", "c"], &[("a", "c")], &trace), store);
    assert_eq!(
        v2.drift().await.unwrap().in_flight[0]
            .changes
            .removed_stages,
        ["review"]
    );
    let waiting = v2.awaiting_review().await.unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(
        (waiting[0].stage.as_str(), waiting[0].version),
        ("review", 1)
    );
    approve_all(&v2, "review", &["d1"]).await;
    v2.run_until_idle().await.unwrap();
    assert_eq!(v2.status("d1").await.unwrap().state, ItemState::Completed);
    assert_eq!(trace.entries(), ["c:d1"]);
    assert_eq!(completions(&v2, "d1").await, 1);
}

pub async fn a_renamed_review_stage_is_decided_by_its_old_name_or_migrated<S: Store + Clone>(
    store: S,
) {
    let v1 = [("a", "review"), ("review", "c")];
    park_at_review(&store, &["a", "review", "c"], &v1, &["old", "moved"]).await;
    let trace = Trace::default();
    let v2 = engine(
        pipeline(
            &["a", "check", "c"],
            &[("a", "check"), ("check", "c")],
            &trace,
        ),
        store,
    );
    let drift = v2.drift().await.unwrap();
    assert_eq!(drift.in_flight[0].changes.added_stages, ["check"]);
    assert_eq!(drift.in_flight[0].changes.removed_stages, ["review"]);
    // Migrating drops the old review with its stage and asks again under
    // the new name; the item left on version 1 keeps its review.
    assert_eq!(
        v2.migrate("moved").await.unwrap(),
        treadle::store::MigrateOutcome::Moved
    );
    v2.run_until_idle().await.unwrap();
    let mut asked: Vec<(String, String, u32)> = v2
        .awaiting_review()
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.item_id, w.stage, w.version))
        .collect();
    asked.sort();
    assert_eq!(
        asked,
        [
            ("moved".to_owned(), "check".to_owned(), 2),
            ("old".to_owned(), "review".to_owned(), 1)
        ]
    );
    approve_all(&v2, "check", &["moved"]).await;
    approve_all(&v2, "review", &["old"]).await;
    v2.run_until_idle().await.unwrap();
    for id in ["old", "moved"] {
        let status = v2.status(id).await.unwrap();
        assert_eq!(status.state, ItemState::Completed, "{status}");
        assert_eq!(completions(&v2, id).await, 1);
    }
    let mut ran = trace.entries();
    ran.sort();
    assert_eq!(ran, ["c:moved", "c:old", "check:moved"]);
}
