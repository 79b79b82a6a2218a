//! Runtime checks of what `#[stage]` and `pipeline!` generate: pipeline
//! definitions, policies, names, and that `run` calls the user's function.

use std::time::Duration;

use treadle::prelude::*;
use treadle::{Backoff, StagePolicy};

#[derive(Debug, Serialize, Deserialize)]
struct Doc {
    id: String,
    pages: u32,
}

impl WorkItem for Doc {
    fn id(&self) -> &str {
        &self.id
    }
}

fn doc(pages: u32) -> Doc {
    Doc {
        id: "doc-1".into(),
        pages,
    }
}

#[stage]
async fn scan(item: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    StageOutcome::complete_with(format!("{} pages, attempt {}", item.pages, ctx.attempt()))
}

#[stage(
    retries = 3,
    backoff = "fixed",
    backoff_base = "750ms",
    timeout = "45s"
)]
async fn ocr(item: &Doc) -> treadle::Result<StageOutcome> {
    if item.pages == 0 {
        return Ok(StageOutcome::Failed {
            reason: "no pages".into(),
        });
    }
    Ok(StageOutcome::complete())
}

#[stage(
    name = "make-thumbnails",
    backoff = "exponential",
    backoff_base = "100ms",
    backoff_max = "10s"
)]
async fn thumbnails(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::Skip {
        reason: "no images".into(),
    })
}

#[stage(timeout = "2m", retries = 0)]
async fn index(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(backoff_base = "10m")]
async fn archive(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

mod more {
    use super::Doc;
    use treadle::prelude::*;

    #[stage(name = "notify")]
    pub async fn send_notification(_item: &Doc) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::complete())
    }
}

fn pairs(edges: &[(&str, &str)]) -> Vec<(String, String)> {
    edges
        .iter()
        .map(|&(a, b)| (a.to_owned(), b.to_owned()))
        .collect()
}

#[test]
fn fan_out_and_in_definition() {
    let pipeline = pipeline! {
        scan -> { ocr, thumbnails } -> index;
        index -> more::send_notification;
        archive;
    };
    let definition = pipeline.definition();
    assert_eq!(
        definition.edges,
        pairs(&[
            ("scan", "ocr"),
            ("scan", "make-thumbnails"),
            ("ocr", "index"),
            ("make-thumbnails", "index"),
            ("index", "notify"),
        ])
    );
    assert_eq!(definition.stages.len(), 6);
    let position = |name: &str| {
        definition
            .stages
            .iter()
            .position(|s| s == name)
            .unwrap_or_else(|| panic!("{name} is a stage"))
    };
    for (from, to) in &definition.edges {
        assert!(position(from) < position(to), "{from} before {to}");
    }
    assert!(definition.stages.contains(&"archive".to_owned()));
    assert_eq!(
        pipeline.upstream_of("index").collect::<Vec<_>>(),
        ["ocr", "make-thumbnails"]
    );
    assert_eq!(
        pipeline.downstream_of("scan").collect::<Vec<_>>(),
        ["ocr", "make-thumbnails"]
    );
}

#[test]
fn chain_definition_is_in_topological_order() {
    let pipeline = pipeline! { index; ocr -> index; scan -> ocr };
    assert_eq!(pipeline.definition().stages, ["scan", "ocr", "index"]);
    assert_eq!(
        pipeline.definition().edges,
        pairs(&[("ocr", "index"), ("scan", "ocr")])
    );
}

#[test]
fn a_stage_in_several_statements_is_one_node() {
    let pipeline = pipeline! { scan -> ocr; scan -> index; scan; ocr -> index };
    assert_eq!(pipeline.len(), 3);
    assert_eq!(pipeline.definition().edges.len(), 3);
}

