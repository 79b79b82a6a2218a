//! Parsing and validation of `#[stage(...)]` options and the stage function's
//! signature. Every problem is recorded; parsing goes on after an error.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{
    Attribute, Expr, ExprLit, FnArg, GenericArgument, Ident, ItemFn, Lit, LitStr, Meta, Path,
    PathArguments, ReturnType, Token, Type,
};

use crate::duration::parse_millis;
use crate::errors::Errors;

/// The option names `#[stage]` accepts, for the "unknown option" message.
const OPTIONS: &str =
    "`name`, `retries`, `backoff`, `backoff_base`, `backoff_max`, `timeout`, `may_skip`, `fan_out`";

/// The kind of retry backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackoffKind {
    /// `backoff = "fixed"`.
    Fixed,
    /// `backoff = "exponential"`.
    Exponential,
}

/// The validated options of one `#[stage(...)]` attribute.
#[derive(Default)]
pub(crate) struct StageOptions {
    /// `name = "..."`: the runtime name, overriding the function's name.
    pub(crate) name: Option<LitStr>,
    /// `retries = N`: attempts after the first.
    pub(crate) retries: Option<u32>,
    /// `backoff = "fixed" | "exponential"`.
    pub(crate) backoff: Option<BackoffKind>,
    /// `backoff_base = "200ms"`, in milliseconds.
    pub(crate) backoff_base: Option<u64>,
    /// `backoff_max = "1m"`, in milliseconds.
    pub(crate) backoff_max: Option<u64>,
    /// `timeout = "30s"`, in milliseconds.
    pub(crate) timeout: Option<u64>,
    /// `may_skip`: the stage may skip; readers get an `Option`.
    pub(crate) may_skip: Option<Span>,
    /// `fan_out`: the stage fans out; readers get its subtasks' outputs.
    pub(crate) fan_out: Option<Span>,
}

/// Which options were written, with the span of their name, to report
/// repeated options and options that contradict each other.
#[derive(Default)]
struct Seen {
    name: Option<Span>,
    retries: Option<Span>,
    backoff: Option<Span>,
    backoff_base: Option<Span>,
    backoff_max: Option<Span>,
    timeout: Option<Span>,
    may_skip: Option<Span>,
    fan_out: Option<Span>,
}

/// Parses and validates the attribute's arguments.
pub(crate) fn parse_options(args: TokenStream, errors: &mut Errors) -> StageOptions {
    let mut options = StageOptions::default();
    let parser = Punctuated::<Meta, Token![,]>::parse_terminated;
    let metas = match parser.parse2(args) {
        Ok(metas) => metas,
        Err(error) => {
            errors.push(error);
            return options;
        }
    };
    let mut seen = Seen::default();
    for meta in &metas {
        let Some(key) = meta.path().get_ident() else {
            errors.spanned(
                meta.path(),
                format_args!("unknown `#[stage]` option; expected one of {OPTIONS}"),
            );
            continue;
        };
        let slot = match key.to_string().as_str() {
            "name" => &mut seen.name,
            "retries" => &mut seen.retries,
            "backoff" => &mut seen.backoff,
            "backoff_base" => &mut seen.backoff_base,
            "backoff_max" => &mut seen.backoff_max,
            "timeout" => &mut seen.timeout,
            "may_skip" => &mut seen.may_skip,
            "fan_out" => &mut seen.fan_out,
            other => {
                errors.at(
                    key.span(),
                    format_args!("unknown `#[stage]` option `{other}`; expected one of {OPTIONS}"),
                );
                continue;
            }
        };
        if slot.is_some() {
            errors.at(
                key.span(),
                format_args!("option `{key}` is given more than once"),
            );
            continue;
        }
        *slot = Some(key.span());
        match (meta, key.to_string().as_str()) {
            (Meta::Path(_), "may_skip") => options.may_skip = Some(key.span()),
            (Meta::Path(_), "fan_out") => options.fan_out = Some(key.span()),
            (_, flag @ ("may_skip" | "fan_out")) => {
                errors.spanned(
                    meta,
                    format_args!("`{flag}` takes no value: write `{flag}`"),
                );
            }
            (Meta::NameValue(pair), _) => parse_option(key, &pair.value, &mut options, errors),
            _ => errors.spanned(
                meta,
                format_args!("expected `{key} = ...`, e.g. `retries = 3` or `timeout = \"30s\"`"),
            ),
        }
    }
    check_backoff(&options, &seen, errors);
    options
}

