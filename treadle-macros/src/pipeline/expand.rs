//! Code generation for `pipeline!`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;

use super::graph::Graph;
use super::parse::PipelineInput;
use crate::errors::Errors;

/// Expands `pipeline! { .. }` into a block expression of type
/// `::treadle::Pipeline<W>`.
///
/// Each stage path is checked with `quote_spanned!` at the user's tokens:
/// that it is a `#[stage]` type (`StageDef`), that its item type is the
/// first stage's, and, in constants, that no earlier stage has the same
/// runtime name and that every stage it reads is upstream of it. After an error the checks are still emitted (so every
/// problem shows at once) and a placeholder of the right type replaces the
/// pipeline.
pub fn expand(input: TokenStream) -> TokenStream {
    let input = match syn::parse2::<PipelineInput>(input) {
        Ok(input) => input,
        Err(error) => {
            let error = error.to_compile_error();
            return quote! {{
                #error
                ::treadle::__private::placeholder(::treadle::__private::PhantomData)
            }};
        }
    };
    let mut errors = Errors::default();
    if input.statements.is_empty() {
        errors.at(
            Span::call_site(),
            "empty pipeline: `pipeline!` needs at least one stage, e.g. `pipeline! { scan -> enrich }`",
        );
    }
    let graph = Graph::build(&input, &mut errors);
    generate(&graph, errors)
}

/// The expression for a checked graph; `errors` holds what the checks found.
fn generate(graph: &Graph, errors: Errors) -> TokenStream {
    let item = format_ident!("__treadle_item", span = Span::mixed_site());
    let value = |i: usize| format_ident!("__treadle_stage{}", i, span = Span::mixed_site());
    let name = |i: usize| format_ident!("__treadle_name{}", i, span = Span::mixed_site());

    // Names are bound only for stages that an edge mentions.
    let mut named = vec![false; graph.nodes.len()];
    for edge in &graph.edges {
        named[edge.from] = true;
        named[edge.to] = true;
    }
    let mut checks = TokenStream::new();
    let mut names = Vec::new();
    let mut unique = TokenStream::new();
    let names_const = format_ident!("__TREADLE_NAMES", span = Span::mixed_site());
    for (i, node) in graph.nodes.iter().enumerate() {
        let path = &node.path;
        let span = path.span();
        let (value, name) = (value(i), name(i));
        checks.extend(quote_spanned! {span=>
            let #value = ::treadle::__private::same_item(
                &#item,
                <#path as ::treadle::__private::StageDef>::NEW,
            );
        });
        if named[i] {
            checks.extend(quote_spanned! {span=>
                let #name = ::treadle::__private::name_of(&#value);
            });
        }
        names.push(quote_spanned!(span=> <#path as ::treadle::__private::StageDef>::NAME));
        if i > 0 {
            unique.extend(quote_spanned! {span=>
                ::treadle::__private::assert!(
                    !::treadle::__private::name_seen_before(&#names_const, #i),
                    "duplicate stage name: an earlier stage of this pipeline has the same runtime name as this one; give one of them another `#[stage(name = \"..\")]`",
                );
            });
        }
    }
    let count = names.len();
    let edges_const = format_ident!("__TREADLE_EDGES", span = Span::mixed_site());
    let edge_pairs = graph.edges.iter().map(|edge| {
        let (from, to) = (edge.from, edge.to);
        quote!((#from, #to))
    });
    let edge_count = graph.edges.len();
    // One constant per stage, so that every stage with a bad read is
    // reported, each at its name in the pipeline.
    let read_checks = graph.nodes.iter().enumerate().map(|(i, node)| {
        let path = &node.path;
        quote_spanned! {path.span()=>
            const _: () = {
                let problems = ::treadle::__private::read_problems(
                    &#names_const,
                    &#edges_const,
                    #i,
                    <#path as ::treadle::__private::StageDef>::READS,
                );
                if !problems.is_empty() {
                    ::treadle::__private::panic!("{}", problems.as_str());
                }
            };
        }
    });
    let prelude = quote! {
        let #item = ::treadle::__private::PhantomData;
        #checks
        const _: () = {
            const #names_const: [&str; #count] = [#(#names),*];
            const #edges_const: [(usize, usize); #edge_count] = [#(#edge_pairs),*];
            #(#read_checks)*
            #unique
        };
    };

    if let Some(errors) = errors.finish() {
        let errors = errors.to_compile_error();
        return quote! {{
            #errors
            #prelude
            ::treadle::__private::placeholder(#item)
        }};
    }

    let stages = (0..graph.nodes.len()).map(value);
    let edges = graph.edges.iter().map(|edge| {
        let (from, to) = (name(edge.from), name(edge.to));
        quote!(.edge(#from, #to))
    });
    quote! {{
        #prelude
        ::treadle::__private::build(
            ::treadle::Pipeline::builder()
                #(.stage(#stages))*
                #(#edges)*
        )
    }}
}
