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
    /// The position of the edge among all edges written, duplicates included.
    pub(crate) written: usize,
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
    /// occurrence and every cycle at the edge that closes it, in the order
    /// those edges are written.
    pub(crate) fn build(input: &PipelineInput, errors: &mut Errors) -> Graph {
        let mut graph = Graph::default();
        let mut seen = BTreeSet::new();
        // (position of the offending edge, error), sorted before reporting.
        let mut found = Vec::new();
        let mut written = 0;
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
                                written,
                            });
                        } else {
                            let message = format!(
                                "duplicate edge `{} -> {}`",
                                graph.nodes[from].key, graph.nodes[to].key
                            );
                            found.push((written, syn::Error::new_spanned(path, message)));
                        }
                        written += 1;
                    }
                }
                previous = current;
            }
        }
        graph.find_cycles(&mut found);
        found.sort_by_key(|(written, _)| *written);
        for (_, error) in found {
            errors.push(error);
        }
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

    /// Finds the cycle closed by each back edge of a depth-first search
    /// (roots in node order, edges in declaration order). Each is reported
    /// as the path of names around it, ending with the edge of the cycle
    /// written last, at that edge's downstream name: the edge that closed
    /// it. Iterative, and linear in nodes + edges plus the length of the
    /// reported cycles.
    fn find_cycles(&self, found: &mut Vec<(usize, syn::Error)>) {
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
            marks[root] = Mark::OnPath;
            depth[root] = 0;
            // The edges followed from the root; `path_edges[k]` leaves the
            // node at depth `k`.
            let mut path_edges: Vec<usize> = Vec::new();
            let mut stack = vec![successors[root].iter()];
            while let Some(next) = stack.last_mut() {
                let Some(&edge) = next.next() else {
                    stack.pop();
                    let done = match path_edges.pop() {
                        Some(edge) => self.edges[edge].to,
                        None => root,
                    };
                    marks[done] = Mark::Done;
                    continue;
                };
                let child = self.edges[edge].to;
                match marks[child] {
                    Mark::New => {
                        marks[child] = Mark::OnPath;
                        depth[child] = path_edges.len() + 1;
                        path_edges.push(edge);
                        stack.push(successors[child].iter());
                    }
                    Mark::OnPath => {
                        let mut cycle = path_edges[depth[child]..].to_vec();
                        cycle.push(edge);
                        found.push(self.cycle_error(&cycle));
                    }
                    Mark::Done => {}
                }
            }
        }
    }

    /// The error for the cycle made of `edges` (each leading to the next).
    fn cycle_error(&self, edges: &[usize]) -> (usize, syn::Error) {
        let last = (0..edges.len())
            .max_by_key(|&i| self.edges[edges[i]].written)
            .unwrap_or(0);
        // Start after the last written edge, so that the path ends with it.
        let rotated = edges[last + 1..].iter().chain(&edges[..=last]);
        let closing = &self.edges[edges[last]];
        let mut names = vec![self.nodes[closing.to].key.as_str()];
        names.extend(rotated.map(|&e| self.nodes[self.edges[e].to].key.as_str()));
        let message = format!("cycle detected: {}", names.join(" -> "));
        (
            closing.written,
            syn::Error::new_spanned(&closing.at, message),
        )
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
