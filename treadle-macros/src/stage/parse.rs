//! Parsing and validation of `#[stage(...)]` options and the stage function's
//! signature. Every problem is recorded; parsing goes on after an error.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{
    Expr, ExprLit, FnArg, GenericArgument, Ident, ItemFn, Lit, LitStr, MetaNameValue,
    PathArguments, ReturnType, Token, Type,
};

use crate::duration::parse_millis;
use crate::errors::Errors;

/// The option names `#[stage]` accepts, for the "unknown option" message.
const OPTIONS: &str = "`name`, `retries`, `backoff`, `backoff_base`, `backoff_max`, `timeout`";

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
}

/// Parses and validates the attribute's arguments.
pub(crate) fn parse_options(args: TokenStream, errors: &mut Errors) -> StageOptions {
    let mut options = StageOptions::default();
    let parser = Punctuated::<MetaNameValue, Token![,]>::parse_terminated;
    let metas = match parser.parse2(args) {
        Ok(metas) => metas,
        Err(error) => {
            errors.push(error);
            return options;
        }
    };
    let mut seen = Seen::default();
    for meta in &metas {
        let Some(key) = meta.path.get_ident() else {
            errors.spanned(
                &meta.path,
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
        parse_option(key, &meta.value, &mut options, errors);
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

/// What the stage function's signature tells: the work item type and whether
/// the function takes the context.
pub(crate) struct StageSignature {
    /// `W` of the `item: &W` parameter.
    pub(crate) item: Type,
    /// The type of the context parameter, if the function takes one.
    pub(crate) context: Option<Type>,
    /// The declared return type.
    pub(crate) output: Type,
}

/// Validates the function's signature. Returns `None` if the item type could
/// not be found; every problem is recorded in `errors`.
pub(crate) fn check_signature(function: &ItemFn, errors: &mut Errors) -> Option<StageSignature> {
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
        Some(FnArg::Typed(arg)) => match &*arg.ty {
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
        },
    };

    let context = match inputs.next() {
        None => None,
        Some(FnArg::Receiver(receiver)) => {
            errors.spanned(receiver, "a `#[stage]` function cannot take `self`");
            None
        }
        Some(FnArg::Typed(arg)) => match &*arg.ty {
            Type::Reference(reference) if reference.mutability.is_some() => Some((*arg.ty).clone()),
            other => {
                errors.spanned(
                    other,
                    "the second parameter of a `#[stage]` function is the context: \
                     `ctx: &mut StageContext`",
                );
                None
            }
        },
    };
    for extra in inputs {
        errors.spanned(
            extra,
            "unexpected parameter: a `#[stage]` function takes `item: &W` and optionally \
             `ctx: &mut StageContext`",
        );
    }

    let output = match &sig.output {
        ReturnType::Default => {
            errors.at(
                sig.paren_token.span.close(),
                "a `#[stage]` function must return `treadle::Result<StageOutcome>`",
            );
            None
        }
        ReturnType::Type(_, ty) => {
            if !returns_stage_result(ty) {
                errors.spanned(
                    ty,
                    format_args!(
                        "a `#[stage]` function must return `treadle::Result<StageOutcome>`, \
                         not `{}`",
                        type_text(ty)
                    ),
                );
            }
            Some((**ty).clone())
        }
    };

    Some(StageSignature {
        item: item?,
        context,
        output: output?,
    })
}

/// Whether `ty` reads `...::Result<...::StageOutcome>`.
fn returns_stage_result(ty: &Type) -> bool {
    let Type::Path(path) = ty else { return false };
    let Some(last) = path.path.segments.last() else {
        return false;
    };
    if last.ident != "Result" {
        return false;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return false;
    };
    if args.args.len() != 1 {
        return false;
    }
    let Some(GenericArgument::Type(Type::Path(inner))) = args.args.first() else {
        return false;
    };
    inner.qself.is_none()
        && inner
            .path
            .segments
            .last()
            .is_some_and(|segment| segment.ident == "StageOutcome" && segment.arguments.is_empty())
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
