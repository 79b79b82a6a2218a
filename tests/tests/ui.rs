//! The trybuild suite: `tests/ui/fail/*.rs` must fail to compile with the
//! message in the `.stderr` next to each; `tests/ui/pass/*.rs` must compile
//! and run. Regenerate expected output with `TRYBUILD=overwrite`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/fail/*.rs");
    t.pass("ui/pass/*.rs");
}
