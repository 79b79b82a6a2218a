//! What the commands print: each report as text for people or as one JSON
//! document for programs (`--json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Write};

use serde::Serialize;
use treadle::{AwaitingReview, Event, ItemStatus, PipelineDef, PipelineDrift, StageState};

use crate::cli::GraphFormat;

/// A command's result, printable both ways.
pub trait Report: Serialize {
    /// Appends the human-readable form to `out`.
    fn text(&self, out: &mut String);
}

/// Prints `report` on `out`: text, or one JSON document when `json`.
pub fn emit<R: Report>(report: &R, json: bool, out: &mut dyn Write) -> io::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, report)?;
        writeln!(out)?;
    } else {
        let mut text = String::new();
        report.text(&mut text);
        out.write_all(text.as_bytes())?;
    }
    out.flush()
}

/// Item counts of one stage, by state name (every state present, zeros included).
pub type Counts = BTreeMap<&'static str, u64>;

/// A count of zero for every state.
pub fn zero_counts() -> Counts {
    StageState::ALL.iter().map(|s| (s.as_str(), 0)).collect()
}

/// `treadle status`: item counts per stage and state.
#[derive(Debug, Serialize)]
pub struct Overview {
    /// The latest pipeline version and the unfinished items of older ones.
    pub pipeline: Option<PipelineDrift>,
    /// One row per stage, in the pipeline's topological order (stages the
    /// pipeline no longer has, but items still do, come last).
    pub stages: Vec<StageRow>,
}

/// One stage's item counts.
#[derive(Debug, Serialize)]
pub struct StageRow {
    /// The stage.
    pub stage: String,
    /// How many items are in each state.
    pub counts: Counts,
}

impl Report for Overview {
    fn text(&self, out: &mut String) {
        // Only the states some item is in, in lifecycle order.
        let states: Vec<&str> = StageState::ALL
            .iter()
            .map(|s| s.as_str())
            .filter(|s| self.stages.iter().any(|row| row.counts[s] > 0))
            .collect();
        if let Some(pipeline) = &self.pipeline {
            let _ = writeln!(out, "{pipeline}");
        }
        if states.is_empty() {
            let _ = writeln!(out, "no items");
            return;
        }
        let mut rows = vec![
            std::iter::once("stage")
                .chain(states.iter().copied())
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        ];
        for row in &self.stages {
            rows.push(
                std::iter::once(row.stage.clone())
                    .chain(states.iter().map(|s| row.counts[s].to_string()))
                    .collect(),
            );
        }
        table(&rows, out);
    }
}

