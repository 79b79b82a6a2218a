//! Turning the end of an attempt into a stored transition, by the stage's policy.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::outcome::StageOutcome;
use crate::stage::StagePolicy;
use crate::state::AttemptResult;
use crate::status::AttemptRecord;
use crate::store::Transition;

/// How an attempt ended, before the policy is applied.
#[derive(Debug)]
pub(crate) enum AttemptEnd {
    /// The stage returned an outcome.
    Outcome(StageOutcome),
    /// Approved edits, checked instead of running the stage, do not fit
    /// its output.
    EditsRefused {
        /// Why.
        reason: String,
    },
    /// The stage returned `Err`, timed out or panicked.
    Error {
        /// Which of the three.
        result: AttemptResult,
        /// What went wrong.
        message: String,
    },
}

/// Everything `settle` needs to know about the attempt.
pub(crate) struct AttemptFacts<'a> {
    pub attempt: u32,
    /// Attempts of this run abandoned by workers that stopped; they do not
    /// count against the policy's attempts.
    pub crashes: u32,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub policy: &'a StagePolicy,
    /// Uniform in `[0, 1)`, for backoff jitter.
    pub random: f64,
}

/// The attempt record and the transition for an attempt's end.
///
/// A returned `Err`, a timeout or a panic is retried with backoff while
/// attempts remain; a `Retry` outcome is retried after its own delay while
/// attempts remain; then the stage fails. `Failed` fails at once.
pub(crate) fn settle(end: AttemptEnd, facts: &AttemptFacts<'_>) -> (AttemptRecord, Transition) {
    // The stage's own attempts: abandoned ones do not count.
    let own = facts.attempt.saturating_sub(facts.crashes);
    let attempts_left = own < facts.policy.max_attempts;
    let retry_or_fail = |delay: Duration, reason: &str| {
        if attempts_left {
            Transition::RetryAt {
                at: facts.finished_at
                    + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX),
            }
        } else {
            Transition::Fail {
                reason: format!("{reason} (after {own} attempts)"),
            }
        }
    };
    let (result, error, transition) = match end {
        AttemptEnd::Outcome(outcome) => match outcome {
            StageOutcome::Complete { output } => (
                AttemptResult::Completed,
                None,
                Transition::Complete { output },
            ),
            StageOutcome::Skip { reason } => (
                AttemptResult::Skipped,
                Some(reason.clone()),
                Transition::Skip { reason },
            ),
            StageOutcome::NeedsReview(request) => (
                AttemptResult::NeedsReview,
                None,
                Transition::AwaitReview(request),
            ),
            StageOutcome::FanOut(subtasks) => match first_duplicate(&subtasks) {
                Some(name) => {
                    let reason = format!("fan-out names subtask `{name}` more than once");
                    (
                        AttemptResult::Failed,
                        Some(reason.clone()),
                        Transition::Fail { reason },
                    )
                }
                None => (
                    AttemptResult::FannedOut,
                    None,
                    Transition::FanOut { subtasks },
                ),
            },
            StageOutcome::Failed { reason } => (
                AttemptResult::Failed,
                Some(reason.clone()),
                Transition::Fail { reason },
            ),
            StageOutcome::Retry { after, reason } => {
                let transition = retry_or_fail(after, &reason);
                (AttemptResult::RetryRequested, Some(reason), transition)
            }
        },
        AttemptEnd::EditsRefused { reason } => (
            AttemptResult::Failed,
            Some(reason.clone()),
            Transition::RefuseEdits { reason },
        ),
        AttemptEnd::Error { result, message } => {
            let delay = facts.policy.backoff.delay(own, facts.random);
            let transition = retry_or_fail(delay, &message);
            (result, Some(message), transition)
        }
    };
    let record = AttemptRecord {
        attempt: facts.attempt,
        started_at: facts.started_at,
        finished_at: facts.finished_at,
        result,
        error,
    };
    (record, transition)
}

fn first_duplicate(names: &[String]) -> Option<&str> {
    let mut seen = BTreeSet::new();
    names
        .iter()
        .find(|n| !seen.insert(n.as_str()))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::Backoff;

    fn facts(attempt: u32, policy: &StagePolicy) -> AttemptFacts<'_> {
        let t = DateTime::from_timestamp(1_000_000, 0).unwrap();
        AttemptFacts {
            attempt,
            crashes: 0,
            started_at: t,
            finished_at: t,
            policy,
            random: 0.0,
        }
    }

    fn error() -> AttemptEnd {
        AttemptEnd::Error {
            result: AttemptResult::Error,
            message: "boom".into(),
        }
    }

    #[test]
    fn errors_retry_with_backoff_until_attempts_run_out() {
        let policy = StagePolicy::new()
            .retries(2)
            .backoff(Backoff::Fixed(Duration::from_secs(10)));
        let (record, transition) = settle(error(), &facts(2, &policy));
        assert_eq!(record.result, AttemptResult::Error);
        let base = facts(2, &policy).finished_at;
        // Equal jitter with random = 0 waits half the nominal delay.
        assert_eq!(
            transition,
            Transition::RetryAt {
                at: base + chrono::Duration::seconds(5)
            }
        );
        let (_, transition) = settle(error(), &facts(3, &policy));
        assert_eq!(
            transition,
            Transition::Fail {
                reason: "boom (after 3 attempts)".into()
            }
        );
    }

    #[test]
    fn abandoned_attempts_do_not_spend_the_stages_own_budget() {
        let policy = StagePolicy::new();
        // Attempt 3 of a stage without retries, after two crashes: its first own attempt.
        let crashed = AttemptFacts {
            crashes: 2,
            ..facts(3, &policy)
        };
        let (record, transition) = settle(error(), &crashed);
        assert_eq!(record.attempt, 3, "the history numbers every attempt");
        assert_eq!(
            transition,
            Transition::Fail {
                reason: "boom (after 1 attempts)".into()
            }
        );
        let retrying = StagePolicy::new().retries(1);
        let (_, transition) = settle(
            error(),
            &AttemptFacts {
                crashes: 2,
                ..facts(3, &retrying)
            },
        );
        assert!(
            matches!(transition, Transition::RetryAt { .. }),
            "{transition:?}"
        );
    }

    #[test]
    fn an_explicit_failure_is_final_and_duplicate_subtasks_fail() {
        let policy = StagePolicy::new().retries(5);
        let (_, t) = settle(
            AttemptEnd::Outcome(StageOutcome::failed("no")),
            &facts(1, &policy),
        );
        assert_eq!(
            t,
            Transition::Fail {
                reason: "no".into()
            }
        );
        let (_, t) = settle(
            AttemptEnd::Outcome(StageOutcome::fan_out(["a", "b", "a"])),
            &facts(1, &policy),
        );
        assert_eq!(
            t,
            Transition::Fail {
                reason: "fan-out names subtask `a` more than once".into()
            }
        );
    }
}
