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

fn main() {
    let pipeline = pipeline! {
        scan
    };
    let definition = pipeline.definition();
    assert_eq!(definition.stages, ["scan"]);
    assert!(definition.edges.is_empty());
}