/// Writes rows as aligned columns: the first left-aligned, the rest right-aligned.
fn table(rows: &[Vec<String>], out: &mut String) {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let width = widths[c];
            if c == 0 {
                let _ = write!(line, "{cell:<width$}");
            } else {
                let _ = write!(line, "  {cell:>width$}");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// `treadle status ITEM`: one item in full.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct ItemReport(pub ItemStatus);

impl Report for ItemReport {
    fn text(&self, out: &mut String) {
        let status = &self.0;
        let _ = write!(out, "{status}");
        let _ = writeln!(out, "  submitted {}", time(status.submitted_at));
        for stage in &status.stages {
            let history = stage
                .attempts
                .iter()
                .map(|a| (None, a))
                .chain(
                    stage
                        .subtasks
                        .iter()
                        .flat_map(|s| s.attempts.iter().map(move |a| (Some(&s.name), a))),
                )
                .collect::<Vec<_>>();
            if history.is_empty() && stage.review.is_none() {
                continue;
            }
            let _ = writeln!(out, "\n{}:", stage.name);
            for (subtask, attempt) in history {
                let ms = (attempt.finished_at - attempt.started_at).num_milliseconds();
                let _ = write!(out, "  ");
                if let Some(subtask) = subtask {
                    let _ = write!(out, "{subtask} ");
                }
                let _ = write!(
                    out,
                    "attempt {}  {}  {ms} ms  {}",
                    attempt.attempt,
                    time(attempt.started_at),
                    attempt.result
                );
                if let Some(error) = &attempt.error {
                    let _ = write!(out, ": {error}");
                }
                let _ = writeln!(out);
            }
            if let Some(output) = &stage.output {
                let _ = writeln!(out, "  output: {output}");
            }
            if let Some(review) = &stage.review {
                let _ = writeln!(
                    out,
                    "  review #{} requested {}: {}",
                    review.round,
                    time(review.requested_at),
                    review.request.summary
                );
                review_request_lines(&review.request, out);
                if let Some(d) = &review.decision {
                    let _ = write!(
                        out,
                        "    decision: {} by {} at {}",
                        d.kind,
                        d.by,
                        time(d.at)
                    );
                    if let Some(note) = &d.note {
                        let _ = write!(out, ", note: {note}");
                    }
                    if let Some(reason) = &d.reason {
                        let _ = write!(out, ", reason: {reason}");
                    }
                    let _ = writeln!(out);
                    if let Some(edits) = &d.edits {
                        let _ = writeln!(out, "    edits: {edits}");
                    }
                }
            }
        }
    }
}

/// The details, proposed output and deadline of a review request, indented.
fn review_request_lines(request: &treadle::ReviewRequest, out: &mut String) {
    if !request.details.is_null() {
        let _ = writeln!(out, "    details: {}", request.details);
    }
    if let Some(proposed) = &request.proposed_output {
        let _ = writeln!(out, "    proposed output: {proposed}");
    }
    if let Some(deadline) = &request.deadline {
        let then = match &deadline.then {
            treadle::DeadlineAction::Approve => "approve".to_owned(),
            treadle::DeadlineAction::Reject { reason } => format!("reject ({reason})"),
        };
        let _ = writeln!(out, "    deadline: {}, then {then}", time(deadline.at));
    }
}

/// A timestamp as people read it.
fn time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string()
}

/// `treadle items`: the items of a stage in a state.
#[derive(Debug, Serialize)]
pub struct ItemList {
    /// The stage asked about.
    pub stage: String,
    /// The state asked about.
    pub state: StageState,
    /// The item ids, in submission order.
    pub items: Vec<String>,
}

impl Report for ItemList {
    fn text(&self, out: &mut String) {
        for item in &self.items {
            let _ = writeln!(out, "{item}");
        }
    }
}

/// `treadle review list`: the stages awaiting review, oldest first.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct ReviewList(pub Vec<AwaitingReview>);

impl Report for ReviewList {
    fn text(&self, out: &mut String) {
        if self.0.is_empty() {
            let _ = writeln!(out, "no reviews waiting");
            return;
        }
        for (i, waiting) in self.0.iter().enumerate() {
            if i > 0 {
                let _ = writeln!(out);
            }
            let review = &waiting.review;
            let _ = writeln!(
                out,
                "{} {} (pipeline version {}, round {}, requested {}): {}",
                waiting.item_id,
                waiting.stage,
                waiting.version,
                review.round,
                time(review.requested_at),
                review.request.summary
            );
            review_request_lines(&review.request, out);
        }
    }
}

/// The result of a command that changed something: what it did and the
/// events it committed.
#[derive(Debug, Serialize)]
pub struct Change {
    /// What was done: `approved`, `approved_with_edits`, `rejected`,
    /// `retry_requested`, `rerun_requested`, `cancelled`.
    pub action: &'static str,
    /// The item.
    pub item_id: String,
    /// The stage, if the command named one.
    pub stage: Option<String>,
    /// The events the change committed, in log order.
    pub events: Vec<Event>,
}

impl Report for Change {
    fn text(&self, out: &mut String) {
        let _ = write!(out, "{} item `{}`", self.action, self.item_id);
        if let Some(stage) = &self.stage {
            let _ = write!(out, " stage `{stage}`");
        }
        if self.events.is_empty() {
            let _ = write!(out, " (nothing changed)");
        }
        let _ = writeln!(out);
    }
}

/// `treadle migrate`: what happened to each item.
#[derive(Debug, Serialize)]
pub struct Migration {
    /// The version items were moved to.
    pub version: u32,
    /// Each item and what happened to it.
    pub items: Vec<(String, &'static str)>,
}

impl Report for Migration {
    fn text(&self, out: &mut String) {
        if self.items.is_empty() {
            let _ = writeln!(out, "no items of older versions in flight");
        }
        for (item, outcome) in &self.items {
            let _ = writeln!(out, "item `{item}` to version {}: {outcome}", self.version);
        }
    }
}

/// `treadle events`: a page of the event log.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct EventLog(pub Vec<Event>);

impl Report for EventLog {
    fn text(&self, out: &mut String) {
        for event in &self.0 {
            event_line(event, out);
        }
    }
}

/// One event as one line: sequence, time, item, stage[/subtask], what happened.
pub fn event_line(event: &Event, out: &mut String) {
    let place = match (&event.stage, &event.subtask) {
        (Some(stage), Some(sub)) => format!("{stage}/{sub}"),
        (Some(stage), None) => stage.clone(),
        _ => "-".to_owned(),
    };
    let _ = writeln!(
        out,
        "{:>6}  {}  {}  {}  {}",
        event.seq,
        time(event.at),
        event.item_id,
        place,
        event_kind(&event.kind)
    );
}

/// An event kind as `type key=value ...`, from its serialized form so that
/// every kind (including ones added later) prints.
fn event_kind(kind: &treadle::EventKind) -> String {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(kind) else {
        return format!("{kind:?}");
    };
    let mut text = fields
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("event")
        .to_owned();
    for (key, value) in fields.iter().filter(|(k, _)| *k != "type") {
        match value {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) => {
                let _ = write!(text, " {key}={s}");
            }
            other => {
                let _ = write!(text, " {key}={other}");
            }
        }
    }
    text
}

/// `treadle graph`: the pipeline as DOT or Mermaid.
#[derive(Debug, Serialize)]
pub struct Graph {
    /// `dot` or `mermaid`.
    pub format: &'static str,
    /// The rendered graph.
    pub graph: String,
    /// The stored definition it was drawn from.
    pub definition: PipelineDef,
    /// Item counts per stage and state, with `--counts`.
    pub counts: Option<BTreeMap<String, Counts>>,
}

impl Report for Graph {
    fn text(&self, out: &mut String) {
        out.push_str(&self.graph);
    }
}

impl Graph {
    /// Draws `definition`, labelling stages with `counts` if given.
    pub fn draw(
        definition: PipelineDef,
        format: GraphFormat,
        counts: Option<BTreeMap<String, Counts>>,
    ) -> Self {
        let graph = match (&counts, format) {
            (None, GraphFormat::Dot) => definition.to_dot(),
            (None, GraphFormat::Mermaid) => definition.to_mermaid(),
            (Some(counts), GraphFormat::Dot) => {
                definition.to_dot_noted(|stage| Some(count_label(counts.get(stage))))
            }
            (Some(counts), GraphFormat::Mermaid) => {
                definition.to_mermaid_noted(|stage| Some(count_label(counts.get(stage))))
            }
        };
        Graph {
            format: match format {
                GraphFormat::Dot => "dot",
                GraphFormat::Mermaid => "mermaid",
            },
            graph,
            definition,
            counts,
        }
    }
}

/// The non-zero counts of a stage, like `2 completed, 1 awaiting_review`.
fn count_label(counts: Option<&Counts>) -> String {
    let parts: Vec<String> = StageState::ALL
        .iter()
        .filter_map(|s| {
            let n = counts.and_then(|c| c.get(s.as_str())).copied().unwrap_or(0);
            (n > 0).then(|| format!("{n} {s}"))
        })
        .collect();
    if parts.is_empty() {
        "no items".to_owned()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> PipelineDef {
        PipelineDef {
            stages: vec!["tag".into(), "review \"x\"".into(), "export".into()],
            edges: vec![
                ("tag".into(), "review \"x\"".into()),
                ("review \"x\"".into(), "export".into()),
            ],
        }
    }

    #[test]
    fn dot_with_counts_labels_each_stage_and_keeps_every_edge() {
        let mut counts = BTreeMap::new();
        let mut tag = zero_counts();
        tag.insert("completed", 2);
        tag.insert("failed", 1);
        counts.insert("tag".to_owned(), tag);
        let graph = Graph::draw(def(), GraphFormat::Dot, Some(counts));
        assert!(
            graph
                .graph
                .contains(r#""tag" [label="tag\n2 completed, 1 failed"];"#),
            "{}",
            graph.graph
        );
        assert!(
            graph
                .graph
                .contains(r#""review \"x\"" [label="review \"x\"\nno items"];"#)
        );
        assert!(graph.graph.contains(r#""tag" -> "review \"x\"";"#));
        assert!(graph.graph.contains(r#""review \"x\"" -> "export";"#));
    }

    #[test]
    fn mermaid_with_counts_uses_the_runtime_ids() {
        let plain = def().to_mermaid();
        let graph = Graph::draw(def(), GraphFormat::Mermaid, Some(BTreeMap::new()));
        for line in plain.lines().filter(|l| l.contains("-->")) {
            assert!(graph.graph.contains(line), "missing {line}");
        }
        assert!(graph.graph.contains("tag[\"tag<br/>no items\"]"));
    }

    #[test]
    fn the_overview_table_shows_only_states_in_use() {
        let mut counts = zero_counts();
        counts.insert("completed", 12);
        let overview = Overview {
            pipeline: None,
            stages: vec![
                StageRow {
                    stage: "tag".into(),
                    counts,
                },
                StageRow {
                    stage: "export".into(),
                    counts: zero_counts(),
                },
            ],
        };
        let mut text = String::new();
        overview.text(&mut text);
        assert_eq!(
            text,
            "stage   completed\ntag            12\nexport          0\n"
        );
    }

    #[test]
    fn the_overview_names_older_versions_in_flight() {
        let drift = PipelineDrift {
            version: 3,
            changes: Default::default(),
            in_flight: vec![treadle::VersionInFlight {
                version: 1,
                items: 4,
                changes: treadle::PipelineChanges {
                    added_stages: vec!["archive".into()],
                    ..Default::default()
                },
            }],
        };
        let overview = Overview {
            pipeline: Some(drift),
            stages: Vec::new(),
        };
        let mut text = String::new();
        overview.text(&mut text);
        assert_eq!(
            text,
            "pipeline version 3; 4 unfinished items on version 1 (stages added: archive)\nno items\n"
        );
    }
}
