//! Crash recovery with real processes: a worker on a SQLite file is killed
//! with SIGKILL at random moments and restarted, and afterwards nothing it
//! reported committed is missing, every item finished, and the log agrees
//! with the stage states. Two workers sharing one file execute each unit
//! once.

mod chaos;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use treadle::store::{SqliteStore, Store};
use treadle::{EventKind, StageState};

use crate::chaos::{start_worker, whole_log};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_at_random_points_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let path = db.to_str().unwrap();
    chaos::killing_a_worker_at_random_points_loses_nothing(&["--db", path], async || {
        SqliteStore::open(&db).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_one_database_run_each_unit_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let items = 2_000;
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Create the schema first so both workers open an existing database.
    drop(SqliteStore::open(&db).await.unwrap());
    let path = ["--db", db.to_str().unwrap()];
    let (mut a, ra) = start_worker(
        &path,
        items,
        &["--worker-id", "a", "--stage-ms", "0"],
        &seen,
    );
    let (mut b, rb) = start_worker(
        &path,
        items,
        &["--worker-id", "b", "--stage-ms", "0"],
        &seen,
    );
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    ra.join().unwrap();
    rb.join().unwrap();

    let store = SqliteStore::open(&db).await.unwrap();
    let log = whole_log(&store).await;
    let mut owners: BTreeMap<String, u32> = BTreeMap::new();
    let mut starts: BTreeMap<(String, String, Option<String>), u32> = BTreeMap::new();
    for event in &log {
        assert!(
            !matches!(event.kind, EventKind::Recovered { .. }),
            "no lease expired: {event:?}"
        );
        if let EventKind::Started { owner, attempt } = &event.kind {
            assert_eq!(*attempt, 1);
            *owners.entry(owner.to_string()).or_default() += 1;
            *starts
                .entry((
                    event.item_id.clone(),
                    event.stage.clone().unwrap(),
                    event.subtask.clone(),
                ))
                .or_default() += 1;
        }
    }
    // 3 stages + 4 subtasks per item, each started exactly once.
    assert_eq!(starts.len(), items * 7);
    assert!(
        starts.values().all(|&n| n == 1),
        "a unit was executed twice"
    );
    assert_eq!(owners.len(), 2, "both workers took work: {owners:?}");
    let completed = store
        .items_in("store", StageState::Completed)
        .await
        .unwrap();
    assert_eq!(completed.len(), items);
}