/// Parses the value of one known option into `options`.
fn parse_option(key: &Ident, value: &Expr, options: &mut StageOptions, errors: &mut Errors) {
    let lit = match value {
        Expr::Lit(ExprLit { lit, attrs }) if attrs.is_empty() => Some(lit),
        _ => None,
    };
    match key.to_string().as_str() {
        "name" => match lit {
            Some(Lit::Str(s)) if s.value().is_empty() => {
                errors.spanned(s, "a stage name cannot be empty");
            }
            Some(Lit::Str(s)) => options.name = Some(s.clone()),
            _ => errors.spanned(value, "expected a string literal, e.g. `name = \"scan\"`"),
        },
        "retries" => match lit {
            Some(Lit::Int(int)) => match int.base10_parse::<u32>() {
                Ok(n) => options.retries = Some(n),
                Err(_) => errors.spanned(
                    int,
                    "`retries` must be an integer between 0 and 4294967295 (u32)",
                ),
            },
            _ => errors.spanned(value, "expected an integer literal, e.g. `retries = 3`"),
        },
        "backoff" => match lit {
            Some(Lit::Str(s)) => match s.value().as_str() {
                "fixed" => options.backoff = Some(BackoffKind::Fixed),
                "exponential" => options.backoff = Some(BackoffKind::Exponential),
                other => errors.spanned(
                    s,
                    format_args!(
                        "unknown backoff `{other}`; expected \"exponential\" or \"fixed\""
                    ),
                ),
            },
            _ => errors.spanned(
                value,
                "expected a string literal: `backoff = \"exponential\"` or `backoff = \"fixed\"`",
            ),
        },
        "backoff_base" => options.backoff_base = duration(key, value, lit, false, errors),
        "backoff_max" => options.backoff_max = duration(key, value, lit, false, errors),
        "timeout" => options.timeout = duration(key, value, lit, true, errors),
        _ => {}
    }
}

/// Parses a duration option's string literal into milliseconds.
fn duration(
    key: &Ident,
    value: &Expr,
    lit: Option<&Lit>,
    nonzero: bool,
    errors: &mut Errors,
) -> Option<u64> {
    let Some(Lit::Str(s)) = lit else {
        errors.spanned(
            value,
            format_args!("expected a duration string, e.g. `{key} = \"500ms\"`"),
        );
        return None;
    };
    match parse_millis(&s.value()) {
        Ok(0) if nonzero => {
            errors.spanned(s, format_args!("`{key}` must be longer than zero"));
            None
        }
        Ok(millis) => Some(millis),
        Err(message) => {
            errors.spanned(s, message);
            None
        }
    }
}

/// Checks the backoff options against each other.
fn check_backoff(options: &StageOptions, seen: &Seen, errors: &mut Errors) {
    if let (Some(BackoffKind::Fixed), Some(span)) = (options.backoff, seen.backoff_max) {
        errors.at(
            span,
            "`backoff_max` only applies to `backoff = \"exponential\"`; a fixed backoff waits \
             `backoff_base` before every retry",
        );
    }
    if let (Some(base), Some(max), Some(span)) =
        (options.backoff_base, options.backoff_max, seen.backoff_max)
        && max < base
    {
        errors.at(
            span,
            "`backoff_max` must not be shorter than `backoff_base`",
        );
    }
}

/// What the stage function's signature tells: the work item type, the
/// parameters after it, and what it returns.
pub(crate) struct StageSignature {
    /// `W` of the `item: &W` parameter.
    pub(crate) item: Type,
    /// The parameters after the item, in order.
    pub(crate) params: Vec<Param>,
    /// What the function returns.
    pub(crate) output: Output,
    /// The declared return type, for spans.
    pub(crate) returns: Type,
}

