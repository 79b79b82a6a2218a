//! Throughput benchmark.
//!
//! ```text
//! cargo run --release --example bench -- --workload linear --store sqlite --items 20000
//! cargo run --release --example bench -- --workload linear --store postgres --items 20000
//! cargo run --release --example bench -- --workload linear --store postgres --items 20000 --workers 2
//! cargo run --release --example bench -- --workload review --store postgres --items 2000 --approver process
//! ```
//!
//! `--store postgres` runs on the server at `--pg-url URL` (default:
//! `TREADLE_PG_URL`, else `postgres://postgres@127.0.0.1:5432/test`), in a
//! schema of its own that is dropped at the end.
//!
//! Flags: `--concurrency N` (`EngineConfig::max_concurrency`; by default
//! what the store suggests, as `Engine::new` uses: 256 in memory, 1,024 on
//! SQLite and 512 on PostgreSQL, where more work in flight makes bigger
//! group commits),
//! `--lanes N` (`memory` only: `MemoryStore::with_lanes(N)`, worked by one
//! run loop per lane; default: one lane per core),
//! `--runtime current|multi` (the tokio runtime: by default multi-thread,
//! one worker per lane, when the memory store has several lanes, so they
//! run in parallel; otherwise current-thread: the engine's work is short
//! and a single thread avoids cross-thread wake-ups; the SQLite store
//! commits on its own thread either way),
//! `--subtasks N` (subtasks per item in `fanout`, default 8),
//! `--stage-sleep-ms N` (`linear` only: the middle stage sleeps N ms, as if
//! waiting for I/O; the bench first runs the same items without the sleep,
//! in the same process on a fresh store, and reports the ideal rate: the
//! smaller of concurrency ÷ N ms and that no-sleep rate),
//! `--peer treadle-0.2` (`linear` only: after our run, runs the same number
//! of items through treadle 0.2.0 from crates.io, in its in-memory store,
//! and reports its items/s beside ours).
//!
//! Several processes (`sqlite` and `postgres`; the bench runs itself again
//! as each of them, on the same database file or schema):
//! `--workers N` (`linear` and `fanout`): the bench submits the items, then
//! starts N worker processes, each running `Engine::run` with its own
//! worker id, and stops them once every item is through; the clock runs
//! from telling them all to start until the last one's run returned, and
//! `workers` and the combined rates are reported.
//! `--approver process` (`review`): the approvals are made by another
//! process, which prints when each `approve` returned (µs since the UNIX
//! epoch); the time from that to the next stage starting in the worker is
//! `remote_decision_to_next_stage_p50_ms` / `_p99_ms` (with the default
//! `--approver local`, the same engine approves: `approve_to_next_stage_*`).
//!
//! Workloads: `linear` (scan -> enrich -> review, each completes at once,
//! with no output; `review` reads `scan`'s, typed),
//! `fanout` (enrich fans out to subtasks), `review` (every item parks at
//! review; the bench approves them all and measures how soon the next stage
//! starts). Items are submitted first, in batches; the clock runs from the
//! first claim until the engine is idle. A transition is one committed
//! state change of a stage or subtask: claimed (running), then completed,
//! fanned out, or parked; an approval; a fan-out completing. `items_per_sec`
//! counts items through every stage: the unit to compare engines in (a
//! linear item is 6 transitions here, 3 stage writes in most engines).
//!
//! Besides the totals, the bench reports the rate over the first and the
//! last 10% of the run's stage attempts (`first_10pct_items_per_sec`,
//! `last_10pct_items_per_sec`, in items/s: attempts ÷ attempts per item),
//! so a long run (`--items 1000000`) shows whether the rate holds up as the
//! store grows, and the peak RSS. (Attempts, not finished items: the run
//! queue is first in, first out, so every item's first stage runs before
//! the first item finishes. Not with `--workers`: the attempts run in the
//! worker processes.)

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use treadle::prelude::*;

#[path = "peer.rs"]
mod peer;
#[path = "bench_processes.rs"]
mod processes;
use treadle::store::Store;
use treadle::{
    Decision, EngineConfig, EventKind, PostgresOptions, PostgresStore, RunReport, StageState,
};

