//! Taking over a dead worker's claims, with real processes and SIGKILL: a
//! worker restarted on the same host resumes at once (well under the
//! lease), and `run_until_idle` in another process waits for a live
//! worker's lease instead of calling the store idle, then finishes the
//! work once that worker is killed and its lease expires.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use treadle::store::{EventQuery, SqliteStore, Store};
use treadle::{AttemptResult, Event, EventKind, ItemState, LeaseOwner};

const WORKER: &str = env!("CARGO_BIN_EXE_crash-worker");

/// A running `crash-worker` and the committed events it prints.
struct Worker {
    child: Child,
    events: mpsc::Receiver<Event>,
}

impl Worker {
    fn start(db: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(WORKER)
            .arg("--db")
            .arg(db)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the worker starts");
        let stdout = child.stdout.take().expect("piped");
        let (send, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line).expect("the worker prints events");
                if send.send(event).is_err() {
                    break;
                }
            }
        });
        Worker { child, events }
    }

    /// Waits (at most a minute) for the worker to print a `Started` event.
    fn wait_for_a_start(&self) -> Event {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .events
                .recv_timeout(left)
                .expect("the worker started a stage");
            if matches!(event.kind, EventKind::Started { .. }) {
                return event;
            }
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap(); // reaped: its pid is gone from /proc
    }

    /// Waits for the worker to exit by itself; returns how long that took.
    fn finish(mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "the worker failed: {status}");
                return started.elapsed();
            }
            if started.elapsed() > limit {
                self.child.kill().ok();
                panic!("the worker did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Checks that `item` completed and that its `fetch` stage was recovered
/// from worker `dead`, with the abandoned attempt in its history.
async fn assert_recovered_from(db: &Path, item: &str, dead: &str) {
    let store = SqliteStore::open(db).await.unwrap();
    let status = store.status(item).await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    let fetch = &status.stages[0];
    assert_eq!(
        fetch.attempts[0].result,
        AttemptResult::Abandoned,
        "{status}"
    );
    let log = store
        .events(EventQuery {
            item_id: Some(item.to_owned()),
            ..EventQuery::default()
        })
        .await
        .unwrap();
    let recovered: Vec<&str> = log
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Recovered { previous_owner, .. } => Some(previous_owner.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(LeaseOwner::parse(recovered[0]).worker_id, dead);
}

#[test]
fn a_restart_on_the_same_host_takes_over_a_dead_workers_claims_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("takeover.db");
    let lease = Duration::from_secs(60);
    let lease_ms = lease.as_millis().to_string();
    let dead = Worker::start(
        &db,
        &[
            "--worker-id",
            "first",
            "--items",
            "1",
            "--prefix",
            "job",
            "--lease-ms",
            &lease_ms,
            "--stage-ms",
            "600000",
        ],
    );
    let started = dead.wait_for_a_start();
    assert_eq!(started.stage.as_deref(), Some("fetch"));
    dead.kill();

    // Another worker id: only the dead process tells that the claim is free.
    let restart = Worker::start(
        &db,
        &[
            "--worker-id",
            "second",
            "--items",
            "0",
            "--lease-ms",
            &lease_ms,
            "--stage-ms",
            "5",
        ],
    );
    let took = restart.finish(lease);
    assert!(
        took < lease / 4,
        "the restart took {took:?}, as if it had waited for the {lease:?} lease"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(assert_recovered_from(&db, "job-0000", "first"));
}

#[test]
fn run_until_idle_waits_for_a_live_workers_lease_and_then_recovers_its_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("idle.db");
    let lease_ms = "1500";
    let slow = Worker::start(
        &db,
        &[
            "--worker-id",
            "slow",
            "--items",
            "1",
            "--prefix",
            "slow",
            "--lease-ms",
            lease_ms,
            "--stage-ms",
            "600000",
        ],
    );
    slow.wait_for_a_start();
    // The second worker starts while the first is alive, so it cannot take
    // the claim over at start; its own item shows when it is running.
    let quick = Worker::start(
        &db,
        &[
            "--worker-id",
            "quick",
            "--items",
            "1",
            "--prefix",
            "quick",
            "--lease-ms",
            lease_ms,
            "--stage-ms",
            "5",
        ],
    );
    quick.wait_for_a_start();
    slow.kill();
    quick.finish(Duration::from_secs(60));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_recovered_from(&db, "slow-0000", "slow").await;
        let store = SqliteStore::open(&db).await.unwrap();
        let status = store.status("quick-0000").await.unwrap();
        assert_eq!(status.state, ItemState::Completed, "{status}");
    });
}
