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

#[stage]
async fn scan(_doc: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

struct NotAStage;

async fn plain(_doc: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let _a = pipeline! { scan -> NotAStage };
    let _b = pipeline! { scan -> plain };
    let _c = pipeline! { NotAStage -> scan };
}
