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

#[stage(name = "scan-v2")]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(name = "index")]
async fn build_index(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let pipeline = pipeline! { scan -> build_index };
    assert_eq!(pipeline.definition().stages, ["scan-v2", "index"]);
    assert_eq!(
        pipeline.definition().edges,
        [("scan-v2".to_owned(), "index".to_owned())]
    );
    assert!(pipeline.stage("scan").is_none());
}
