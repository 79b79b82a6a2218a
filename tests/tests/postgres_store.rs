//! The PostgreSQL store, against a real server: the shared store suite and
//! the differential run against the memory store, plus what only a shared
//! database can show (schema versions and foreign schemas, several stores
//! on one schema, fencing, live feeds across stores, killed connections).
//!
//! The server comes from `TREADLE_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test runs in a schema of
//! its own, dropped when the test ends; schemas left by killed runs are
//! swept at the start. When no server answers, the tests fail, saying how
//! to start one: they never skip.

#![cfg(feature = "postgres")]

mod chaos;
mod differential;
mod pg_proxy;
mod store_suite;
mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::OnceCell;
use treadle::store::{ClaimRequest, EventQuery, NewItem, Store, Transition};
use treadle::{
    Engine, EngineConfig, Error, EventKind, MemoryStore, Pipeline, PostgresOptions, PostgresStore,
    StageOutcome, StageState,
};

use crate::chaos::WORKER;
use crate::differential::*;
use crate::support::{Doc, done, stage};

/// The default server: the one the development machine and CI run.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Schemas of this suite start with this; older ones are swept.
const PREFIX: &str = "treadle_test_";

/// How old a leftover schema must be to be swept (a concurrent run's are younger).
const STALE_AFTER_SECS: u64 = 3600;

fn url() -> String {
    std::env::var("TREADLE_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A plain client to the test server; fails the test if none answers.
async fn client() -> tokio_postgres::Client {
    let url = url();
    let (client, connection) = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok(pair) => pair,
        Err(error) => panic!(
            "no PostgreSQL server answers at {url}: {error}.\n\
             These tests need one. Start the local server (`pg_ctlcluster 15 main start`, \
             or `service postgresql start`), or set TREADLE_PG_URL to a server's URL \
             (trust authentication, a database the user may create schemas in)."
        ),
    };
    tokio::spawn(connection);
    client
}

/// Drops the schemas earlier runs left behind, once per test binary.
async fn sweep() {
    static SWEPT: OnceCell<()> = OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let client = client().await;
            let rows = client
                .query(
                    "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1",
                    &[&format!("{PREFIX}%")],
                )
                .await
                .unwrap();
            let now = now_secs();
            for row in rows {
                let name: String = row.get(0);
                let born = name[PREFIX.len()..]
                    .split('_')
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                if now.saturating_sub(born) > STALE_AFTER_SECS {
                    drop_schema(&client, &name).await;
                }
            }
        })
        .await;
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn drop_schema(client: &tokio_postgres::Client, name: &str) {
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
        .await
        .unwrap();
}

/// A schema for one test, dropped when the guard is.
pub struct Schema {
    name: String,
}

impl Schema {
    /// A fresh, unused schema name (the schema itself is made by the store).
    async fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        sweep().await;
        Schema {
            name: format!(
                "{PREFIX}{}_{}_{}",
                now_secs(),
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    fn options(&self) -> PostgresOptions {
        PostgresOptions::new(url()).schema(&self.name)
    }

    async fn store(&self) -> PostgresStore {
        PostgresStore::open(self.options()).await.unwrap()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        // A runtime of its own: the test's runtime may be shutting down.
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async { drop_schema(&client().await, &name).await });
        })
        .join()
        .unwrap();
    }
}

