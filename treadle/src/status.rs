//! Inspection: the state of an item and its stages, readable by people and programs.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::review::ReviewStatus;
use crate::state::{AttemptResult, ItemState, StageState};

/// Everything known about one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemStatus {
    /// The item's id.
    pub item_id: String,
    /// The overall state, derived from the stages (see [`ItemState::derive`]).
    pub state: ItemState,
    /// When the item was submitted.
    pub submitted_at: DateTime<Utc>,
    /// The pipeline version the item moves on.
    pub version: u32,
    /// The stages of that version, upstream before downstream.
    pub stages: Vec<StageStatus>,
}

/// Everything known about one stage of one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStatus {
    /// The stage's name.
    pub name: String,
    /// Its state.
    pub state: StageState,
    /// How many of its upstream stages have not completed or skipped yet.
    pub waiting_on: u32,
    /// Attempts made in the current run (a manual retry starts a new run).
    pub attempt: u32,
    /// When the latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the stage reached its current terminal or parked state.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the next attempt is due, for a scheduled retry.
    pub next_run_at: Option<DateTime<Utc>>,
    /// The latest error or failure reason.
    pub last_error: Option<String>,
    /// The stored output.
    pub output: Option<Value>,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptRecord>,
    /// The subtasks, if the stage fanned out.
    pub subtasks: Vec<SubtaskStatus>,
    /// The latest review, if the stage asked for one.
    pub review: Option<ReviewStatus>,
}

/// One subtask of a fanned-out stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubtaskStatus {
    /// The subtask's name.
    pub name: String,
    /// Its state.
    pub state: StageState,
    /// Attempts made in the current run.
    pub attempt: u32,
    /// When the next attempt is due, for a scheduled retry.
    pub next_run_at: Option<DateTime<Utc>>,
    /// The latest error or failure reason.
    pub last_error: Option<String>,
    /// The subtask's output.
    pub output: Option<Value>,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptRecord>,
}

/// One attempt of a stage or subtask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The attempt number within its run.
    pub attempt: u32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// How it ended.
    pub result: AttemptResult,
    /// The error or reason, if any.
    pub error: Option<String>,
}

/// An item parked for review at one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AwaitingReview {
    /// The item.
    pub item_id: String,
    /// The stage that asked.
    pub stage: String,
    /// The pipeline version the item moves on.
    pub version: u32,
    /// The request and its round.
    pub review: ReviewStatus,
}

impl ItemState {
    /// Derives an item's state from whether it was cancelled and its
    /// stages, in this order of precedence: cancelled; awaiting review if any
    /// stage waits for a person; active while any stage runs, waits for a
    /// retry, or is pending with nothing left to wait for; failed if any
    /// stage failed (what is still pending waits behind it); active while any
    /// stage is pending; otherwise completed.
    pub fn derive(cancelled: bool, stages: &[StageStatus]) -> Self {
        Self::of_stages(cancelled, stages.iter().map(|s| (s.state, s.waiting_on)))
    }

    /// [`ItemState::derive`] from each stage's state and the number of
    /// upstream stages it still waits on.
    pub fn of_stages(
        cancelled: bool,
        stages: impl Iterator<Item = (StageState, u32)> + Clone,
    ) -> Self {
        let any = |wanted: fn(StageState, u32) -> bool| {
            stages
                .clone()
                .any(|(state, waiting)| wanted(state, waiting))
        };
        if cancelled {
            ItemState::Cancelled
        } else if any(|state, _| state == StageState::AwaitingReview) {
            ItemState::AwaitingReview
        } else if any(|state, waiting| {
            matches!(state, StageState::Running | StageState::RetryScheduled)
                || (state == StageState::Pending && waiting == 0)
        }) {
            ItemState::Active
        } else if any(|state, _| state == StageState::Failed) {
            ItemState::Failed
        } else if any(|state, _| state == StageState::Pending) {
            ItemState::Active
        } else {
            ItemState::Completed
        }
    }
}

impl fmt::Display for ItemStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "item {} — {} (pipeline version {})",
            self.item_id, self.state, self.version
        )?;
        let width = self.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for stage in &self.stages {
            write!(f, "  {:width$}  {:<15}", stage.name, stage.state.as_str())?;
            if stage.attempt > 0 {
                write!(f, "  attempt {}", stage.attempt)?;
            }
            if let (Some(start), Some(end)) = (stage.started_at, stage.finished_at) {
                let ms = (end - start).num_milliseconds();
                write!(f, "  {ms} ms")?;
            }
            if let Some(at) = stage.next_run_at {
                write!(f, "  next at {}", at.format("%H:%M:%S%.3f"))?;
            }
            if let Some(error) = stage
                .last_error
                .as_ref()
                .filter(|_| !stage.state.satisfies_dependents())
            {
                write!(f, "  error: {error}")?;
            }
            writeln!(f)?;
            for sub in &stage.subtasks {
                write!(
                    f,
                    "  {:width$}    - {:<12}{:<15}  attempt {}",
                    "",
                    sub.name,
                    sub.state.as_str(),
                    sub.attempt
                )?;
                if let Some(error) = sub
                    .last_error
                    .as_ref()
                    .filter(|_| !sub.state.satisfies_dependents())
                {
                    write!(f, "  error: {error}")?;
                }
                writeln!(f)?;
            }
            if let Some(review) = &stage.review {
                write!(
                    f,
                    "  {:width$}    review #{}: {}",
                    "", review.round, review.request.summary
                )?;
                if let Some(d) = &review.decision {
                    write!(f, " — {} by {}", d.kind, d.by)?;
                    if let Some(reason) = d.reason.as_ref().or(d.note.as_ref()) {
                        write!(f, " ({reason})")?;
                    }
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}
