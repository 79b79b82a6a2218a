//! Deciding a fanned-out stage's fate from its subtasks' states.

use crate::state::StageState;

/// What the subtasks of a fan-out add up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FanIn {
    /// Some subtask can still run.
    Waiting,
    /// Every subtask completed or skipped.
    Completed,
    /// Nothing can run any more and these subtasks failed.
    Failed(Vec<String>),
}

/// Folds the subtasks' `(name, state)` pairs into the stage's fate.
pub fn fan_in<'a>(subtasks: impl IntoIterator<Item = (&'a str, StageState)>) -> FanIn {
    let mut failed = Vec::new();
    for (name, state) in subtasks {
        match state {
            StageState::Completed | StageState::Skipped => {}
            StageState::Failed => failed.push(name.to_owned()),
            _ => return FanIn::Waiting,
        }
    }
    if failed.is_empty() {
        FanIn::Completed
    } else {
        FanIn::Failed(failed)
    }
}

impl FanIn {
    /// The failure reason recorded on the stage when subtasks failed.
    pub fn failure_reason(failed: &[String]) -> String {
        format!("subtasks failed: {}", failed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StageState::*;

    #[test]
    fn a_fan_out_waits_while_any_subtask_can_run() {
        assert_eq!(
            fan_in([("a", Completed), ("b", RetryScheduled), ("c", Failed)]),
            FanIn::Waiting
        );
        assert_eq!(fan_in([("a", Completed), ("b", Skipped)]), FanIn::Completed);
        assert_eq!(
            fan_in([("a", Failed), ("b", Completed), ("c", Failed)]),
            FanIn::Failed(vec!["a".into(), "c".into()])
        );
    }
}
