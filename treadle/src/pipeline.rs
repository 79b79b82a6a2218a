//! The pipeline: stages wired into a validated DAG.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

use crate::item::WorkItem;
use crate::stage::Stage;

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

/// A validated DAG of stages for work items of type `W`.
pub struct Pipeline<W: WorkItem> {
    stages: Vec<Arc<dyn Stage<W>>>,
    index: HashMap<String, usize>,
    upstream: Vec<Vec<usize>>,
    downstream: Vec<Vec<usize>>,
    definition: PipelineDef,
}

impl<W: WorkItem> fmt::Debug for Pipeline<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("definition", &self.definition)
            .finish_non_exhaustive()
    }
}

impl<W: WorkItem> Pipeline<W> {
    /// Starts a pipeline definition.
    pub fn builder() -> PipelineBuilder<W> {
        PipelineBuilder {
            stages: Vec::new(),
            edges: Vec::new(),
        }
    }

    /// The stage names and edges, stages in topological order.
    pub fn definition(&self) -> &PipelineDef {
        &self.definition
    }

    /// The number of stages.
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Whether the pipeline has no stages (never true for a built pipeline).
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&Arc<dyn Stage<W>>> {
        self.index.get(name).map(|&i| &self.stages[i])
    }

    /// The names of the stages `name` depends on directly.
    pub fn upstream_of(&self, name: &str) -> impl Iterator<Item = &str> {
        self.neighbours(&self.upstream, name)
    }

    /// The names of the stages that depend directly on `name`.
    pub fn downstream_of(&self, name: &str) -> impl Iterator<Item = &str> {
        self.neighbours(&self.downstream, name)
    }

    fn neighbours<'a>(
        &'a self,
        table: &'a [Vec<usize>],
        name: &str,
    ) -> impl Iterator<Item = &'a str> {
        self.index
            .get(name)
            .into_iter()
            .flat_map(move |&i| table[i].iter().map(|&j| self.stages[j].name()))
    }

    /// The pipeline graph in Graphviz DOT.
    pub fn to_dot(&self) -> String {
        self.definition.to_dot()
    }

    /// The pipeline graph as a Mermaid flowchart.
    pub fn to_mermaid(&self) -> String {
        self.definition.to_mermaid()
    }
}

/// Collects stages and edges, then validates them into a [`Pipeline`].
pub struct PipelineBuilder<W: WorkItem> {
    stages: Vec<Arc<dyn Stage<W>>>,
    edges: Vec<(String, String)>,
}

impl<W: WorkItem> PipelineBuilder<W> {
    /// Adds a stage.
    pub fn stage(mut self, stage: impl Stage<W>) -> Self {
        self.stages.push(Arc::new(stage));
        self
    }

    /// Adds an edge: `to` runs after `from`.
    pub fn edge(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.edges.push((from.into(), to.into()));
        self
    }

    /// Validates the definition: no duplicate stages or edges, no unknown
    /// stages, no cycles. Every problem found is reported.
    pub fn build(self) -> Result<Pipeline<W>, PipelineError> {
        let mut problems = Vec::new();
        if self.stages.is_empty() {
            problems.push(PipelineProblem::Empty);
        }
        let mut graph = DiGraph::<usize, ()>::new();
        let mut index = HashMap::new();
        let mut nodes = Vec::new();
        for (i, stage) in self.stages.iter().enumerate() {
            let name = stage.name().to_owned();
            match index.entry(name) {
                std::collections::hash_map::Entry::Occupied(taken) => {
                    problems.push(PipelineProblem::DuplicateStage(taken.key().clone()));
                    nodes.push(None);
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(i);
                    nodes.push(Some(graph.add_node(i)));
                }
            }
        }
        let mut seen_edges = BTreeSet::new();
        for (from, to) in &self.edges {
            let mut endpoints = [None, None];
            for (slot, name) in endpoints.iter_mut().zip([from, to]) {
                match index.get(name.as_str()) {
                    Some(&i) => *slot = nodes[i],
                    None => problems.push(PipelineProblem::UnknownStage {
                        stage: name.clone(),
                        edge: (from.clone(), to.clone()),
                    }),
                }
            }
            if !seen_edges.insert((from.clone(), to.clone())) {
                problems.push(PipelineProblem::DuplicateEdge(from.clone(), to.clone()));
            } else if let [Some(a), Some(b)] = endpoints {
                graph.add_edge(a, b, ());
            }
        }
        if let Some(cycle) = find_cycle(&graph) {
            problems.push(PipelineProblem::Cycle(
                cycle
                    .iter()
                    .map(|&n| self.stages[graph[n]].name().to_owned())
                    .collect(),
            ));
        }
        if !problems.is_empty() {
            return Err(PipelineError { problems });
        }
        Ok(self.assemble(&graph, index))
    }

