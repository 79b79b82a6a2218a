//! A numbered pipeline version as the rules walk it: stage positions, each
//! stage's direct dependents and how many upstream stages it waits for.

use std::sync::Arc;

use crate::definition::PipelineDef;
use crate::fast_hash::FastMap;

/// One registered pipeline definition, indexed for the rules.
///
/// Stage positions are the definition's topological order; an item of this
/// version keeps one stage row per position, in the same order.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionGraph {
    version: u32,
    definition: PipelineDef,
    names: Vec<Arc<str>>,
    positions: FastMap<String, usize>,
    dependents: Vec<Vec<usize>>,
    upstream: Vec<u32>,
}

impl VersionGraph {
    /// Indexes `definition` as pipeline version `version`.
    pub fn new(version: u32, definition: PipelineDef) -> Self {
        let positions: FastMap<String, usize> = definition
            .stages
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), i))
            .collect();
        let mut dependents = vec![Vec::new(); definition.stages.len()];
        let mut upstream = vec![0; definition.stages.len()];
        for (from, to) in &definition.edges {
            if let (Some(&from), Some(&to)) = (positions.get(from), positions.get(to)) {
                dependents[from].push(to);
                upstream[to] += 1;
            }
        }
        VersionGraph {
            version,
            names: definition
                .stages
                .iter()
                .map(|s| Arc::from(s.as_str()))
                .collect(),
            definition,
            positions,
            dependents,
            upstream,
        }
    }

    /// The version number.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The definition this version was registered with.
    pub fn definition(&self) -> &PipelineDef {
        &self.definition
    }

    /// The stage names, by position.
    pub fn stages(&self) -> &[String] {
        &self.definition.stages
    }

    /// The name of the stage at `position`, shared by the stage rows of
    /// every item of this version.
    pub fn name(&self, position: usize) -> &Arc<str> {
        &self.names[position]
    }

    /// The position of stage `name`, if this version has it.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.positions.get(name).copied()
    }

    /// The positions of the stages that directly depend on `stage`.
    pub fn dependents(&self, stage: usize) -> &[usize] {
        &self.dependents[stage]
    }

    /// How many upstream stages `stage` has.
    pub fn upstream(&self, stage: usize) -> u32 {
        self.upstream[stage]
    }

    /// The positions of every stage downstream of `stage` (not `stage`
    /// itself), in topological order.
    pub fn downstream(&self, stage: usize) -> Vec<usize> {
        let mut reached = vec![false; self.dependents.len()];
        let mut pending = vec![stage];
        while let Some(next) = pending.pop() {
            for &dependent in &self.dependents[next] {
                if !reached[dependent] {
                    reached[dependent] = true;
                    pending.push(dependent);
                }
            }
        }
        (0..reached.len()).filter(|&i| reached[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diamond() -> VersionGraph {
        let stages = ["a", "b", "c", "d"].map(String::from).to_vec();
        let edges = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
            .map(|(f, t)| (f.to_owned(), t.to_owned()))
            .to_vec();
        VersionGraph::new(3, PipelineDef { stages, edges })
    }

    #[test]
    fn a_diamond_has_dependents_upstream_counts_and_downstream_sets() {
        let graph = diamond();
        assert_eq!(graph.version(), 3);
        assert_eq!(graph.dependents(0), [1, 2]);
        assert_eq!(graph.upstream(3), 2);
        assert_eq!(graph.upstream(0), 0);
        assert_eq!(graph.downstream(1), [3]);
        assert_eq!(graph.downstream(0), [1, 2, 3]);
        assert_eq!(graph.position("c"), Some(2));
        assert_eq!(graph.position("zz"), None);
    }
}
