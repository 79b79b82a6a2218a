//! `pipeline!`: parse the graph, validate it, generate the builder calls.

mod expand;
mod graph;
mod parse;

pub use expand::expand;

#[cfg(test)]
mod tests;
