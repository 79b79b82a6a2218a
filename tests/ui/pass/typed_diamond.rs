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
async fn scan(_item: &Doc) -> treadle::Result<Report> {
    Ok(Report { pages: 3 })
}

#[stage]
async fn ocr(_item: &Doc, #[from(scan)] report: &Report) -> treadle::Result<String> {
    Ok(format!("{} pages of text", report.pages))
}

#[stage]
async fn thumbnails(_item: &Doc, #[from(scan)] report: &Report) -> treadle::Result<Vec<u32>> {
    Ok((1..=report.pages).collect())
}

#[stage]
async fn index(
    _item: &Doc,
    #[from(ocr)] text: &String,
    #[from(thumbnails)] thumbs: &Vec<u32>,
    #[from(scan)] report: &Report,
) -> treadle::Result<()> {
    assert_eq!(thumbs.len(), report.pages as usize);
    assert!(!text.is_empty());
    Ok(())
}

fn main() {
    let pipeline = pipeline! { scan -> { ocr, thumbnails } -> index };
    assert_eq!(
        pipeline.stage("index").unwrap().reads(),
        ["ocr", "thumbnails", "scan"]
    );
    // Each stage's output type is reachable from its name.
    let pages: <scan as StageOutput>::Output = Report { pages: 2 };
    let text: <ocr as StageOutput>::Output = String::new();
    let _: (Report, String, <index as StageOutput>::Output) = (pages, text, ());
}
