//! Poison-item isolation on a real SQLite file: a stored item that cannot
//! be decoded (corrupted with plain SQL) fails only its own item, with a
//! reason naming the table, key and column, in its status and event log,
//! while every other item runs to the end; nothing is deleted, and after
//! the row is repaired a retry completes it.

mod support;

use std::path::Path;

use support::{Doc, doc, done, engine, events_of};
use treadle::store::SqliteStore;
use treadle::{EventKind, ItemState, Pipeline, StageState};

fn pipeline() -> Pipeline<Doc> {
    Pipeline::builder()
        .stage(done("scan"))
        .stage(done("export"))
        .edge("scan", "export")
        .build()
        .unwrap()
}

fn set_payload(path: &Path, id: &str, payload: &str) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let changed = conn
        .execute(
            "UPDATE items SET payload = ?1 WHERE id = ?2",
            rusqlite::params![payload, id],
        )
        .unwrap();
    assert_eq!(changed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_payload_fails_its_item_alone_and_a_retry_after_repair_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("poison.db");
    let engine = engine(pipeline(), SqliteStore::open(&path).await.unwrap());
    let ids: Vec<String> = (0..100).map(|i| format!("doc-{i:03}")).collect();
    engine
        .submit_all(ids.iter().map(|id| doc(id)))
        .await
        .unwrap();
    set_payload(&path, "doc-042", r#"{"id": "doc-042", "pages": "#);
    set_payload(&path, "doc-077", r#"{"id": "doc-077"}"#);

    engine.run_until_idle().await.unwrap();
    for id in &ids {
        let status = engine.status(id).await.unwrap();
        let expected = match id.as_str() {
            "doc-042" | "doc-077" => ItemState::Failed,
            _ => ItemState::Completed,
        };
        assert_eq!(status.state, expected, "{status}");
    }
    for (id, detail) in [
        ("doc-042", "EOF while parsing"),
        ("doc-077", "missing field `pages`"),
    ] {
        let status = engine.status(id).await.unwrap();
        let scan = &status.stages[0];
        assert_eq!(scan.state, StageState::Failed);
        assert_eq!(
            status.stages[1].state,
            StageState::Pending,
            "nothing ran past it"
        );
        let reason = scan.last_error.clone().unwrap();
        assert!(
            reason.starts_with(&format!("corrupt stored value at items(id={id}).payload")),
            "{reason}"
        );
        assert!(reason.contains(detail), "{reason}");
        let logged = events_of(&engine, id)
            .await
            .into_iter()
            .any(|e| matches!(&e.kind, EventKind::Failed { reason: logged } if *logged == reason));
        assert!(logged, "the event log names the corrupt column");
    }

    // Nothing was deleted: repair the rows and retry.
    for id in ["doc-042", "doc-077"] {
        set_payload(&path, id, &serde_json::to_string(&doc(id)).unwrap());
        engine.retry(id, "scan").await.unwrap();
    }
    engine.run_until_idle().await.unwrap();
    for id in ["doc-042", "doc-077"] {
        let status = engine.status(id).await.unwrap();
        assert_eq!(status.state, ItemState::Completed, "{status}");
    }
}
