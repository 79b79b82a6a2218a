//! Throughput benchmark.
//!
//! ```text
//! cargo run --release --example bench -- --workload linear --store sqlite --items 20000
//! cargo run --release --example bench -- --workload linear --store postgres --items 20000
//! ```
//!
//! `--store postgres` runs on the server at `--pg-url URL` (default:
//! `TREADLE_PG_URL`, else `postgres://postgres@127.0.0.1:5432/test`), in a
//! schema of its own that is dropped at the end.
//!
//! Flags: `--concurrency N` (`EngineConfig::max_concurrency`; by default
//! what the store suggests, as `Engine::new` uses: 256 in memory, 512 on
//! SQLite, where more work in flight makes bigger group commits),
//! `--runtime current|multi` (the tokio runtime, default current-thread:
//! the engine's work is short and a single thread avoids cross-thread
//! wake-ups; the SQLite store commits on its own thread either way).
//!
//! Workloads: `linear` (scan -> enrich -> review, each completes at once,
//! with no output; `review` reads `scan`'s, typed),
//! `fanout` (enrich fans out to 8 subtasks), `review` (every item parks at
//! review; the bench approves them all and measures how soon the next stage
//! starts). Items are submitted first, in batches; the clock runs from the
//! first claim until the engine is idle. A transition is one committed
//! state change of a stage or subtask: claimed (running), then completed,
//! fanned out, or parked; an approval; a fan-out completing.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use treadle::prelude::*;
use treadle::store::Store;
use treadle::{Decision, EngineConfig, PostgresOptions, PostgresStore};

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

/// What the bench's stages share: the workload, progress and, for
/// `review`, when each item's next stage started.
#[derive(Default)]
struct Probe {
    workload: OnceLock<Workload>,
    finished: AtomicU64,
    export_started: Mutex<HashMap<String, Instant>>,
}

static PROBE: LazyLock<Probe> = LazyLock::new(Probe::default);

fn workload() -> Workload {
    *PROBE.workload.get().unwrap_or(&Workload::Linear)
}

/// Completes at once with no output (`()`: nothing is stored).
#[stage]
async fn scan(_record: &Record) -> treadle::Result<()> {
    Ok(())
}

/// Completes at once (workloads `linear` and `review`).
#[stage]
async fn enrich(_record: &Record) -> treadle::Result<()> {
    Ok(())
}