store_suite!(async {
    let schema = Schema::new().await;
    (schema.store().await, schema)
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_behaves_exactly_like_the_memory_store() {
    let schema = Schema::new().await;
    let postgres = schema.store().await;
    let expected = script(&MemoryStore::new()).await;
    let actual = script(&postgres).await;
    assert!(expected.len() > 40, "the script ran to its end");
    for (i, (want, got)) in expected.iter().zip(&actual).enumerate() {
        assert_eq!(got, want, "step {i} differs");
    }
    assert_eq!(actual.len(), expected.len());
    assert_gapless(&all_events(&postgres).await);
}

// ---- schema versions and foreign schemas ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_from_a_newer_version_is_refused_naming_both_versions() {
    let schema = Schema::new().await;
    drop(schema.store().await);
    let sql = format!(
        "UPDATE {}.treadle_meta SET value = '99' WHERE key = 'schema_version'",
        schema.name
    );
    client().await.batch_execute(&sql).await.unwrap();
    match PostgresStore::open(schema.options()).await {
        Err(Error::SchemaTooNew { found, supported }) => {
            assert_eq!(found, 99);
            assert_eq!(supported, PostgresStore::SCHEMA_VERSION);
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_schema_is_refused_and_left_untouched() {
    let schema = Schema::new().await;
    let client = client().await;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {0}; CREATE TABLE {0}.accounts (id int); INSERT INTO {0}.accounts VALUES (7)",
            schema.name
        ))
        .await
        .unwrap();
    match PostgresStore::open(schema.options()).await {
        Err(Error::NotATreadleDatabase { location }) => {
            assert!(location.contains(&schema.name), "{location}");
            assert!(location.contains("accounts"), "{location}");
        }
        other => panic!("expected NotATreadleDatabase, got {other:?}"),
    }
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1",
            &[&schema.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1, "nothing was created in a foreign schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_opening_only_existing_schemas_never_creates_one() {
    let schema = Schema::new().await;
    match PostgresStore::open(schema.options().existing_only()).await {
        Err(Error::NotATreadleDatabase { location }) => {
            assert!(location.contains(&schema.name), "{location}");
        }
        other => panic!("expected NotATreadleDatabase, got {other:?}"),
    }
    let exists: bool = client()
        .await
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "the schema was not created");
    drop(schema.store().await);
    let store = PostgresStore::open(schema.options().existing_only())
        .await
        .unwrap();
    assert_eq!(store.pipeline_definition().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_typed_errors_naming_the_setting() {
    let error = PostgresStore::open(PostgresOptions::new(url()).schema("Robert'); DROP"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::PostgresConfig {
                setting: "schema",
                ..
            }
        ),
        "{error:?}"
    );
    let error = PostgresStore::connect("postgres://nobody@127.0.0.1:1/none")
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Store {
                backend: "PostgreSQL",
                ..
            }
        ),
        "{error:?}"
    );
    let error = PostgresStore::connect("not a url at all")
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::PostgresConfig { setting: "url", .. }),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_opening_one_new_schema_at_once_both_work() {
    let schema = Schema::new().await;
    let (a, b) = tokio::join!(
        PostgresStore::open(schema.options()),
        PostgresStore::open(schema.options())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    a.register_pipeline(&definition()).await.unwrap();
    a.submit(vec![item("x", t(0))]).await.unwrap();
    assert_eq!(b.status("x").await.unwrap().stages.len(), 4);
}

// ---- stored values ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_come_back_byte_exact_and_times_to_the_microsecond() {
    let schema = Schema::new().await;
    let store = schema.store().await;
    store.register_pipeline(&definition()).await.unwrap();
    let payload = "{ \"z\": 1.50,\n  \"a\": [\"é\", null] }";
    let at = chrono::DateTime::parse_from_rfc3339("2026-03-01T10:00:00.123456789Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let mut feed = store.subscribe();
    let new = store
        .submit(vec![NewItem {
            id: "exact".into(),
            payload: payload.to_owned(),
            version: 1,
            at,
        }])
        .await
        .unwrap();
    assert_eq!(new, 1);
    let sent = tokio::time::timeout(Duration::from_secs(10), feed.recv())
        .await
        .expect("the feed delivers the submission")
        .unwrap();
    let micros = at - chrono::TimeDelta::nanoseconds(789);
    assert_eq!(
        sent.at, micros,
        "times sent to the feed are truncated like stored ones"
    );
    assert_eq!(all_events(&store).await, vec![sent]);
    assert_eq!(store.status("exact").await.unwrap().submitted_at, micros);
    let batch = store.claim(request(t(1))).await.unwrap();
    assert_eq!(&*batch.claims[0].payload, payload);
}

// ---- several stores on one schema ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_never_claim_the_same_work_and_each_feed_sees_both() {
    let schema = Schema::new().await;
    let (a, b) = (schema.store().await, schema.store().await);
    a.register_pipeline(&definition()).await.unwrap();
    let mut feed_a = a.subscribe();
    let mut feed_b = b.subscribe();
    let items: Vec<NewItem> = (0..200).map(|i| item(&format!("i{i:03}"), t(0))).collect();
    a.submit(items).await.unwrap();
    let claim = |store: PostgresStore, owner: &'static str| async move {
        let mut claimed = Vec::new();
        loop {
            let batch = store
                .claim(ClaimRequest {
                    owner: owner.into(),
                    limit: 7,
                    lease: Duration::from_secs(30),
                    now: t(1),
                    crash_retries: RECOVER_AT_ONCE,
                    lane: None,
                })
                .await
                .unwrap();
            if batch.claims.is_empty() {
                return claimed;
            }
            claimed.extend(batch.claims.into_iter().map(|c| c.task.item_id));
        }
    };
    let (from_a, from_b) = tokio::join!(claim(a.clone(), "wa"), claim(b.clone(), "wb"));
    assert!(
        !from_a.is_empty() && !from_b.is_empty(),
        "both stores took work"
    );
    let mut all: Vec<String> = from_a
        .iter()
        .chain(&from_b)
        .map(|id| id.to_string())
        .collect();
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(before, all.len(), "no unit was claimed twice");
    assert_eq!(all.len(), 200, "every runnable unit was claimed");
    let log = all_events(&a).await;
    assert_gapless(&log);
    assert_eq!(log.len(), 400);
    for feed in [&mut feed_a, &mut feed_b] {
        let mut seen = Vec::new();
        while seen.len() < log.len() {
            let event = tokio::time::timeout(Duration::from_secs(10), feed.recv())
                .await
                .expect("the feed delivers every committed event")
                .unwrap();
            seen.push(event);
        }
        assert_eq!(
            seen, log,
            "each feed carries both stores' events in log order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_gets_every_event_committed_after_it_subscribed() {
    let schema = Schema::new().await;
    let (quiet, busy) = (schema.store().await, schema.store().await);
    busy.register_pipeline(&definition()).await.unwrap();
    // Committed while nobody listens to `quiet`'s feed: it passes them over.
    for i in 0..5 {
        busy.submit(vec![item(&format!("early{i}"), t(0))])
            .await
            .unwrap();
    }
    let mut feed = quiet.subscribe();
    for i in 0..5 {
        busy.submit(vec![item(&format!("late{i}"), t(1))])
            .await
            .unwrap();
    }
    let late: Vec<treadle::Event> = all_events(&busy)
        .await
        .into_iter()
        .filter(|e| e.item_id.starts_with("late"))
        .collect();
    assert_eq!(late.len(), 5);
    // Everything committed after subscribing arrives, in log order; what
    // arrives first may include earlier events, never a gap.
    let mut seen: Vec<treadle::Event> = Vec::new();
    while seen.last() != late.last() {
        let event = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("the feed delivers what commits after subscribing")
            .unwrap();
        if let Some(previous) = seen.last() {
            assert_eq!(event.seq, previous.seq + 1, "no gap in the feed");
        }
        seen.push(event);
    }
    assert!(seen.ends_with(&late), "{seen:?}");
}

// ---- fencing ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_reclaimed_and_the_stale_writer_is_fenced_out() {
    let schema = Schema::new().await;
    let (a, b) = (schema.store().await, schema.store().await);
    a.register_pipeline(&definition()).await.unwrap();
    a.submit(vec![item("x", t(0))]).await.unwrap();
    let first = a.claim(request(t(1))).await.unwrap().claims.remove(0);
    // The lease is 30 s: at t(40) it has expired and another worker takes it.
    let mut late = request(t(40));
    late.owner = "w2".into();
    let second = b.claim(late).await.unwrap();
    assert_eq!(second.claims.len(), 1);
    assert_eq!(second.claims[0].generation, first.generation + 1);
    // The claim logged the recovery, then the new start.
    let log = all_events(&b).await;
    assert!(matches!(
        log[log.len() - 2].kind,
        EventKind::Recovered { ref previous_owner, attempt: 1 } if previous_owner == "w1"
    ));
    let before = a.status("x").await.unwrap();
    let stale = a
        .commit(commit(
            first.task.clone(),
            first.generation,
            1,
            t(41),
            complete(json!(1)),
        ))
        .await
        .unwrap_err();
    assert!(matches!(stale, Error::LeaseLost { .. }), "{stale:?}");
    assert_eq!(
        a.status("x").await.unwrap(),
        before,
        "the fenced-out write changed nothing"
    );
    b.commit(commit(
        second.claims[0].task.clone(),
        second.claims[0].generation,
        2,
        t(42),
        complete(json!(2)),
    ))
    .await
    .unwrap();
    let log = all_events(&a).await;
    assert_eq!(log.last().unwrap().kind, EventKind::Completed);
    assert_eq!(
        a.status("x").await.unwrap().stages[0].state,
        StageState::Completed
    );
}

// ---- lost connections ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_replaced_and_the_feed_catches_up() {
    let schema = Schema::new().await;
    let store = PostgresStore::open(schema.options().application_name(&schema.name))
        .await
        .unwrap();
    store.register_pipeline(&definition()).await.unwrap();
    let mut feed = store.subscribe();
    store.submit(vec![item("a", t(0))]).await.unwrap();
    let admin = client().await;
    // The feed listens on a connection of its own, made in the background:
    // wait for it, so both kinds of connection are killed.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let listening: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = $1 AND query LIKE 'LISTEN %'",
                    &[&schema.name],
                )
                .await
                .unwrap()
                .get(0);
            if listening > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the feed's listening connection appears");
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&schema.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        killed >= 2,
        "the pool and the listener had connections ({killed})"
    );
    // Another store commits while this one's listener is down.
    let other = schema.store().await;
    other.submit(vec![item("b", t(1))]).await.unwrap();
    store.submit(vec![item("c", t(2))]).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("the feed catches up after reconnecting")
            .unwrap();
        seen.push(event.item_id);
    }
    assert_eq!(seen, ["a", "b", "c"]);
    assert_gapless(&store.events(EventQuery::default()).await.unwrap());
}

