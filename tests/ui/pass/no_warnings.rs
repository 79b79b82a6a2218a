//! Generated code adds no warnings, even for a public stage no pipeline uses
//! (a private one is dead code, reported on the function like any other),
//! and stage functions may be named like the generated `run`'s parameters.
#![deny(warnings, missing_docs, unused)]

use treadle::prelude::*;

/// A document.
#[derive(Serialize, Deserialize)]
pub struct Doc {
    id: String,
}

impl WorkItem for Doc {
    fn id(&self) -> &str {
        &self.id
    }
}

/// Never used in a pipeline.
#[stage]
pub async fn unused(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn item(item: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    StageOutcome::complete_with(format!("{}/{}", item.id, ctx.stage()))
}

#[stage]
async fn ctx(_ctx: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let pipeline = pipeline! { item -> ctx };
    assert_eq!(pipeline.definition().stages, ["item", "ctx"]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let doc = Doc { id: "d".into() };
    let mut context = StageContext::new("d", "item");
    let outcome = runtime
        .block_on(Stage::run(&item {}, &doc, &mut context))
        .unwrap();
    assert_eq!(outcome, StageOutcome::complete_with("d/item").unwrap());
}
