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

#[stage(may_skip, fan_out)]
async fn scan(_item: &Doc) -> treadle::Result<Report> {
    Ok(Report { pages: 1 })
}

fn main() {}
