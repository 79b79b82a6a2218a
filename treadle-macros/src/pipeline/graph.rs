//! The pipeline graph and its checks: duplicate edges and cycles.
//!
//! Nodes are numbered in order of first appearance and edges kept in
//! declaration order, so every diagnostic comes out in the same order on
//! every run (nothing here iterates a hash map).

use std::collections::{BTreeMap, BTreeSet};

use quote::ToTokens;
use syn::Path;

use super::parse::PipelineInput;
use crate::errors::Errors;

/// One stage of the pipeline.
pub(crate) struct Node {
    /// The path as written, spaces removed: `stages::scan`.
    pub(crate) key: String,
    /// The path at its first appearance.
    pub(crate) path: Path,
}

/// One edge `from -> to`.
pub(crate) struct Edge {
    /// The upstream node.
    pub(crate) from: usize,
    /// The downstream node.
    pub(crate) to: usize,
    /// The downstream name where the edge was written, for errors.
    pub(crate) at: Path,
}

/// The stages and distinct edges of a pipeline.
#[derive(Default)]
pub(crate) struct Graph {
    /// The nodes, in order of first appearance.
    pub(crate) nodes: Vec<Node>,
    /// The distinct edges, in declaration order.
    pub(crate) edges: Vec<Edge>,
    index: BTreeMap<String, usize>,
}

impl Graph {
    /// Builds the graph of `input`, recording a duplicate edge at its second
    /// occurrence, then every cycle.
    pub(crate) fn build(input: &PipelineInput, errors: &mut Errors) -> Graph {
        let mut graph = Graph::default();
        let mut seen = BTreeSet::new();
        for chain in &input.statements {
            let mut previous: Vec<usize> = chain
                .first
                .stages()
                .into_iter()
                .map(|path| graph.node(path))
                .collect();
            for (_arrow, element) in &chain.rest {
                let mut current = Vec::new();
                for path in element.stages() {
                    let to = graph.node(path);
                    current.push(to);
                    for &from in &previous {
                        if seen.insert((from, to)) {
                            graph.edges.push(Edge {
                                from,
                                to,
                                at: path.clone(),
                            });
                        } else {
                            errors.spanned(
                                path,
                                format_args!(
                                    "duplicate edge `{} -> {}`",
                                    graph.nodes[from].key, graph.nodes[to].key
                                ),
                            );
                        }
                    }
                }
                previous = current;
            }
        }
        graph.report_cycles(errors);
        graph
    }

    /// The node for `path`, added on first sight.
    fn node(&mut self, path: &Path) -> usize {
        let key = path_key(path);
        if let Some(&index) = self.index.get(&key) {
            return index;
        }
        let index = self.nodes.len();
        self.index.insert(key.clone(), index);
        self.nodes.push(Node {
            key,
            path: path.clone(),
        });
        index
    }

    /// Reports each cycle closed by a back edge of a depth-first search
    /// (roots in node order, edges in declaration order), as the path of
    /// names from the stage where it starts back to that stage, at the
    /// downstream name of the edge that closes it. Iterative and linear in
    /// nodes + edges, plus the length of the reported paths.
    fn report_cycles(&self, errors: &mut Errors) {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let mut successors = vec![Vec::new(); self.nodes.len()];
        for (index, edge) in self.edges.iter().enumerate() {
            successors[edge.from].push(index);
        }
        let mut marks = vec![Mark::New; self.nodes.len()];
        // Position of each node on the current path, valid while `OnPath`.
        let mut depth = vec![0; self.nodes.len()];
        for root in 0..self.nodes.len() {
            if marks[root] != Mark::New {
                continue;
            }
            let mut path = vec![root];
            let mut stack = vec![successors[root].iter()];
            marks[root] = Mark::OnPath;
            while let Some(next) = stack.last_mut() {
                let Some(&edge) = next.next() else {
                    stack.pop();
                    if let Some(done) = path.pop() {
                        marks[done] = Mark::Done;
                    }
                    continue;
                };
                let child = self.edges[edge].to;
                match marks[child] {
                    Mark::New => {
                        marks[child] = Mark::OnPath;
                        depth[child] = path.len();
                        path.push(child);
                        stack.push(successors[child].iter());
                    }
                    Mark::OnPath => {
                        let names: Vec<&str> = path[depth[child]..]
                            .iter()
                            .chain([&child])
                            .map(|&n| self.nodes[n].key.as_str())
                            .collect();
                        errors.spanned(
                            &self.edges[edge].at,
                            format_args!("cycle detected: {}", names.join(" -> ")),
                        );
                    }
                    Mark::Done => {}
                }
            }
        }
    }
}

/// The path as written, without spaces: `stages::scan`.
pub(crate) fn path_key(path: &Path) -> String {
    path.to_token_stream()
        .to_string()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}
