//! Throughput benchmark.
//!
//! ```text
//! cargo run --release --example bench -- --workload linear --store sqlite --items 20000
//! ```
//!
//! Workloads: `linear` (scan -> enrich -> review, each completes at once),
//! `fanout` (enrich fans out to 8 subtasks), `review` (every item parks at
//! review; the bench approves them all and measures how soon the next stage
//! starts). Items are submitted first, in batches; the clock runs from the
//! first claim until the engine is idle. A transition is one committed
//! state change of a stage or subtask: claimed (running), then completed,
//! fanned out, or parked; an approval; a fan-out completing.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use treadle::store::Store;
use treadle::{
    Decision, Engine, EngineConfig, MemoryStore, Pipeline, ReviewRequest, SqliteStore, Stage,
    StageContext, StageOutcome, WorkItem,
};

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

/// What the bench's stages share: progress and, for `review`, start times.
#[derive(Default)]
struct Probe {
    finished: AtomicU64,
    export_started: Mutex<HashMap<String, Instant>>,
}

struct BenchStage {
    name: &'static str,
    workload: Workload,
    probe: Arc<Probe>,
}

#[treadle::async_trait]
impl Stage<Record> for BenchStage {
    fn name(&self) -> &str {
        self.name
    }

    async fn run(&self, item: &Record, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
        Ok(match (self.name, self.workload) {
            ("enrich", Workload::Fanout) if ctx.subtask().is_none() => {
                StageOutcome::fan_out((0..8).map(|i| format!("source-{i}")))
            }
            ("review", Workload::Review) => StageOutcome::needs_review(ReviewRequest::new("check")),
            ("export", _) => {
                let now = Instant::now();
                self.probe
                    .export_started
                    .lock()
                    .unwrap()
                    .insert(item.id.clone(), now);
                self.probe.finished.fetch_add(1, Ordering::Relaxed);
                StageOutcome::complete()
            }
            ("review", _) => {
                self.probe.finished.fetch_add(1, Ordering::Relaxed);
                StageOutcome::complete()
            }
            _ => StageOutcome::complete(),
        })
    }
}

struct Args {
    workload: Workload,
    store: String,
    items: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workload: Workload::Linear,
        store: "memory".into(),
        items: 10_000,
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
                "memory" | "sqlite" => args.store = value,
                other => return Err(format!("unknown store `{other}` (memory|sqlite)")),
            },
            "--items" => args.items = value.parse().map_err(|e| format!("--items {value}: {e}"))?,
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    Ok(args)
}

fn pipeline(workload: Workload, probe: &Arc<Probe>) -> Pipeline<Record> {
    let stage = |name| BenchStage {
        name,
        workload,
        probe: probe.clone(),
    };
    let mut builder = Pipeline::builder()
        .stage(stage("scan"))
        .stage(stage("enrich"))
        .stage(stage("review"))
        .edge("scan", "enrich")
        .edge("enrich", "review");
    if workload == Workload::Review {
        builder = builder.stage(stage("export")).edge("review", "export");
    }
    builder.build().expect("the bench pipeline is valid")
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
fn progress(probe: Arc<Probe>, total: u64) -> Option<tokio::task::JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            let done = probe.finished.load(Ordering::Relaxed).min(total);
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
    let probe = Arc::new(Probe::default());
    let config = EngineConfig {
        max_concurrency: 256,
        ..EngineConfig::default()
    };
    let engine = Engine::with_config(pipeline(args.workload, &probe), store, config);
    let ids: Vec<String> = (0..args.items).map(|i| format!("item-{i:08}")).collect();
    for chunk in ids.chunks(1_000) {
        engine
            .submit_all(chunk.iter().map(|id| Record { id: id.clone() }))
            .await?;
    }
    let bar = progress(probe.clone(), args.items);
    let started = Instant::now();
    let mut result = serde_json::Map::new();
    let report = if args.workload == Workload::Review {
        engine.run_until_idle().await?;
        let worker = tokio::spawn({
            let engine = engine.clone();
            let probe = probe.clone();
            let total = args.items;
            async move {
                engine
                    .run(async move {
                        while probe.finished.load(Ordering::Relaxed) < total {
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
        let starts = probe.export_started.lock().unwrap();
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().map_err(|e| {
        format!("{e}\nusage: bench --workload linear|fanout|review --store memory|sqlite --items N")
    })?;
    let line = match args.store.as_str() {
        "memory" => bench(&args, MemoryStore::new()).await?,
        _ => {
            // A file in a temporary directory, with the store's durable defaults.
            let dir = tempfile::tempdir()?;
            let store = SqliteStore::open(dir.path().join("bench.db")).await?;
            bench(&args, store).await?
        }
    };
    println!("{line}");
    Ok(())
}
