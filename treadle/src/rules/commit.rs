//! The end of an attempt: what it does to its stage or subtask, and what a
//! fan-out adds up to.

use serde_json::Value;

use super::effects::load_all_subtasks;
use super::{
    Commit, Effects, FanOut, ItemRecord, SubtaskSource, SubtaskTransition, Transition, UnitRef,
    VersionGraph, complete_stage, fail_stage, finish_stage, set_state,
};
use crate::error::{Error, Result};
use crate::event::EventKind;
use crate::review::ReviewStatus;
use crate::state::StageState;

/// Applies the end of an attempt if the claim still holds (the unit is
/// `running` with the commit's generation); otherwise [`Error::LeaseLost`]
/// and nothing changes. Completing or skipping a stage unblocks its
/// dependents; the last subtask of a fan-out to finish completes the stage
/// (with a map of the subtasks' outputs) or fails it (naming the failed
/// subtasks); the item's last stage to finish records `ItemCompleted`.
pub fn commit(
    graph: &VersionGraph,
    item: &mut ItemRecord,
    commit: Commit,
    subtasks: &mut dyn SubtaskSource,
    fx: &mut Effects,
) -> Result<()> {
    if item.stage_position(&commit.task.stage).is_none() {
        return Err(Error::UnknownStage {
            item: item.id.clone(),
            stage: String::from(&*commit.task.stage),
        });
    }
    let unit = item
        .locate(&commit.task)
        .filter(|&unit| {
            item.unit(unit)
                .is_some_and(|u| u.held_by(commit.generation))
        })
        .ok_or_else(|| Error::LeaseLost {
            task: commit.task.clone(),
            generation: commit.generation,
        })?;
    let row = item.unit_mut(unit).expect("located above");
    if commit.attempt.result.is_failure() {
        row.last_error = commit.attempt.error.clone();
    }
    fx.attempts.push((unit, commit.attempt.clone()));
    match unit.subtask {
        None => {
            commit_stage(graph, item, unit.stage, commit, fx);
            Ok(())
        }
        Some(_) => commit_subtask(graph, item, unit, commit, subtasks, fx),
    }
}

fn commit_stage(
    graph: &VersionGraph,
    item: &mut ItemRecord,
    stage: usize,
    c: Commit,
    fx: &mut Effects,
) {
    let at = c.attempt.finished_at;
    let here = Some(UnitRef::stage(stage));
    match c.transition {
        Transition::Complete { output } => complete_stage(graph, item, stage, output, at, fx),
        Transition::Skip { reason } => {
            fx.event(at, here, EventKind::Skipped { reason });
            finish_stage(graph, item, stage, StageState::Skipped, at, fx);
        }
        Transition::AwaitReview(request) => {
            let row = &mut item.stages[stage];
            let round = row.review.as_ref().map_or(1, |r| r.round + 1);
            let summary = request.summary.clone();
            row.review = Some(Box::new(ReviewStatus {
                round,
                request,
                requested_at: at,
                decision: None,
            }));
            row.unit.finished_at = Some(at);
            set_state(&mut row.unit, StageState::AwaitingReview);
            fx.changed.push(UnitRef::stage(stage));
            fx.event(at, here, EventKind::ReviewRequested { summary });
        }
        Transition::RetryAt { at: due } => {
            let unit = &mut item.stages[stage].unit;
            set_state(unit, StageState::RetryScheduled);
            unit.next_run_at = Some(due);
            fx.changed.push(UnitRef::stage(stage));
            fx.scheduled.push((due, UnitRef::stage(stage)));
            let error = c.attempt.error;
            fx.event(at, here, EventKind::RetryScheduled { at: due, error });
        }
        Transition::Fail { reason } => fail_stage(item, stage, reason, at, fx),
        Transition::RefuseEdits { reason } => {
            // The refused decision stays recorded for its round; the same
            // request is asked again in the next one.
            let row = &mut item.stages[stage];
            row.edits_to_check = false;
            let edits = Box::new(row.unit.output.take().unwrap_or_default());
            let Some(review) = row.review.as_mut() else {
                fail_stage(item, stage, reason, at, fx);
                return;
            };
            review.round += 1;
            review.requested_at = at;
            review.decision = None;
            let summary = review.request.summary.clone();
            row.unit.finished_at = Some(at);
            set_state(&mut row.unit, StageState::AwaitingReview);
            fx.changed.push(UnitRef::stage(stage));
            fx.event(at, here, EventKind::EditsRefused { reason, edits });
            fx.event(at, here, EventKind::ReviewRequested { summary });
        }
        Transition::FanOut { subtasks } => {
            // The stage stays running without a lease: its subtasks hold the
            // leases, and it is never recovered itself.
            let row = &mut item.stages[stage];
            row.unit.lease = None;
            row.fan_out = Some(Box::new(FanOut::new(&subtasks)));
            fx.changed.push(UnitRef::stage(stage));
            fx.fanned_out.push(stage);
            let count = subtasks.len() as u32;
            fx.event(at, here, EventKind::FannedOut { subtasks });
            if count == 0 {
                let empty = Some(Value::Object(Default::default()));
                complete_stage(graph, item, stage, empty, at, fx);
            }
            fx.runnable.extend((0..count).map(|i| UnitRef {
                stage,
                subtask: Some(i),
            }));
        }
    }
}

