#!/usr/bin/env python3
"""Writes the trybuild cases under tests/ui/{fail,pass} and formats them with
rustfmt (except the case whose syntax is broken on purpose). Run
`python3 tests/ui/gen/make_cases.py`, then
`TRYBUILD=overwrite cargo test --test ui`; the generated files are committed."""

import os
import subprocess

HEADER = """use treadle::prelude::*;

#[derive(Serialize, Deserialize)]
struct Doc {
    id: String,
}

impl WorkItem for Doc {
    fn id(&self) -> &str {
        &self.id
    }
}
"""


def stage(name, attr="#[stage]", item="Doc"):
    return f"""
{attr}
async fn {name}(_item: &{item}, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {{
    Ok(StageOutcome::complete())
}}
"""


def pipeline_case(stages, body):
    if "\n" in body:
        body = "\n        " + body + "\n    "
    else:
        body = " " + body + " "
    return HEADER + "".join(stage(s) for s in stages) + f"""
fn main() {{
    let _pipeline = pipeline! {{{body}}};
}}
"""


FAIL = {}
PASS = {}

# --- pipeline! graph errors -------------------------------------------------
FAIL["cycle_self_loop"] = pipeline_case(["scan"], "scan -> scan")
FAIL["cycle_two_stages"] = pipeline_case(["scan", "enrich"], "scan -> enrich -> scan")
long = [f"step{i}" for i in range(1, 9)]
FAIL["cycle_long"] = pipeline_case(long, " -> ".join(long + ["step3"]))
FAIL["cycle_through_group"] = pipeline_case(
    ["scan", "ocr", "thumbnails", "index"], "scan -> { ocr, thumbnails } -> index -> scan"
)
FAIL["cycle_in_diamond"] = pipeline_case(
    ["scan", "ocr", "thumbnails", "index"],
    "scan -> { ocr, thumbnails } -> index;\n        index -> thumbnails;",
)
FAIL["cycle_across_statements"] = pipeline_case(
    ["scan", "enrich", "index"], "scan -> enrich;\n        enrich -> index;\n        index -> scan;"
)
FAIL["duplicate_edge"] = pipeline_case(["scan", "enrich"], "scan -> enrich;\n        scan -> enrich;")
FAIL["duplicate_edge_in_group"] = pipeline_case(["scan", "ocr"], "scan -> { ocr, ocr }")
FAIL["duplicate_edge_through_groups"] = pipeline_case(
    ["scan", "ocr", "index"], "{ scan, ocr } -> index;\n        ocr -> index;"
)
FAIL["several_errors_at_once"] = HEADER + "".join(
    stage(s) for s in ["scan", "ocr", "thumbnails", "index", "archive"]
) + """
struct Audit;

fn main() {
    let _pipeline = pipeline! {
        scan -> { ocr, thumbnails } -> index;
        index -> scan;
        scan -> ocr;
        archive -> archive;
        index -> Audit;
    };
}
"""
FAIL["empty_pipeline"] = HEADER + """
fn main() {
    let _pipeline: Pipeline<Doc> = pipeline! {};
}
"""
FAIL["empty_group"] = pipeline_case(["scan"], "scan -> {}")
FAIL["missing_arrow"] = pipeline_case(["scan", "enrich"], "scan enrich")
FAIL["double_arrow"] = pipeline_case(["scan", "enrich"], "scan -> -> enrich")
FAIL["trailing_arrow"] = pipeline_case(["scan"], "scan ->")
FAIL["group_missing_comma"] = pipeline_case(["scan", "ocr", "index"], "scan -> { ocr index }")
FAIL["nested_group"] = pipeline_case(["scan", "ocr"], "scan -> { { ocr } }")
FAIL["empty_statement"] = pipeline_case(["scan", "enrich"], "scan;; enrich")
FAIL["group_not_closed_before_arrow"] = pipeline_case(
    ["scan", "ocr", "index"], "scan -> { ocr, index -> scan }"
)
FAIL["unclosed_group"] = pipeline_case(["scan", "ocr"], "scan -> { ocr").replace(" };\n}", ";\n}")

