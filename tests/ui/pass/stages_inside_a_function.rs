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

fn main() {
    #[stage]
    async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::complete())
    }

    #[stage]
    async fn index(_item: &Doc) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::complete())
    }

    let pipeline: Pipeline<Doc> = pipeline! { scan -> index };
    assert_eq!(pipeline.len(), 2);
}
