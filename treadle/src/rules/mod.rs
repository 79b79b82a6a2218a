//! The transition rules, written once for every store.
//!
//! Each rule is a plain synchronous function over the rows of one item
//! ([`ItemRecord`]) and its pipeline version ([`VersionGraph`]): it checks
//! that the transition is allowed, changes the rows in place, and reports
//! in [`Effects`] what it changed, which units became runnable, and the
//! events it appended, in log order. A store loads the rows a transition
//! touches, calls the rule, and saves the effects atomically; it decides
//! nothing itself. So the in-memory, SQLite and PostgreSQL stores agree on
//! every state, event and error by construction.
//!
//! | rule | what it decides |
//! |---|---|
//! | [`new_item`] | stage rows and waiting counts from the item's version; roots runnable |
//! | [`claim`] | whether a unit is runnable; the attempt, generation and lease; recovery of an expired lease |
//! | [`commit`] | fencing; the end of an attempt on a stage or subtask; fan-out and fan-in; unblocking dependents; item completion |
//! | [`decide`] | review state and round checks; verdict to decision; approval completes, rejection fails |
//! | [`retry`] | which failed units run again |
//! | [`rerun`] | which finished stages run again, with everything downstream |
//! | [`cancel`] | which units stop, and how |
//! | [`renew`] | whether a claim still holds, and its new lease |
//! | [`migrate`] | moving an unfinished item to another pipeline version |

mod claim;
mod commit;
mod decide;
mod effects;
mod graph;
mod operator;
mod record;
pub mod retention;
mod transition;

#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};
use serde_json::Value;

pub use claim::claim;
pub use commit::commit;
pub use decide::decide;
#[cfg(feature = "postgres")]
pub(crate) use effects::load_all_subtasks;
pub use effects::{AllLoaded, Effects, NewEvent, SubtaskSource};
pub use graph::VersionGraph;
pub use operator::{MigrateOutcome, cancel, migrate, renew, rerun, retry};
pub use record::{FanOut, ItemRecord, Lease, StageRecord, UnitRecord, UnitRef};
pub use transition::{
    Claim, ClaimRequest, Commit, CrashRetries, DecisionCommit, NewItem, SubtaskTransition,
    Transition, Verdict,
};

use crate::event::EventKind;
use crate::state::StageState;

/// The rows of a new item of `graph`'s version: every stage pending, each
/// waiting for its upstream stages; stages without upstream are runnable.
pub fn new_item(graph: &VersionGraph, item: NewItem) -> (ItemRecord, Effects) {
    let mut fx = Effects::default();
    let stages = graph
        .stages()
        .iter()
        .enumerate()
        .map(|(position, _)| {
            let waiting = graph.upstream(position);
            if waiting == 0 {
                fx.runnable.push(UnitRef::stage(position));
            }
            StageRecord::new(graph.name(position).clone(), position as u32, waiting)
        })
        .collect();
    fx.event(item.at, None, EventKind::ItemSubmitted);
    fx.item_changed = true;
    let record = ItemRecord {
        id: item.id,
        version: graph.version(),
        payload: item.payload.into(),
        submitted_at: item.at,
        cancelled: false,
        stages,
        unreadable_outputs: Vec::new(),
    };
    (record, fx)
}

/// Sets a unit's state; a unit that stops running gives up its lease.
fn set_state(unit: &mut UnitRecord, state: StageState) {
    unit.state = state;
    if state != StageState::Running {
        unit.lease = None;
    }
}

/// Completes a stage with `output`: records `Completed`, then unblocks its
/// dependents.
fn complete_stage(
    graph: &VersionGraph,
    item: &mut ItemRecord,
    stage: usize,
    output: Option<Value>,
    at: DateTime<Utc>,
    fx: &mut Effects,
) {
    item.stages[stage].unit.output = output;
    fx.event(at, Some(UnitRef::stage(stage)), EventKind::Completed);
    finish_stage(graph, item, stage, StageState::Completed, at, fx);
}

/// Marks a stage completed or skipped, makes dependents whose upstream
/// stages are all done runnable, and records `ItemCompleted` after the
/// item's last stage.
fn finish_stage(
    graph: &VersionGraph,
    item: &mut ItemRecord,
    stage: usize,
    state: StageState,
    at: DateTime<Utc>,
    fx: &mut Effects,
) {
    item.stages[stage].edits_to_check = false;
    let unit = &mut item.stages[stage].unit;
    set_state(unit, state);
    unit.finished_at = Some(at);
    fx.changed.push(UnitRef::stage(stage));
    for &dependent in graph.dependents(stage) {
        let row = &mut item.stages[dependent];
        row.waiting = row.waiting.saturating_sub(1);
        fx.changed.push(UnitRef::stage(dependent));
        if row.waiting == 0 && row.unit.state == StageState::Pending {
            fx.runnable.push(UnitRef::stage(dependent));
        }
    }
    if item.all_done() {
        fx.event(at, None, EventKind::ItemCompleted);
    }
}

/// Fails a stage for good with `reason`.
fn fail_stage(
    item: &mut ItemRecord,
    stage: usize,
    reason: String,
    at: DateTime<Utc>,
    fx: &mut Effects,
) {
    let unit = &mut item.stages[stage].unit;
    set_state(unit, StageState::Failed);
    unit.finished_at = Some(at);
    unit.last_error = Some(reason.clone());
    fx.changed.push(UnitRef::stage(stage));
    fx.event(
        at,
        Some(UnitRef::stage(stage)),
        EventKind::Failed { reason },
    );
}
