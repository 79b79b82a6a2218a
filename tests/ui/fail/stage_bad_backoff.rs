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

#[stage(backoff = "linear")]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(backoff = "fixed", backoff_base = "1s", backoff_max = "1m")]
async fn enrich(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(backoff_base = "10s", backoff_max = "1s")]
async fn index(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {}
