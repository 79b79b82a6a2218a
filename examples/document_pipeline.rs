//! A document pipeline: scan -> enrich (fan-out over metadata sources) ->
//! review (a person checks uncertain tags) -> export.
//!
//! ```text
//! cargo run --example document_pipeline                  # process, park reviews
//! cargo run --example document_pipeline -- --approve-all # approve parked reviews, finish
//! ```
//!
//! State lives in `treadle-example/document_pipeline.db` under the system's
//! temporary directory (SQLite; the first line printed names it), so a
//! second run resumes where the first stopped; `--db PATH` picks another
//! file (its directory is created) and `--memory` uses the in-memory store
//! instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use treadle::StageState;
use treadle::prelude::*;
use treadle::store::Store;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Document {
    id: String,
    title: String,
    pages: u32,
}

impl WorkItem for Document {
    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ScanReport {
    pages: u32,
    words: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Tags {
    tags: Vec<String>,
    confidence: f64,
}

/// Reads the document and reports its size.
#[stage(timeout = "5s")]
async fn scan(doc: &Document) -> treadle::Result<ScanReport> {
    Ok(ScanReport {
        pages: doc.pages,
        words: doc.title.split_whitespace().count() * 250 * doc.pages as usize,
    })
}

/// Looks the document up in three metadata sources at once, one subtask
/// each (so its readers get the subtasks' outputs, keyed by source), or
/// skips an empty document. `discogs` is flaky: its first attempt fails,
/// and the retry policy runs it again.
#[stage(
    fan_out,
    may_skip,
    retries = 2,
    backoff = "fixed",
    backoff_base = "50ms",
    timeout = "10s"
)]
async fn enrich(
    doc: &Document,
    #[from(scan)] report: &ScanReport,
    ctx: &mut StageContext,
) -> treadle::Result<StageOutcome<String>> {
    let Some(source) = ctx.subtask() else {
        if report.words == 0 {
            return Ok(StageOutcome::skip("nothing to look up"));
        }
        return Ok(StageOutcome::fan_out([
            "musicbrainz",
            "discogs",
            "wikidata",
        ]));
    };
    if source == "discogs" && ctx.attempt() == 1 {
        return Err(treadle::Error::stage("discogs: 503 Service Unavailable"));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let word = doc
        .title
        .split_whitespace()
        .next()
        .unwrap_or("untitled")
        .to_lowercase();
    Ok(StageOutcome::done(format!("{source}:{word}")))
}

/// Asks a person to check the tags when the sources disagree.
#[stage]
async fn review(
    doc: &Document,
    #[from(enrich)] found: Option<&Subtasks<String>>,
) -> treadle::Result<StageOutcome<Tags>> {
    let tags = found.map_or_else(Vec::new, |found| found.values().cloned().collect());
    let confidence = if doc.pages > 10 { 0.4 } else { 0.9 };
    let proposed = Tags { tags, confidence };
    if confidence < 0.5 {
        let request = ReviewRequest::new(format!("Check the tags of “{}”", doc.title))
            .details(&proposed)?
            .proposed_output(&proposed)?;
        return Ok(StageOutcome::needs_review(request));
    }
    Ok(StageOutcome::done(proposed))
}

/// Writes the reviewed result.
#[stage]
async fn export(doc: &Document, #[from(review)] tags: &Tags) -> treadle::Result<String> {
    Ok(format!("exported {} with {} tags", doc.id, tags.tags.len()))
}

fn documents() -> Vec<Document> {
    [
        ("doc-1", "Kind of Blue liner notes", 4),
        ("doc-2", "Abbey Road session sheets", 12),
        ("doc-3", "Blue Train press kit", 2),
        ("doc-4", "Untitled scan", 0),
        ("doc-5", "Rumours tour programme", 24),
    ]
    .into_iter()
    .map(|(id, title, pages)| Document {
        id: id.into(),
        title: title.into(),
        pages,
    })
    .collect()
}

async fn run<S: Store>(store: S, approve_all: bool) -> treadle::Result<()> {
    let engine = Engine::new(pipeline! { scan -> enrich -> review -> export }, store);
    let drift = engine.drift().await?;
    if !drift.is_empty() {
        println!("note: {drift}");
    }
    let new = engine.submit_all(documents()).await?;
    println!("submitted {new} new documents\n");
    if approve_all {
        for parked in engine.awaiting_review().await? {
            println!("approving {} at {}", parked.item_id, parked.stage);
            engine
                .approve(
                    &parked.item_id,
                    &parked.stage,
                    Decision::by("example").note("approved by --approve-all"),
                )
                .await?;
        }
    }
    engine.run_until_idle().await?;
    for doc in documents() {
        println!("{}", engine.status(&doc.id).await?);
    }
    let waiting = engine
        .items_in("review", StageState::AwaitingReview)
        .await?;
    if waiting.is_empty() {
        println!("nothing awaits review");
    } else {
        println!("awaiting review: {}", waiting.join(", "));
        println!("run again with `-- --approve-all` to approve them");
    }
    let done = engine
        .items_in("export", StageState::Completed)
        .await?
        .len();
    println!("{done} of {} documents exported", documents().len());
    Ok(())
}

/// Where the state lives unless `--db PATH` says otherwise: a directory of
/// the system's temporary directory, so the example runs the same wherever
/// cargo puts its build output.
fn default_db() -> PathBuf {
    std::env::temp_dir()
        .join("treadle-example")
        .join("document_pipeline.db")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let approve_all = args.iter().any(|a| a == "--approve-all");
    let outcome = if args.iter().any(|a| a == "--memory") {
        run(MemoryStore::new(), approve_all).await
    } else {
        let path = match args.iter().position(|a| a == "--db") {
            Some(i) => match args.get(i + 1) {
                Some(path) => PathBuf::from(path),
                None => {
                    eprintln!("document_pipeline: --db needs a path");
                    return ExitCode::from(2);
                }
            },
            None => default_db(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            eprintln!(
                "document_pipeline: cannot create the directory `{}`: {e}",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
        println!("state: {}", path.display());
        match SqliteStore::open(&path).await {
            Ok(store) => run(store, approve_all).await,
            Err(e) => Err(e),
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("document_pipeline: {}", error.with_causes());
            ExitCode::FAILURE
        }
    }
}