/// Fans out to 8 subtasks, each completing at once (workload `fanout`).
#[stage(name = "enrich", fan_out)]
async fn enrich_sources(
    _record: &Record,
    ctx: &mut StageContext,
) -> treadle::Result<StageOutcome<()>> {
    Ok(match ctx.subtask() {
        None => StageOutcome::fan_out((0..8).map(|i| format!("source-{i}"))),
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
    if workload() == Workload::Review {
        return Ok(StageOutcome::needs_review(ReviewRequest::new("check")));
    }
    PROBE.finished.fetch_add(1, Ordering::Relaxed);
    Ok(StageOutcome::done(()))
}

#[stage]
async fn export(record: &Record) -> treadle::Result<()> {
    let now = Instant::now();
    PROBE
        .export_started
        .lock()
        .unwrap()
        .insert(record.id.clone(), now);
    PROBE.finished.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

struct Args {
    workload: Workload,
    store: String,
    items: u64,
    /// `None`: what the store suggests, as `Engine::new` does.
    concurrency: Option<usize>,
    /// A multi-thread tokio runtime instead of a current-thread one.
    multi_thread: bool,
    /// The PostgreSQL server, for `--store postgres`.
    pg_url: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workload: Workload::Linear,
        store: "memory".into(),
        items: 10_000,
        concurrency: None,
        multi_thread: false,
        pg_url: None,
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
            "--items" => args.items = value.parse().map_err(|e| format!("--items {value}: {e}"))?,
            "--runtime" => match value.as_str() {
                "current" => args.multi_thread = false,
                "multi" => args.multi_thread = true,
                other => return Err(format!("unknown runtime `{other}` (current|multi)")),
            },
            "--concurrency" => {
                let n = value
                    .parse()
                    .map_err(|e| format!("--concurrency {value}: {e}"))?;
                args.concurrency = Some(n);
            }
            other => return Err(format!("unknown flag `{other}`")),
        }
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

async fn bench<S: Store>(args: &Args, store: S) -> treadle::Result<serde_json::Value> {
    PROBE
        .workload
        .set(args.workload)
        .map_err(|_| treadle::Error::stage("the bench runs one workload per process"))?;
    let config = EngineConfig {
        max_concurrency: args
            .concurrency
            .unwrap_or_else(|| store.suggested_concurrency()),
        ..EngineConfig::default()
    };
    let concurrency = config.max_concurrency;
    let engine = Engine::with_config(pipeline(args.workload), store, config);
    let ids: Vec<String> = (0..args.items).map(|i| format!("item-{i:08}")).collect();
    for chunk in ids.chunks(1_000) {
        engine
            .submit_all(chunk.iter().map(|id| Record { id: id.clone() }))
            .await?;
    }
    let bar = progress(args.items);
    let started = Instant::now();
    let mut result = serde_json::Map::new();
    let report = if args.workload == Workload::Review {
        engine.run_until_idle().await?;
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
        let approve_started = Instant::now();
        let approved = Arc::new(Mutex::new(HashMap::with_capacity(ids.len())));
        let approvers = 32;
        let mut tasks = tokio::task::JoinSet::<treadle::Result<()>>::new();
        for lane in 0..approvers {
            let (engine, approved) = (engine.clone(), approved.clone());
            let mine: Vec<String> = ids.iter().skip(lane).step_by(approvers).cloned().collect();
            tasks.spawn(async move {
                for id in mine {
                    engine.approve(&id, "review", Decision::by("bench")).await?;
                    approved.lock().unwrap().insert(id, Instant::now());
                }
                Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("approver task")?;
        }
        let approve_secs = approve_started.elapsed().as_secs_f64();
        let report = worker.await.expect("worker task")?;
        let starts = PROBE.export_started.lock().unwrap();
        let approved = approved.lock().unwrap();
        let mut latencies: Vec<f64> = approved
            .iter()
            .filter_map(|(id, at)| {
                Some(starts.get(id)?.saturating_duration_since(*at).as_secs_f64() * 1e3)
            })
            .collect();
        latencies.sort_by(f64::total_cmp);
        result.insert(
            "approvals_per_sec".into(),
            (args.items as f64 / approve_secs).round().into(),
        );
        result.insert(
            "approve_to_next_stage_p50_ms".into(),
            percentile(&latencies, 0.50).into(),
        );
        result.insert(
            "approve_to_next_stage_p99_ms".into(),
            percentile(&latencies, 0.99).into(),
        );
        treadle::RunReport {
            attempts: report.attempts + args.items * 3,
            ..report
        }
    } else {
        engine.run_until_idle().await?
    };
    let secs = started.elapsed().as_secs_f64();
    if let Some(bar) = bar {
        let _ = bar.await;
    }
    // Each attempt is two transitions (claimed, then its end); a fan-out
    // also completes its stage once, and each approval is one.
    let extra = match args.workload {
        Workload::Linear => 0,
        Workload::Fanout => args.items,
        Workload::Review => args.items,
    };
    let transitions = report.attempts * 2 + extra;
    result.insert(
        "workload".into(),
        ["linear", "fanout", "review"][args.workload as usize].into(),
    );
    result.insert("store".into(), args.store.clone().into());
    result.insert("concurrency".into(), concurrency.into());
    result.insert("items".into(), args.items.into());
    result.insert("transitions".into(), transitions.into());
    result.insert("secs".into(), ((secs * 1000.0).round() / 1000.0).into());
    result.insert(
        "transitions_per_sec".into(),
        (transitions as f64 / secs).round().into(),
    );
    result.insert(
        "peak_rss_mb".into(),
        ((peak_rss_mb() * 10.0).round() / 10.0).into(),
    );
    Ok(serde_json::Value::Object(result))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().map_err(|e| {
        format!(
            "{e}\nusage: bench --workload linear|fanout|review --store memory|sqlite|postgres \
             --items N [--concurrency N] [--runtime current|multi] [--pg-url URL]"
        )
    })?;
    let mut runtime = if args.multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let line = runtime.enable_all().build()?.block_on(run(&args))?;
    println!("{line}");
    Ok(())
}

async fn run(args: &Args) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let mut line = match args.store.as_str() {
        "memory" => bench(args, MemoryStore::new()).await?,
        "postgres" => {
            let url = args.pg_url.clone().unwrap_or_else(|| {
                std::env::var("TREADLE_PG_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
            });
            let schema = format!("treadle_bench_{}", std::process::id());
            let options = PostgresOptions::new(url)
                .schema(schema)
                .application_name("bench");
            let store = PostgresStore::open(options).await?;
            let line = bench(args, store.clone()).await;
            store.drop_schema().await?;
            line?
        }
        _ => {
            // A file in a temporary directory, with the store's durable defaults.
            let dir = tempfile::tempdir()?;
            let store = SqliteStore::open(dir.path().join("bench.db")).await?;
            bench(args, store).await?
        }
    };
    line["runtime"] = if args.multi_thread {
        "multi_thread"
    } else {
        "current_thread"
    }
    .into();
    Ok(line)
}
