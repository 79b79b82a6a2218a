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
/// async fn scan(doc: &Document) -> treadle::Result<ScanReport> {
///     Ok(ScanReport { pages: 3 })
/// }
///
/// #[stage(may_skip)]
/// async fn ocr(
///     doc: &Document,
///     #[from(scan)] report: &ScanReport,
///     ctx: &mut StageContext,
/// ) -> treadle::Result<StageOutcome<String>> {
///     if report.pages == 0 {
///         return Ok(StageOutcome::skip("no pages"));
///     }
///     Ok(StageOutcome::done(format!("{} pages", report.pages)))
/// }
/// ```
///
/// The function must be `async` and take the work item by shared reference
/// (`item: &W`) first. After it come, in any order, reads of upstream
/// outputs (`#[from(scan)] report: &ScanReport`) and optionally the context
/// (`ctx: &mut StageContext`). It may not be generic or take `self`.
///
/// # Output
///
/// The return type says what the stage produces:
///
/// | returns | output type | the stage |
/// |---|---|---|
/// | `treadle::Result<T>` | `T` (`()`: none) | completes with the value |
/// | `treadle::Result<StageOutcome<T>>` | `T` | completes with `StageOutcome::done(t)`, or reviews, retries, fails; skips only if `may_skip`, fans out only if `fan_out` |
/// | `treadle::Result<StageOutcome>` | `serde_json::Value` | untyped: anything |
///
/// (Any path ending in `Result<..>` and `StageOutcome<..>`.) `fan_out` makes
/// the output `Subtasks<T>`, the subtasks' outputs by name; `may_skip` wraps
/// it in an `Option`. The output type is `<scan as treadle::StageOutput>::Output`.
/// Outputs are stored as JSON; a `null` output (`()`, `None`) is stored as
/// none. An outcome the declaration does not allow (a skip without
/// `may_skip`, a fan-out without `fan_out`, a `fan_out` stage completing
/// without fanning out, a review proposing an output of another type) fails
/// the stage permanently with a message saying so.
///
/// # Reads
///
/// `#[from(scan)] report: &T` reads the output of the `#[stage]` `scan` (a
/// path to its type); `T` must be its output type, or the parameter is
/// `Option<&T>` for an output `Option<T>` (a stage that may skip: `None`
/// when it did). A mismatch is a compile error at the parameter. The output
/// is decoded before the function runs; a stored value that does not decode
/// is a failed attempt naming the stage and the type. `pipeline!` checks
/// that every stage read is upstream of the reader.
///
/// The function is kept as it is (without the `#[from]` attributes), so
/// tests can still call `scan(&doc).await`. Next to it the macro generates
/// a braced struct of the same name, `pub struct scan {}` with the
/// function's visibility, implementing `treadle::Stage<W>` and
/// `treadle::StageOutput`: its `run` decodes the reads and calls the
/// function. A struct with braces lives only in the type namespace, so it
/// does not clash with the function; `pipeline!` names stages by this type.
/// The impls sit in `const _: () = { .. }` and name only `::treadle` paths,
/// so nothing else is added to your module. A private stage that nothing
/// uses is reported as dead code on the function, like any unused function.
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
/// | `may_skip` | none | the stage may skip (typed outcomes only) |
/// | `fan_out` | none | the stage fans out into subtasks (typed outcomes only) |
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
/// parentheses), takes the item by value or `&mut`, has a parameter that is
/// neither a read nor the context, takes the context twice, is generic, or
/// does not return `Result<..>`; a malformed `#[from(..)]`, a read of
/// something that is not a `#[stage]` (at its name) or of the wrong type (at
/// the parameter); an unknown option, an option given twice, a value of the
/// wrong type, a malformed duration, an unknown backoff, a `backoff_max`
/// shorter than `backoff_base` or on a fixed backoff, `may_skip` or
/// `fan_out` on a stage without a typed outcome. After an error the
/// function, the struct and a stub `Stage` impl are still generated, so
/// code that uses the stage reports nothing more.
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
///   when a generated constant is evaluated, at the later stage;
/// - a stage that reads (`#[from(..)]`) a stage that is not upstream of it:
///   `` `enrich` reads the output of `review`, which is not upstream of
///   `enrich` in this pipeline `` (also for a stage that reads itself or a
///   stage not in the pipeline), found when a generated constant per stage
///   is evaluated, at the reader's name, every bad read of the stage in one
///   message.
///
/// A pipeline the macro accepts is valid for the runtime's builder too, so
/// the expression never fails at run time.
#[proc_macro]
pub fn pipeline(input: TokenStream) -> TokenStream {
    pipeline::expand(input.into()).into()
}