/// What the bench's functions return: any error ends it with a message.
type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
}

impl WorkItem for Record {
    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Linear,
    Fanout,
    Review,
}

/// What the bench's stages share: the workload, its settings, progress
/// and, for `review`, when each item's next stage started.
#[derive(Default)]
struct Probe {
    workload: OnceLock<Workload>,
    subtasks: OnceLock<u32>,
    /// How long the middle stage sleeps, in ms (0: not at all).
    sleep_ms: AtomicU64,
    finished: AtomicU64,
    /// Stage attempts expected in this pass.
    attempts_total: AtomicU64,
    /// Stage attempts finished so far (counted in batches per thread).
    attempts: AtomicU64,
    /// Passes begun: a thread's uncounted attempts of an earlier pass are dropped.
    pass: AtomicU64,
    /// When 10%, 90% and all of the pass's attempts had finished.
    marks: Mutex<Vec<Instant>>,
    /// When each item's `export` started (`review`), in µs since the UNIX
    /// epoch: wall-clock time, comparable with another process's.
    export_started: Mutex<HashMap<String, u64>>,
}

static PROBE: LazyLock<Probe> = LazyLock::new(Probe::default);

fn workload() -> Workload {
    *PROBE.workload.get().unwrap_or(&Workload::Linear)
}

/// How many attempts a thread counts before adding them to the total: the
/// threads of a memory store's lanes would otherwise meet at one counter on
/// every attempt, a cost the engine does not have.
const COUNT_BATCH: u64 = 32;

