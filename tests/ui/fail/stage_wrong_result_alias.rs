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

type Result<T> = std::result::Result<T, String>;

#[stage]
async fn scan(_item: &Doc) -> Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {}
