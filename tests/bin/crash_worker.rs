//! A worker process for the crash-recovery and multi-process tests: runs a
//! pipeline on a SQLite file (or, with the `postgres` feature, a
//! `postgres://` URL and `--schema NAME`) and prints every event of its
//! store's live feed as a JSON line on stdout, so a test can kill it with
//! SIGKILL at any moment and then check that everything it printed (and so
//! everything committed) survived.
//!
//! ```text
//! crash-worker --db PATH|URL --items N [--worker-id ID] [--lease-ms MS] [--stage-ms MS]
//!              [--prefix P] [--retries N] [--crash-limit N] [--crash-backoff-ms MS]
//!              [--schema NAME] [--concurrency N]
//! ```

use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use treadle::store::{SqliteStore, Store};
use treadle::{
    Backoff, CrashRetries, Engine, EngineConfig, Pipeline, Stage, StageContext, StageOutcome,
    StagePolicy, WorkItem,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: String,
}

impl WorkItem for Job {
    fn id(&self) -> &str {
        &self.id
    }
}

/// A stage that takes `delay` and fans out when `fan_out` is set.
struct Step {
    name: &'static str,
    delay: Duration,
    fan_out: bool,
    retries: u32,
}

#[treadle::async_trait]
impl Stage<Job> for Step {
    fn name(&self) -> &str {
        self.name
    }

    fn policy(&self) -> StagePolicy {
        StagePolicy::new().retries(self.retries)
    }

    async fn run(&self, _job: &Job, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
        if self.fan_out && ctx.subtask().is_none() {
            return Ok(StageOutcome::fan_out(["a", "b", "c", "d"]));
        }
        tokio::time::sleep(self.delay).await;
        StageOutcome::complete_with(format!("{}:{}", self.name, ctx.attempt()))
    }
}

struct Args {
    db: String,
    items: usize,
    prefix: String,
    worker_id: String,
    lease: Duration,
    stage_delay: Duration,
    retries: u32,
    crash_retries: CrashRetries,
    schema: String,
    concurrency: usize,
}

fn parse() -> Args {
    let mut args = Args {
        db: String::new(),
        items: 10,
        prefix: "job".into(),
        worker_id: "crash-worker".into(),
        lease: Duration::from_secs(30),
        stage_delay: Duration::from_millis(2),
        retries: 50,
        crash_retries: CrashRetries::DEFAULT,
        schema: "treadle".into(),
        concurrency: 8,
    };
    let mut it = std::env::args().skip(1);
    while let (Some(flag), Some(value)) = (it.next(), it.next()) {
        match flag.as_str() {
            "--db" => args.db = value,
            "--items" => args.items = value.parse().expect("--items N"),
            "--prefix" => args.prefix = value,
            "--schema" => args.schema = value,
            "--concurrency" => args.concurrency = value.parse().expect("--concurrency N"),
            "--worker-id" => args.worker_id = value,
            "--lease-ms" => {
                args.lease = Duration::from_millis(value.parse().expect("--lease-ms MS"))
            }
            "--stage-ms" => {
                args.stage_delay = Duration::from_millis(value.parse().expect("--stage-ms MS"))
            }
            "--retries" => args.retries = value.parse().expect("--retries N"),
            "--crash-limit" => args.crash_retries.limit = value.parse().expect("--crash-limit N"),
            "--crash-backoff-ms" => {
                let ms = value.parse().expect("--crash-backoff-ms MS");
                args.crash_retries.backoff = Backoff::Fixed(Duration::from_millis(ms));
            }
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!args.db.is_empty(), "--db PATH is required");
    args
}

#[tokio::main]
async fn main() -> treadle::Result<()> {
    let args = parse();
    let step = |name, fan_out| Step {
        name,
        delay: args.stage_delay,
        fan_out,
        retries: args.retries,
    };
    let pipeline = Pipeline::builder()
        .stage(step("fetch", false))
        .stage(step("enrich", true))
        .stage(step("store", false))
        .edge("fetch", "enrich")
        .edge("enrich", "store")
        .build()?;
    let config = EngineConfig {
        max_concurrency: args.concurrency,
        lease: args.lease,
        worker_id: args.worker_id.clone(),
        idle_poll: Duration::from_millis(20),
        crash_retries: args.crash_retries,
        ..EngineConfig::default()
    };
    #[cfg(feature = "postgres")]
    if args.db.starts_with("postgres://") {
        let options = treadle::PostgresOptions::new(&args.db)
            .schema(&args.schema)
            .application_name(&args.worker_id);
        let store = treadle::PostgresStore::open(options).await?;
        return work(&args, pipeline, store, config).await;
    }
    let store = SqliteStore::open(&args.db).await?;
    work(&args, pipeline, store, config).await
}

/// Submits the items and runs the pipeline until idle, printing the feed.
async fn work<S: Store>(
    args: &Args,
    pipeline: Pipeline<Job>,
    store: S,
    config: EngineConfig,
) -> treadle::Result<()> {
    let engine = Engine::with_config(pipeline, store, config);
    let mut feed = engine.subscribe();
    let printer = tokio::spawn(async move {
        while let Ok(event) = feed.recv().await {
            // One line per committed event, flushed at once: what the test
            // reads was committed before it was printed.
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{}",
                serde_json::to_string(&event).expect("events serialize")
            )
            .ok();
            out.flush().ok();
        }
    });
    let jobs = (0..args.items).map(|i| Job {
        id: format!("{}-{i:04}", args.prefix),
    });
    engine.submit_all(jobs).await?;
    let report = engine.run_until_idle().await?;
    drop(engine);
    printer.await.ok();
    eprintln!("done: {report:?}");
    Ok(())
}
