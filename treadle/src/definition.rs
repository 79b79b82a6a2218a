//! The shape of a pipeline without its code: the serialisable definition
//! stores keep, and the problems a definition can have.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::reads::ReadProblem;

/// One thing wrong with a pipeline definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineProblem {
    /// The pipeline has no stages.
    Empty,
    /// Two stages share a name.
    DuplicateStage(String),
    /// An edge names a stage that was never added.
    UnknownStage {
        /// The stage name that does not exist.
        stage: String,
        /// The edge that names it.
        edge: (String, String),
    },
    /// The same edge was added twice.
    DuplicateEdge(String, String),
    /// The edges form a cycle; the path starts and ends at the same stage.
    Cycle(Vec<String>),
    /// A stage reads the output of a stage that is not upstream of it.
    Read(ReadProblem),
}

impl fmt::Display for PipelineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineProblem::Empty => f.write_str("pipeline has no stages"),
            PipelineProblem::DuplicateStage(name) => write!(f, "duplicate stage `{name}`"),
            PipelineProblem::UnknownStage { stage, edge } => {
                write!(
                    f,
                    "edge `{} -> {}` names unknown stage `{stage}`",
                    edge.0, edge.1
                )
            }
            PipelineProblem::DuplicateEdge(from, to) => {
                write!(f, "duplicate edge `{from} -> {to}`")
            }
            PipelineProblem::Cycle(path) => write!(f, "cycle detected: {}", path.join(" -> ")),
            PipelineProblem::Read(problem) => problem.fmt(f),
        }
    }
}

/// A pipeline definition that failed validation, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PipelineError {
    /// The problems, in the order the definition states them.
    pub problems: Vec<PipelineProblem>,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid pipeline: ")?;
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// The shape of a pipeline without its code: stage names in topological
/// order and edges in declaration order. Stores keep it so tools can draw
/// the graph and detect drift between the code and a database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineDef {
    /// Stage names, upstream before downstream.
    pub stages: Vec<String>,
    /// Edges `(from, to)`.
    pub edges: Vec<(String, String)>,
}

impl PipelineDef {
    /// The graph in Graphviz DOT.
    pub fn to_dot(&self) -> String {
        self.to_dot_noted(|_| None)
    }

    /// The graph in Graphviz DOT, each stage with the second label line
    /// `note` gives it, if any (e.g. item counts).
    pub fn to_dot_noted(&self, note: impl Fn(&str) -> Option<String>) -> String {
        let mut out = String::from("digraph pipeline {\n    rankdir=LR;\n");
        for stage in &self.stages {
            match note(stage) {
                None => out.push_str(&format!("    {};\n", dot_id(stage))),
                // `\n` inside a DOT string is a centred line break.
                Some(note) => out.push_str(&format!(
                    "    {} [label=\"{}\\n{}\"];\n",
                    dot_id(stage),
                    dot_escape(stage),
                    dot_escape(&note)
                )),
            }
        }
        for (from, to) in &self.edges {
            out.push_str(&format!("    {} -> {};\n", dot_id(from), dot_id(to)));
        }
        out.push_str("}\n");
        out
    }

    /// The graph as a Mermaid flowchart.
    pub fn to_mermaid(&self) -> String {
        self.to_mermaid_noted(|_| None)
    }

    /// The graph as a Mermaid flowchart, each stage with the second label
    /// line `note` gives it, if any.
    pub fn to_mermaid_noted(&self, note: impl Fn(&str) -> Option<String>) -> String {
        let mut out = String::from("flowchart LR\n");
        for stage in &self.stages {
            let mut label = stage.replace('"', "#quot;");
            if let Some(note) = note(stage) {
                label = format!("{label}<br/>{}", note.replace('"', "#quot;"));
            }
            out.push_str(&format!("    {}[\"{label}\"]\n", mermaid_id(stage)));
        }
        for (from, to) in &self.edges {
            out.push_str(&format!(
                "    {} --> {}\n",
                mermaid_id(from),
                mermaid_id(to)
            ));
        }
        out
    }
}

/// Text inside a DOT string, with `\` and `"` escaped.
fn dot_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

fn dot_id(name: &str) -> String {
    format!("\"{}\"", dot_escape(name))
}

fn mermaid_id(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// How one pipeline definition differs from another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineChanges {
    /// Stages the newer definition has and the older did not.
    pub added_stages: Vec<String>,
    /// Stages the older definition had and the newer does not.
    pub removed_stages: Vec<String>,
    /// Edges the newer definition has and the older did not.
    pub added_edges: Vec<(String, String)>,
    /// Edges the older definition had and the newer does not.
    pub removed_edges: Vec<(String, String)>,
}

impl PipelineChanges {
    /// The differences from `older` to `newer`.
    pub fn between(older: &PipelineDef, newer: &PipelineDef) -> Self {
        fn missing<T: Clone + PartialEq>(from: &[T], in_: &[T]) -> Vec<T> {
            from.iter().filter(|x| !in_.contains(x)).cloned().collect()
        }
        PipelineChanges {
            added_stages: missing(&newer.stages, &older.stages),
            removed_stages: missing(&older.stages, &newer.stages),
            added_edges: missing(&newer.edges, &older.edges),
            removed_edges: missing(&older.edges, &newer.edges),
        }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added_stages.is_empty()
            && self.removed_stages.is_empty()
            && self.added_edges.is_empty()
            && self.removed_edges.is_empty()
    }
}

impl fmt::Display for PipelineChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        let edges = |edges: &[(String, String)]| {
            edges
                .iter()
                .map(|(a, b)| format!("{a} -> {b}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let parts = [
            ("stages added", self.added_stages.join(", ")),
            ("stages removed", self.removed_stages.join(", ")),
            ("edges added", edges(&self.added_edges)),
            ("edges removed", edges(&self.removed_edges)),
        ];
        let mut first = true;
        for (label, list) in parts.iter().filter(|(_, list)| !list.is_empty()) {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{label}: {list}")?;
        }
        Ok(())
    }
}

/// What registering a pipeline definition with a store found: the version
/// it runs as, what changed since the version registered before it, and
/// which unfinished items still move on older versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineDrift {
    /// The version number the current definition is stored as.
    pub version: u32,
    /// How the current definition differs from the latest version stored
    /// before it (empty the first time, and when nothing changed).
    pub changes: PipelineChanges,
    /// Unfinished items (not completed, not cancelled) of older versions,
    /// oldest version first.
    pub in_flight: Vec<VersionInFlight>,
}

/// Unfinished items that move on an older pipeline version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInFlight {
    /// The older version.
    pub version: u32,
    /// How many unfinished items move on it.
    pub items: u64,
    /// How the current definition differs from it.
    pub changes: PipelineChanges,
}

impl PipelineDrift {
    /// Whether the definition is unchanged and no item moves on an older version.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.in_flight.is_empty()
    }
}

impl fmt::Display for PipelineDrift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pipeline version {}", self.version)?;
        if !self.changes.is_empty() {
            write!(f, " (changed from the previous version: {})", self.changes)?;
        }
        for older in &self.in_flight {
            write!(
                f,
                "; {} unfinished item{} on version {} ({})",
                older.items,
                if older.items == 1 { "" } else { "s" },
                older.version,
                older.changes
            )?;
        }
        Ok(())
    }
}
