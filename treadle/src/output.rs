//! Typed stage outputs: what a `#[stage]` produces, and how its readers see it.

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

/// The outputs of a fan-out stage's subtasks, keyed by subtask name.
pub type Subtasks<T> = BTreeMap<String, T>;

/// The output type of a stage, implemented by every `#[stage]` type.
///
/// A stage reads the output of an upstream `#[stage]` by naming it on a
/// parameter, `#[from(scan)] report: &ScanReport`; the parameter's type must
/// fit `<scan as StageOutput>::Output` (see `#[stage]`).
pub trait StageOutput {
    /// What readers of the stage receive: the function's output type `T`,
    /// as [`Subtasks<T>`] for a `fan_out` stage, inside an `Option` for a
    /// stage that `may_skip`.
    type Output: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Whether the stage may skip (`#[stage(may_skip)]`): readers then get
    /// `None` when it did.
    const MAY_SKIP: bool;
    /// Whether the stage fans out into subtasks (`#[stage(fan_out)]`).
    const FAN_OUT: bool;
}

/// Decodes a stored output (or its absence, as JSON `null`) as `T`, the
/// output type of stage `stage`.
///
/// An absent output reads as `null`, so a stage that produces `()` or an
/// `Option` (a skipped stage, or one that completed without an output)
/// decodes, and any other type is an error.
pub(crate) fn decode<T: DeserializeOwned>(
    stage: &str,
    what: &'static str,
    value: Option<&Value>,
) -> Result<T> {
    T::deserialize(value.unwrap_or(&Value::Null)).map_err(|source| Error::OutputShape {
        what,
        stage: stage.to_owned(),
        expected: short_type_name(std::any::type_name::<T>()),
        source,
    })
}

/// A type name without module paths: `Option<Tags>` for
/// `core::option::Option<my_app::Tags>`.
fn short_type_name(full: &str) -> String {
    let mut short = String::with_capacity(full.len());
    let mut rest = full;
    while let Some(at) = rest.find("::") {
        short.push_str(&rest[..at]);
        // Drop the module name just written.
        let kept = short
            .trim_end_matches(|c: char| c.is_alphanumeric() || c == '_')
            .len();
        short.truncate(kept);
        rest = &rest[at + 2..];
    }
    short.push_str(rest);
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_lose_their_module_paths() {
        assert_eq!(
            short_type_name(
                "core::option::Option<alloc::collections::btree::map::BTreeMap<alloc::string::String, my_app::Tags>>"
            ),
            "Option<BTreeMap<String, Tags>>"
        );
        assert_eq!(short_type_name("u32"), "u32");
        assert_eq!(short_type_name("(a::B, [c::D; 2])"), "(B, [D; 2])");
    }
}
