//! The runtime pipeline builder: validation messages and graph exports.

mod support;

use support::{Doc, done};
use treadle::{Pipeline, PipelineProblem};

fn build(stages: &[&str], edges: &[(&str, &str)]) -> Result<Pipeline<Doc>, treadle::PipelineError> {
    let mut builder = Pipeline::builder();
    for name in stages {
        builder = builder.stage(done(name));
    }
    for (from, to) in edges {
        builder = builder.edge(*from, *to);
    }
    builder.build()
}

fn error(stages: &[&str], edges: &[(&str, &str)]) -> String {
    build(stages, edges).unwrap_err().to_string()
}

#[test]
fn a_cycle_is_reported_as_the_path_of_stage_names() {
    assert_eq!(
        error(
            &["scan", "enrich", "review"],
            &[("scan", "enrich"), ("enrich", "review"), ("review", "scan")]
        ),
        "invalid pipeline: cycle detected: scan -> enrich -> review -> scan"
    );
    assert_eq!(
        error(&["a", "b"], &[("a", "b"), ("b", "b")]),
        "invalid pipeline: cycle detected: b -> b"
    );
}

#[test]
fn a_cycle_behind_a_diamond_names_only_the_cycle() {
    let err = build(
        &["a", "b", "c", "d", "e"],
        &[
            ("a", "b"),
            ("a", "c"),
            ("b", "d"),
            ("c", "d"),
            ("d", "e"),
            ("e", "c"),
        ],
    )
    .unwrap_err();
    assert_eq!(
        err.problems,
        [PipelineProblem::Cycle(vec![
            "c".into(),
            "d".into(),
            "e".into(),
            "c".into()
        ])]
    );
}

#[test]
fn every_problem_is_reported_at_once_in_declaration_order() {
    assert_eq!(
        error(
            &["a", "b", "a"],
            &[("a", "b"), ("a", "b"), ("b", "x"), ("b", "a")]
        ),
        "invalid pipeline: duplicate stage `a`; duplicate edge `a -> b`; \
         edge `b -> x` names unknown stage `x`; cycle detected: a -> b -> a"
    );
}

#[test]
fn an_empty_pipeline_is_rejected() {
    assert_eq!(error(&[], &[]), "invalid pipeline: pipeline has no stages");
}

#[test]
fn definition_lists_stages_upstream_first_and_keeps_edge_order() {
    let pipeline = build(
        &["export", "review", "scan"],
        &[("scan", "review"), ("review", "export")],
    )
    .unwrap();
    assert_eq!(pipeline.definition().stages, ["scan", "review", "export"]);
    assert_eq!(pipeline.upstream_of("review").collect::<Vec<_>>(), ["scan"]);
    assert_eq!(
        pipeline.downstream_of("review").collect::<Vec<_>>(),
        ["export"]
    );
    assert_eq!(pipeline.len(), 3);
}

#[test]
fn graph_exports_as_dot_and_mermaid() {
    let pipeline = build(
        &["scan", "ocr", "thumbs", "index"],
        &[
            ("scan", "ocr"),
            ("scan", "thumbs"),
            ("ocr", "index"),
            ("thumbs", "index"),
        ],
    )
    .unwrap();
    let dot = pipeline.to_dot();
    assert!(dot.starts_with("digraph pipeline {\n"));
    for edge in [
        "\"scan\" -> \"ocr\";",
        "\"scan\" -> \"thumbs\";",
        "\"ocr\" -> \"index\";",
        "\"thumbs\" -> \"index\";",
    ] {
        assert!(dot.contains(edge), "{edge} missing from\n{dot}");
    }
    assert!(dot.trim_end().ends_with('}'));
    let mermaid = pipeline.to_mermaid();
    assert_eq!(
        mermaid,
        "flowchart LR\n    scan[\"scan\"]\n    ocr[\"ocr\"]\n    thumbs[\"thumbs\"]\n    index[\"index\"]\n    \
         scan --> ocr\n    scan --> thumbs\n    ocr --> index\n    thumbs --> index\n"
    );
}