# --- pipeline! names that are not stages ------------------------------------
FAIL["not_a_stage"] = HEADER + stage("scan") + """
struct Audit;

async fn plain(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let _first = pipeline! { scan -> Audit };
    let _second = pipeline! { Audit -> scan };
    let _third = pipeline! { scan -> plain };
    let _fourth = pipeline! { scan -> missing };
}
"""
FAIL["not_a_stage_paths"] = HEADER + stage("scan") + """
mod stages {
    use super::Doc;
    use treadle::prelude::*;

    /// A stage written by hand: it implements `Stage` but is not a `#[stage]`
    /// type, so `pipeline!` cannot construct it (use `Pipeline::builder()`).
    pub struct Manual;

    #[treadle::__private::async_trait]
    impl Stage<Doc> for Manual {
        fn name(&self) -> &str {
            "manual"
        }

        async fn run(&self, _item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
            Ok(StageOutcome::complete())
        }
    }

    #[stage]
    async fn private(_item: &Doc) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::complete())
    }
}

fn main() {
    let _first = pipeline! { scan -> stages::Manual };
    let _second = pipeline! { scan -> stages::private };
    let _third = pipeline! { scan -> stages::missing };
}
"""
FAIL["mismatched_item_types"] = HEADER + """
#[derive(Serialize, Deserialize)]
struct Invoice {
    id: String,
}

impl WorkItem for Invoice {
    fn id(&self) -> &str {
        &self.id
    }
}
""" + stage("scan") + stage("bill", item="Invoice") + stage("index") + """
fn main() {
    let _pipeline = pipeline! { scan -> bill -> index };
}
"""
FAIL["duplicate_stage_names"] = HEADER + stage("scan_v1", '#[stage(name = "scan")]') + stage(
    "scan_v2", '#[stage(name = "scan")]'
) + stage("index") + """
fn main() {
    let _pipeline = pipeline! { scan_v1 -> index; scan_v2 -> index };
}
"""

# --- #[stage] errors ----------------------------------------------------------
def stage_case(code):
    return HEADER + code + "\nfn main() {}\n"


