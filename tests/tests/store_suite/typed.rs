//! Typed dataflow on every store: `#[stage]` functions that return typed
//! outputs and read upstream outputs as typed parameters.

use serde::{Deserialize, Serialize};
use serde_json::json;
use treadle::store::Store;
use treadle::{
    Decision, Error, ItemState, Pipeline, ReviewRequest, StageOutcome, StageState, StageStatus,
    Subtasks, pipeline, stage,
};

use crate::support::*;

/// What `scan` reports about a document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub pages: u32,
}

/// The tags a reviewer checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tags {
    pub tags: Vec<String>,
}

#[stage]
async fn scan(doc: &Doc) -> treadle::Result<Report> {
    Ok(Report { pages: doc.pages })
}

/// Skips documents without pages.
#[stage(may_skip)]
async fn ocr(_doc: &Doc, #[from(scan)] report: &Report) -> treadle::Result<StageOutcome<String>> {
    if report.pages == 0 {
        return Ok(StageOutcome::skip("nothing to read"));
    }
    Ok(StageOutcome::done(format!(
        "text of {} pages",
        report.pages
    )))
}

#[stage]
async fn index(
    _doc: &Doc,
    #[from(ocr)] text: Option<&String>,
    #[from(scan)] report: &Report,
) -> treadle::Result<String> {
    Ok(match text {
        Some(text) => format!("indexed {text}"),
        None => format!("nothing indexed ({} pages)", report.pages),
    })
}

/// Looks the document up in two sources, one subtask each.
#[stage(fan_out)]
async fn lookup(
    _doc: &Doc,
    #[from(scan)] report: &Report,
    ctx: &mut treadle::StageContext,
) -> treadle::Result<StageOutcome<u32>> {
    Ok(match ctx.subtask() {
        None => StageOutcome::fan_out(["discogs", "musicbrainz"]),
        Some(source) => StageOutcome::done(report.pages * source.len() as u32),
    })
}

#[stage]
async fn review(
    _doc: &Doc,
    #[from(lookup)] found: &Subtasks<u32>,
) -> treadle::Result<StageOutcome<Tags>> {
    let proposed = Tags {
        tags: found.iter().map(|(k, v)| format!("{k}:{v}")).collect(),
    };
    Ok(StageOutcome::needs_review(
        ReviewRequest::new("Check the tags").proposed_output(&proposed)?,
    ))
}

#[stage]
async fn export(
    _doc: &Doc,
    #[from(review)] tags: &Tags,
    #[from(scan)] report: &Report,
) -> treadle::Result<String> {
    Ok(format!("{} pages: {}", report.pages, tags.tags.join(", ")))
}

/// Declared neither `may_skip` nor `fan_out`, yet tries both.
#[stage]
async fn unruly(doc: &Doc, ctx: &mut treadle::StageContext) -> treadle::Result<StageOutcome<u32>> {
    let _ = ctx;
    Ok(match doc.pages {
        0 => StageOutcome::skip("no pages"),
        _ => StageOutcome::fan_out(["a"]),
    })
}

fn stage_status<'a>(status: &'a treadle::ItemStatus, name: &str) -> &'a StageStatus {
    status
        .stages
        .iter()
        .find(|stage| stage.name == name)
        .expect("the stage is in the status")
}

fn review_pipeline() -> Pipeline<Doc> {
    pipeline! { scan -> lookup -> review -> export }
}