/// A parameter after the work item.
pub(crate) enum Param {
    /// `ctx: &mut StageContext`, with its type.
    Context(Type),
    /// `#[from(scan)] report: &ScanReport`: a read of an upstream output.
    Read {
        /// The producing stage's path.
        from: Path,
        /// The parameter's type.
        ty: Type,
    },
}

/// What a stage function returns, inside `treadle::Result<..>`.
pub(crate) enum Output {
    /// `StageOutcome`: an untyped outcome, output `serde_json::Value`.
    Untyped,
    /// `StageOutcome<T>`: a typed outcome with output `T`.
    Outcome(Type),
    /// `T`: the stage always completes, with output `T` (`()` for none).
    Plain(Type),
}

/// The message for a missing or wrong return type.
const RETURNS: &str = "a `#[stage]` function returns `treadle::Result<T>` (it completes with a `T`; \
     `()` for no output) or `treadle::Result<StageOutcome<T>>` (it may also review, retry, \
     skip, fail or fan out)";

/// The message for a parameter that is neither a read nor the context.
const PARAMETERS: &str = "after the work item, a `#[stage]` function takes reads of upstream \
     outputs (`#[from(scan)] report: &ScanReport`) and optionally the context \
     (`ctx: &mut StageContext`)";

/// Validates the function's signature and options that depend on it.
/// Returns `None` if the item type or the output could not be found; every
/// problem is recorded in `errors`.
pub(crate) fn check_signature(
    function: &ItemFn,
    options: &StageOptions,
    errors: &mut Errors,
) -> Option<StageSignature> {
    let sig = &function.sig;
    if sig.asyncness.is_none() {
        errors.at(
            sig.fn_token.span,
            "a `#[stage]` function must be `async`: write `async fn`",
        );
    }
    if let Some(constness) = &sig.constness {
        errors.at(constness.span, "a `#[stage]` function cannot be `const`");
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.at(unsafety.span, "a `#[stage]` function cannot be `unsafe`");
    }
    if let Some(abi) = &sig.abi {
        errors.spanned(abi, "a `#[stage]` function cannot have an `extern` ABI");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.spanned(
            &sig.generics,
            "a `#[stage]` function cannot be generic: it is the stage for one work item type",
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.spanned(variadic, "a `#[stage]` function cannot be variadic");
    }

    let mut inputs = sig.inputs.iter();
    let item = match inputs.next() {
        None => {
            errors.at(
                sig.paren_token.span.join(),
                "a `#[stage]` function takes the work item by reference as its first \
                 parameter, e.g. `item: &Document`",
            );
            None
        }
        Some(FnArg::Receiver(receiver)) => {
            errors.spanned(receiver, "a `#[stage]` function cannot take `self`");
            None
        }
        Some(FnArg::Typed(arg)) => {
            if let Some(attr) = arg.attrs.iter().find(|a| is_from(a)) {
                errors.spanned(
                    attr,
                    "the first parameter of a `#[stage]` function is the work item, not a read",
                );
            }
            match &*arg.ty {
                Type::Reference(reference) if reference.mutability.is_none() => {
                    Some((*reference.elem).clone())
                }
                Type::Reference(reference) => {
                    errors.spanned(
                        reference,
                        format_args!(
                            "the work item is passed by shared reference: write `&{}`",
                            type_text(&reference.elem)
                        ),
                    );
                    None
                }
                other => {
                    errors.spanned(
                        other,
                        format_args!(
                            "the work item parameter must be a reference: write `&{}`",
                            type_text(other)
                        ),
                    );
                    None
                }
            }
        }
    };

    let mut params = Vec::new();
    let mut has_context = false;
    for input in inputs {
        let arg = match input {
            FnArg::Receiver(receiver) => {
                errors.spanned(receiver, "a `#[stage]` function cannot take `self`");
                continue;
            }
            FnArg::Typed(arg) => arg,
        };
        let mut froms = arg.attrs.iter().filter(|a| is_from(a));
        if let Some(attr) = froms.next() {
            for again in froms {
                errors.spanned(again, "a parameter reads one stage: one `#[from(..)]`");
            }
            match attr.parse_args_with(Path::parse_mod_style) {
                Ok(from) => params.push(Param::Read {
                    from,
                    ty: (*arg.ty).clone(),
                }),
                Err(_) => errors.spanned(
                    attr,
                    "expected the name of the stage to read, e.g. `#[from(scan)]`",
                ),
            }
            continue;
        }
        match &*arg.ty {
            Type::Reference(reference) if reference.mutability.is_some() && !has_context => {
                has_context = true;
                params.push(Param::Context((*arg.ty).clone()));
            }
            Type::Reference(reference) if reference.mutability.is_some() => {
                errors.spanned(arg, "a `#[stage]` function takes the context only once");
            }
            _ => errors.spanned(arg, format_args!("unexpected parameter: {PARAMETERS}")),
        }
    }

    let (output, returns) = match &sig.output {
        ReturnType::Default => {
            errors.at(sig.paren_token.span.close(), RETURNS);
            (None, None)
        }
        ReturnType::Type(_, ty) => {
            let output = classify_output(ty);
            if output.is_none() {
                errors.spanned(ty, format_args!("{RETURNS}, not `{}`", type_text(ty)));
            }
            (output, Some((**ty).clone()))
        }
    };
    if let Some(output @ (Output::Untyped | Output::Plain(_))) = &output {
        for (flag, span) in [("may_skip", options.may_skip), ("fan_out", options.fan_out)] {
            if let Some(span) = span {
                let why = match output {
                    Output::Plain(_) => "a stage returning a plain value always completes",
                    _ => "an untyped `StageOutcome` may do anything",
                };
                errors.at(
                    span,
                    format_args!(
                        "`{flag}` declares what a typed outcome may do; {why}: return \
                         `treadle::Result<StageOutcome<T>>`"
                    ),
                );
            }
        }
    }

    Some(StageSignature {
        item: item?,
        params,
        output: output?,
        returns: returns?,
    })
}

/// Whether `attr` is `#[from(..)]`.
pub(crate) fn is_from(attr: &Attribute) -> bool {
    attr.path().is_ident("from")
}

/// What `ty`, expected to read `...::Result<X>`, returns inside the result.
fn classify_output(ty: &Type) -> Option<Output> {
    let inner = single_argument(ty, "Result")?;
    if let Type::Path(path) = inner
        && path.qself.is_none()
        && let Some(last) = path.path.segments.last()
        && last.ident == "StageOutcome"
    {
        return match &last.arguments {
            PathArguments::None => Some(Output::Untyped),
            _ => single_argument(inner, "StageOutcome").map(|t| Output::Outcome(t.clone())),
        };
    }
    Some(Output::Plain(inner.clone()))
}

/// `X` if `ty` is a path ending in `name<X>`.
fn single_argument<'a>(ty: &'a Type, name: &str) -> Option<&'a Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != name {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    if args.args.len() != 1 {
        return None;
    }
    match args.args.first() {
        Some(GenericArgument::Type(inner)) => Some(inner),
        _ => None,
    }
}

/// A type as a person writes it: `Result<String, treadle::Error>`, not the
/// token stream's `Result < String , treadle :: Error >`.
fn type_text(ty: &Type) -> String {
    let spaced = ty.to_token_stream().to_string();
    let mut text = String::with_capacity(spaced.len());
    let mut chars = spaced.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ' ' {
            text.push(c);
            continue;
        }
        let before = text.chars().last();
        let after = chars.peek().copied();
        let tight_before = matches!(before, Some('<' | '&' | ':' | '(' | '['));
        let tight_after = matches!(after, Some('<' | '>' | ',' | ':' | ')' | ']'));
        // Keeps the space in `dyn Trait`, `&'a T`, `impl Trait`, `&mut T`.
        if !(tight_before || tight_after) {
            text.push(' ');
        }
    }
    text
}
