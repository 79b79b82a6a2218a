//! The SQLite store: the shared store suite on a database file, plus what
//! only a database can show (reopening, schema versions, corruption,
//! atomicity, group commit, lease recovery), and a differential run that
//! drives the memory store and the SQLite store through the same script and
//! requires identical results.

mod differential;
mod store_suite;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use serde_json::json;
use tempfile::TempDir;
use treadle::store::{ClaimRequest, EventQuery, NewItem, Store, Transition};
use treadle::{
    AttemptResult, Decision, Error, EventKind, MemoryStore, Pipeline, PipelineDef, ReviewRequest,
    SqliteStore, StageOutcome, StageState,
};

use crate::differential::*;
use crate::support::*;

store_suite!(async {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("treadle.db"))
        .await
        .unwrap();
    (store, dir)
});

// ---- helpers ----

fn db(dir: &TempDir) -> PathBuf {
    dir.path().join("treadle.db")
}

/// `store`, with [`definition`] registered as pipeline version 1.
async fn registered(store: SqliteStore) -> SqliteStore {
    let drift = store.register_pipeline(&definition()).await.unwrap();
    assert_eq!(drift.version, 1);
    store
}

fn exec(path: &Path, sql: &str) {
    Connection::open(path).unwrap().execute_batch(sql).unwrap();
}

fn corrupt_location(error: Error) -> String {
    match error {
        Error::Corrupt { location, detail } => {
            assert!(!detail.is_empty());
            location
        }
        other => panic!("expected Error::Corrupt, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_store_behaves_exactly_like_the_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    let expected = script(&MemoryStore::new()).await;
    let actual = script(&sqlite).await;
    assert!(expected.len() > 40, "the script ran to its end");
    for (i, (want, got)) in expected.iter().zip(&actual).enumerate() {
        assert_eq!(got, want, "step {i} differs");
    }
    assert_eq!(actual.len(), expected.len());
    assert_gapless(&all_events(&sqlite).await);
}

// ---- durability and reopening ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_closing_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = || {
        Pipeline::builder()
            .stage(stage("scan", |doc, _| async move {
                StageOutcome::complete_with(doc.pages)
            }))
            .stage(stage("review", |_, _| async {
                Ok(StageOutcome::needs_review(
                    ReviewRequest::new("looks right?")
                        .proposed_output(json!("proposal"))
                        .unwrap(),
                ))
            }))
            .stage(done("export"))
            .edge("scan", "review")
            .edge("review", "export")
            .build()
            .unwrap()
    };
    let (status, events) = {
        let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
        let engine = engine(pipeline(), store);
        engine.submit_all([doc("d1"), doc("d2")]).await.unwrap();
        engine.run_until_idle().await.unwrap();
        let status = engine.status("d1").await.unwrap();
        assert_eq!(status.stages[1].state, StageState::AwaitingReview);
        let events = engine.events(EventQuery::default()).await.unwrap();
        (status, events)
    };
    // Everything above was dropped: the writer thread has closed the file.
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    assert_eq!(store.status("d1").await.unwrap(), status);
    assert_eq!(all_events(&store).await, events);
    assert_eq!(store.awaiting_review().await.unwrap().len(), 2);
    assert_eq!(
        store.pipeline_definition().await.unwrap().as_ref(),
        Some(pipeline().definition())
    );
    // A new process resumes from the stored payloads and decisions.
    let engine = engine(pipeline(), store);
    assert!(engine.drift().await.unwrap().is_empty());
    engine
        .approve("d1", "review", Decision::by("ann"))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d1").await.unwrap();
    assert_eq!(status.state, treadle::ItemState::Completed, "{status}");
    assert_eq!(status.stages[1].output, Some(json!("proposal")));
    assert_eq!(status.stages[0].output, Some(json!(3)));
}

