//! The SQLite store: the shared store suite on a database file, plus what
//! only a database can show (reopening, schema versions, corruption,
//! atomicity, group commit).

mod store_suite;
mod support;

store_suite!(async {
    let dir = tempfile::tempdir().unwrap();
    let store = treadle::SqliteStore::open(dir.path().join("treadle.db"))
        .await
        .unwrap();
    (store, dir)
});
