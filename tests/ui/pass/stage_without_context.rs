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
async fn scan(item: &Doc) -> treadle::Result<StageOutcome> {
    StageOutcome::complete_with(item.id.len())
}

fn main() {
    let pipeline = pipeline! { scan };
    let doc = Doc { id: "doc-1".into() };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let stage = pipeline.stage("scan").unwrap();
    let mut ctx = StageContext::new("doc-1", "scan");
    let outcome = runtime.block_on(stage.run(&doc, &mut ctx)).unwrap();
    assert_eq!(outcome, StageOutcome::complete_with(5).unwrap());
    // The function is still there, callable with the item alone.
    assert_eq!(runtime.block_on(scan(&doc)).unwrap(), outcome);
}