#[tokio::test]
async fn register_pipeline_reports_drift_and_keeps_rows_of_removed_stages() {
    let dir = tempfile::tempdir().unwrap();
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    assert!(
        store
            .register_pipeline(&definition())
            .await
            .unwrap()
            .is_empty()
    );
    store.submit(vec![item("a", t(0))]).await.unwrap();
    let smaller = PipelineDef {
        stages: vec!["scan".into(), "split".into(), "archive".into()],
        edges: vec![
            ("scan".into(), "split".into()),
            ("split".into(), "archive".into()),
        ],
    };
    drop(store);
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    let drift = store.register_pipeline(&smaller).await.unwrap();
    assert_eq!(drift.version, 2);
    assert_eq!(drift.changes.added_stages, ["archive"]);
    assert_eq!(drift.changes.removed_stages, ["review", "export"]);
    assert_eq!(
        drift.changes.removed_edges,
        [
            ("split".to_owned(), "review".to_owned()),
            ("review".to_owned(), "export".to_owned())
        ]
    );
    assert_eq!(drift.in_flight.len(), 1, "item a still moves on version 1");
    assert_eq!(
        (drift.in_flight[0].version, drift.in_flight[0].items),
        (1, 1)
    );
    assert_eq!(drift.in_flight[0].changes, drift.changes);
    let status = store.status("a").await.unwrap();
    let names: Vec<_> = status.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["scan", "split", "review", "export"],
        "no row dropped"
    );
    assert_eq!(store.pipeline_definition().await.unwrap(), Some(smaller));
}

// ---- schema versions and foreign files ----

#[tokio::test]
async fn a_database_from_a_newer_schema_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    drop(registered(SqliteStore::open(db(&dir)).await.unwrap()).await);
    let newer = SqliteStore::SCHEMA_VERSION + 1;
    exec(&db(&dir), &format!("PRAGMA user_version = {newer};"));
    let error = SqliteStore::open(db(&dir)).await.unwrap_err();
    let message = error.to_string();
    match error {
        Error::SchemaTooNew { found, supported } => {
            assert_eq!((found, supported), (newer, SqliteStore::SCHEMA_VERSION));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    let supported = format!("supports up to {}", SqliteStore::SCHEMA_VERSION);
    assert!(message.contains(&newer.to_string()) && message.contains(&supported));
}

#[tokio::test]
async fn another_applications_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    exec(
        &path,
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);
         INSERT INTO customers (name) VALUES ('ann');",
    );
    let before = std::fs::read(&path).unwrap();
    match SqliteStore::open(&path).await.unwrap_err() {
        Error::NotATreadleDatabase { location } => assert_eq!(location, path.display().to_string()),
        other => panic!("expected NotATreadleDatabase, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was not modified"
    );
    assert!(
        !dir.path().join("other.db-wal").exists(),
        "not switched to WAL"
    );
}

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "these are notes, not a database\n".repeat(200)).unwrap();
    let error = SqliteStore::open(&path).await.unwrap_err();
    assert!(error.to_string().contains("notes.txt"), "{error}");
    assert!(
        matches!(&error, Error::NotATreadleDatabase { location } if *location == path.display().to_string())
    );
}

#[tokio::test]
async fn a_missing_directory_is_named_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("pipeline.db");
    let error = SqliteStore::open(&path).await.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(
            error,
            Error::Store {
                backend: "SQLite",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains("no-such-dir` does not exist"),
        "the cause, not just `SQLite error`: {message}"
    );
}

#[tokio::test]
async fn a_read_only_file_is_refused_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    drop(registered(SqliteStore::open(db(&dir)).await.unwrap()).await);
    // Root writes through file modes, so make the file immutable there.
    let as_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let lock = |on: bool| {
        let ok = if as_root {
            std::process::Command::new("chattr")
                .arg(if on { "+i" } else { "-i" })
                .arg(db(&dir))
                .status()
                .unwrap()
                .success()
        } else {
            let mut mode = std::fs::metadata(db(&dir)).unwrap().permissions();
            mode.set_readonly(on);
            std::fs::set_permissions(db(&dir), mode).is_ok()
        };
        assert!(ok, "could not change the file's write protection");
    };
    // Leave no WAL beside it, so opening must write the file itself.
    for extra in ["treadle.db-wal", "treadle.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(extra));
    }
    lock(true);
    let opened = SqliteStore::open(db(&dir)).await;
    lock(false);
    let error = opened.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(
            error,
            Error::Store {
                backend: "SQLite",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        message.contains("readonly"),
        "the cause is shown: {message}"
    );
}

