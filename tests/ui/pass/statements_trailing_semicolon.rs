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

#[stage]
async fn audit(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let pipeline = pipeline! {
        scan -> enrich;
        enrich -> index;
        scan -> audit;
    };
    let definition = pipeline.definition();
    assert_eq!(
        definition.edges,
        [
            ("scan".to_owned(), "enrich".to_owned()),
            ("enrich".to_owned(), "index".to_owned()),
            ("scan".to_owned(), "audit".to_owned())
        ]
    );
    assert_eq!(pipeline.len(), 4);
}
