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
async fn scan(item: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    StageOutcome::complete_with(format!("{} at attempt {}", item.id, ctx.attempt()))
}

fn main() {
    let doc = Doc { id: "doc-7".into() };
    let mut ctx = StageContext::new("doc-7", "scan").with_attempt(3);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let outcome = runtime.block_on(scan(&doc, &mut ctx)).unwrap();
    assert_eq!(
        outcome,
        StageOutcome::complete_with("doc-7 at attempt 3").unwrap()
    );
    // The generated type runs the same function.
    let via_stage = runtime
        .block_on(Stage::run(&scan {}, &doc, &mut ctx))
        .unwrap();
    assert_eq!(via_stage, outcome);
}