#[tokio::test]
async fn a_database_stamped_at_an_older_version_is_migrated_on_open() {
    // Version 0 of our own schema: the application id, no tables yet (as
    // left by a process that died while creating the database).
    let dir = tempfile::tempdir().unwrap();
    exec(
        &db(&dir),
        "PRAGMA application_id = 1414677580; PRAGMA user_version = 0;",
    );
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    store.submit(vec![item("a", t(0))]).await.unwrap();
    drop(store);
    let conn = Connection::open(db(&dir)).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SqliteStore::SCHEMA_VERSION);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

// ---- retention ----

/// `(page_count, freelist_count)` of the database, read beside the store.
fn pages(path: &Path) -> (i64, i64) {
    let conn = Connection::open(path).unwrap();
    let count = |pragma: &str| conn.pragma_query_value(None, pragma, |r| r.get(0)).unwrap();
    (count("page_count"), count("freelist_count"))
}

#[tokio::test]
async fn a_pruned_database_reuses_its_pages_and_stops_growing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(db(&dir)).await.unwrap();
    let mode: i64 = Connection::open(db(&dir))
        .unwrap()
        .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, 2, "a new database uses incremental vacuum");
    let pipeline = Pipeline::builder()
        .stage(done("a"))
        .stage(done("b"))
        .edge("a", "b")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    let mut peaks = Vec::new();
    for round in 0..4 {
        let ids: Vec<String> = (0..300)
            .map(|i| format!("round-{round}-item-{i:04}-{}", "x".repeat(200)))
            .collect();
        engine
            .submit_all(ids.iter().map(|id| doc(id)))
            .await
            .unwrap();
        engine.run_until_idle().await.unwrap();
        peaks.push(pages(&db(&dir)).0);
        let pruned = engine.prune(Duration::ZERO).await.unwrap();
        assert_eq!(pruned.items, 300);
        let (_, free) = pages(&db(&dir));
        assert_eq!(
            free, 0,
            "round {round}: the freed pages went back to the file system"
        );
    }
    // Each round writes as much as the one before; the pages of the pruned
    // rounds are used again instead of new ones.
    assert!(
        peaks[3] <= peaks[0] + peaks[0] / 10,
        "the database kept growing: {peaks:?}"
    );
}

// ---- strict decoding ----

