//! The peer the bench compares with: treadle 0.2.0 from crates.io (a
//! renamed dev-dependency, `treadle_020`), on the bench's linear workload:
//! three stages, `scan -> enrich -> review`, each completing at once, in
//! its in-memory store. 0.2.0 advances one item at a time (`advance` takes
//! the store by `&mut`), so the items run one after another.

use std::time::Instant;

use async_trait::async_trait;
use treadle_020::{MemoryStateStore, Stage, StageContext, StageOutcome, WorkItem, Workflow};

/// What the peer measured.
pub struct PeerRun {
    /// Items through all three stages per second.
    pub items_per_sec: f64,
    /// Wall-clock seconds.
    pub secs: f64,
}

#[derive(Debug)]
struct Record(String);

impl WorkItem for Record {
    fn id(&self) -> &str {
        &self.0
    }
}

/// A stage that completes at once.
#[derive(Debug)]
struct Done(&'static str);

#[async_trait]
impl Stage for Done {
    fn name(&self) -> &str {
        self.0
    }

    async fn execute(
        &self,
        _item: &dyn WorkItem,
        _ctx: &mut StageContext,
    ) -> treadle_020::Result<StageOutcome> {
        Ok(StageOutcome::Complete)
    }
}

/// Runs `items` items through treadle 0.2.0's linear pipeline, then checks
/// (off the clock) that each one completed.
pub async fn run(items: u64) -> Result<PeerRun, Box<dyn std::error::Error>> {
    let workflow = Workflow::builder()
        .stage("scan", Done("scan"))
        .stage("enrich", Done("enrich"))
        .stage("review", Done("review"))
        .dependency("enrich", "scan")
        .dependency("review", "enrich")
        .build()?;
    let mut store = MemoryStateStore::new();
    let records: Vec<Record> = (0..items).map(|i| Record(format!("item-{i:08}"))).collect();
    let started = Instant::now();
    for record in &records {
        workflow.advance(record, &mut store).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    for record in &records {
        if !workflow.is_complete(record.id(), &store).await? {
            return Err(format!("treadle 0.2.0 left `{}` unfinished", record.id()).into());
        }
    }
    Ok(PeerRun {
        items_per_sec: items as f64 / secs,
        secs,
    })
}
