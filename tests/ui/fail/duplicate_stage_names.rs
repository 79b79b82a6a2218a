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

#[stage(name = "scan")]
async fn scan_v1(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(name = "scan")]
async fn scan_v2(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn index(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let _pipeline = pipeline! { scan_v1 -> index; scan_v2 -> index };
}