#[tokio::test]
async fn corrupt_rows_are_errors_naming_table_key_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    store
        .submit(vec![item("doc-1", t(0)), item("doc-2", t(0))])
        .await
        .unwrap();
    let batch = store.claim(request(t(1))).await.unwrap();
    let scan = batch
        .claims
        .iter()
        .find(|c| &*c.task.item_id == "doc-2")
        .unwrap();
    store
        .commit(commit(
            scan.task.clone(),
            scan.generation,
            1,
            t(1),
            complete(json!({"pages": 3})),
        ))
        .await
        .unwrap();
    drop(store);

    exec(
        &db(&dir),
        "UPDATE stages SET state = 'runing' WHERE item_id = 'doc-1' AND stage = 'scan';
         UPDATE stages SET output = '{\"pages\": 3' WHERE item_id = 'doc-2' AND stage = 'scan';
         UPDATE events SET kind = '{\"type\":\"exploded\"}' WHERE seq = 2;",
    );
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    let error = store.status("doc-1").await.unwrap_err();
    assert!(error.to_string().contains("runing"), "{error}");
    assert_eq!(
        corrupt_location(error),
        "stages(item=doc-1, stage=scan).state"
    );
    assert_eq!(
        corrupt_location(store.status("doc-2").await.unwrap_err()),
        "stages(item=doc-2, stage=scan).output"
    );
    assert_eq!(
        corrupt_location(store.events(all_events_query()).await.unwrap_err()),
        "events(seq=2).kind"
    );
    assert_eq!(
        corrupt_location(
            store
                .items_in("scan", StageState::Running)
                .await
                .map(|_| ())
                .and(store.stage_counts().await.map(|_| ()))
                .unwrap_err()
        ),
        "stages(stage=scan).state"
    );
    // A missing row: an item whose stage rows are gone.
    store.submit(vec![item("doc-3", t(0))]).await.unwrap();
    exec(
        &db(&dir),
        "DELETE FROM stages WHERE item_id = 'doc-3'; DELETE FROM run_queue WHERE item_id = 'doc-3';",
    );
    assert_eq!(
        corrupt_location(store.status("doc-3").await.unwrap_err()),
        "items(id=doc-3).stages"
    );
    drop(store);

    // A payload that is not JSON does not fail the claim batch: the unit is
    // claimed with it, and the attempt (which decodes it) fails that unit
    // alone (see tests/poison_items.rs); the other units are claimed too.
    exec(
        &db(&dir),
        "UPDATE stages SET output = '{\"pages\": 3}' WHERE item_id = 'doc-2' AND stage = 'scan';
         UPDATE stages SET state = 'pending' WHERE item_id = 'doc-1' AND stage = 'scan';
         INSERT INTO run_queue (item_id, stage) VALUES ('doc-1', 'scan');
         UPDATE items SET payload = 'not json' WHERE id = 'doc-1';",
    );
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    let batch = store.claim(request(t(2))).await.unwrap();
    let poisoned = batch
        .claims
        .iter()
        .find(|c| &*c.task.item_id == "doc-1")
        .expect("the unit with the bad payload is claimed");
    assert_eq!(&*poisoned.payload, "not json", "handed over as stored");
    assert!(
        batch.claims.iter().any(|c| &*c.task.item_id == "doc-2"),
        "the other unit is claimed in the same batch"
    );
}

// ---- atomicity ----

