//! Unit tests of the `pipeline!` grammar, graph checks and expansion.

use proc_macro2::TokenStream;
use quote::quote;

use super::expand;
use super::graph::Graph;
use super::parse::PipelineInput;
use crate::errors::Errors;

/// The graph's node keys and edges as `from -> to` strings, or the messages
/// of every error (parse errors included), in order.
fn check(input: TokenStream) -> Result<(Vec<String>, Vec<String>), Vec<String>> {
    let input = syn::parse2::<PipelineInput>(input).map_err(|e| vec![e.to_string()])?;
    let mut errors = Errors::default();
    let graph = Graph::build(&input, &mut errors);
    if let Some(errors) = errors.finish() {
        return Err(errors.into_iter().map(|e| e.to_string()).collect());
    }
    let nodes = graph.nodes.iter().map(|n| n.key.clone()).collect();
    let edges = graph
        .edges
        .iter()
        .map(|e| format!("{} -> {}", graph.nodes[e.from].key, graph.nodes[e.to].key))
        .collect();
    Ok((nodes, edges))
}

fn graph(input: TokenStream) -> (Vec<String>, Vec<String>) {
    check(input).expect("the pipeline is valid")
}

fn errors(input: TokenStream) -> Vec<String> {
    check(input).expect_err("the pipeline is invalid")
}

#[test]
fn chain() {
    let (nodes, edges) = graph(quote!(a -> b -> c));
    assert_eq!(nodes, ["a", "b", "c"]);
    assert_eq!(edges, ["a -> b", "b -> c"]);
}

#[test]
fn statements_with_and_without_trailing_semicolon() {
    let expected = (
        vec!["a".to_owned(), "b".to_owned(), "c".to_owned()],
        vec!["a -> b".to_owned(), "a -> c".to_owned()],
    );
    assert_eq!(graph(quote!(a -> b; a -> c)), expected);
    assert_eq!(graph(quote!(a -> b; a -> c;)), expected);
}

#[test]
fn lone_stages() {
    assert_eq!(graph(quote!(a)), (vec!["a".to_owned()], vec![]));
    assert_eq!(graph(quote!(a; b;)).0, ["a", "b"]);
    // A lone stage that also appears in an edge is the same node.
    assert_eq!(
        graph(quote!(a; a -> b)),
        (vec!["a".into(), "b".into()], vec!["a -> b".into()])
    );
}

#[test]
fn groups_at_every_position() {
    assert_eq!(graph(quote!({ a, b } -> c)).1, ["a -> c", "b -> c"]);
    assert_eq!(
        graph(quote!(a -> { b, c } -> d)).1,
        ["a -> b", "a -> c", "b -> d", "c -> d"]
    );
    assert_eq!(graph(quote!(a -> { b, c, })).1, ["a -> b", "a -> c"]);
    assert_eq!(
        graph(quote!({ a, b } -> { c, d })).1,
        ["a -> c", "b -> c", "a -> d", "b -> d"]
    );
    assert_eq!(
        graph(quote!({ a, b })),
        (vec!["a".into(), "b".into()], vec![])
    );
}

#[test]
fn paths_are_nodes_by_their_text() {
    let (nodes, edges) =
        graph(quote!(stages::scan -> crate::stages::index; ::x::y -> stages::scan));
    assert_eq!(nodes, ["stages::scan", "crate::stages::index", "::x::y"]);
    assert_eq!(
        edges,
        [
            "stages::scan -> crate::stages::index",
            "::x::y -> stages::scan"
        ]
    );
}

#[test]
fn diamond_is_not_a_cycle() {
    let (_, edges) = graph(quote!(a -> b -> d; a -> c -> d));
    assert_eq!(edges, ["a -> b", "b -> d", "a -> c", "c -> d"]);
}

#[test]
fn cycles_are_reported_as_paths() {
    assert_eq!(errors(quote!(a -> a)), ["cycle detected: a -> a"]);
    assert_eq!(errors(quote!(a -> b -> a)), ["cycle detected: a -> b -> a"]);
    assert_eq!(
        errors(quote!(a -> b -> c -> d -> b)),
        ["cycle detected: b -> c -> d -> b"]
    );
    assert_eq!(
        errors(quote!(a -> b; b -> c; c -> a)),
        ["cycle detected: a -> b -> c -> a"]
    );
}

#[test]
fn cycles_through_groups_and_diamonds() {
    assert_eq!(
        errors(quote!(a -> { b, c } -> d -> a)),
        ["cycle detected: a -> b -> d -> a"]
    );
    // Two back edges, two reports.
    assert_eq!(
        errors(quote!(a -> { b, c } -> a)),
        ["cycle detected: a -> b -> a", "cycle detected: a -> c -> a"]
    );
    assert_eq!(
        errors(quote!(a -> b -> d; a -> c -> d; d -> a)),
        ["cycle detected: a -> b -> d -> a"]
    );
}

