use treadle::prelude::*;

#[derive(Serialize, Deserialize)]
struct Doc {
    id: String,
}

impl WorkItem for Doc {
    fn id(&self) -> &str {
        &self.id
    }
}

#[stage(timeout = "30 seconds")]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(backoff_base = "1.5s")]
async fn enrich(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(timeout = "0s")]
async fn index(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {}