#[tokio::test]
async fn a_transition_that_fails_midway_leaves_no_partial_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    store.submit(vec![item("a", t(0))]).await.unwrap();
    let claim = store.claim(request(t(1))).await.unwrap().claims.remove(0);
    let before = store.status("a").await.unwrap();
    let events_before = all_events(&store).await;

    // The completion writes the output, the attempt record and the stage
    // state, then fails when its `Completed` event is appended.
    exec(
        &db(&dir),
        "CREATE TRIGGER fail_completion BEFORE INSERT ON events
         WHEN json_extract(NEW.kind, '$.type') = 'completed'
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    );
    let finish = || {
        commit(
            claim.task.clone(),
            claim.generation,
            1,
            t(1),
            complete(json!("out")),
        )
    };
    let error = store.commit(finish()).await.unwrap_err();
    assert!(
        matches!(
            &error,
            Error::Store {
                backend: "SQLite",
                ..
            }
        ) && error.to_string().contains("injected failure"),
        "the message shows the database's own cause: {error}"
    );
    assert_eq!(store.status("a").await.unwrap(), before);
    assert_eq!(all_events(&store).await, events_before);

    // Without the fault the same commit goes through, and the log has no gap.
    exec(&db(&dir), "DROP TRIGGER fail_completion;");
    store.commit(finish()).await.unwrap();
    let events = all_events(&store).await;
    assert_eq!(events[events_before.len()].kind, EventKind::Completed);
    let after = store.status("a").await.unwrap();
    assert_eq!(after.stages[0].state, StageState::Completed);
    assert_eq!(after.stages[0].attempts.len(), 1);
    assert_gapless(&all_events(&store).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transitions_all_land_with_a_gapless_log() {
    const ITEMS: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    let mut feed = store.subscribe();
    let only = PipelineDef {
        stages: vec!["only".into()],
        edges: vec![],
    };
    let version = store.register_pipeline(&only).await.unwrap().version;
    let single = |id: String| NewItem {
        id,
        payload: json!(null).to_string(),
        version,
        at: t(0),
    };
    let submits: Vec<_> = (0..ITEMS)
        .map(|i| {
            let (store, item) = (store.clone(), single(format!("i{i:03}")));
            tokio::spawn(async move { store.submit(vec![item]).await })
        })
        .collect();
    for task in submits {
        assert_eq!(task.await.unwrap().unwrap(), 1);
    }
    let claims = store
        .claim(ClaimRequest {
            limit: ITEMS,
            ..request(t(1))
        })
        .await
        .unwrap()
        .claims;
    assert_eq!(claims.len(), ITEMS);
    // Each good commit races a stale one for the same unit: every stale
    // one must fail alone, inside the same group commits.
    let mut tasks = Vec::new();
    for claim in claims {
        for generation in [claim.generation + 7, claim.generation] {
            let store = store.clone();
            let c = commit(claim.task.clone(), generation, 1, t(2), complete(json!(1)));
            tasks.push(tokio::spawn(
                async move { (generation, store.commit(c).await) },
            ));
        }
    }
    let (mut ok, mut lost) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (_, Ok(())) => ok += 1,
            (_, Err(Error::LeaseLost { .. })) => lost += 1,
            (generation, Err(other)) => panic!("generation {generation}: {other:?}"),
        }
    }
    assert_eq!((ok, lost), (ITEMS, ITEMS));
    let events = all_events(&store).await;
    assert_gapless(&events);
    // submitted + started + completed + item completed, per item
    assert_eq!(events.len(), ITEMS * 4);
    let mut broadcast = Vec::new();
    while let Ok(event) = feed.try_recv() {
        broadcast.push(event);
    }
    assert_eq!(broadcast, events, "broadcast in log order, after commit");
    assert_eq!(
        store
            .items_in("only", StageState::Completed)
            .await
            .unwrap()
            .len(),
        ITEMS
    );
}

// ---- leases and crash recovery ----

#[tokio::test]
async fn expired_leases_are_recovered_but_fanned_out_stages_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    store
        .submit(vec![item("a", t(0)), item("b", t(0))])
        .await
        .unwrap();
    let short = |now, owner: &str| ClaimRequest {
        owner: owner.into(),
        limit: 16,
        lease: Duration::from_secs(5),
        now,
        crash_retries: RECOVER_AT_ONCE,
        lane: None,
    };
    let first = store.claim(short(t(1), "dead")).await.unwrap().claims;
    assert_eq!(first.len(), 2);
    // b fans out: its stage keeps running without a lease while its subtask runs.
    let b = first.iter().find(|c| &*c.task.item_id == "b").unwrap();
    store
        .commit(commit(
            b.task.clone(),
            b.generation,
            1,
            t(1),
            Transition::Complete { output: None },
        ))
        .await
        .unwrap();
    let split = store.claim(short(t(2), "dead")).await.unwrap().claims;
    store
        .commit(commit(
            split[0].task.clone(),
            split[0].generation,
            1,
            t(2),
            Transition::FanOut {
                subtasks: vec!["p1".into()],
            },
        ))
        .await
        .unwrap();
    let p1 = store.claim(short(t(2), "dead")).await.unwrap().claims;
    assert_eq!(p1[0].task, key("b", "split", Some("p1")));

    // Nothing is taken over before the leases run out.
    assert!(
        store
            .claim(short(t(3), "alive"))
            .await
            .unwrap()
            .claims
            .is_empty()
    );
    let logged = all_events(&store).await.len();
    let batch = store.claim(short(t(100), "alive")).await.unwrap();
    let claimed = all_events(&store).await.split_off(logged);
    let tasks: Vec<_> = batch.claims.iter().map(|c| c.task.clone()).collect();
    assert_eq!(
        tasks,
        [key("a", "scan", None), key("b", "split", Some("p1"))],
        "the fanned-out stage itself is never recovered"
    );
    let a = &batch.claims[0];
    assert_eq!((a.attempt, a.generation), (2, first[0].generation + 1));
    assert_eq!(
        claimed[0].kind,
        EventKind::Recovered {
            previous_owner: "dead".into(),
            attempt: 1
        }
    );
    assert!(matches!(
        claimed[1].kind,
        EventKind::Started { attempt: 2, .. }
    ));
    let history = &store.status("a").await.unwrap().stages[0].attempts;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].result, AttemptResult::Abandoned);
    // The dead worker's late write is fenced off.
    let late = store
        .commit(commit(
            first[0].task.clone(),
            first[0].generation,
            1,
            t(1),
            complete(json!(0)),
        ))
        .await
        .unwrap_err();
    assert!(matches!(late, Error::LeaseLost { .. }), "{late:?}");
}

