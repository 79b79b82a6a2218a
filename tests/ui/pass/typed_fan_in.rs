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

#[stage(fan_out, may_skip)]
async fn enrich(_item: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome<u32>> {
    Ok(match ctx.subtask() {
        None => StageOutcome::fan_out(["musicbrainz", "discogs"]),
        Some(source) => StageOutcome::done(source.len() as u32),
    })
}

#[stage(fan_out)]
async fn lookup(_item: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome<String>> {
    Ok(match ctx.subtask() {
        None => StageOutcome::fan_out(["a", "b"]),
        Some(name) => StageOutcome::done(name.to_owned()),
    })
}

#[stage]
async fn merge(
    _item: &Doc,
    #[from(enrich)] found: Option<&Subtasks<u32>>,
    #[from(lookup)] names: &Subtasks<String>,
) -> treadle::Result<u32> {
    Ok(found.map_or(0, |found| found.values().sum()) + names.len() as u32)
}

fn main() {
    let _pipeline = pipeline! { { enrich, lookup } -> merge };
}