FAIL["stage_not_async"] = stage_case("""
#[stage]
fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_no_item_parameter"] = stage_case("""
#[stage]
async fn scan() -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_item_by_value"] = stage_case("""
#[stage]
async fn scan(_item: Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_item_by_mut_ref"] = stage_case("""
#[stage]
async fn scan(_item: &mut Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_extra_parameter"] = stage_case("""
#[stage]
async fn scan(_item: &Doc, _ctx: &mut StageContext, _retries: u32) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_context_not_mut"] = stage_case("""
#[stage]
async fn scan(_item: &Doc, _ctx: StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_context_wrong_type"] = stage_case("""
#[stage]
async fn scan(_item: &Doc, _ctx: &mut String) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_missing_return_type"] = stage_case("""
#[stage]
async fn scan(_item: &Doc) {}
""")
FAIL["stage_wrong_return_type"] = stage_case("""
#[stage]
async fn scan(_item: &Doc) -> Result<String, treadle::Error> {
    Ok(String::new())
}
""")
FAIL["stage_wrong_result_alias"] = stage_case("""
type Result<T> = std::result::Result<T, String>;

#[stage]
async fn scan(_item: &Doc) -> Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_generic"] = stage_case("""
#[stage]
async fn scan<T>(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_unknown_option"] = stage_case("""
#[stage(retry = 3)]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_repeated_option"] = stage_case("""
#[stage(retries = 3, timeout = "10s", retries = 5)]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_bad_duration"] = stage_case("""
#[stage(timeout = "30 seconds")]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(backoff_base = "1.5s")]
async fn enrich(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(timeout = "0s")]
async fn index(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_wrong_literal_type"] = stage_case("""
#[stage(name = scan, retries = "3", timeout = 30)]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_bad_backoff"] = stage_case("""
#[stage(backoff = "linear")]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(backoff = "fixed", backoff_base = "1s", backoff_max = "1m")]
async fn enrich(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(backoff_base = "10s", backoff_max = "1s")]
async fn index(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}
""")
FAIL["stage_many_errors_at_once"] = stage_case("""
#[stage(retries = 3, retries = 4, colour = "blue")]
fn scan(_item: Doc, _extra: u8, _more: u8) -> String {
    String::new()
}
""")
FAIL["stage_on_a_struct"] = stage_case("""
#[stage]
struct Scan;
""")
FAIL["stage_error_does_not_cascade"] = HEADER + """
#[stage]
fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(retries = "many")]
async fn enrich(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn index(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let _pipeline = pipeline! { scan -> enrich -> index };
    let _first_is_broken = pipeline! { scan -> index };
}
"""

# --- pass cases --------------------------------------------------------------
def pass_case(stages, body, checks):
    return HEADER + "".join(stage(s) for s in stages) + f"""
fn main() {{
    let pipeline = pipeline! {{
        {body}
    }};
    let definition = pipeline.definition();
{checks}
}}
"""


def edges(*pairs):
    return ", ".join(f'("{a}".to_owned(), "{b}".to_owned())' for a, b in pairs)


PASS["chain"] = pass_case(
    ["scan", "enrich", "index"],
    "scan -> enrich -> index",
    f"""    assert_eq!(definition.stages, ["scan", "enrich", "index"]);
    assert_eq!(definition.edges, [{edges(("scan", "enrich"), ("enrich", "index"))}]);""",
)
PASS["statements_trailing_semicolon"] = pass_case(
    ["scan", "enrich", "index", "audit"],
    "scan -> enrich;\n        enrich -> index;\n        scan -> audit;",
    f"""    assert_eq!(definition.edges, [{edges(("scan", "enrich"), ("enrich", "index"), ("scan", "audit"))}]);
    assert_eq!(pipeline.len(), 4);""",
)
PASS["statements_no_trailing_semicolon"] = pass_case(
    ["scan", "enrich", "index"],
    "scan -> enrich; enrich -> index",
    f"""    assert_eq!(definition.stages, ["scan", "enrich", "index"]);
    assert_eq!(definition.edges, [{edges(("scan", "enrich"), ("enrich", "index"))}]);""",
)
PASS["lone_stage"] = pass_case(
    ["scan"],
    "scan",
    """    assert_eq!(definition.stages, ["scan"]);
    assert!(definition.edges.is_empty());""",
)
PASS["lone_stages_and_chains"] = pass_case(
    ["scan", "enrich", "archive"],
    "scan -> enrich;\n        archive;\n        scan;",
    f"""    assert_eq!(pipeline.len(), 3);
    assert_eq!(definition.edges, [{edges(("scan", "enrich"))}]);""",
)
PASS["group_at_start"] = pass_case(
    ["ocr", "thumbnails", "index"],
    "{ ocr, thumbnails } -> index",
    f"""    assert_eq!(definition.edges, [{edges(("ocr", "index"), ("thumbnails", "index"))}]);
    assert_eq!(definition.stages.last().map(String::as_str), Some("index"));""",
)
PASS["group_in_middle"] = pass_case(
    ["scan", "ocr", "thumbnails", "index"],
    "scan -> { ocr, thumbnails } -> index",
    f"""    assert_eq!(
        definition.edges,
        [{edges(("scan", "ocr"), ("scan", "thumbnails"), ("ocr", "index"), ("thumbnails", "index"))}]
    );
    assert_eq!(definition.stages.first().map(String::as_str), Some("scan"));
    assert_eq!(definition.stages.last().map(String::as_str), Some("index"));""",
)
PASS["group_at_end"] = pass_case(
    ["scan", "ocr", "thumbnails"],
    "scan -> { ocr, thumbnails, }",
    f"""    assert_eq!(definition.edges, [{edges(("scan", "ocr"), ("scan", "thumbnails"))}]);""",
)
PASS["group_to_group"] = pass_case(
    ["a", "b", "c", "d"],
    "{ a, b } -> { c, d }",
    f"""    assert_eq!(definition.edges, [{edges(("a", "c"), ("b", "c"), ("a", "d"), ("b", "d"))}]);""",
)
PASS["diamond"] = pass_case(
    ["scan", "ocr", "thumbnails", "index"],
    "scan -> ocr -> index;\n        scan -> thumbnails -> index;",
    f"""    assert_eq!(
        definition.edges,
        [{edges(("scan", "ocr"), ("ocr", "index"), ("scan", "thumbnails"), ("thumbnails", "index"))}]
    );
    assert_eq!(pipeline.upstream_of("index").collect::<Vec<_>>(), ["ocr", "thumbnails"]);""",
)
PASS["stage_without_context"] = HEADER + """
#[stage]
async fn scan(item: &Doc) -> treadle::Result<StageOutcome> {
    StageOutcome::complete_with(item.id.len())
}

fn main() {
    let pipeline = pipeline! { scan };
    let doc = Doc { id: "doc-1".into() };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let stage = pipeline.stage("scan").unwrap();
    let mut ctx = StageContext::new("doc-1", "scan");
    let outcome = runtime.block_on(stage.run(&doc, &mut ctx)).unwrap();
    assert_eq!(outcome, StageOutcome::complete_with(5).unwrap());
    // The function is still there, callable with the item alone.
    assert_eq!(runtime.block_on(scan(&doc)).unwrap(), outcome);
}
"""
PASS["all_options"] = HEADER + """use std::time::Duration;
use treadle::{Backoff, StagePolicy};

#[stage(
    name = "optical-character-recognition",
    retries = 4,
    backoff = "exponential",
    backoff_base = "200ms",
    backoff_max = "1m",
    timeout = "2h",
)]
async fn ocr(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(retries = 1, backoff = "fixed", backoff_base = "500ms", timeout = "30s")]
async fn fetch(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn plain(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    assert_eq!(
        Stage::<Doc>::policy(&ocr {}),
        StagePolicy::new()
            .retries(4)
            .backoff(Backoff::Exponential {
                base: Duration::from_millis(200),
                max: Duration::from_secs(60),
            })
            .timeout(Duration::from_secs(7200))
    );
    assert_eq!(Stage::<Doc>::name(&ocr {}), "optical-character-recognition");
    assert_eq!(
        Stage::<Doc>::policy(&fetch {}),
        StagePolicy::new()
            .retries(1)
            .backoff(Backoff::Fixed(Duration::from_millis(500)))
            .timeout(Duration::from_secs(30))
    );
    assert_eq!(Stage::<Doc>::policy(&plain {}), StagePolicy::DEFAULT);
    let pipeline = pipeline! { fetch -> ocr -> plain };
    assert_eq!(
        pipeline.definition().stages,
        ["fetch", "optical-character-recognition", "plain"]
    );
}
"""
PASS["name_override"] = HEADER + """
#[stage(name = "scan-v2")]
async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage(name = "index")]
async fn build_index(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let pipeline = pipeline! { scan -> build_index };
    assert_eq!(pipeline.definition().stages, ["scan-v2", "index"]);
    assert_eq!(
        pipeline.definition().edges,
        [("scan-v2".to_owned(), "index".to_owned())]
    );
    assert!(pipeline.stage("scan").is_none());
}
"""
PASS["direct_call"] = HEADER + """
#[stage]
async fn scan(item: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    StageOutcome::complete_with(format!("{} at attempt {}", item.id, ctx.attempt()))
}

fn main() {
    let doc = Doc { id: "doc-7".into() };
    let mut ctx = StageContext::new("doc-7", "scan").with_attempt(3);
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let outcome = runtime.block_on(scan(&doc, &mut ctx)).unwrap();
    assert_eq!(outcome, StageOutcome::complete_with("doc-7 at attempt 3").unwrap());
    // The generated type runs the same function.
    let via_stage = runtime.block_on(Stage::run(&scan {}, &doc, &mut ctx)).unwrap();
    assert_eq!(via_stage, outcome);
}
"""
PASS["stage_paths_and_visibility"] = HEADER + """
mod stages {
    use super::Doc;
    use treadle::prelude::*;

    #[stage]
    pub async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::complete())
    }

    pub mod nested {
        use super::super::Doc;
        use treadle::{StageContext, StageOutcome, stage};

        #[stage]
        pub(crate) async fn index(
            _item: &Doc,
            _ctx: &mut StageContext,
        ) -> treadle::Result<StageOutcome> {
            Ok(StageOutcome::complete())
        }
    }
}

fn main() {
    let pipeline = treadle::pipeline! {
        stages::scan -> crate::stages::nested::index;
    };
    assert_eq!(pipeline.definition().stages, ["scan", "index"]);
}
"""
PASS["stages_inside_a_function"] = HEADER + """
fn main() {
    #[stage]
    async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::complete())
    }

    #[stage]
    async fn index(_item: &Doc) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::complete())
    }

    let pipeline: Pipeline<Doc> = pipeline! { scan -> index };
    assert_eq!(pipeline.len(), 2);
}
"""
PASS["no_warnings"] = """//! Generated code adds no warnings, even for a public stage no pipeline uses
//! (a private one is dead code, reported on the function like any other),
//! and stage functions may be named like the generated `run`'s parameters.
#![deny(warnings, missing_docs, unused)]

