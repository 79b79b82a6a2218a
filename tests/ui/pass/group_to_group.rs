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
async fn a(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn b(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn c(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn d(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let pipeline = pipeline! {
        { a, b } -> { c, d }
    };
    let definition = pipeline.definition();
    assert_eq!(
        definition.edges,
        [
            ("a".to_owned(), "c".to_owned()),
            ("b".to_owned(), "c".to_owned()),
            ("a".to_owned(), "d".to_owned()),
            ("b".to_owned(), "d".to_owned())
        ]
    );
}
