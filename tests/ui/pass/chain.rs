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

#[stage]
async fn enrich(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn index(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let pipeline = pipeline! {
        scan -> enrich -> index
    };
    let definition = pipeline.definition();
    assert_eq!(definition.stages, ["scan", "enrich", "index"]);
    assert_eq!(
        definition.edges,
        [
            ("scan".to_owned(), "enrich".to_owned()),
            ("enrich".to_owned(), "index".to_owned())
        ]
    );
}
