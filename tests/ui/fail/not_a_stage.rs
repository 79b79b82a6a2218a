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
async fn scan(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

struct Audit;

async fn plain(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let _first = pipeline! { scan -> Audit };
    let _second = pipeline! { Audit -> scan };
    let _third = pipeline! { scan -> plain };
    let _fourth = pipeline! { scan -> missing };
}
