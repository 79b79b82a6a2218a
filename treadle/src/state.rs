//! Stored enums and their strict string codec.
//!
//! Every enum that is written to a store has one canonical lowercase string
//! per variant. Decoding an unknown string is an error, never a default.

use std::fmt;
use std::str::FromStr;

/// A string that is not the name of any variant of a stored enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct UnknownVariant {
    /// Which enum was being decoded.
    pub kind: &'static str,
    /// The string that matched no variant.
    pub value: String,
}

/// Defines a fieldless enum with a strict, bidirectional string codec.
macro_rules! stored_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident as $kind:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The canonical stored string of this variant.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownVariant;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    _ => Err(UnknownVariant { kind: $kind, value: s.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

stored_enum! {
    /// The state of one stage (or one fan-out subtask) of one item.
    pub enum StageState as "stage state" {
        /// Waiting for its upstream stages, or ready to be claimed.
        Pending = "pending",
        /// Claimed by a worker (or, for a fanned-out stage, waiting on its subtasks).
        Running = "running",
        /// Finished; its output (if any) is stored.
        Completed = "completed",
        /// Failed for good: attempts exhausted, an explicit failure, or a rejected review.
        Failed = "failed",
        /// Parked until a person approves or rejects it.
        AwaitingReview = "awaiting_review",
        /// Skipped by the stage itself; satisfies its dependents like a completion.
        Skipped = "skipped",
        /// Waiting for a retry at a stored time.
        RetryScheduled = "retry_scheduled",
        /// Stopped because the item was cancelled.
        Cancelled = "cancelled",
    }
}

impl StageState {
    /// Whether nothing more will happen to this stage without a person acting.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            StageState::Completed
                | StageState::Failed
                | StageState::Skipped
                | StageState::Cancelled
        )
    }

    /// Whether dependents may run after this stage.
    pub const fn satisfies_dependents(self) -> bool {
        matches!(self, StageState::Completed | StageState::Skipped)
    }
}

stored_enum! {
    /// How one attempt of a stage ended, as kept in the attempt history.
    pub enum AttemptResult as "attempt result" {
        /// The stage completed.
        Completed = "completed",
        /// The stage skipped itself.
        Skipped = "skipped",
        /// The stage asked for a person's review.
        NeedsReview = "needs_review",
        /// The stage fanned out into subtasks.
        FannedOut = "fanned_out",
        /// The stage asked to be retried later.
        RetryRequested = "retry_requested",
        /// The stage reported a permanent failure.
        Failed = "failed",
        /// The stage returned an error.
        Error = "error",
        /// The stage ran past its timeout.
        TimedOut = "timed_out",
        /// The stage panicked.
        Panicked = "panicked",
        /// The worker running it disappeared; its lease expired.
        Abandoned = "abandoned",
    }
}

impl AttemptResult {
    /// Whether the attempt went wrong; its message becomes the unit's `last_error`.
    pub const fn is_failure(self) -> bool {
        matches!(
            self,
            AttemptResult::RetryRequested
                | AttemptResult::Failed
                | AttemptResult::Error
                | AttemptResult::TimedOut
                | AttemptResult::Panicked
                | AttemptResult::Abandoned
        )
    }
}

stored_enum! {
    /// The kind of a person's review decision.
    pub enum DecisionKind as "decision kind" {
        /// Approved; the stage completes with its proposed output.
        Approved = "approved",
        /// Approved with edits that replace the stage's output.
        ApprovedWithEdits = "approved_with_edits",
        /// Rejected; the stage fails with the reviewer's reason.
        Rejected = "rejected",
    }
}

stored_enum! {
    /// The overall state of an item, derived from its stages.
    pub enum ItemState as "item state" {
        /// Some stage can still run.
        Active = "active",
        /// At least one stage waits for a person.
        AwaitingReview = "awaiting_review",
        /// Every stage completed or was skipped.
        Completed = "completed",
        /// A stage failed for good and nothing else can run.
        Failed = "failed",
        /// The item was cancelled.
        Cancelled = "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_string() {
        for state in StageState::ALL {
            assert_eq!(state.as_str().parse::<StageState>(), Ok(*state));
        }
        for result in AttemptResult::ALL {
            assert_eq!(result.as_str().parse::<AttemptResult>(), Ok(*result));
        }
    }

    #[test]
    fn an_unknown_string_is_an_error_naming_the_kind_and_value() {
        let err = "runing".parse::<StageState>().unwrap_err();
        assert_eq!(err.to_string(), "unknown stage state `runing`");
        assert!(
            "Completed".parse::<StageState>().is_err(),
            "decoding is case-sensitive"
        );
    }
}