#[tokio::test]
async fn renewed_leases_are_not_recovered_and_released_claims_are_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    store
        .submit(vec![item("a", t(0)), item("b", t(0))])
        .await
        .unwrap();
    let claims = store.claim(request(t(1))).await.unwrap().claims;
    let held: Vec<_> = claims
        .iter()
        .map(|c| (c.task.clone(), c.generation))
        .collect();
    assert!(store.renew(&held, t(200)).await.unwrap().is_empty());
    // Past the original lease (t31) but within the renewed one.
    assert!(
        store
            .claim(request(t(100)))
            .await
            .unwrap()
            .claims
            .is_empty()
    );
    assert_eq!(
        store.release_claims("someone-else", t(101)).await.unwrap(),
        0
    );
    assert_eq!(store.release_claims("w1", t(101)).await.unwrap(), 2);
    let retaken = store.claim(request(t(102))).await.unwrap().claims;
    assert_eq!(retaken.len(), 2);
    assert!(retaken.iter().all(|c| c.attempt == 2));
    let lost = store.renew(&held, t(300)).await.unwrap();
    assert_eq!(lost.len(), 2, "the old generations lost their claims");
}

#[tokio::test]
async fn an_in_memory_database_works_without_a_file() {
    let store = registered(SqliteStore::open_in_memory().await.unwrap()).await;
    let expected = script(&MemoryStore::new()).await;
    assert_eq!(script(&store).await, expected);
}

// ---- several processes on one file ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_on_one_file_never_claim_the_same_work() {
    const ITEMS: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    // Two stores, each with its own connections and writer thread, as two
    // processes would have.
    let first = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    let second = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    let items: Vec<_> = (0..ITEMS)
        .map(|i| item(&format!("i{i:03}"), t(0)))
        .collect();
    first.submit(items).await.unwrap();
    let worker = |store: SqliteStore, owner: &'static str| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = store
                    .claim(ClaimRequest {
                        owner: owner.into(),
                        limit: 7,
                        lease: Duration::from_secs(60),
                        now: t(1),
                        crash_retries: RECOVER_AT_ONCE,
                        lane: None,
                    })
                    .await
                    .unwrap();
                if batch.claims.is_empty() {
                    return mine;
                }
                mine.extend(batch.claims.into_iter().map(|c| c.task));
                // Let the other process in, as a worker busy running its claims would.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let (a, b) = (worker(first.clone(), "one"), worker(second.clone(), "two"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(!a.is_empty() && !b.is_empty(), "both processes got work");
    let mut all: Vec<_> = a.into_iter().chain(b).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), ITEMS, "every scan claimed exactly once");
    // Each store reads what the other committed, with one gapless log.
    let events = all_events(&second).await;
    assert_eq!(events.len(), ITEMS * 2);
    assert_gapless(&events);
    assert_eq!(
        first
            .items_in("scan", StageState::Running)
            .await
            .unwrap()
            .len(),
        ITEMS
    );
}