pub async fn typed_outputs_flow_to_typed_reads<S: Store>(store: S) {
    let engine = engine(pipeline! { scan -> ocr -> index }, store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    assert_eq!(
        stage_status(&status, "scan").output,
        Some(json!({"pages": 3}))
    );
    assert_eq!(
        stage_status(&status, "index").output,
        Some(json!("indexed text of 3 pages"))
    );
}

pub async fn a_skipped_upstream_is_read_as_none<S: Store>(store: S) {
    let engine = engine(pipeline! { scan -> ocr -> index }, store);
    let blank = Doc {
        id: "blank".into(),
        pages: 0,
    };
    engine.submit(blank).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("blank").await.unwrap();
    assert_eq!(stage_status(&status, "ocr").state, StageState::Skipped);
    assert_eq!(
        stage_status(&status, "index").output,
        Some(json!("nothing indexed (0 pages)"))
    );
}

pub async fn fan_out_outputs_are_read_by_subtask<S: Store>(store: S) {
    let engine = engine(review_pipeline(), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(
        stage_status(&status, "review").state,
        StageState::AwaitingReview
    );
    let proposed = stage_status(&status, "review")
        .review
        .as_ref()
        .unwrap()
        .request
        .proposed_output
        .clone();
    assert_eq!(
        proposed,
        Some(json!({"tags": ["discogs:21", "musicbrainz:33"]}))
    );
}

pub async fn edits_of_the_wrong_shape_are_refused_and_change_nothing<S: Store>(store: S) {
    let engine = engine(review_pipeline(), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let before = engine.status("d").await.unwrap();
    let log_before = events_of(&engine, "d").await;
    let err = engine
        .approve_with_edits(
            "d",
            "review",
            Decision::by("alice"),
            json!({"tags": "jazz"}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::OutputShape { stage, .. } if stage == "review"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the value is not a valid output of stage `review`, a `Tags`"
    );
    assert_eq!(engine.status("d").await.unwrap(), before);
    assert_eq!(events_of(&engine, "d").await, log_before);
    // The review is still open, and a right-shaped decision is taken.
    engine
        .approve_with_edits(
            "d",
            "review",
            Decision::by("alice"),
            Tags {
                tags: vec!["jazz".into()],
            },
        )
        .await
        .unwrap();
}

pub async fn edits_of_the_right_shape_are_read_typed_downstream<S: Store>(store: S) {
    let engine = engine(review_pipeline(), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let edits = Tags {
        tags: vec!["jazz".into(), "bebop".into()],
    };
    engine
        .approve_with_edits("d", "review", Decision::by("alice"), &edits)
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    assert_eq!(
        stage_status(&status, "export").output,
        Some(json!("3 pages: jazz, bebop"))
    );
}

pub async fn outcomes_the_stage_did_not_declare_fail_it<S: Store>(store: S) {
    let engine = engine(pipeline! { unruly }, store);
    let blank = Doc {
        id: "blank".into(),
        pages: 0,
    };
    engine.submit_all([blank, doc("d")]).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let skipped = engine.status("blank").await.unwrap();
    assert_eq!(stage_status(&skipped, "unruly").state, StageState::Failed);
    assert_eq!(
        stage_status(&skipped, "unruly").last_error.as_deref(),
        Some(
            "`unruly` skipped, but it is not declared `#[stage(may_skip)]`; its readers expect an output"
        )
    );
    let fanned = engine.status("d").await.unwrap();
    assert_eq!(
        stage_status(&fanned, "unruly").last_error.as_deref(),
        Some(
            "`unruly` fanned out, but it is not declared `#[stage(fan_out)]`; its readers expect its output type"
        )
    );
}

pub async fn a_stored_output_of_another_shape_fails_the_reader<S: Store>(store: S) {
    // A hand-written `scan` stores a string where the typed reader expects a `Report`.
    let pipeline = Pipeline::builder()
        .stage(stage("scan", |_, _| async {
            StageOutcome::complete_with("three pages")
        }))
        .stage(ocr {})
        .edge("scan", "ocr")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    let ocr = stage_status(&status, "ocr");
    assert_eq!(ocr.state, StageState::Failed);
    let error = ocr.last_error.as_deref().unwrap();
    assert_eq!(
        error,
        "the stored output is not a valid output of stage `scan`, a `Report`: invalid type: \
         string \"three pages\", expected struct Report (after 1 attempts)"
    );
}
