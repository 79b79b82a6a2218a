//! Unit tests of `#[stage]` option and signature checks, and its expansion.

use proc_macro2::TokenStream;
use quote::quote;

use super::expand;
use super::parse::{BackoffKind, Output, Param, StageOptions, check_signature, parse_options};
use crate::errors::Errors;

fn messages(errors: Errors) -> Vec<String> {
    errors
        .finish()
        .map(|e| e.into_iter().map(|e| e.to_string()).collect())
        .unwrap_or_default()
}

fn option_errors(args: TokenStream) -> Vec<String> {
    let mut errors = Errors::default();
    parse_options(args, &mut errors);
    messages(errors)
}

fn signature_errors(function: TokenStream) -> Vec<String> {
    let mut errors = Errors::default();
    check_signature(
        &syn::parse2(function).unwrap(),
        &StageOptions::default(),
        &mut errors,
    );
    messages(errors)
}

#[test]
fn all_options_parse() {
    let mut errors = Errors::default();
    let options = parse_options(
        quote!(
            name = "ocr",
            retries = 3,
            backoff = "fixed",
            backoff_base = "250ms",
            timeout = "2m"
        ),
        &mut errors,
    );
    assert!(errors.is_empty());
    assert_eq!(options.name.unwrap().value(), "ocr");
    assert_eq!(options.retries, Some(3));
    assert_eq!(options.backoff, Some(BackoffKind::Fixed));
    assert_eq!(options.backoff_base, Some(250));
    assert_eq!(options.backoff_max, None);
    assert_eq!(options.timeout, Some(120_000));

    let options = parse_options(
        quote!(
            backoff = "exponential",
            backoff_base = "1s",
            backoff_max = "1h",
        ),
        &mut errors,
    );
    assert!(errors.is_empty());
    assert_eq!(options.backoff, Some(BackoffKind::Exponential));
    assert_eq!(
        (options.backoff_base, options.backoff_max),
        (Some(1_000), Some(3_600_000))
    );
}

#[test]
fn option_errors_are_all_reported() {
    assert_eq!(
        option_errors(quote!(
            retry = 3,
            retries = 1,
            retries = 2,
            timeout = "soon"
        )),
        [
            "unknown `#[stage]` option `retry`; expected one of `name`, `retries`, `backoff`, \
             `backoff_base`, `backoff_max`, `timeout`, `may_skip`, `fan_out`",
            "option `retries` is given more than once",
            "invalid duration `soon`: expected an integer followed by `ms`, `s`, `m` or `h`, \
             such as \"500ms\", \"30s\", \"2m\" or \"1h\"",
        ]
    );
}

#[test]
fn wrong_literal_types() {
    assert_eq!(
        option_errors(quote!(
            name = scan,
            retries = "3",
            timeout = 30,
            backoff = 1
        )),
        [
            "expected a string literal, e.g. `name = \"scan\"`",
            "expected an integer literal, e.g. `retries = 3`",
            "expected a duration string, e.g. `timeout = \"500ms\"`",
            "expected a string literal: `backoff = \"exponential\"` or `backoff = \"fixed\"`",
        ]
    );
    assert_eq!(
        option_errors(quote!(retries = 5000000000, name = "")),
        [
            "`retries` must be an integer between 0 and 4294967295 (u32)",
            "a stage name cannot be empty",
        ]
    );
}

#[test]
fn backoff_rules() {
    assert_eq!(
        option_errors(quote!(backoff = "linear")),
        ["unknown backoff `linear`; expected \"exponential\" or \"fixed\""]
    );
    assert_eq!(
        option_errors(quote!(backoff = "fixed", backoff_max = "1m")),
        [
            "`backoff_max` only applies to `backoff = \"exponential\"`; a fixed backoff waits \
          `backoff_base` before every retry"
        ]
    );
    assert_eq!(
        option_errors(quote!(backoff_base = "2m", backoff_max = "1m")),
        ["`backoff_max` must not be shorter than `backoff_base`"]
    );
    assert_eq!(
        option_errors(quote!(timeout = "0ms")),
        ["`timeout` must be longer than zero"]
    );
    assert!(option_errors(quote!(backoff_base = "0ms")).is_empty());
}

#[test]
fn option_syntax_errors() {
    assert_eq!(
        option_errors(quote!(retries)),
        ["expected `retries = ...`, e.g. `retries = 3` or `timeout = \"30s\"`"]
    );
    assert_eq!(
        option_errors(quote!(may_skip = true)),
        ["`may_skip` takes no value: write `may_skip`"]
    );
    assert_eq!(
        option_errors(quote!(a::b = 1)),
        [
            "unknown `#[stage]` option; expected one of `name`, `retries`, `backoff`, \
          `backoff_base`, `backoff_max`, `timeout`, `may_skip`, `fan_out`"
        ]
    );
}