/// The writer keeps the items it wrote last; a change another process
/// commits to one of them is seen by the next transition, not overwritten.
#[tokio::test]
async fn a_change_committed_by_another_process_is_seen_by_the_next_transition() {
    let dir = tempfile::tempdir().unwrap();
    let worker = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    let operator = registered(SqliteStore::open(db(&dir)).await.unwrap()).await;
    worker.submit(vec![item("x", t(0))]).await.unwrap();
    let claim = worker.claim(request(t(1))).await.unwrap().claims.remove(0);
    let scan = commit(claim.task, claim.generation, 1, t(1), complete(json!(1)));
    worker.commit(scan).await.unwrap();
    // `split` is runnable now, and the worker just wrote the item.
    operator.cancel("x", t(2)).await.unwrap();
    let batch = worker.claim(request(t(3))).await.unwrap();
    assert!(
        batch.claims.is_empty(),
        "claimed a cancelled item: {batch:?}"
    );
    let status = worker.status("x").await.unwrap();
    assert_eq!(status.state, treadle::ItemState::Cancelled);
    let kinds: Vec<String> = all_events(&operator)
        .await
        .iter()
        .map(|e| support::kind_name(&e.kind))
        .collect();
    assert_eq!(kinds.last().map(String::as_str), Some("item_cancelled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_engines_on_one_file_run_every_stage_once() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Trace::default();
    let pipeline = |runs: Trace| {
        let counted = |name: &'static str| {
            let runs = runs.clone();
            stage(name, move |doc, _| {
                let runs = runs.clone();
                async move {
                    runs.push(format!("{name}:{}", doc.id));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok(StageOutcome::complete())
                }
            })
        };
        Pipeline::builder()
            .stage(counted("scan"))
            .stage(counted("export"))
            .edge("scan", "export")
            .build()
            .unwrap()
    };
    // Distinct worker ids: a worker releases its own id's claims on start.
    let worker = |id: &str, store| {
        treadle::Engine::with_config(
            pipeline(runs.clone()),
            store,
            treadle::EngineConfig {
                max_concurrency: 8,
                lease: Duration::from_secs(30),
                worker_id: id.into(),
                idle_poll: Duration::from_millis(20),
                ..treadle::EngineConfig::default()
            },
        )
    };
    let one = worker(
        "one",
        registered(SqliteStore::open(db(&dir)).await.unwrap()).await,
    );
    let two = worker(
        "two",
        registered(SqliteStore::open(db(&dir)).await.unwrap()).await,
    );
    one.submit_all((0..60).map(|i| doc(&format!("d{i:02}"))))
        .await
        .unwrap();
    let (r1, r2) = tokio::join!(one.run_until_idle(), two.run_until_idle());
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    let mut entries = runs.entries();
    let total = entries.len();
    entries.sort();
    entries.dedup();
    assert_eq!(total, entries.len(), "a stage ran twice");
    for i in 0..60 {
        let status = one.status(&format!("d{i:02}")).await.unwrap();
        assert_eq!(status.state, treadle::ItemState::Completed, "{status}");
    }
    assert_eq!(total, 120, "{r1:?} {r2:?}");
}

// ---- a real crash: SIGKILL in the middle of the work ----

const CRASH_DB: &str = "TREADLE_SQLITE_CRASH_DB";

fn crash_pipeline() -> Pipeline<Doc> {
    let slow = |name: &str| {
        stage(name, |doc, ctx| async move {
            if ctx.stage() == "split" && ctx.subtask().is_none() {
                return Ok(StageOutcome::fan_out(["p1", "p2", "p3"]));
            }
            // One first attempt hangs, so the worker is surely killed mid-attempt.
            let hangs = doc.id == "c05" && ctx.stage() == "export" && ctx.attempt() == 1;
            let pause = if hangs { 60_000 } else { 5 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
            StageOutcome::complete_with(ctx.attempt())
        })
        .policy(treadle::StagePolicy::new().retries(5))
    };
    Pipeline::builder()
        .stage(slow("scan"))
        .stage(slow("split"))
        .stage(slow("export"))
        .edge("scan", "split")
        .edge("split", "export")
        .build()
        .unwrap()
}

/// Not a test on its own: the worker process that
/// `a_killed_worker_loses_nothing_it_committed` starts and kills. Without
/// the environment variable it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_worker() {
    let Ok(path) = std::env::var(CRASH_DB) else {
        return;
    };
    let store = SqliteStore::open(path).await.unwrap();
    let engine = treadle::Engine::with_config(
        crash_pipeline(),
        store,
        treadle::EngineConfig {
            max_concurrency: 8,
            lease: Duration::from_millis(300),
            worker_id: "doomed".into(),
            idle_poll: Duration::from_millis(5),
            ..treadle::EngineConfig::default()
        },
    );
    let mut feed = engine.subscribe();
    tokio::spawn(async move {
        use std::io::Write;
        while let Ok(event) = feed.recv().await {
            // Printed only after the event's transition committed.
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::to_string(&event).unwrap()).unwrap();
            out.flush().unwrap();
        }
    });
    engine
        .submit_all((0..40).map(|i| doc(&format!("c{i:02}"))))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_nothing_it_committed() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_worker",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DB, db(&dir))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        let (mut printed, mut seen_hang) = (Vec::new(), false);
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line.starts_with('{') {
                let event: treadle::Event = serde_json::from_str(&line).unwrap();
                let hung = event.item_id == "c05"
                    && event.stage.as_deref() == Some("export")
                    && matches!(event.kind, EventKind::Started { .. });
                printed.push(event);
                seen_hang |= hung;
                if printed.len() >= 150 && seen_hang {
                    break;
                }
            }
        }
        printed
    })
    .await
    .unwrap();
    child.kill().unwrap(); // SIGKILL: no destructor, no clean shutdown
    child.wait().unwrap();
    assert!(
        printed.len() >= 150,
        "the worker got far enough before it was killed"
    );

    let store = SqliteStore::open(db(&dir)).await.unwrap();
    let log = all_events(&store).await;
    assert_gapless(&log);
    for event in &printed {
        assert_eq!(
            log.get(event.seq as usize - 1),
            Some(event),
            "a committed event was lost"
        );
    }
    assert!(log.len() < 40 * 14, "killed before the end");
    // Units the dead worker was running: stages without subtasks, and subtasks.
    let mut interrupted = 0;
    for i in 0..40 {
        for stage in store.status(&format!("c{i:02}")).await.unwrap().stages {
            let running = |s: StageState| s == StageState::Running;
            interrupted += stage.subtasks.iter().filter(|s| running(s.state)).count();
            interrupted += usize::from(running(stage.state) && stage.subtasks.is_empty());
        }
    }
    assert!(interrupted > 0, "the worker was killed mid-attempt");

    // Another worker takes over once the dead one's leases run out.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rescuer = treadle::Engine::with_config(
        crash_pipeline(),
        store,
        treadle::EngineConfig {
            max_concurrency: 8,
            lease: Duration::from_secs(30),
            worker_id: "rescuer".into(),
            idle_poll: Duration::from_millis(5),
            ..treadle::EngineConfig::default()
        },
    );
    rescuer.run_until_idle().await.unwrap();
    for i in 0..40 {
        let status = rescuer.status(&format!("c{i:02}")).await.unwrap();
        assert_eq!(status.state, treadle::ItemState::Completed, "{status}");
    }
    let log = rescuer.events(EventQuery::default()).await.unwrap();
    assert_gapless(&log);
    let recovered = log
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::Recovered { previous_owner, .. } if treadle::LeaseOwner::parse(previous_owner).worker_id == "doomed"))
        .count();
    assert!(
        recovered >= interrupted,
        "{recovered} recovered, {interrupted} stages were running"
    );
}