#[test]
fn options_produce_the_policy() {
    assert_eq!(Stage::<Doc>::policy(&scan {}), StagePolicy::DEFAULT);
    assert_eq!(
        Stage::<Doc>::policy(&ocr {}),
        StagePolicy {
            max_attempts: 4,
            backoff: Backoff::Fixed(Duration::from_millis(750)),
            timeout: Some(Duration::from_secs(45)),
        }
    );
    assert_eq!(
        Stage::<Doc>::policy(&thumbnails {}),
        StagePolicy {
            max_attempts: 1,
            backoff: Backoff::Exponential {
                base: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
            timeout: None,
        }
    );
    assert_eq!(
        Stage::<Doc>::policy(&index {}),
        StagePolicy {
            max_attempts: 1,
            backoff: StagePolicy::DEFAULT.backoff,
            timeout: Some(Duration::from_secs(120)),
        }
    );
    // A base longer than the default cap raises the cap to the base.
    assert_eq!(
        Stage::<Doc>::policy(&archive {}).backoff,
        Backoff::Exponential {
            base: Duration::from_secs(600),
            max: Duration::from_secs(600),
        }
    );
}

#[test]
fn name_defaults_to_the_function_and_can_be_overridden() {
    assert_eq!(Stage::<Doc>::name(&scan {}), "scan");
    assert_eq!(Stage::<Doc>::name(&thumbnails {}), "make-thumbnails");
    assert_eq!(Stage::<Doc>::name(&more::send_notification {}), "notify");
    let pipeline = pipeline! { more::send_notification };
    assert!(pipeline.stage("notify").is_some());
    assert!(pipeline.stage("send_notification").is_none());
}

#[tokio::test]
async fn run_calls_the_function_with_item_and_context() {
    let mut ctx = StageContext::new("doc-1", "scan").with_attempt(2);
    let outcome = Stage::run(&scan {}, &doc(12), &mut ctx).await.unwrap();
    assert_eq!(
        outcome,
        StageOutcome::complete_with("12 pages, attempt 2").unwrap()
    );
    // The function itself is still callable directly.
    let direct = scan(&doc(12), &mut ctx).await.unwrap();
    assert_eq!(direct, outcome);
}

#[tokio::test]
async fn run_calls_a_function_without_context() {
    let mut ctx = StageContext::new("doc-1", "ocr");
    let failed = Stage::run(&ocr {}, &doc(0), &mut ctx).await.unwrap();
    assert_eq!(
        failed,
        StageOutcome::Failed {
            reason: "no pages".into()
        }
    );
    let complete = Stage::run(&ocr {}, &doc(3), &mut ctx).await.unwrap();
    assert_eq!(complete, StageOutcome::complete());
}

#[tokio::test]
async fn stages_run_through_the_pipeline() {
    let pipeline = pipeline! { scan -> thumbnails };
    let stage = pipeline.stage("make-thumbnails").expect("the stage exists");
    let mut ctx = StageContext::new("doc-1", "make-thumbnails");
    let outcome = stage.run(&doc(1), &mut ctx).await.unwrap();
    assert_eq!(
        outcome,
        StageOutcome::Skip {
            reason: "no images".into()
        }
    );
}

// ---- typed outputs and reads ----

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Report {
    pages: u32,
}

#[stage]
async fn measure(item: &Doc) -> treadle::Result<Report> {
    Ok(Report { pages: item.pages })
}

#[stage]
async fn nothing(_item: &Doc) -> treadle::Result<()> {
    Ok(())
}

#[stage(may_skip)]
async fn maybe(item: &Doc) -> treadle::Result<StageOutcome<u32>> {
    Ok(match item.pages {
        0 => StageOutcome::skip("empty"),
        pages => StageOutcome::done(pages),
    })
}

#[stage]
async fn combine(
    _item: &Doc,
    #[from(maybe)] maybe_pages: Option<&u32>,
    ctx: &mut StageContext,
    #[from(measure)] report: &Report,
) -> treadle::Result<String> {
    Ok(format!(
        "{} / {:?} / attempt {}",
        report.pages,
        maybe_pages,
        ctx.attempt()
    ))
}

#[stage(fan_out)]
async fn split(_item: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome<u32>> {
    Ok(match ctx.subtask() {
        Some(_) => StageOutcome::done(1),
        // Completing without fanning out breaks the declaration.
        None => StageOutcome::done(0),
    })
}

#[stage]
async fn propose(item: &Doc) -> treadle::Result<StageOutcome<Report>> {
    let request = match item.pages {
        0 => ReviewRequest::new("check").proposed_output("not a report")?,
        pages => ReviewRequest::new("check").proposed_output(Report { pages })?,
    };
    Ok(StageOutcome::needs_review(request))
}

async fn run<S: Stage<Doc>>(
    stage: S,
    item: &Doc,
    ctx: StageContext,
) -> treadle::Result<StageOutcome> {
    let mut ctx = ctx;
    stage.run(item, &mut ctx).await
}

#[tokio::test]
async fn typed_outputs_are_stored_as_json() {
    let ctx = || StageContext::new("doc-1", "x");
    assert_eq!(
        run(measure {}, &doc(4), ctx()).await.unwrap(),
        StageOutcome::complete_with(serde_json::json!({"pages": 4})).unwrap()
    );
    // `()` stores no output.
    assert_eq!(
        run(nothing {}, &doc(4), ctx()).await.unwrap(),
        StageOutcome::complete()
    );
    assert_eq!(
        run(maybe {}, &doc(0), ctx()).await.unwrap(),
        StageOutcome::skip("empty")
    );
    let split_up = StageOutcome::failed(
        "`split` is declared `#[stage(fan_out)]`: it completes through its subtasks, so \
         without a subtask it must fan out",
    );
    assert_eq!(run(split {}, &doc(1), ctx()).await.unwrap(), split_up);
    assert_eq!(
        run(split {}, &doc(1), ctx().with_subtask("a"))
            .await
            .unwrap(),
        StageOutcome::complete_with(1).unwrap()
    );
}

#[tokio::test]
async fn reads_are_decoded_before_the_function_runs() {
    let ctx = StageContext::new("doc-1", "combine")
        .with_attempt(2)
        .with_output("measure", serde_json::json!({"pages": 7}))
        .with_output("maybe", serde_json::json!(5));
    assert_eq!(
        run(combine {}, &doc(1), ctx).await.unwrap(),
        StageOutcome::complete_with("7 / Some(5) / attempt 2").unwrap()
    );
    // A skipped stage stored nothing: read as `None`.
    let ctx = StageContext::new("doc-1", "combine")
        .with_output("measure", serde_json::json!({"pages": 7}));
    assert_eq!(
        run(combine {}, &doc(1), ctx).await.unwrap(),
        StageOutcome::complete_with("7 / None / attempt 1").unwrap()
    );
    // A missing or malformed output is an error naming the stage and type.
    let ctx = StageContext::new("doc-1", "combine");
    let error = run(combine {}, &doc(1), ctx).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "the stored output is not a valid output of stage `measure`, a `Report`"
    );
}

#[tokio::test]
async fn a_review_must_propose_an_output_of_the_stage_type() {
    let ctx = || StageContext::new("doc-1", "propose");
    assert!(matches!(
        run(propose {}, &doc(3), ctx()).await.unwrap(),
        StageOutcome::NeedsReview(_)
    ));
    let StageOutcome::Failed { reason } = run(propose {}, &doc(0), ctx()).await.unwrap() else {
        panic!("a wrong proposal fails the stage");
    };
    assert_eq!(
        reason,
        "asked for review, but approving it would store a wrong output: the proposed output \
         is not a valid output of stage `propose`, a `Report`: invalid type: string \
         \"not a report\", expected struct Report"
    );
}

#[test]
fn stage_types_expose_output_type_reads_and_checks() {
    let report: <measure as StageOutput>::Output = Report { pages: 1 };
    let maybe_pages: <maybe as StageOutput>::Output = Some(3);
    let split_outputs: <split as StageOutput>::Output = Subtasks::from([("a".into(), 1)]);
    let (_, _, _) = (report, maybe_pages, split_outputs);
    let flags = |may_skip, fan_out| (may_skip, fan_out);
    assert_eq!(
        flags(
            <maybe as StageOutput>::MAY_SKIP,
            <maybe as StageOutput>::FAN_OUT
        ),
        (true, false)
    );
    assert_eq!(
        flags(
            <split as StageOutput>::MAY_SKIP,
            <split as StageOutput>::FAN_OUT
        ),
        (false, true)
    );
    assert_eq!(Stage::<Doc>::reads(&combine {}), ["maybe", "measure"]);
    assert!(Stage::<Doc>::reads(&measure {}).is_empty());
    let check = |value| Stage::<Doc>::check_output(&measure {}, &value);
    assert!(check(serde_json::json!({"pages": 2})).is_ok());
    assert_eq!(
        check(serde_json::json!({"pages": "two"}))
            .unwrap_err()
            .to_string(),
        "the value is not a valid output of stage `measure`, a `Report`"
    );
    assert!(
        Stage::<Doc>::check_output(&maybe {}, &serde_json::Value::Null).is_ok(),
        "a stage that may skip accepts `null`"
    );
}
