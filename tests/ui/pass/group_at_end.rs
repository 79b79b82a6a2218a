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
async fn ocr(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn thumbnails(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let pipeline = pipeline! {
        scan -> { ocr, thumbnails, }
    };
    let definition = pipeline.definition();
    assert_eq!(
        definition.edges,
        [
            ("scan".to_owned(), "ocr".to_owned()),
            ("scan".to_owned(), "thumbnails".to_owned())
        ]
    );
}