fn commit_subtask(
    graph: &VersionGraph,
    item: &mut ItemRecord,
    unit: UnitRef,
    c: Commit,
    subtasks: &mut dyn SubtaskSource,
    fx: &mut Effects,
) -> Result<()> {
    let at = c.attempt.finished_at;
    let sub = item.unit_mut(unit).expect("located by the caller");
    let kind = match c.transition.for_subtask() {
        SubtaskTransition::Complete { output } => {
            sub.output = output;
            set_state(sub, StageState::Completed);
            sub.finished_at = Some(at);
            EventKind::Completed
        }
        SubtaskTransition::Skip { reason } => {
            set_state(sub, StageState::Skipped);
            sub.finished_at = Some(at);
            EventKind::Skipped { reason }
        }
        SubtaskTransition::RetryAt { at: due } => {
            set_state(sub, StageState::RetryScheduled);
            sub.next_run_at = Some(due);
            fx.scheduled.push((due, unit));
            EventKind::RetryScheduled {
                at: due,
                error: c.attempt.error,
            }
        }
        SubtaskTransition::Fail { reason } => {
            set_state(sub, StageState::Failed);
            sub.finished_at = Some(at);
            sub.last_error = Some(reason.clone());
            EventKind::Failed { reason }
        }
    };
    let ended = sub.state.is_terminal();
    let failed = sub.state == StageState::Failed;
    fx.changed.push(unit);
    fx.event(at, Some(unit), kind);
    let stage = unit.stage;
    let fan = item.stages[stage]
        .fan_out
        .as_mut()
        .expect("a subtask belongs to a fan-out");
    if ended {
        fan.open = fan.open.saturating_sub(1);
        fan.failed += u32::from(failed);
        fx.changed.push(UnitRef::stage(stage));
    }
    if fan.open > 0 {
        return Ok(());
    }
    load_all_subtasks(item, stage, subtasks)?;
    let fan = item.stages[stage].fan_out.as_ref().expect("checked above");
    if fan.failed == 0 {
        let output = fan
            .rows
            .iter()
            .map(|s| {
                (
                    String::from(&*s.name),
                    s.output.clone().unwrap_or(Value::Null),
                )
            })
            .collect();
        complete_stage(graph, item, stage, Some(Value::Object(output)), at, fx);
    } else {
        let failed: Vec<&str> = fan
            .rows
            .iter()
            .filter(|s| s.state == StageState::Failed)
            .map(|s| &*s.name)
            .collect();
        let reason = format!("subtasks failed: {}", failed.join(", "));
        fail_stage(item, stage, reason, at, fx);
    }
    Ok(())
}
