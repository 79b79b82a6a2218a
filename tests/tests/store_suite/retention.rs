//! Retention: pruning removes items that finished for good, with all their
//! rows and events, and nothing else, also while a worker is busy.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use treadle::store::{EventQuery, Pruned, Store};
use treadle::{
    Decision, Engine, EngineConfig, Error, Event, EventKind, ItemState, Pipeline, ReviewRequest,
    StageOutcome,
};

use crate::support::*;

/// `a -> b`: `a` fails for items named `fail-*`; `b` asks for a review for
/// items named `park-*`, and sleeps a moment for items named `slow-*`.
fn pipeline() -> Pipeline<Doc> {
    Pipeline::builder()
        .stage(stage("a", |doc, _| async move {
            Ok(if doc.id.starts_with("fail") {
                StageOutcome::failed("broken")
            } else {
                StageOutcome::complete()
            })
        }))
        .stage(stage("b", |doc, _| async move {
            if doc.id.starts_with("slow") {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(if doc.id.starts_with("park") {
                StageOutcome::needs_review(ReviewRequest::new("check it"))
            } else {
                StageOutcome::complete()
            })
        }))
        .edge("a", "b")
        .build()
        .unwrap()
}

/// The whole event log.
async fn log<S: Store>(store: &S) -> Vec<Event> {
    store.events(EventQuery::default()).await.unwrap()
}

/// Asserts that `id` is gone: unknown to `status`, without events.
async fn assert_gone<S: Store>(store: &S, id: &str) {
    assert!(
        matches!(store.status(id).await, Err(Error::UnknownItem(ref gone)) if gone == id),
        "`{id}` is still there"
    );
    let query = EventQuery {
        item_id: Some(id.to_owned()),
        ..EventQuery::default()
    };
    assert_eq!(
        store.events(query).await.unwrap(),
        Vec::new(),
        "events of `{id}`"
    );
}

pub async fn prune_removes_finished_items_with_their_events_and_nothing_else<S: Store + Clone>(
    store: S,
) {
    let engine = engine(pipeline(), store.clone());
    let ids = ["done-1", "done-2", "fail-1", "park-1", "park-2"];
    engine.submit_all(ids.map(doc)).await.unwrap();
    engine.run_until_idle().await.unwrap();
    engine.cancel("park-2").await.unwrap();
    assert_eq!(
        engine.status("fail-1").await.unwrap().state,
        ItemState::Failed,
        "`b` waits behind the failure"
    );
    let before = log(&store).await;
    let doomed = ["done-1", "done-2", "fail-1", "park-2"];
    let of = |ids: &[&str]| -> Vec<Event> {
        before
            .iter()
            .filter(|e| ids.contains(&e.item_id.as_str()))
            .cloned()
            .collect()
    };
    let live_before = engine.status("park-1").await.unwrap();

    let pruned = engine.prune(Duration::ZERO).await.unwrap();

    assert_eq!(
        pruned,
        Pruned {
            items: 4,
            events: of(&doomed).len() as u64,
            more: false
        }
    );
    for id in doomed {
        assert_gone(&store, id).await;
    }
    assert_eq!(
        log(&store).await,
        of(&["park-1"]),
        "only the live item's events remain"
    );
    assert_eq!(engine.status("park-1").await.unwrap(), live_before);
    let watermark = of(&doomed).iter().map(|e| e.seq).max().unwrap();
    assert_eq!(store.pruned_through().await.unwrap(), watermark);
    let counted: u64 = store
        .stage_counts()
        .await
        .unwrap()
        .iter()
        .map(|c| c.items)
        .sum();
    assert_eq!(
        counted, 2,
        "the two stage rows of `park-1` are all that is left"
    );
    assert_eq!(
        engine
            .items_in("a", treadle::StageState::Completed)
            .await
            .unwrap(),
        ["park-1"]
    );

    // The live item goes on, and the log never hands out a pruned number again.
    engine
        .approve("park-1", "b", Decision::by("ann"))
        .await
        .unwrap();
    assert_eq!(
        engine.status("park-1").await.unwrap().state,
        ItemState::Completed
    );
    let last_before = before.iter().map(|e| e.seq).max().unwrap();
    let newest = log(&store).await;
    assert!(
        newest.iter().rev().take(3).all(|e| e.seq > last_before),
        "{newest:?}"
    );
    assert_eq!(
        engine.prune(Duration::from_secs(3600)).await.unwrap(),
        Pruned::default(),
        "nothing finished an hour ago"
    );
}

pub async fn prune_keeps_what_finished_after_the_cutoff_and_works_in_batches<S: Store + Clone>(
    store: S,
) {
    let engine = engine(pipeline(), store.clone());
    engine
        .submit_all(["old-1", "old-2", "old-3", "old-4", "old-5"].map(doc))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    engine.submit(doc("new")).await.unwrap();
    engine.run_until_idle().await.unwrap();

    let first = store.prune(cutoff, 2).await.unwrap();
    assert_eq!((first.items, first.more), (2, true));
    assert_eq!(store.prune(cutoff, 0).await.unwrap(), Pruned::default());
    let rest = treadle::store::prune_all(&store, cutoff, 2).await.unwrap();
    assert_eq!((rest.items, rest.more), (3, false));
    for id in ["old-1", "old-2", "old-3", "old-4", "old-5"] {
        assert_gone(&store, id).await;
    }
    assert_eq!(
        engine.status("new").await.unwrap().state,
        ItemState::Completed,
        "finished after the cutoff: kept"
    );
}

pub async fn a_prune_beside_a_busy_worker_loses_nothing<S: Store + Clone>(store: S) {
    let engine = engine(pipeline(), store.clone());
    let old: Vec<String> = (0..60).map(|i| format!("old-{i:02}")).collect();
    engine
        .submit_all(old.iter().map(|id| doc(id)))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let cutoff = Utc::now();

    let mut feed = engine.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run(async { stopped.await.unwrap_or(()) }).await }
    });
    let live: Vec<String> = (0..60).map(|i| format!("slow-{i:02}")).collect();
    let pruner = tokio::spawn({
        let store = store.clone();
        async move {
            let mut total = Pruned::default();
            loop {
                let step = store.prune(cutoff, 3).await.unwrap();
                total = total.and(step);
                if !step.more {
                    return total;
                }
            }
        }
    });
    for chunk in live.chunks(10) {
        engine
            .submit_all(chunk.iter().map(|id| doc(id)))
            .await
            .unwrap();
    }
    let pruned = pruner.await.unwrap();
    assert_eq!(pruned.items, 60, "every old item went");

    // Every live item completes, and every event the feed showed for it is
    // still in the log, in order.
    let mut seen: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    let mut completed = 0;
    tokio::time::timeout(Duration::from_secs(20), async {
        while completed < live.len() {
            let event = feed.recv().await.unwrap();
            if event.kind == EventKind::ItemCompleted {
                completed += 1;
            }
            seen.entry(event.item_id.clone()).or_default().push(event);
        }
    })
    .await
    .expect("every live item completed");
    stop.send(()).unwrap();
    worker.await.unwrap().unwrap();
    for id in &live {
        assert_eq!(engine.status(id).await.unwrap().state, ItemState::Completed);
        assert_eq!(&events_of(&engine, id).await, &seen[id], "events of `{id}`");
    }
    for id in &old {
        assert_gone(&store, id).await;
    }
}

pub async fn a_worker_with_retention_prunes_by_itself<S: Store + Clone>(store: S) {
    let first = engine(pipeline(), store.clone());
    first
        .submit_all(["done-1", "done-2", "park-1"].map(doc))
        .await
        .unwrap();
    first.run_until_idle().await.unwrap();
    let config = EngineConfig {
        retention: Some(Duration::ZERO),
        ..first.config().clone()
    };
    let worker = Engine::with_config(pipeline(), store.clone(), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let worker = worker.clone();
        async move { worker.run(async { stopped.await.unwrap_or(()) }).await }
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while store.status("done-2").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the worker pruned by itself");
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert_gone(&store, "done-1").await;
    assert_gone(&store, "done-2").await;
    assert_eq!(
        worker.status("park-1").await.unwrap().state,
        ItemState::AwaitingReview,
        "an item in flight stays"
    );
}