use treadle::prelude::*;

/// A document.
#[derive(Serialize, Deserialize)]
pub struct Doc {
    id: String,
}

impl WorkItem for Doc {
    fn id(&self) -> &str {
        &self.id
    }
}

/// Never used in a pipeline.
#[stage]
pub async fn unused(_item: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

#[stage]
async fn item(item: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    StageOutcome::complete_with(format!("{}/{}", item.id, ctx.stage()))
}

#[stage]
async fn ctx(_ctx: &Doc) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

fn main() {
    let pipeline = pipeline! { item -> ctx };
    assert_eq!(pipeline.definition().stages, ["item", "ctx"]);
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let doc = Doc { id: "d".into() };
    let mut context = StageContext::new("d", "item");
    let outcome = runtime.block_on(Stage::run(&item {}, &doc, &mut context)).unwrap();
    assert_eq!(outcome, StageOutcome::complete_with("d/item").unwrap());
}
"""

N = 200
big = HEADER + "\n// Generated by gen/make_cases.py: 200 stages in one pipeline.\n"
big += "".join(stage(f"stage{i:03}") for i in range(N))
rows = []
for i in range(0, N, 10):
    rows.append("        " + " -> ".join(f"stage{j:03}" for j in range(i, i + 10)) + ";")
for i in range(9, N - 1, 10):
    rows.append(f"        stage{i:03} -> stage{i + 1:03};")
rows.append("        stage000 -> { " + ", ".join(f"stage{j:03}" for j in range(50, N, 50)) + " };")
big += """
fn main() {
    let pipeline = pipeline! {
""" + "\n".join(rows) + f"""
    }};
    assert_eq!(pipeline.len(), {N});
    let stages = &pipeline.definition().stages;
    assert_eq!(stages.first().map(String::as_str), Some("stage000"));
    assert_eq!(stages.last().map(String::as_str), Some("stage199"));
    assert_eq!(pipeline.definition().edges.len(), {N - 1 + 3});
}}
"""
PASS["two_hundred_stages"] = big

# --- typed dataflow: reads checked by #[stage] and pipeline! ----------------
TYPED = HEADER + """
#[derive(Serialize, Deserialize)]
struct Report {
    pages: u32,
}
"""


def typed(name, reads="", returns="treadle::Result<Report>", body="Ok(Report { pages: 1 })", attr="#[stage]"):
    return f"""
{attr}
async fn {name}(_item: &Doc{reads}) -> {returns} {{
    {body}
}}
"""


def typed_case(stages, body):
    return TYPED + "".join(stages) + f"""