/// Parks item `x` at review, then approves it through a proxy that cuts
/// the connection around the decision's `COMMIT` as `cut` says; checks the
/// decision was recorded once and answered as committed.
async fn decide_across_a_cut(cut: pg_proxy::Cut) {
    let schema = Schema::new().await;
    let proxy = pg_proxy::Proxy::start(&url());
    let options = PostgresOptions::new(proxy.url()).schema(&schema.name);
    let store = PostgresStore::open(options).await.unwrap();
    park_x_for_review(&store, treadle::ReviewRequest::new("check")).await;
    proxy.arm(cut);
    let decided = store
        .decide(treadle::store::DecisionCommit {
            item_id: "x".into(),
            stage: "scan".into(),
            verdict: treadle::store::Verdict::Approve,
            decision: treadle::Decision::by("alice").for_round(1),
            at: t(3),
        })
        .await;
    assert_eq!(proxy.cuts(), 1, "the connection was cut at the COMMIT");
    // Answered as committed: not an error, and not replayed into
    // NotAwaitingReview by a decision that had in fact been recorded.
    let events = decided.expect("the decision is answered as committed");
    let log = all_events(&schema.store().await).await;
    assert_gapless(&log);
    let decisions: Vec<_> = log
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ReviewDecided { .. }))
        .collect();
    assert_eq!(decisions.len(), 1, "decided exactly once");
    assert_eq!(&events[0], decisions[0], "the answer is the logged event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_resolved_as_committed() {
    decide_across_a_cut(pg_proxy::Cut::AfterCommit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_the_server_never_got_is_resolved_as_not_committed_and_replayed() {
    decide_across_a_cut(pg_proxy::Cut::BeforeCommit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_for_an_unknown_item_fails_alone_in_its_batch() {
    let schema = Schema::new().await;
    let store = schema.store().await;
    store.register_pipeline(&definition()).await.unwrap();
    store.submit(vec![item("a", t(0))]).await.unwrap();
    let claimed = store.claim(request(t(1))).await.unwrap().claims.remove(0);
    let (good, bad) = tokio::join!(
        store.commit(commit(
            claimed.task.clone(),
            claimed.generation,
            1,
            t(2),
            complete(json!(1))
        )),
        store.commit(commit(
            key("nope", "scan", None),
            1,
            1,
            t(2),
            Transition::Skip { reason: "x".into() }
        )),
    );
    good.unwrap();
    assert!(matches!(bad, Err(Error::UnknownItem(ref id)) if id == "nope"));
    let log = all_events(&store).await;
    assert_eq!(log.last().unwrap().kind, EventKind::Completed);
    assert_gapless(&log);
}

// ---- waking on other processes' commits ----

/// `scan -> split -> review -> export`, with `scan` given.
fn four_stages(scan: support::FnStage) -> Pipeline<Doc> {
    Pipeline::builder()
        .stage(scan)
        .stage(done("split"))
        .stage(done("review"))
        .stage(done("export"))
        .edge("scan", "split")
        .edge("split", "review")
        .edge("review", "export")
        .build()
        .unwrap()
}

/// An engine configuration whose idle poll is far longer than the tests
/// wait: only the feed can wake it.
fn woken_only(worker_id: &str) -> EngineConfig {
    EngineConfig {
        max_concurrency: 4,
        lease: Duration::from_secs(30),
        worker_id: worker_id.into(),
        idle_poll: Duration::from_secs(600),
        ..EngineConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_engine_wakes_on_a_commit_made_through_another_store() {
    let schema = Schema::new().await;
    let (local, remote) = (schema.store().await, schema.store().await);
    let engine = Engine::with_config(four_stages(done("scan")), local, woken_only("sleeper"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(async move {
        engine
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    while remote.pipeline_definition().await.unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // the engine is idle now
    let mut feed = remote.subscribe();
    remote.submit(vec![item("remote", t(0))]).await.unwrap();
    let completed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = feed.recv().await.unwrap();
            if event.item_id == "remote" && event.kind == EventKind::ItemCompleted {
                return;
            }
        }
    })
    .await;
    assert!(
        completed.is_ok(),
        "the idle engine ran the remote item without polling"
    );
    stop.send(()).unwrap();
    let report = runner.await.unwrap().unwrap();
    assert_eq!(report.attempts, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_engine_starts_work_committed_elsewhere_without_waiting_for_its_own() {
    let schema = Schema::new().await;
    let (local, remote) = (schema.store().await, schema.store().await);
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let held = release.clone();
    // `busy`'s first stage runs until the test lets it finish.
    let scan = stage("scan", move |doc, _| {
        let held = held.clone();
        async move {
            if doc.id == "busy" {
                held.notified().await;
            }
            Ok(StageOutcome::complete())
        }
    });
    let engine = Engine::with_config(four_stages(scan), local, woken_only("busy-worker"));
    let feed = engine.subscribe();
    // Waits for the first event `wanted` picks, from the moment it is called.
    let event = |wanted: fn(&treadle::Event) -> bool| {
        let mut feed = feed.resubscribe();
        async move { while !wanted(&feed.recv().await.unwrap()) {} }
    };
    let busy_started =
        event(|e| e.item_id == "busy" && matches!(e.kind, EventKind::Started { .. }));
    // Submitted through the other store, so that nothing in this process
    // has asked the engine to look for work: its first claim finds `busy`.
    remote.register_pipeline(&definition()).await.unwrap();
    remote.submit(vec![item("busy", t(0))]).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let ten_secs = Duration::from_secs(10);
    tokio::time::timeout(ten_secs, busy_started)
        .await
        .expect("the engine started the busy stage");
    let remote_done = event(|e| e.item_id == "remote" && e.kind == EventKind::ItemCompleted);
    remote.submit(vec![item("remote", t(0))]).await.unwrap();
    let ran = tokio::time::timeout(ten_secs, remote_done).await;
    let busy_done = event(|e| e.item_id == "busy" && e.kind == EventKind::ItemCompleted);
    release.notify_one();
    assert!(
        ran.is_ok(),
        "the engine ran the remote item while its own stage was still running"
    );
    tokio::time::timeout(ten_secs, busy_done)
        .await
        .expect("the busy item finishes once released");
    stop.send(()).unwrap();
    let report = runner.await.unwrap().unwrap();
    assert_eq!(report.attempts, 8);
}

// ---- several worker processes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_worker_processes_run_every_unit_exactly_once() {
    const ITEMS: usize = 2000;
    let schema = Schema::new().await;
    let store = schema.store().await;
    let definition = treadle::PipelineDef {
        stages: ["fetch", "enrich", "store"].map(String::from).to_vec(),
        edges: vec![
            ("fetch".into(), "enrich".into()),
            ("enrich".into(), "store".into()),
        ],
    };
    store.register_pipeline(&definition).await.unwrap();
    let items = (0..ITEMS)
        .map(|i| {
            let id = format!("job-{i:04}");
            NewItem {
                payload: json!({ "id": id }).to_string(),
                id,
                version: 1,
                at: t(0),
            }
        })
        .collect();
    store.submit(items).await.unwrap();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let args = [
                "--db".to_owned(),
                url(),
                "--schema".into(),
                schema.name.clone(),
                "--items".into(),
                "0".into(),
                "--worker-id".into(),
                format!("w{w}"),
                "--stage-ms".into(),
                "1".into(),
                "--concurrency".into(),
                "64".into(),
            ];
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(WORKER)
                    .args(args)
                    .stdout(std::process::Stdio::piped())
                    .output()
                    .unwrap()
            })
        })
        .collect();
    let mut feeds = Vec::new();
    for worker in workers {
        let output = worker.await.unwrap();
        assert!(output.status.success(), "a worker failed: {output:?}");
        let feed: Vec<treadle::Event> = String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        feeds.push(feed);
    }
    let log = all_events(&store).await;
    assert_gapless(&log);
    let mut completions = std::collections::HashMap::new();
    let mut starts = std::collections::HashMap::new();
    let mut owners = std::collections::BTreeSet::new();
    for event in &log {
        let unit = (
            event.item_id.clone(),
            event.stage.clone(),
            event.subtask.clone(),
        );
        match &event.kind {
            EventKind::Completed => *completions.entry(unit).or_insert(0) += 1,
            EventKind::Started { owner, .. } => {
                owners.insert(owner.clone());
                *starts.entry(unit).or_insert(0) += 1;
            }
            _ => {}
        }
    }
    // Per item: fetch, four subtasks, enrich itself (fan-in), store.
    assert_eq!(completions.len(), ITEMS * 7);
    assert!(
        completions.values().all(|&n| n == 1),
        "a unit completed twice"
    );
    assert_eq!(starts.len(), ITEMS * 7, "every unit started");
    assert!(starts.values().all(|&n| n == 1), "a unit was claimed twice");
    assert_eq!(owners.len(), 4, "every worker took work: {owners:?}");
    for feed in &feeds {
        let first = feed.first().expect("each worker's feed carried events").seq;
        let slice = &log[first as usize - 1..][..feed.len()];
        assert_eq!(
            feed.as_slice(),
            slice,
            "a worker's live feed is a gapless run of the log"
        );
    }
    // No worker processed anything before the first one subscribed, so the
    // earliest feed starts right after the submissions.
    let earliest = feeds.iter().map(|f| f[0].seq).min().unwrap();
    assert_eq!(
        earliest,
        ITEMS as u64 + 1,
        "a feed starts at the first processing event"
    );
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_past_its_lease_is_fenced_out_and_nothing_completes_twice() {
    use std::io::BufRead;
    let schema = Schema::new().await;
    let worker = |id: &str, items: &str, stage_ms: &str| {
        std::process::Command::new(WORKER)
            .args(["--db", &url(), "--schema", &schema.name, "--worker-id", id])
            .args([
                "--items",
                items,
                "--stage-ms",
                stage_ms,
                "--lease-ms",
                "400",
            ])
            .args(["--prefix", "slow"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // A claims the items' first stages, which take 1.5 s each.
    let mut stalled = worker("stalled", "3", "1500");
    let mut lines = std::io::BufReader::new(stalled.stdout.take().unwrap()).lines();
    let mut started = 0;
    while started < 3 {
        let line = tokio::task::block_in_place(|| lines.next())
            .unwrap()
            .unwrap();
        if line.contains("\"started\"") {
            started += 1;
        }
    }
    // Stop it between transactions (stopped inside one, it would hold its
    // row locks until the server's idle-in-transaction timeout).
    let admin = client().await;
    loop {
        signal(stalled.id(), "STOP");
        let open: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = 'stalled' AND state <> 'idle'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        signal(stalled.id(), "CONT");
        tokio::time::sleep(Duration::from_millis(7)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await; // past the 400 ms lease
    // B takes the work over once the leases expired, and finishes it all.
    let rescuer = worker("rescuer", "0", "5");
    let rescued = tokio::task::spawn_blocking(move || rescuer.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(rescued.status.success(), "{rescued:?}");
    signal(stalled.id(), "CONT");
    let stalled = tokio::task::spawn_blocking(move || {
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut stalled.stderr.take().unwrap(), &mut stderr).unwrap();
        (stalled.wait().unwrap(), stderr)
    })
    .await
    .unwrap();
    assert!(stalled.0.success(), "{}", stalled.1);
    let discarded: u64 = stalled
        .1
        .split("discarded: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the stalled worker reports its run: {}", stalled.1));
    assert!(
        discarded >= 3,
        "the stalled worker's results were refused ({discarded})"
    );
    let store = schema.store().await;
    let log = all_events(&store).await;
    assert_gapless(&log);
    let mut completions = std::collections::HashMap::new();
    for event in log.iter().filter(|e| e.kind == EventKind::Completed) {
        let unit = (
            event.item_id.clone(),
            event.stage.clone(),
            event.subtask.clone(),
        );
        *completions.entry(unit).or_insert(0) += 1;
    }
    assert_eq!(completions.len(), 3 * 7, "every unit completed");
    assert!(
        completions.values().all(|&n| n == 1),
        "a unit completed twice"
    );
    for i in 0..3 {
        let status = store.status(&format!("slow-{i:04}")).await.unwrap();
        let fetch = &status.stages[0];
        let results: Vec<_> = fetch.attempts.iter().map(|a| a.result).collect();
        assert_eq!(
            results,
            [
                treadle::AttemptResult::Abandoned,
                treadle::AttemptResult::Completed
            ],
            "the stalled attempt is recorded abandoned and its late result nowhere"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_stores_deciding_one_review_round_record_exactly_one_decision() {
    let schema = Schema::new().await;
    let store = schema.store().await;
    let review = treadle::ReviewRequest::new("check")
        .proposed_output(json!("proposed"))
        .unwrap();
    park_x_for_review(&store, review).await;
    let mut deciders = Vec::new();
    for i in 0..8 {
        // A store of its own each: its own connections, as a separate process has.
        let decider = schema.store().await;
        deciders.push(tokio::spawn(async move {
            let verdict = if i % 2 == 0 {
                treadle::store::Verdict::Approve
            } else {
                treadle::store::Verdict::Reject {
                    reason: format!("no, says {i}"),
                }
            };
            decider
                .decide(treadle::store::DecisionCommit {
                    item_id: "x".into(),
                    stage: "scan".into(),
                    verdict,
                    decision: treadle::Decision::by(format!("reviewer-{i}")).for_round(1),
                    at: t(3),
                })
                .await
        }));
    }
    let mut decided = 0;
    for decider in deciders {
        match decider.await.unwrap() {
            Ok(events) => {
                decided += 1;
                assert!(matches!(events[0].kind, EventKind::ReviewDecided { .. }));
            }
            Err(Error::NotAwaitingReview { .. }) => {}
            Err(other) => panic!("a losing decision gets NotAwaitingReview, not {other:?}"),
        }
    }
    assert_eq!(decided, 1, "exactly one decision won the round");
    let log = all_events(&store).await;
    let decisions = log
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ReviewDecided { .. }))
        .count();
    assert_eq!(decisions, 1);
    let rows: i64 = client()
        .await
        .query_one(
            &format!("SELECT count(*) FROM {}.review_decisions", schema.name),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "one decision row for the round");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_at_random_points_loses_nothing() {
    let schema = Schema::new().await;
    let url = url();
    let db = ["--db", url.as_str(), "--schema", schema.name.as_str()];
    chaos::killing_a_worker_at_random_points_loses_nothing(&db, async || schema.store().await)
        .await;
}

/// Registers the pipeline, submits item `x` and parks its first stage for
/// `review`.
async fn park_x_for_review(store: &PostgresStore, review: treadle::ReviewRequest) {
    store.register_pipeline(&definition()).await.unwrap();
    store.submit(vec![item("x", t(0))]).await.unwrap();
    let claim = store.claim(request(t(1))).await.unwrap().claims.remove(0);
    store
        .commit(commit(
            claim.task,
            claim.generation,
            1,
            t(2),
            Transition::AwaitReview(review),
        ))
        .await
        .unwrap();
}