    fn assemble(self, graph: &DiGraph<usize, ()>, index: HashMap<String, usize>) -> Pipeline<W> {
        let n = self.stages.len();
        let mut upstream = vec![Vec::new(); n];
        let mut downstream = vec![Vec::new(); n];
        // Keep edges in the order they were declared, for deterministic output.
        for (from, to) in &self.edges {
            let (a, b) = (index[from.as_str()], index[to.as_str()]);
            downstream[a].push(b);
            upstream[b].push(a);
        }
        let definition = PipelineDef {
            stages: topological_order(graph)
                .into_iter()
                .map(|node| self.stages[graph[node]].name().to_owned())
                .collect(),
            edges: self.edges,
        };
        Pipeline {
            stages: self.stages,
            index,
            upstream,
            downstream,
            definition,
        }
    }
}

/// Kahn's algorithm, taking among the ready stages the one declared first,
/// so the order is deterministic. The graph must be acyclic.
fn topological_order(graph: &DiGraph<usize, ()>) -> Vec<NodeIndex> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut waiting: Vec<usize> = graph
        .node_indices()
        .map(|n| {
            graph
                .neighbors_directed(n, petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<NodeIndex>> = graph
        .node_indices()
        .filter(|n| waiting[n.index()] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(graph.node_count());
    while let Some(Reverse(node)) = ready.pop() {
        order.push(node);
        for next in graph.neighbors(node) {
            waiting[next.index()] -= 1;
            if waiting[next.index()] == 0 {
                ready.push(Reverse(next));
            }
        }
    }
    order
}

/// Finds one cycle by depth-first search in insertion order, returned as a
/// path whose first and last nodes are the same, starting at the node
/// declared first. Linear in nodes + edges.
fn find_cycle(graph: &DiGraph<usize, ()>) -> Option<Vec<NodeIndex>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks = vec![Mark::New; graph.node_count()];
    let successors = |n: NodeIndex| {
        // petgraph lists neighbours newest edge first; reverse for declaration order.
        let mut next: Vec<_> = graph.neighbors(n).collect();
        next.reverse();
        next
    };
    for root in graph.node_indices() {
        if marks[root.index()] != Mark::New {
            continue;
        }
        let mut path = vec![root];
        let mut stack = vec![successors(root).into_iter()];
        marks[root.index()] = Mark::OnPath;
        while let Some(children) = stack.last_mut() {
            match children.next() {
                Some(child) => match marks[child.index()] {
                    Mark::OnPath => {
                        let start = path.iter().position(|&n| n == child).expect("on the path");
                        let mut cycle = path[start..].to_vec();
                        // Start the path at the stage declared first, so the
                        // message does not depend on where the search began.
                        let first = (0..cycle.len()).min_by_key(|&i| cycle[i]).unwrap_or(0);
                        cycle.rotate_left(first);
                        cycle.push(cycle[0]);
                        return Some(cycle);
                    }
                    Mark::New => {
                        marks[child.index()] = Mark::OnPath;
                        path.push(child);
                        stack.push(successors(child).into_iter());
                    }
                    Mark::Done => {}
                },
                None => {
                    stack.pop();
                    let done = path.pop().expect("path and stack have equal depth");
                    marks[done.index()] = Mark::Done;
                }
            }
        }
    }
    None
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
