//! The `pipeline!` grammar:
//!
//! ```text
//! pipeline  := statement (";" statement)* ";"?
//! statement := element ("->" element)*
//! element   := path | "{" path ("," path)* ","? "}"
//! ```
//!
//! Every arrow and name keeps its tokens, so errors can point at them.

use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Path, Token, braced, token};

/// The whole macro input: statements in source order.
pub(crate) struct PipelineInput {
    /// The statements, without the separating `;`.
    pub(crate) statements: Vec<Chain>,
}

/// One statement: elements joined by arrows.
pub(crate) struct Chain {
    /// The first element.
    pub(crate) first: Element,
    /// Each further element with the arrow before it.
    pub(crate) rest: Vec<(Token![->], Element)>,
}

/// A stage, or a `{ .. }` group of stages that all connect the same way.
pub(crate) enum Element {
    /// A stage type's path, such as `scan` or `stages::scan`.
    Stage(Path),
    /// A group `{ a, b }` (never empty).
    Group(Punctuated<Path, Token![,]>),
}

impl Element {
    /// The stages of the element, in source order.
    pub(crate) fn stages(&self) -> Vec<&Path> {
        match self {
            Element::Stage(path) => vec![path],
            Element::Group(members) => members.iter().collect(),
        }
    }
}

impl Parse for PipelineInput {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut statements = Vec::new();
        while !input.is_empty() {
            statements.push(input.parse::<Chain>()?);
            if input.is_empty() {
                break;
            }
            if !input.peek(Token![;]) {
                return Err(input.error("expected `->` or `;`"));
            }
            input.parse::<Token![;]>()?;
        }
        Ok(PipelineInput { statements })
    }
}

impl Parse for Chain {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let first = input.parse()?;
        let mut rest = Vec::new();
        while input.peek(Token![->]) {
            let arrow = input.parse::<Token![->]>()?;
            if input.is_empty() || input.peek(Token![;]) {
                return Err(syn::Error::new_spanned(
                    arrow,
                    "expected a stage name or a `{ .. }` group after `->`",
                ));
            }
            rest.push((arrow, input.parse()?));
        }
        Ok(Chain { first, rest })
    }
}

impl Parse for Element {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        if input.peek(token::Brace) {
            let content;
            let brace = braced!(content in input);
            if content.is_empty() {
                return Err(syn::Error::new(
                    brace.span.join(),
                    "empty group: a `{ .. }` group lists at least one stage",
                ));
            }
            let mut members = Punctuated::new();
            loop {
                members.push_value(parse_stage_path(&content, "in a group")?);
                if content.is_empty() {
                    break;
                }
                if !content.peek(Token![,]) {
                    return Err(content.error("expected `,` or `}` after a stage in a group"));
                }
                members.push_punct(content.parse()?);
                if content.is_empty() {
                    break;
                }
            }
            Ok(Element::Group(members))
        } else {
            parse_stage_path(input, "").map(Element::Stage)
        }
    }
}

/// Parses a stage path (`scan`, `stages::scan`, `crate::stages::scan`),
/// with a message naming what was expected instead.
fn parse_stage_path(input: ParseStream, context: &str) -> syn::Result<Path> {
    if input.peek(syn::Ident::peek_any) || input.peek(Token![::]) {
        let path = Path::parse_mod_style(input)?;
        if input.peek(Token![<]) || input.peek(Token![::]) && input.peek2(Token![<]) {
            return Err(input.error(
                "a stage name cannot have generic arguments: `#[stage]` types are not generic",
            ));
        }
        return Ok(path);
    }
    let expected = if context.is_empty() {
        "expected a stage name or a `{ .. }` group".to_owned()
    } else {
        format!("expected a stage name {context}")
    };
    if input.peek(Token![->]) {
        Err(input.error(format!("{expected} before `->`")))
    } else {
        Err(input.error(expected))
    }
}