thread_local! {
    /// The pass, and the attempts of it this thread counted and has not
    /// added to the total yet.
    static UNCOUNTED: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Counts a stage attempt, noting when 10% and 90% of the pass's attempts
/// had finished (to within a batch per thread; the end of the run is the
/// end of the last 10%).
fn attempt_done() {
    let pass = PROBE.pass.load(Ordering::Relaxed);
    let uncounted = match UNCOUNTED.get() {
        (counted_in, uncounted) if counted_in == pass => uncounted + 1,
        _ => 1,
    };
    if uncounted < COUNT_BATCH {
        UNCOUNTED.set((pass, uncounted));
        return;
    }
    UNCOUNTED.set((pass, 0));
    let before = PROBE.attempts.fetch_add(uncounted, Ordering::Relaxed);
    let after = before + uncounted;
    let total = PROBE.attempts_total.load(Ordering::Relaxed);
    for mark in [total / 10, total - total / 10] {
        if before < mark && mark <= after {
            PROBE.marks.lock().unwrap().push(Instant::now());
        }
    }
}

/// Stage attempts per item: one per stage, and one per subtask.
fn attempts_per_item(workload: Workload, subtasks: u32) -> u64 {
    match workload {
        Workload::Linear => 3,
        Workload::Fanout => 3 + u64::from(subtasks),
        Workload::Review => 4,
    }
}

/// Completes at once with no output (`()`: nothing is stored).
#[stage]
async fn scan(_record: &Record) -> treadle::Result<()> {
    attempt_done();
    Ok(())
}

/// Completes at once (workloads `linear` and `review`).
#[stage]
async fn enrich(_record: &Record) -> treadle::Result<()> {
    attempt_done();
    let sleep = PROBE.sleep_ms.load(Ordering::Relaxed);
    if sleep > 0 {
        tokio::time::sleep(Duration::from_millis(sleep)).await;
    }
    Ok(())
}

/// Fans out to `--subtasks` subtasks, each completing at once (workload
/// `fanout`).
#[stage(name = "enrich", fan_out)]
async fn enrich_sources(
    _record: &Record,
    ctx: &mut StageContext,
) -> treadle::Result<StageOutcome<()>> {
    attempt_done();
    Ok(match ctx.subtask() {
        None => {
            let subtasks = *PROBE.subtasks.get().unwrap_or(&8);
            StageOutcome::fan_out((0..subtasks).map(|i| format!("source-{i}")))
        }
        Some(_) => StageOutcome::done(()),
    })
}

/// Reads `scan`'s output, typed (`()`: decoding it costs nothing, so the
/// bench measures the engine, not JSON).
#[stage]
async fn review(
    _record: &Record,
    #[from(scan)] _scanned: &(),
) -> treadle::Result<StageOutcome<()>> {
    attempt_done();
    if workload() == Workload::Review {
        return Ok(StageOutcome::needs_review(ReviewRequest::new("check")));
    }
    PROBE.finished.fetch_add(1, Ordering::Relaxed);
    Ok(StageOutcome::done(()))
}

#[stage]
async fn export(record: &Record) -> treadle::Result<()> {
    attempt_done();
    let now = now_micros();
    PROBE
        .export_started
        .lock()
        .unwrap()
        .insert(record.id.clone(), now);
    PROBE.finished.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Who decides the reviews of the `review` workload.
#[derive(Clone, Copy, PartialEq)]
enum Approver {
    /// The engine that runs the work, in this process.
    Local,
    /// Another process, on its own store handle.
    Process,
}

/// What this process of the bench is.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// The bench itself.
    Main,
    /// Worker process `N` of a `--workers` run.
    Worker(usize),
    /// The approver process of `--approver process`.
    Approver,
}

struct Args {
    workload: Workload,
    store: String,
    items: u64,
    /// `None`: what the store suggests, as `Engine::new` does.
    concurrency: Option<usize>,
    /// Lanes of the memory store (`None`: one per core).
    lanes: Option<usize>,
    /// A multi-thread tokio runtime instead of a current-thread one
    /// (`None`: multi-thread when the memory store has several lanes).
    multi_thread: Option<bool>,
    /// Subtasks per item in `fanout`.
    subtasks: u32,
    /// How long the middle stage sleeps, in ms.
    stage_sleep_ms: u64,
    /// Also run treadle 0.2.0 on the same items.
    peer: bool,
    /// The PostgreSQL server, for `--store postgres`.
    pg_url: Option<String>,
    /// Run the work in this many worker processes (`None`: in this one).
    workers: Option<usize>,
    /// Who approves in `review`.
    approver: Approver,
    /// Approvals per second in `review` (`None`: as fast as they go).
    approve_rate: Option<f64>,
    /// What this process is (`--role`, given to the bench's own children).
    role: Role,
    /// The database file (SQLite) or schema (PostgreSQL) of the parent's
    /// pass (`--at`, given to the bench's own children).
    at: Option<String>,
}

impl Args {
    /// The memory store's lanes: as asked, else one per core.
    fn memory_lanes(&self) -> usize {
        self.lanes.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// Whether the runtime is multi-thread: as asked, else when the
    /// memory store has several lanes.
    fn multi_thread(&self) -> bool {
        self.multi_thread
            .unwrap_or(self.store == "memory" && self.memory_lanes() > 1)
    }
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workload: Workload::Linear,
        store: "memory".into(),
        items: 10_000,
        concurrency: None,
        lanes: None,
        multi_thread: None,
        subtasks: 8,
        stage_sleep_ms: 0,
        peer: false,
        pg_url: None,
        workers: None,
        approver: Approver::Local,
        approve_rate: None,
        role: Role::Main,
        at: None,
    };
    let number = |flag: &str, value: &str| -> Result<u64, String> {
        value.parse().map_err(|e| format!("{flag} {value}: {e}"))
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--workload" => {
                args.workload = match value.as_str() {
                    "linear" => Workload::Linear,
                    "fanout" => Workload::Fanout,
                    "review" => Workload::Review,
                    other => {
                        return Err(format!("unknown workload `{other}` (linear|fanout|review)"));
                    }
                }
            }
            "--store" => match value.as_str() {
                "memory" | "sqlite" | "postgres" => args.store = value,
                other => return Err(format!("unknown store `{other}` (memory|sqlite|postgres)")),
            },
            "--pg-url" => args.pg_url = Some(value),
            "--items" => args.items = number(&flag, &value)?,
            "--runtime" => match value.as_str() {
                "current" => args.multi_thread = Some(false),
                "multi" => args.multi_thread = Some(true),
                other => return Err(format!("unknown runtime `{other}` (current|multi)")),
            },
            "--concurrency" => args.concurrency = Some(number(&flag, &value)? as usize),
            "--lanes" => match number(&flag, &value)? {
                0 => return Err("--lanes needs at least 1".into()),
                n => args.lanes = Some(n as usize),
            },
            "--subtasks" => {
                args.subtasks = u32::try_from(number(&flag, &value)?)
                    .map_err(|e| format!("--subtasks {value}: {e}"))?;
            }
            "--stage-sleep-ms" => args.stage_sleep_ms = number(&flag, &value)?,
            "--peer" => match value.as_str() {
                "treadle-0.2" => args.peer = true,
                other => return Err(format!("unknown peer `{other}` (treadle-0.2)")),
            },
            "--workers" => match number(&flag, &value)? {
                0 => return Err("--workers needs at least 1".into()),
                n => args.workers = Some(n as usize),
            },
            "--approver" => match value.as_str() {
                "local" => args.approver = Approver::Local,
                "process" => args.approver = Approver::Process,
                other => return Err(format!("unknown approver `{other}` (local|process)")),
            },
            "--approve-rate" => {
                let rate: f64 = value
                    .parse()
                    .map_err(|e| format!("--approve-rate {value}: {e}"))?;
                if !(rate > 0.0 && rate.is_finite()) {
                    return Err(format!("--approve-rate {value}: not a positive rate"));
                }
                args.approve_rate = Some(rate);
            }
            "--role" => {
                args.role = match value.split_once(':') {
                    Some(("worker", n)) => Role::Worker(number(&flag, n)? as usize),
                    None if value == "approver" => Role::Approver,
                    _ => return Err(format!("unknown role `{value}` (worker:N|approver)")),
                }
            }
            "--at" => args.at = Some(value),
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    if args.workload != Workload::Linear && (args.stage_sleep_ms > 0 || args.peer) {
        return Err("--stage-sleep-ms and --peer run the linear workload only".into());
    }
    let several = args.workers.is_some() || args.approver == Approver::Process;
    if several && args.store == "memory" {
        return Err(
            "--workers and --approver process need a store processes share \
                    (sqlite|postgres)"
                .into(),
        );
    }
    if args.lanes.is_some() && args.store != "memory" {
        return Err("--lanes splits the memory store; the others have one lane".into());
    }
    if args.workers.is_some() && args.workload == Workload::Review {
        return Err("--workers runs the linear and fanout workloads".into());
    }
    if (args.approver == Approver::Process || args.approve_rate.is_some())
        && args.workload != Workload::Review
    {
        return Err("--approver and --approve-rate run the review workload".into());
    }
    if args.workers.is_some() && (args.stage_sleep_ms > 0 || args.peer) {
        return Err("--stage-sleep-ms and --peer run in one process, not with --workers".into());
    }
    Ok(args)
}

fn pipeline(workload: Workload) -> Pipeline<Record> {
    match workload {
        Workload::Review => pipeline! { scan -> enrich -> review -> export },
        Workload::Linear => pipeline! { scan -> enrich -> review },
        Workload::Fanout => pipeline! { scan -> enrich_sources -> review },
    }
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Redraws a progress line on stderr while the bench runs, if it is a terminal.
fn progress(total: u64) -> Option<tokio::task::JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            let done = PROBE.finished.load(Ordering::Relaxed).min(total);
            let width = 40;
            let filled = (done * width / total.max(1)) as usize;
            eprint!(
                "\r[{}{}] {done}/{total}",
                "#".repeat(filled),
                " ".repeat(width as usize - filled)
            );
            if done >= total {
                eprintln!();
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Items per second over `items` items in `secs`, rounded.
fn rate(items: u64, secs: f64) -> serde_json::Value {
    (items as f64 / secs).round().into()
}

/// Microseconds since the UNIX epoch: wall-clock time, which processes on
/// one machine share.
fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The id of the bench's item number `i`.
fn item_id(i: u64) -> String {
    format!("item-{i:08}")
}

/// The ids of the bench's items.
fn item_ids(items: u64) -> Vec<String> {
    (0..items).map(item_id).collect()
}

/// Where a pass keeps its store; the bench's child processes open the same.
enum Place {
    /// A memory store with this many lanes.
    Memory(usize),
    /// A database file, in a temporary directory kept while the pass runs
    /// (`None` in a child: the parent owns it).
    Sqlite {
        path: PathBuf,
        _dir: Option<tempfile::TempDir>,
    },
    /// A schema on a server; the parent drops it at the end of its pass.
    Postgres { url: String, schema: String },
}

impl Place {
    /// A fresh place for a pass of the parent, per `args.store`.
    fn fresh(args: &Args, sleep_ms: u64) -> BenchResult<Place> {
        Ok(match args.store.as_str() {
            "memory" => Place::Memory(args.memory_lanes()),
            "postgres" => Place::Postgres {
                url: pg_url(args),
                schema: format!("treadle_bench_{}_{sleep_ms}", std::process::id()),
            },
            _ => {
                let dir = tempfile::tempdir()?;
                Place::Sqlite {
                    path: dir.path().join("bench.db"),
                    _dir: Some(dir),
                }
            }
        })
    }

    /// The place a child process was given (`--at`).
    fn given(args: &Args) -> BenchResult<Place> {
        let at = args.at.clone().ok_or("a child of the bench needs --at")?;
        Ok(match args.store.as_str() {
            "postgres" => Place::Postgres {
                url: pg_url(args),
                schema: at,
            },
            "sqlite" => Place::Sqlite {
                path: at.into(),
                _dir: None,
            },
            other => {
                return Err(format!("a child of the bench cannot share a {other} store").into());
            }
        })
    }

    /// What a child process is told with `--at`.
    fn at(&self) -> Option<String> {
        match self {
            Place::Memory(_) => None,
            Place::Sqlite { path, .. } => Some(path.display().to_string()),
            Place::Postgres { schema, .. } => Some(schema.clone()),
        }
    }

    /// Opens the store here (with its durable defaults) as `name`, runs
    /// `job` on it, and, if `owner`, drops a PostgreSQL schema afterwards.
    async fn open<J: OnStore>(&self, name: &str, owner: bool, job: J) -> BenchResult<J::Output> {
        match self {
            Place::Memory(lanes) => job.run(MemoryStore::with_lanes(*lanes)).await,
            Place::Sqlite { path, .. } => job.run(SqliteStore::open(path).await?).await,
            Place::Postgres { url, schema } => {
                let options = PostgresOptions::new(url)
                    .schema(schema)
                    .application_name(name);
                let store = PostgresStore::open(options).await?;
                let output = job.run(store.clone()).await;
                if owner {
                    store.drop_schema().await?;
                }
                output
            }
        }
    }
}

fn pg_url(args: &Args) -> String {
    args.pg_url.clone().unwrap_or_else(|| {
        std::env::var("TREADLE_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    })
}

/// Something to do with an open store, whatever its kind.
trait OnStore {
    type Output;

    async fn run<S: Store>(self, store: S) -> BenchResult<Self::Output>;
}

/// One pass of the workload, in the parent.
struct Pass<'a> {
    args: &'a Args,
    sleep_ms: u64,
    place: &'a Place,
}

impl OnStore for Pass<'_> {
    type Output = serde_json::Value;

    async fn run<S: Store>(self, store: S) -> BenchResult<serde_json::Value> {
        bench(self.args, store, self.sleep_ms, self.place).await
    }
}

/// Resets the probe for a pass of `args` whose middle stage sleeps `sleep_ms`.
fn reset_probe(args: &Args, sleep_ms: u64) {
    PROBE.workload.get_or_init(|| args.workload);
    PROBE.subtasks.get_or_init(|| args.subtasks);
    PROBE.sleep_ms.store(sleep_ms, Ordering::Relaxed);
    let per_item = attempts_per_item(args.workload, args.subtasks);
    PROBE
        .attempts_total
        .store(args.items * per_item, Ordering::Relaxed);
    PROBE.attempts.store(0, Ordering::Relaxed);
    PROBE.pass.fetch_add(1, Ordering::Relaxed);
    PROBE.finished.store(0, Ordering::Relaxed);
    PROBE.marks.lock().unwrap().clear();
    PROBE.export_started.lock().unwrap().clear();
}

/// The engine of `args`' workload on `store`, as worker `worker_id`.
fn engine<S: Store>(args: &Args, store: S, worker_id: &str) -> Engine<Record, S> {
    let config = EngineConfig {
        max_concurrency: args
            .concurrency
            .unwrap_or_else(|| store.suggested_concurrency()),
        worker_id: worker_id.to_owned(),
        ..EngineConfig::default()
    };
    Engine::with_config(pipeline(args.workload), store, config)
}

/// One pass of the workload on `store` (kept at `place`), with the middle
/// stage sleeping `sleep_ms`.
async fn bench<S: Store>(
    args: &Args,
    store: S,
    sleep_ms: u64,
    place: &Place,
) -> BenchResult<serde_json::Value> {
    reset_probe(args, sleep_ms);
    let per_item = attempts_per_item(args.workload, args.subtasks);
    let engine = engine(args, store, "bench");
    let concurrency = engine.config().max_concurrency;
    // Ids are made batch by batch: the bench holds none of them while the
    // engine runs, so the peak RSS is the engine's.
    for start in (0..args.items).step_by(1_000) {
        let end = (start + 1_000).min(args.items);
        engine
            .submit_all((start..end).map(|i| Record { id: item_id(i) }))
            .await?;
    }
    let mut result = serde_json::Map::new();
    let started = Instant::now();
    let (report, secs) = match args.workers {
        Some(workers) => {
            let run = processes::run_workers(args, place, workers).await?;
            check_finished(engine.store(), args).await?;
            result.insert("workers".into(), workers.into());
            (run.report, run.secs)
        }
        None => {
            let bar = progress(args.items);
            let report = if args.workload == Workload::Review {
                review_pass(args, &engine, place, &mut result).await?
            } else {
                engine.run_until_idle().await?
            };
            let secs = started.elapsed().as_secs_f64();
            if let Some(bar) = bar {
                let _ = bar.await;
            }
            (report, secs)
        }
    };
    // Each attempt is two transitions (claimed, then its end); a fan-out
    // also completes its stage once, and each approval is one.
    let extra = match args.workload {
        Workload::Linear => 0,
        Workload::Fanout => args.items,
        Workload::Review => args.items,
    };
    let transitions = report.attempts * 2 + extra;
    let marks = PROBE.marks.lock().unwrap().clone();
    // A tenth of the attempts, in items.
    let tenth = args.items * per_item / 10;
    if let [first, ninety] = marks[..]
        && tenth > 0
    {
        let all = started + Duration::from_secs_f64(secs);
        let items = |secs: f64| (tenth as f64 / per_item as f64 / secs).round();
        result.insert(
            "first_10pct_items_per_sec".into(),
            items((first - started).as_secs_f64()).into(),
        );
        result.insert(
            "last_10pct_items_per_sec".into(),
            items((all - ninety).as_secs_f64()).into(),
        );
    }
    result.insert(
        "workload".into(),
        ["linear", "fanout", "review"][args.workload as usize].into(),
    );
    result.insert("store".into(), args.store.clone().into());
    result.insert("concurrency".into(), concurrency.into());
    result.insert("items".into(), args.items.into());
    result.insert("transitions".into(), transitions.into());
    result.insert("secs".into(), ((secs * 1000.0).round() / 1000.0).into());
    result.insert("items_per_sec".into(), rate(args.items, secs));
    result.insert("transitions_per_sec".into(), rate(transitions, secs));
    result.insert(
        "peak_rss_mb".into(),
        ((peak_rss_mb() * 10.0).round() / 10.0).into(),
    );
    Ok(serde_json::Value::Object(result))
}

/// Checks that every item went through the last stage (`review` in
/// `linear` and `fanout`).
async fn check_finished<S: Store>(store: &S, args: &Args) -> BenchResult<()> {
    let done: u64 = store
        .stage_counts()
        .await?
        .iter()
        .filter(|c| c.stage == "review" && c.state == StageState::Completed)
        .map(|c| c.items)
        .sum();
    if done != args.items {
        return Err(format!("{done} of {} items finished", args.items).into());
    }
    Ok(())
}

/// The `review` workload after the items were submitted: runs them to
/// their reviews, then runs a worker while every review is approved (here
/// or from another process, per `--approver`), and notes how soon after
/// each approval the next stage started.
async fn review_pass<S: Store>(
    args: &Args,
    engine: &Engine<Record, S>,
    place: &Place,
    result: &mut serde_json::Map<String, serde_json::Value>,
) -> BenchResult<RunReport> {
    engine.run_until_idle().await?;
    // When this process learned of each decision, from its store's live
    // feed (which carries another process's decisions on PostgreSQL only).
    let seen = Arc::new(Mutex::new(HashMap::with_capacity(args.items as usize)));
    let watching = tokio::spawn({
        let (mut feed, seen) = (engine.subscribe(), seen.clone());
        async move {
            loop {
                match feed.recv().await {
                    Ok(event) if matches!(event.kind, EventKind::ReviewDecided { .. }) => {
                        seen.lock().unwrap().insert(event.item_id, now_micros());
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    let worker = tokio::spawn({
        let engine = engine.clone();
        let total = args.items;
        async move {
            engine
                .run(async move {
                    while PROBE.finished.load(Ordering::Relaxed) < total {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await
        }
    });
    let (approved, approve_secs, measured) = match args.approver {
        Approver::Local => {
            let ids = item_ids(args.items);
            let (approved, secs) = approve_all(engine, &ids, args.approve_rate).await?;
            (approved, secs, "approve_to_next_stage")
        }
        Approver::Process => {
            let (approved, secs) = processes::approve_elsewhere(args, place).await?;
            (approved, secs, "remote_decision_to_next_stage")
        }
    };
    let report = worker.await??;
    watching.abort();
    let seen = seen.lock().unwrap();
    let mut seen_after: Vec<f64> = approved
        .iter()
        .filter_map(|(id, at)| Some(seen.get(id)?.saturating_sub(*at) as f64 / 1e3))
        .collect();
    seen_after.sort_by(f64::total_cmp);
    let starts = PROBE.export_started.lock().unwrap();
    let mut latencies: Vec<f64> = approved
        .iter()
        .filter_map(|(id, at)| Some(starts.get(id)?.saturating_sub(*at) as f64 / 1e3))
        .collect();
    if latencies.len() as u64 != args.items {
        return Err(format!(
            "{} of {} approved items started their next stage",
            latencies.len(),
            args.items
        )
        .into());
    }
    latencies.sort_by(f64::total_cmp);
    let ms = |p: f64| (percentile(&latencies, p) * 1000.0).round() / 1000.0;
    let approver = match args.approver {
        Approver::Local => "local",
        Approver::Process => "process",
    };
    result.insert("approver".into(), approver.into());
    if let Some(rate) = args.approve_rate {
        result.insert("approve_rate".into(), rate.into());
    }
    result.insert(
        "approvals_per_sec".into(),
        (args.items as f64 / approve_secs).round().into(),
    );
    result.insert(format!("{measured}_p50_ms"), ms(0.50).into());
    result.insert(format!("{measured}_p99_ms"), ms(0.99).into());
    result.insert(format!("{measured}_max_ms"), ms(1.0).into());
    if seen_after.len() == latencies.len() {
        let seen_ms = |p: f64| (percentile(&seen_after, p) * 1000.0).round() / 1000.0;
        result.insert("decision_seen_p50_ms".into(), seen_ms(0.50).into());
        result.insert("decision_seen_p99_ms".into(), seen_ms(0.99).into());
    }
    Ok(RunReport {
        attempts: report.attempts + args.items * 3,
        ..report
    })
}

/// Approves every item of `ids` at `review`, 32 at a time, or, at `rate`
/// approvals per second, each at its time (the `n`th `n / rate` seconds
/// after the start); returns when each `approve` returned (µs since the
/// UNIX epoch) and how long it all took, in seconds.
async fn approve_all<S: Store>(
    engine: &Engine<Record, S>,
    ids: &[String],
    rate: Option<f64>,
) -> treadle::Result<(Vec<(String, u64)>, f64)> {
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let approvers = 32;
    let mut tasks = tokio::task::JoinSet::<treadle::Result<Vec<(String, u64)>>>::new();
    for lane in 0..approvers {
        let engine = engine.clone();
        let mine: Vec<(usize, String)> = ids
            .iter()
            .cloned()
            .enumerate()
            .skip(lane)
            .step_by(approvers)
            .collect();
        tasks.spawn(async move {
            let mut approved = Vec::with_capacity(mine.len());
            for (n, id) in mine {
                if let Some(rate) = rate {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate))
                        .await;
                }
                engine.approve(&id, "review", Decision::by("bench")).await?;
                approved.push((id, now_micros()));
            }
            Ok(approved)
        });
    }
    let mut approved = Vec::with_capacity(ids.len());
    while let Some(done) = tasks.join_next().await {
        approved.extend(done.expect("approver task")?);
    }
    Ok((approved, started.elapsed().as_secs_f64()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().map_err(|e| {
        format!(
            "{e}\nusage: bench --workload linear|fanout|review --store memory|sqlite|postgres \
             --items N [--concurrency N] [--lanes N] [--runtime current|multi] [--subtasks N] \
             [--stage-sleep-ms N] [--peer treadle-0.2] [--pg-url URL] [--workers N] \
             [--approver local|process] [--approve-rate N]"
        )
    })?;
    let mut runtime = if args.multi_thread() {
        let mut multi = tokio::runtime::Builder::new_multi_thread();
        if args.store == "memory" {
            // A worker per lane.
            multi.worker_threads(args.memory_lanes());
        }
        multi
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = runtime.enable_all().build()?;
    if args.role == Role::Main {
        let line = runtime.block_on(run(&args))?;
        println!("{line}");
    } else {
        runtime.block_on(processes::child(&args))?;
    }
    Ok(())
}

/// One pass on a fresh store of the kind `args` names.
async fn pass(args: &Args, sleep_ms: u64) -> BenchResult<serde_json::Value> {
    let place = Place::fresh(args, sleep_ms)?;
    let pass = Pass {
        args,
        sleep_ms,
        place: &place,
    };
    place.open("bench", true, pass).await
}

async fn run(args: &Args) -> BenchResult<serde_json::Value> {
    let mut line = if args.stage_sleep_ms > 0 {
        // The no-sleep pass first: the ideal is bounded by it.
        let fastest = pass(args, 0).await?["items_per_sec"]
            .as_f64()
            .unwrap_or(0.0);
        let mut line = pass(args, args.stage_sleep_ms).await?;
        let concurrency = line["concurrency"].as_f64().unwrap_or(0.0);
        let ideal = (concurrency * 1000.0 / args.stage_sleep_ms as f64).min(fastest);
        let got = line["items_per_sec"].as_f64().unwrap_or(0.0);
        line["stage_sleep_ms"] = args.stage_sleep_ms.into();
        line["no_sleep_items_per_sec"] = fastest.into();
        line["ideal_items_per_sec"] = ideal.round().into();
        line["of_ideal"] = ((got / ideal * 1000.0).round() / 1000.0).into();
        line
    } else {
        pass(args, 0).await?
    };
    if args.peer {
        let peer = peer::run(args.items).await?;
        let ours = line["items_per_sec"].as_f64().unwrap_or(0.0);
        line["peer"] = "treadle 0.2.0 (crates.io), memory store, one item at a time".into();
        line["peer_items_per_sec"] = peer.items_per_sec.round().into();
        line["peer_secs"] = ((peer.secs * 1000.0).round() / 1000.0).into();
        line["items_per_sec_vs_peer"] =
            ((ours / peer.items_per_sec * 100.0).round() / 100.0).into();
    }
    if args.store == "memory" {
        line["lanes"] = args.memory_lanes().into();
    }
    line["runtime"] = if args.multi_thread() {
        "multi_thread"
    } else {
        "current_thread"
    }
    .into();
    Ok(line)
}
