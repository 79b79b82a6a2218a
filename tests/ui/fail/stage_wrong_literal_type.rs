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

#[stage(name = scan, retries = "3", timeout = 30)]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {}