fn main() {{
    let _pipeline = pipeline! {{ {body} }};
}}
"""


FAIL["read_downstream"] = typed_case(
    [typed("scan"), typed("enrich", ", #[from(review)] _report: &Report"), typed("review")],
    "scan -> enrich -> review",
)
FAIL["read_sibling_branch"] = typed_case(
    [typed("scan"), typed("ocr", ", #[from(thumbnails)] _report: &Report"), typed("thumbnails")],
    "scan -> { ocr, thumbnails }",
)
FAIL["read_itself"] = typed_case(
    [typed("scan"), typed("enrich", ", #[from(enrich)] _report: &Report")],
    "scan -> enrich",
)
FAIL["read_not_in_pipeline"] = typed_case(
    [typed("scan"), typed("enrich", ", #[from(audit)] _report: &Report"), typed("audit")],
    "scan -> enrich",
)
FAIL["read_not_a_stage"] = TYPED + """
struct Audit;

""" + typed("enrich", ", #[from(Audit)] _report: &Report") + """
fn main() {}
"""
FAIL["read_type_mismatch"] = TYPED + typed("scan") + typed(
    "enrich", ", #[from(scan)] pages: &u32", body="Ok(Report { pages: *pages })"
) + typed("index", ", #[from(scan)] report: Option<&Report>", body="Ok(Report { pages: report.map_or(0, |r| r.pages) })") + """
fn main() {
    let _pipeline = pipeline! { scan -> enrich -> index };
}
"""
FAIL["read_skipping_stage_without_option"] = TYPED + typed(
    "scan",
    returns="treadle::Result<StageOutcome<Report>>",
    body='Ok(StageOutcome::skip("empty"))',
    attr="#[stage(may_skip)]",
) + typed("enrich", ", #[from(scan)] report: &Report", body="Ok(Report { pages: report.pages })") + """
fn main() {
    let _pipeline = pipeline! { scan -> enrich };
}
"""
FAIL["skip_options_need_a_typed_outcome"] = TYPED + typed(
    "scan", attr="#[stage(may_skip, fan_out)]"
) + """
fn main() {}
"""
FAIL["several_read_errors_at_once"] = TYPED + "".join([
    typed("scan", ", #[from(index)] _later: &Report"),
    typed("ocr", ", #[from(scan)] _report: &Report, #[from(thumbnails)] _other: &Report"),
    typed("thumbnails", ", #[from(audit)] _audit: &Report"),
    typed("index", ", #[from(index)] _me: &Report"),
    typed("audit"),
]) + """
fn main() {
    let _pipeline = pipeline! {
        scan -> { ocr, thumbnails } -> index;
        index -> index;
        scan -> ocr;
    };
}
"""

PASS["typed_diamond"] = TYPED + """
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
    assert_eq!(pipeline.stage("index").unwrap().reads(), ["ocr", "thumbnails", "scan"]);
    // Each stage's output type is reachable from its name.
    let pages: <scan as StageOutput>::Output = Report { pages: 2 };
    let text: <ocr as StageOutput>::Output = String::new();
    let _: (Report, String, <index as StageOutput>::Output) = (pages, text, ());
}
"""
PASS["typed_fan_in"] = TYPED + """
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
"""
chain = TYPED + "\n// Generated by gen/make_cases.py: 50 stages, each reading its predecessor.\n"
chain += typed("step00", returns="treadle::Result<u32>", body="Ok(0)")
for i in range(1, 50):
    chain += typed(
        f"step{i:02}",
        reads=f", #[from(step{i - 1:02})] previous: &u32",
        returns="treadle::Result<u32>",
        body="Ok(previous + 1)",
    )
chain += """
fn main() {
    let pipeline = pipeline! {
        """ + "\n        ".join(
    " -> ".join(f"step{j:02}" for j in range(i, min(i + 10, 50))) + (" ->" if i + 10 < 50 else "")
    for i in range(0, 50, 10)
) + """
    };
    assert_eq!(pipeline.len(), 50);
}
"""
PASS["typed_chain_of_fifty"] = chain

here = os.path.dirname(os.path.abspath(__file__))
for kind, cases in (("fail", FAIL), ("pass", PASS)):
    folder = os.path.join(here, "..", kind)
    os.makedirs(folder, exist_ok=True)
    for name, code in cases.items():
        path = os.path.join(folder, name + ".rs")
        with open(path, "w") as f:
            f.write(code)
        if name != "unclosed_group":
            subprocess.run(["rustfmt", "--edition", "2024", path], check=True)
print(len(FAIL), "fail cases,", len(PASS), "pass cases")
