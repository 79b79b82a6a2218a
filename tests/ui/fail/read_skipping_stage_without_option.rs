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

#[derive(Serialize, Deserialize)]
struct Report {
    pages: u32,
}

#[stage(may_skip)]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome<Report>> {
    Ok(StageOutcome::skip("empty"))
}

#[stage]
async fn enrich(_item: &Doc, #[from(scan)] report: &Report) -> treadle::Result<Report> {
    Ok(Report {
        pages: report.pages,
    })
}

fn main() {
    let _pipeline = pipeline! { scan -> enrich };
}