#[test]
fn valid_signatures() {
    for function in [
        quote!(
            async fn scan(item: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {}
        ),
        quote!(
            async fn scan(_: &Doc) -> Result<StageOutcome> {}
        ),
        quote!(
            pub async fn scan(
                doc: &crate::Doc,
                _ctx: &mut treadle::StageContext,
            ) -> ::treadle::Result<::treadle::StageOutcome> {
            }
        ),
    ] {
        assert_eq!(signature_errors(function), Vec::<String>::new());
    }
}

const RETURNS: &str = "a `#[stage]` function returns `treadle::Result<T>` (it completes with a \
     `T`; `()` for no output) or `treadle::Result<StageOutcome<T>>` (it may also review, retry, \
     skip, fail or fan out)";

const PARAMETERS: &str = "unexpected parameter: after the work item, a `#[stage]` function \
     takes reads of upstream outputs (`#[from(scan)] report: &ScanReport`) and optionally the \
     context (`ctx: &mut StageContext`)";

#[test]
fn signature_errors_are_all_reported() {
    assert_eq!(
        signature_errors(quote!(
            fn scan() {}
        )),
        [
            "a `#[stage]` function must be `async`: write `async fn`",
            "a `#[stage]` function takes the work item by reference as its first parameter, \
             e.g. `item: &Document`",
            RETURNS,
        ]
    );
    assert_eq!(
        signature_errors(quote!(
            async fn scan(doc: Doc, ctx: StageContext, extra: u8) -> String {}
        )),
        [
            "the work item parameter must be a reference: write `&Doc`".to_owned(),
            PARAMETERS.to_owned(),
            PARAMETERS.to_owned(),
            format!("{RETURNS}, not `String`"),
        ]
    );
    assert_eq!(
        signature_errors(quote!(
            async fn scan<T>(doc: &mut Doc) -> Result<StageOutcome, E> {}
        )),
        [
            "a `#[stage]` function cannot be generic: it is the stage for one work item type"
                .to_owned(),
            "the work item is passed by shared reference: write `&Doc`".to_owned(),
            format!("{RETURNS}, not `Result<StageOutcome, E>`"),
        ]
    );
    assert_eq!(
        signature_errors(quote!(
            async fn scan(&self) -> Result<Outcome> {}
        )),
        ["a `#[stage]` function cannot take `self`"]
    );
}

#[test]
fn reads_and_the_context_in_any_order() {
    let function: syn::ItemFn = syn::parse2(quote!(
        async fn enrich(
            doc: &Doc,
            #[from(scan)] report: &Report,
            ctx: &mut StageContext,
            #[from(stages::ocr)] text: Option<&String>,
        ) -> Result<StageOutcome<Tags>> {
        }
    ))
    .unwrap();
    let mut errors = Errors::default();
    let signature = check_signature(&function, &StageOptions::default(), &mut errors).unwrap();
    assert!(errors.is_empty());
    let kinds: Vec<String> = signature
        .params
        .iter()
        .map(|param| match param {
            Param::Context(_) => "ctx".to_owned(),
            Param::Read { from, .. } => quote!(#from).to_string().replace(' ', ""),
        })
        .collect();
    assert_eq!(kinds, ["scan", "ctx", "stages::ocr"]);
    assert!(matches!(signature.output, Output::Outcome(_)));
}

#[test]
fn read_and_context_errors() {
    assert_eq!(
        signature_errors(quote!(
            async fn enrich(
                #[from(scan)] doc: &Doc,
                #[from] a: &u8,
                #[from(scan)]
                #[from(ocr)]
                b: &u8,
                x: &mut StageContext,
                y: &mut StageContext,
            ) -> Result<()> {
            }
        )),
        [
            "the first parameter of a `#[stage]` function is the work item, not a read",
            "expected the name of the stage to read, e.g. `#[from(scan)]`",
            "a parameter reads one stage: one `#[from(..)]`",
            "a `#[stage]` function takes the context only once",
        ]
    );
}

#[test]
fn return_types() {
    let output = |ty: TokenStream| {
        let function = syn::parse2(quote!(async fn s(d: &Doc) -> #ty {})).unwrap();
        let mut errors = Errors::default();
        check_signature(&function, &StageOptions::default(), &mut errors).map(|s| s.output)
    };
    assert!(matches!(
        output(quote!(treadle::Result<StageOutcome>)),
        Some(Output::Untyped)
    ));
    assert!(matches!(
        output(quote!(Result<StageOutcome<Tags>>)),
        Some(Output::Outcome(_))
    ));
    assert!(matches!(
        output(quote!(Result<ScanReport>)),
        Some(Output::Plain(_))
    ));
    assert!(matches!(output(quote!(Result<()>)), Some(Output::Plain(_))));
    assert!(output(quote!(Option<()>)).is_none());
}

#[test]
fn skip_and_fan_out_need_a_typed_outcome() {
    let check = |ty: TokenStream| {
        let mut errors = Errors::default();
        let options = parse_options(quote!(may_skip, fan_out), &mut errors);
        let function = syn::parse2(quote!(async fn s(d: &Doc) -> #ty {})).unwrap();
        check_signature(&function, &options, &mut errors);
        messages(errors)
    };
    assert!(check(quote!(Result<StageOutcome<Tags>>)).is_empty());
    assert_eq!(
        check(quote!(Result<Tags>)),
        [
            "`may_skip` declares what a typed outcome may do; a stage returning a plain value \
             always completes: return `treadle::Result<StageOutcome<T>>`",
            "`fan_out` declares what a typed outcome may do; a stage returning a plain value \
             always completes: return `treadle::Result<StageOutcome<T>>`",
        ]
    );
    assert_eq!(check(quote!(Result<StageOutcome>)).len(), 2);
}

#[test]
fn typed_expansion_declares_the_output_and_reads() {
    let out = expand(
        quote!(may_skip, fan_out),
        quote!(
            async fn enrich(
                doc: &Doc,
                #[from(scan)] report: &Report,
            ) -> Result<StageOutcome<Tags>> {
                todo!()
            }
        ),
    )
    .to_string();
    assert!(!out.contains("compile_error"));
    assert!(out.contains(
        "type Output = :: treadle :: __private :: Option < :: treadle :: Subtasks < Tags > >"
    ));
    assert!(out.contains("const MAY_SKIP : bool = true"));
    assert!(out.contains(
        "const READS : & 'static [& 'static str] = & [< scan as :: treadle :: __private :: StageDef > :: NAME]"
    ));
    assert!(out.contains("read_output :: < scan >"));
    assert!(out.contains("typed_outcome :: < Self , Tags >"));
    // The re-emitted function has no `#[from]` left.
    assert!(out.contains("async fn enrich (doc : & Doc , report : & Report"));
    assert!(!out.contains("# [from"));
}

#[test]
fn expansion_keeps_the_function_and_adds_the_type() {
    let out = expand(
        quote!(name = "ocr", retries = 2, timeout = "30s"),
        quote!(
            pub async fn scan(doc: &Doc) -> treadle::Result<StageOutcome> {
                todo!()
            }
        ),
    )
    .to_string();
    assert!(out.contains("pub async fn scan (doc : & Doc)"));
    assert!(out.contains("pub struct scan { }"));
    assert!(out.contains("const NAME : & 'static str = \"ocr\""));
    assert!(out.contains("impl :: treadle :: Stage < Doc > for scan"));
    assert!(out.contains(". retries (2u32)"));
    assert!(
        out.contains(". timeout (:: treadle :: __private :: Duration :: from_millis (30000u64))")
    );
    // Without a context parameter, `run` calls the function with the item only.
    assert!(out.contains("scan (item) . await"));
    assert!(!out.contains("compile_error"));
}

#[test]
fn name_defaults_to_the_function_name() {
    let out = expand(
        quote!(),
        quote!(
            async fn r#enrich(doc: &Doc, ctx: &mut StageContext) -> Result<StageOutcome> {
                todo!()
            }
        ),
    )
    .to_string();
    assert!(out.contains("const NAME : & 'static str = \"enrich\""));
    assert!(out.contains("r#enrich (item , ctx) . await"));
}

#[test]
fn errors_come_with_a_stub() {
    let out = expand(
        quote!(retries = "x"),
        quote!(
            fn scan(doc: &Doc) -> treadle::Result<StageOutcome> {
                todo!()
            }
        ),
    )
    .to_string();
    assert_eq!(out.matches("compile_error").count(), 2);
    assert!(out.contains("fn scan (doc : & Doc)"));
    assert!(out.contains("struct scan { }"));
    assert!(out.contains("impl < W : :: treadle :: WorkItem > :: treadle :: Stage < W > for scan"));
}

#[test]
fn not_a_function() {
    let out = expand(
        quote!(),
        quote!(
            struct Scan;
        ),
    )
    .to_string();
    assert!(out.contains("compile_error"));
    assert!(out.contains("struct Scan ;"));
}
