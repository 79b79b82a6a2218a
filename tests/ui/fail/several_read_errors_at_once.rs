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

#[stage]
async fn scan(_item: &Doc, #[from(index)] _later: &Report) -> treadle::Result<Report> {
    Ok(Report { pages: 1 })
}

#[stage]
async fn ocr(
    _item: &Doc,
    #[from(scan)] _report: &Report,
    #[from(thumbnails)] _other: &Report,
) -> treadle::Result<Report> {
    Ok(Report { pages: 1 })
}

#[stage]
async fn thumbnails(_item: &Doc, #[from(audit)] _audit: &Report) -> treadle::Result<Report> {
    Ok(Report { pages: 1 })
}

#[stage]
async fn index(_item: &Doc, #[from(index)] _me: &Report) -> treadle::Result<Report> {
    Ok(Report { pages: 1 })
}

#[stage]
async fn audit(_item: &Doc) -> treadle::Result<Report> {
    Ok(Report { pages: 1 })
}

fn main() {
    let _pipeline = pipeline! {
        scan -> { ocr, thumbnails } -> index;
        index -> index;
        scan -> ocr;
    };
}
