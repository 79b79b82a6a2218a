//! Procedural macros for treadle: `#[stage]` and `pipeline!`.
//!
//! Use them through the `treadle` crate (`treadle::stage`,
//! `treadle::pipeline`, or `use treadle::prelude::*`): the generated code
//! names `::treadle` paths. This crate is a thin shim; the logic lives in
//! modules written against `proc_macro2` so it can be unit-tested.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use proc_macro::TokenStream;

mod duration;
mod errors;
mod pipeline;
mod stage;

/// Turns an `async fn` into a pipeline stage.
///
/// ```ignore
/// use treadle::prelude::*;
///
/// #[stage(retries = 3, backoff = "exponential", backoff_base = "200ms", timeout = "30s")]
/// async fn scan(doc: &Document, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
///     Ok(StageOutcome::complete())
/// }
/// ```
///
/// The function must be `async`, take the work item by shared reference
/// (`item: &W`), optionally the context (`ctx: &mut StageContext`), and
/// return `treadle::Result<StageOutcome>` (any path ending in
/// `Result<StageOutcome>`). It may not be generic or take `self`.
///
/// The function is kept as it is, so tests can still call
/// `scan(&doc, &mut ctx).await`. Next to it the macro generates a braced
/// struct of the same name, `pub struct scan {}` with the function's
/// visibility, implementing `treadle::Stage<W>`: its `run` calls the
/// function (without the context if the function does not take one).
/// A struct with braces lives only in the type namespace, so it does not
/// clash with the function; `pipeline!` names stages by this type. The impls
/// sit in `const _: () = { .. }` and name only `::treadle` paths, so nothing
/// else is added to your module. A private stage that nothing uses is
/// reported as dead code on the function, like any unused function.
///
/// # Options
///
/// | option | value | effect |
/// |---|---|---|
/// | `name = "..."` | non-empty string | the runtime stage name (default: the function's name) |
/// | `retries = N` | integer (`u32`) | `N` attempts after the first |
/// | `backoff = "..."` | `"exponential"` or `"fixed"` | how the delay before a retry grows |
/// | `backoff_base = "..."` | duration | the delay before the first retry (fixed: before every retry) |
/// | `backoff_max = "..."` | duration | the longest delay (exponential only) |
/// | `timeout = "..."` | duration, not zero | the longest one attempt may run |
///
/// A duration is an integer followed by `ms`, `s`, `m` or `h`: `"500ms"`,
/// `"30s"`, `"2m"`, `"1h"`. `backoff_base`/`backoff_max` without `backoff`
/// mean an exponential backoff; a missing base or cap comes from
/// `StagePolicy::DEFAULT` (1 s, capped at 5 min, or at the base if that is
/// longer). The options build the `StagePolicy` returned by `policy()`.
///
/// # Errors
///
/// Reported at compile time, at the offending token, all at once: a
/// function that is not `async` (at `fn`), has no item parameter (at the
/// parentheses), takes the item by value or `&mut`, has a second parameter
/// that is not `&mut`, has extra parameters, is generic, or does not return
/// `Result<StageOutcome>`; an unknown option, an option given twice, a value
/// of the wrong type, a malformed duration, an unknown backoff, a
/// `backoff_max` shorter than `backoff_base` or on a fixed backoff. After an
/// error the function, the struct and a stub `Stage` impl are still
/// generated, so code that uses the stage reports nothing more.
#[proc_macro_attribute]
pub fn stage(args: TokenStream, item: TokenStream) -> TokenStream {
    stage::expand(args.into(), item.into()).into()
}

/// Builds a `treadle::Pipeline<W>` from a graph of `#[stage]` types.
///
/// ```ignore
/// use treadle::prelude::*;
///
/// let pipeline: Pipeline<Document> = pipeline! {
///     scan -> { ocr, thumbnails } -> index;
///     scan -> audit;
///     archive;
/// };
/// ```
///
/// # Grammar
///
/// ```text
/// pipeline  := statement (";" statement)* ";"?
/// statement := element ("->" element)*
/// element   := stage | "{" stage ("," stage)* ","? "}"
/// stage     := a path to a `#[stage]` type: `scan`, `stages::scan`
/// ```
///
/// `a -> b` runs `b` after `a`. A group `{ b, c }` connects each of its
/// stages the same way, so `a -> { b, c } -> d` fans out to `b` and `c`
/// and joins again at `d`; groups may begin, sit in or end a chain. A stage
/// on its own is a statement (a one-stage pipeline, or a stage with no
/// edges). A stage named in several statements is one node. The runtime
/// stage names come from the stage types (the function name or its
/// `name = "..."` option). The work item type `W` is inferred from the
/// stages.
///
/// # Errors
///
/// The whole graph is checked at compile time and every problem is
/// reported at once, in a deterministic order, each at the user's tokens:
///
/// - a cycle, as its path: `cycle detected: a -> b -> a`, at the name that
///   closes it (a self-loop `a -> a` too);
/// - a duplicate edge: ``duplicate edge `a -> b` ``, at its second
///   occurrence, also through groups (`a -> { b, b }`);
/// - an empty pipeline, an empty group, or a syntax error such as
///   ``expected `->` or `;` `` or a missing stage after `->`;
/// - a name that is not a `#[stage]` type: "`x` is not a treadle stage"
///   (a hand-written `Stage` impl is added with `Pipeline::builder()`);
/// - a stage whose work item type differs from the first stage's: "`x` is
///   not a treadle stage for work items of type `W`", at that stage;
/// - two stages with the same runtime name (via `name = "..."`, or one
///   stage reached by two different paths): "duplicate stage name", found
///   when a generated constant is evaluated, at the later stage.
///
/// A pipeline the macro accepts is valid for the runtime's builder too, so
/// the expression never fails at run time.
#[proc_macro]
pub fn pipeline(input: TokenStream) -> TokenStream {
    pipeline::expand(input.into()).into()
}
