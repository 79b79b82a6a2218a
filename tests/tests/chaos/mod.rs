//! Crash recovery with real processes, for every store a worker process
//! can open: the worker (`tests/bin/crash_worker.rs`) is killed with
//! SIGKILL at random moments and restarted.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use treadle::store::{EventQuery, Store};
use treadle::{Event, EventKind, ItemState, StageState};

pub const WORKER: &str = env!("CARGO_BIN_EXE_crash-worker");

/// Starts a worker whose stdout lines (committed events) are collected into `seen`.
pub fn start_worker(
    db: &[&str],
    items: usize,
    args: &[&str],
    seen: &Arc<Mutex<Vec<String>>>,
) -> (Child, std::thread::JoinHandle<()>) {
    let mut child = Command::new(WORKER)
        .args(db)
        .args(["--items", &items.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the worker starts");
    let stdout = child.stdout.take().expect("piped");
    let seen = seen.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            seen.lock().unwrap().push(line);
        }
    });
    (child, reader)
}

/// A small deterministic generator for kill delays; the seed is printed so
/// a failing run can be repeated.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// The whole event log of `store`.
pub async fn whole_log<S: Store>(store: &S) -> Vec<Event> {
    store.events(EventQuery::default()).await.unwrap()
}

/// Kills a worker on the database `db` (its `--db` and other arguments)
/// with SIGKILL at seeded random moments, over and over (half the restarts
/// reuse the worker id, half take a new one), lets a last run finish, then
/// checks, on the store `open` opens, that nothing a worker reported
/// committed is missing, every item finished, each unit completed exactly
/// once, and the log agrees with the stage states.
pub async fn killing_a_worker_at_random_points_loses_nothing<S: Store>(
    db: &[&str],
    open: impl AsyncFnOnce() -> S,
) {
    let items = 40;
    let rounds = 24;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("kill schedule seed: {seed}");
    let mut rng = Lcg(seed);
    let printed = Arc::new(Mutex::new(Vec::new()));
    let mut kills = 0;
    for round in 0..rounds {
        // Each run adds its own items, so every run has work to be killed in.
        let prefix = format!("r{round:02}");
        let worker_id = if round % 2 == 0 {
            "w1".to_owned()
        } else {
            format!("w-{round}")
        };
        // Killed this often, a unit may be abandoned more times than the
        // default crash-retry limit allows; this test is about losing nothing.
        let args = [
            "--worker-id",
            &worker_id,
            "--lease-ms",
            "400",
            "--stage-ms",
            "10",
            "--prefix",
            &prefix,
            "--crash-limit",
            "1000",
            "--crash-backoff-ms",
            "0",
        ];
        let (mut child, reader) = start_worker(db, items, &args, &printed);
        // Early kills land in start-up and migrations, later ones mid-run,
        // mid-fan-out and inside group commits.
        let delay = if round % 4 == 0 {
            rng.below(40)
        } else {
            20 + rng.below(300)
        };
        std::thread::sleep(Duration::from_millis(delay));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        reader.join().unwrap();
    }
    assert!(
        kills >= 20,
        "only {kills} of {rounds} runs were killed before they finished"
    );

    let args = [
        "--worker-id",
        "w1",
        "--lease-ms",
        "400",
        "--prefix",
        "final",
        "--crash-limit",
        "1000",
        "--crash-backoff-ms",
        "0",
    ];
    let (mut last, reader) = start_worker(db, items, &args, &printed);
    let started = Instant::now();
    while last.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the final run did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(last.wait().unwrap().success());
    reader.join().unwrap();

    let store = open().await;
    let log = whole_log(&store).await;
    let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "the event log is gapless"
    );

    // Every event a worker printed had been committed: it is in the log, unchanged.
    let by_seq: BTreeMap<u64, &Event> = log.iter().map(|e| (e.seq, e)).collect();
    let printed = printed.lock().unwrap().clone();
    assert!(
        printed.len() > 100,
        "the workers reported progress ({} events)",
        printed.len()
    );
    for line in printed.iter() {
        let event: Event = serde_json::from_str(line).unwrap();
        assert_eq!(
            by_seq.get(&event.seq),
            Some(&&event),
            "a reported event was lost or changed"
        );
    }

    // Every item finished, each unit completed exactly once, and the log agrees with the states.
    let mut completions: BTreeMap<(String, Option<String>, Option<String>), u32> = BTreeMap::new();
    let mut starts: BTreeMap<(String, String, Option<String>), u32> = BTreeMap::new();
    for event in &log {
        match &event.kind {
            EventKind::Completed | EventKind::ItemCompleted => {
                *completions
                    .entry((
                        event.item_id.clone(),
                        event.stage.clone(),
                        event.subtask.clone(),
                    ))
                    .or_default() += 1
            }
            EventKind::Started { .. } => {
                let key = (
                    event.item_id.clone(),
                    event.stage.clone().unwrap(),
                    event.subtask.clone(),
                );
                *starts.entry(key).or_default() += 1
            }
            _ => {}
        }
    }
    assert!(
        completions.values().all(|&n| n == 1),
        "a unit completed twice: {completions:?}"
    );
    // A run killed before its submission committed submitted nothing: a
    // batch submission is one transaction, so a prefix has all its items or none.
    let submitted: Vec<String> = log
        .iter()
        .filter(|e| e.kind == EventKind::ItemSubmitted)
        .map(|e| e.item_id.clone())
        .collect();
    for prefix in (0..rounds)
        .map(|r| format!("r{r:02}"))
        .chain(["final".to_owned()])
    {
        let count = submitted
            .iter()
            .filter(|id| id.starts_with(&format!("{prefix}-")))
            .count();
        assert!(
            count == 0 || count == items,
            "{prefix}: {count} of {items} items submitted"
        );
        if prefix == "final" {
            assert_eq!(count, items);
        }
    }
    for id in submitted {
        let status = store.status(&id).await.unwrap();
        assert_eq!(status.state, ItemState::Completed, "{status}");
        assert_eq!(
            completions.get(&(id.clone(), None, None)),
            Some(&1),
            "one ItemCompleted for {id}"
        );
        for stage in &status.stages {
            assert_eq!(stage.state, StageState::Completed);
            assert_eq!(
                completions.get(&(id.clone(), Some(stage.name.clone()), None)),
                Some(&1)
            );
            // Each start is either the attempt that completed or one recorded as abandoned/failed.
            let started = starts
                .get(&(id.clone(), stage.name.clone(), None))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                started as usize,
                stage.attempts.len(),
                "{id}/{}: starts vs attempt history",
                stage.name
            );
            for sub in &stage.subtasks {
                assert_eq!(sub.state, StageState::Completed);
                let key = (id.clone(), Some(stage.name.clone()), Some(sub.name.clone()));
                assert_eq!(completions.get(&key), Some(&1));
                let started = starts
                    .get(&(id.clone(), stage.name.clone(), Some(sub.name.clone())))
                    .copied()
                    .unwrap_or(0);
                assert_eq!(
                    started as usize,
                    sub.attempts.len(),
                    "{id}/{}/{}",
                    stage.name,
                    sub.name
                );
            }
        }
    }
}
