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
use std::time::Duration;
use treadle::{Backoff, StagePolicy};

#[stage(
    name = "optical-character-recognition",
    retries = 4,
    backoff = "exponential",
    backoff_base = "200ms",
    backoff_max = "1m",
    timeout = "2h"
)]
async fn ocr(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(
    retries = 1,
    backoff = "fixed",
    backoff_base = "500ms",
    timeout = "30s"
)]
async fn fetch(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn plain(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    assert_eq!(
        Stage::<Doc>::policy(&ocr {}),
        StagePolicy::new()
            .retries(4)
            .backoff(Backoff::Exponential {
                base: Duration::from_millis(200),
                max: Duration::from_secs(60),
            })
            .timeout(Duration::from_secs(7200))
    );
    assert_eq!(Stage::<Doc>::name(&ocr {}), "optical-character-recognition");
    assert_eq!(
        Stage::<Doc>::policy(&fetch {}),
        StagePolicy::new()
            .retries(1)
            .backoff(Backoff::Fixed(Duration::from_millis(500)))
            .timeout(Duration::from_secs(30))
    );
    assert_eq!(Stage::<Doc>::policy(&plain {}), StagePolicy::DEFAULT);
    let pipeline = pipeline! { fetch -> ocr -> plain };
    assert_eq!(
        pipeline.definition().stages,
        ["fetch", "optical-character-recognition", "plain"]
    );
}