#[test]
fn a_cycle_ends_with_the_edge_written_last() {
    assert_eq!(
        errors(quote!(scan -> { ocr, thumbnails } -> index; index -> thumbnails)),
        ["cycle detected: thumbnails -> index -> thumbnails"]
    );
    assert_eq!(
        errors(quote!(c -> a; a -> b -> c)),
        ["cycle detected: c -> a -> b -> c"]
    );
    assert_eq!(
        errors(quote!(b -> c; c -> a; a -> b)),
        ["cycle detected: b -> c -> a -> b"]
    );
}

#[test]
fn errors_follow_the_order_edges_are_written() {
    assert_eq!(
        errors(quote!(x -> y; a -> b; x -> y; b -> a; z -> z)),
        [
            "duplicate edge `x -> y`",
            "cycle detected: a -> b -> a",
            "cycle detected: z -> z",
        ]
    );
}

#[test]
fn duplicate_edges() {
    assert_eq!(errors(quote!(a -> b; a -> b)), ["duplicate edge `a -> b`"]);
    assert_eq!(errors(quote!(a -> { b, b })), ["duplicate edge `a -> b`"]);
    assert_eq!(
        errors(quote!(a -> { b, c }; a -> c -> d; { a } -> b)),
        ["duplicate edge `a -> c`", "duplicate edge `a -> b`"]
    );
}

#[test]
fn every_problem_is_reported_in_order() {
    assert_eq!(
        errors(quote!(a -> b -> a; c -> d; c -> d; e -> e)),
        [
            "cycle detected: a -> b -> a",
            "duplicate edge `c -> d`",
            "cycle detected: e -> e",
        ]
    );
}

#[test]
fn syntax_errors() {
    assert_eq!(errors(quote!(a b)), ["expected `->` or `;`"]);
    assert_eq!(
        errors(quote!(a -> -> b)),
        ["expected a stage name or a `{ .. }` group before `->`"]
    );
    assert_eq!(
        errors(quote!(a ->)),
        ["expected a stage name or a `{ .. }` group after `->`"]
    );
    assert_eq!(
        errors(quote!(a -> ; b)),
        ["expected a stage name or a `{ .. }` group after `->`"]
    );
    assert_eq!(
        errors(quote!(a -> {})),
        ["empty group: a `{ .. }` group lists at least one stage"]
    );
    assert_eq!(
        errors(quote!(a -> { b c })),
        ["expected `,` or `}` after a stage in a group"]
    );
    assert_eq!(
        errors(quote!(a -> { { b } })),
        ["expected a stage name in a group"]
    );
    assert_eq!(
        errors(quote!(a;; b)),
        ["expected a stage name or a `{ .. }` group"]
    );
    assert_eq!(
        errors(quote!(a -> b<T>)),
        ["a stage name cannot have generic arguments: `#[stage]` types are not generic"]
    );
    assert_eq!(
        errors(quote!(a -> 1)),
        ["expected a stage name or a `{ .. }` group"]
    );
}

/// The messages of the `compile_error!`s in an expansion.
fn compile_errors(tokens: &TokenStream) -> Vec<String> {
    let text = tokens.to_string();
    text.match_indices("compile_error !")
        .map(|(at, _)| {
            let rest = &text[at..];
            let start = rest.find('"').expect("a message") + 1;
            let end = start + rest[start..].find("\" }").expect("its end");
            rest[start..end].to_owned()
        })
        .collect()
}

#[test]
fn empty_pipeline_is_an_error_with_a_placeholder() {
    let out = expand(quote!());
    assert_eq!(
        compile_errors(&out),
        [
            "empty pipeline: `pipeline!` needs at least one stage, e.g. `pipeline! { scan -> enrich }`"
        ]
    );
    assert!(out.to_string().contains("placeholder"));
}

#[test]
fn valid_pipeline_expands_to_builder_calls() {
    let out = expand(quote!(a -> { b, c }; d)).to_string();
    assert!(compile_errors(&out.parse().unwrap()).is_empty());
    assert!(!out.contains("placeholder"));
    assert_eq!(out.matches(". stage (").count(), 4);
    assert_eq!(out.matches(". edge (").count(), 2);
    assert!(out.contains("name_seen_before"));
}

#[test]
fn invalid_pipeline_still_checks_its_stages() {
    let out = expand(quote!(a -> b -> a));
    assert_eq!(compile_errors(&out), ["cycle detected: a -> b -> a"]);
    let out = out.to_string();
    assert!(out.contains("placeholder"));
    assert!(out.contains("same_item"));
    assert!(!out.contains(". edge ("));
}

#[test]
fn expansion_is_deterministic() {
    let input = quote!(a -> { b, c } -> d -> a; e -> f; e -> f; g -> { h, i, h });
    let first = expand(input.clone()).to_string();
    for _ in 0..10 {
        assert_eq!(expand(input.clone()).to_string(), first);
    }
}

#[test]
fn long_graphs_do_not_overflow_the_stack() {
    // A 20 000-stage chain closed into one cycle: the DFS is iterative.
    let names: Vec<_> = (0..20_000u32)
        .map(|i| quote::format_ident!("s{}", i))
        .collect();
    let input = quote!(#(#names)->* -> s0);
    let errors = errors(input);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("cycle detected: s0 -> s1 -> s2 -> "));
    assert!(errors[0].ends_with(" -> s19999 -> s0"));
}
