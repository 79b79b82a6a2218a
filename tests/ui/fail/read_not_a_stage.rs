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

struct Audit;

#[stage]
async fn enrich(_item: &Doc, #[from(Audit)] _report: &Report) -> treadle::Result<Report> {
    Ok(Report { pages: 1 })
}

fn main() {}
