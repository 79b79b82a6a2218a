//! The pipeline: stages wired into a validated DAG.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use crate::definition::{PipelineDef, PipelineError, PipelineProblem};
use crate::fast_hash::FastMap;
use crate::item::WorkItem;
use crate::reads::{ReadProblem, check_read};
use crate::stage::Stage;
use petgraph::graph::{DiGraph, NodeIndex};

/// A validated DAG of stages for work items of type `W`.
pub struct Pipeline<W: WorkItem> {
    stages: Vec<Arc<dyn Stage<W>>>,
    index: FastMap<String, usize>,
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

    /// The position of stage `name` in [`Pipeline::stages`].
    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Every stage, in topological order.
    pub(crate) fn stages(&self) -> &[Arc<dyn Stage<W>>] {
        &self.stages
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
    /// stages, no cycles, and every stage reads (see [`Stage::reads`]) only
    /// stages upstream of it. Every problem found is reported.
    pub fn build(self) -> Result<Pipeline<W>, PipelineError> {
        let mut problems = Vec::new();
        if self.stages.is_empty() {
            problems.push(PipelineProblem::Empty);
        }
        let mut graph = DiGraph::<usize, ()>::new();
        let mut index = FastMap::default();
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
        self.check_reads(&index, &mut problems);
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

    /// Records every read of a stage that is not upstream of its reader.
    fn check_reads(&self, index: &FastMap<String, usize>, problems: &mut Vec<PipelineProblem>) {
        let names: Vec<&str> = self.stages.iter().map(|stage| stage.name()).collect();
        let edges: Vec<(usize, usize)> = self
            .edges
            .iter()
            .filter_map(|(from, to)| Some((*index.get(from)?, *index.get(to)?)))
            .collect();
        let (mut seen, mut stack) = (vec![false; names.len()], vec![0; names.len()]);
        for (reader, stage) in self.stages.iter().enumerate() {
            for &producer in stage.reads() {
                if let Some(fault) =
                    check_read(&names, &edges, reader, producer, &mut seen, &mut stack)
                {
                    problems.push(PipelineProblem::Read(ReadProblem {
                        reader: names[reader].to_owned(),
                        producer: producer.to_owned(),
                        fault,
                    }));
                }
            }
        }
    }

    fn assemble(self, graph: &DiGraph<usize, ()>, index: FastMap<String, usize>) -> Pipeline<W> {
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

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::reads::ReadFault;
    use crate::stage;

    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Doc {
        id: String,
    }

    impl WorkItem for Doc {
        fn id(&self) -> &str {
            &self.id
        }
    }

    #[stage]
    async fn scan(_doc: &Doc) -> crate::Result<u32> {
        Ok(1)
    }

    #[stage]
    async fn ocr(_doc: &Doc, #[from(scan)] pages: &u32) -> crate::Result<u32> {
        Ok(*pages)
    }

    #[stage]
    async fn index(
        _doc: &Doc,
        #[from(ocr)] a: &u32,
        #[from(scan)] b: &u32,
        #[from(index)] c: &u32,
    ) -> crate::Result<u32> {
        Ok(a + b + c)
    }

    fn read_problems(result: Result<Pipeline<Doc>, PipelineError>) -> Vec<String> {
        let problems = match result {
            Ok(_) => return Vec::new(),
            Err(error) => error.problems,
        };
        problems
            .into_iter()
            .filter_map(|problem| match problem {
                PipelineProblem::Read(read) => Some(read.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_builder_checks_reads_like_the_macro() {
        let built = Pipeline::builder()
            .stage(scan {})
            .stage(ocr {})
            .edge("scan", "ocr")
            .build()
            .unwrap();
        assert_eq!(built.stage("ocr").unwrap().reads(), ["scan"]);

        // `ocr` upstream of `scan` instead of downstream; `index` reads itself.
        let problems = read_problems(
            Pipeline::builder()
                .stage(scan {})
                .stage(ocr {})
                .stage(index {})
                .edge("ocr", "scan")
                .edge("scan", "index")
                .build(),
        );
        assert_eq!(
            problems,
            [
                "`ocr` reads the output of `scan`, which is not upstream of `ocr` in this pipeline",
                "`index` reads its own output; a stage reads only the outputs of stages upstream of it",
            ]
        );
        // Without `ocr` in the pipeline.
        let problems = read_problems(
            Pipeline::builder()
                .stage(scan {})
                .stage(index {})
                .edge("scan", "index")
                .build(),
        );
        assert_eq!(
            problems,
            [
                "`index` reads the output of `ocr`, which is not a stage of this pipeline",
                "`index` reads its own output; a stage reads only the outputs of stages upstream of it",
            ]
        );
        let error = Pipeline::builder()
            .stage(scan {})
            .stage(ocr {})
            .build()
            .unwrap_err();
        assert_eq!(
            error.problems,
            [PipelineProblem::Read(ReadProblem {
                reader: "ocr".into(),
                producer: "scan".into(),
                fault: ReadFault::NotUpstream,
            })]
        );
    }
}
