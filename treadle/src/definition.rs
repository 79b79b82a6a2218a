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
        let mut out = String::from("digraph pipeline {\n    rankdir=LR;\n");
        for stage in &self.stages {
            out.push_str(&format!("    {};\n", dot_id(stage)));
        }
        for (from, to) in &self.edges {
            out.push_str(&format!("    {} -> {};\n", dot_id(from), dot_id(to)));
        }
        out.push_str("}\n");
        out
    }

    /// The graph as a Mermaid flowchart.
    pub fn to_mermaid(&self) -> String {
        let mut out = String::from("flowchart LR\n");
        for stage in &self.stages {
            out.push_str(&format!(
                "    {}[\"{}\"]\n",
                mermaid_id(stage),
                stage.replace('"', "#quot;")
            ));
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

fn dot_id(name: &str) -> String {
    format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
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
