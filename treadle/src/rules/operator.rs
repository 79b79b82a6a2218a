//! What operators and workers do to an item outside an attempt: retry a
//! failed stage, cancel the item, renew a lease, move the item to another
//! pipeline version.

use chrono::{DateTime, Utc};

use super::effects::load_all_subtasks;
use super::{Effects, ItemRecord, StageRecord, SubtaskSource, UnitRef, VersionGraph, set_state};
use crate::error::{Error, Result};
use crate::event::EventKind;
use crate::state::StageState;
use crate::task::TaskKey;

/// Makes a failed stage runnable again, starting a new run of attempts and
/// clearing its last error (the attempt history keeps it). For a fanned-out
/// stage only the failed subtasks run again. A stage in any other state is
/// [`Error::NotRetryable`]; a cancelled item is [`Error::ItemCancelled`].
pub fn retry(
    item: &mut ItemRecord,
    stage: &str,
    at: DateTime<Utc>,
    subtasks: &mut dyn SubtaskSource,
    fx: &mut Effects,
) -> Result<()> {
    let position = item
        .stage_position(stage)
        .ok_or_else(|| Error::UnknownStage {
            item: item.id.clone(),
            stage: stage.to_owned(),
        })?;
    if item.cancelled {
        return Err(Error::ItemCancelled(item.id.clone()));
    }
    let state = item.stages[position].unit.state;
    if state != StageState::Failed {
        return Err(Error::NotRetryable {
            item: item.id.clone(),
            stage: stage.to_owned(),
            state,
        });
    }
    if item.stages[position].fan_out.is_some() {
        load_all_subtasks(item, position, subtasks)?;
    }
    let row = &mut item.stages[position];
    row.unit.attempt = 0;
    row.unit.crashes = 0;
    row.unit.finished_at = None;
    row.unit.last_error = None;
    let mut requeued = 0;
    if let Some(fan) = &mut row.fan_out {
        for sub in fan
            .rows
            .iter_mut()
            .filter(|s| s.state == StageState::Failed)
        {
            set_state(sub, StageState::Pending);
            sub.attempt = 0;
            sub.crashes = 0;
            sub.finished_at = None;
            sub.last_error = None;
            let unit = UnitRef {
                stage: position,
                subtask: Some(sub.position),
            };
            fx.changed.push(unit);
            fx.runnable.push(unit);
            requeued += 1;
        }
        fan.open += requeued;
        fan.failed -= requeued;
    }
    if requeued == 0 {
        set_state(&mut row.unit, StageState::Pending);
        fx.runnable.push(UnitRef::stage(position));
    } else {
        set_state(&mut row.unit, StageState::Running);
    }
    fx.changed.push(UnitRef::stage(position));
    fx.event(
        at,
        Some(UnitRef::stage(position)),
        EventKind::RetryRequested,
    );
    Ok(())
}

/// Runs a finished (completed or skipped) or failed stage again, with every
/// stage downstream of it on the item's version: they all become pending,
/// with a new run of attempts, no output, no error and no subtasks (a
/// fanned-out stage fans out afresh; its old subtasks and their attempts
/// go), and waiting counts recomputed. The stages' attempt history and
/// reviews stay: a review stage asks for a new round.
/// Downstream work still running loses its claim (a new generation); its
/// keys are returned so its worker can stop it. A stage in another state is
/// [`Error::NotRerunnable`]; a cancelled item is [`Error::ItemCancelled`].
pub fn rerun(
    graph: &VersionGraph,
    item: &mut ItemRecord,
    stage: &str,
    at: DateTime<Utc>,
    subtasks: &mut dyn SubtaskSource,
    fx: &mut Effects,
) -> Result<Vec<TaskKey>> {
    let position = item
        .stage_position(stage)
        .ok_or_else(|| Error::UnknownStage {
            item: item.id.clone(),
            stage: stage.to_owned(),
        })?;
    if item.cancelled {
        return Err(Error::ItemCancelled(item.id.clone()));
    }
    let state = item.stages[position].unit.state;
    if !matches!(
        state,
        StageState::Completed | StageState::Skipped | StageState::Failed
    ) {
        return Err(Error::NotRerunnable {
            item: item.id.clone(),
            stage: stage.to_owned(),
            state,
        });
    }
    let downstream = graph.downstream(position);
    let mut running = Vec::new();
    for &reset in std::iter::once(&position).chain(&downstream) {
        if item.stages[reset].fan_out.is_some() {
            load_all_subtasks(item, reset, subtasks)?;
        }
        running.extend(running_units(item, reset));
        let unit = &mut item.stages[reset].unit;
        let was_running = unit.state == StageState::Running;
        set_state(unit, StageState::Pending);
        if was_running {
            unit.generation += 1;
        }
        unit.attempt = 0;
        unit.crashes = 0;
        unit.started_at = None;
        unit.finished_at = None;
        unit.next_run_at = None;
        unit.last_error = None;
        unit.output = None;
        if item.stages[reset].fan_out.take().is_some() {
            fx.fanned_out.push(reset);
        }
        item.stages[reset].edits_to_check = false;
        fx.changed.push(UnitRef::stage(reset));
    }
    for &reset in std::iter::once(&position).chain(&downstream) {
        let waiting = (0..item.stages.len())
            .filter(|&up| graph.dependents(up).contains(&reset))
            .filter(|&up| !item.stages[up].unit.state.satisfies_dependents())
            .count() as u32;
        item.stages[reset].waiting = waiting;
        if waiting == 0 {
            fx.runnable.push(UnitRef::stage(reset));
        }
    }
    let reset = downstream
        .iter()
        .map(|&d| String::from(&*item.stages[d].unit.name))
        .collect();
    fx.event(
        at,
        Some(UnitRef::stage(position)),
        EventKind::RerunRequested { reset },
    );
    Ok(running)
}

/// Cancels an item: every stage and subtask not yet finished becomes
/// `cancelled` with a new generation (so running claims lose their lease).
/// Returns the keys of the units that were running. Cancelling twice changes
/// nothing.
pub fn cancel(
    item: &mut ItemRecord,
    at: DateTime<Utc>,
    subtasks: &mut dyn SubtaskSource,
    fx: &mut Effects,
) -> Result<Vec<TaskKey>> {
    if item.cancelled {
        return Ok(Vec::new());
    }
    let mut running = Vec::new();
    for position in 0..item.stages.len() {
        if item.stages[position].fan_out.is_some() {
            load_all_subtasks(item, position, subtasks)?;
        }
        running.extend(running_units(item, position));
        let here = UnitRef::stage(position);
        let row = &mut item.stages[position];
        if row.unit.state.is_terminal() {
            continue;
        }
        set_state(&mut row.unit, StageState::Cancelled);
        row.unit.generation += 1;
        row.unit.finished_at = Some(at);
        fx.changed.push(here);
        if let Some(fan) = &mut row.fan_out {
            for sub in fan.rows.iter_mut().filter(|s| !s.state.is_terminal()) {
                set_state(sub, StageState::Cancelled);
                sub.generation += 1;
                fan.open = fan.open.saturating_sub(1);
                fx.changed.push(UnitRef {
                    subtask: Some(sub.position),
                    ..here
                });
            }
        }
    }
    item.cancelled = true;
    fx.item_changed = true;
    fx.event(at, None, EventKind::ItemCancelled);
    Ok(running)
}

/// Extends the lease of the unit `key` names to `until` if the claim with
/// `generation` still holds it; `false` if it was lost.
pub fn renew(
    item: &mut ItemRecord,
    key: &TaskKey,
    generation: u64,
    until: DateTime<Utc>,
    fx: &mut Effects,
) -> bool {
    let Some(unit) = item.locate(key) else {
        return false;
    };
    let Some(row) = item.unit_mut(unit).filter(|u| u.held_by(generation)) else {
        return false;
    };
    if let Some(lease) = &mut row.lease {
        lease.expiry = until;
        fx.changed.push(unit);
    }
    true
}

/// What [`migrate`] did with one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateOutcome {
    /// The item now moves on the target version.
    Moved,
    /// The item was already on the target version.
    AlreadyCurrent,
    /// The item is finished (completed or cancelled) and keeps its version.
    Finished,
    /// Work of the item is running; migrate it once it is idle.
    Busy,
}

/// Moves an unfinished, idle item from its version `from` to version `to`.
/// Stages are matched by name: a stage both versions have keeps its row
/// (state, attempts, output, review); a stage only `to` has starts
/// pending; rows of stages `to` lacks are dropped (their events stay in the
/// log). Waiting counts are recomputed on `to`'s graph, pending stages with
/// nothing to wait for become runnable, and an item whose stages are then
/// all done records `ItemCompleted`. An `ItemMigrated` event comes first.
pub fn migrate(
    from: &VersionGraph,
    to: &VersionGraph,
    item: &mut ItemRecord,
    at: DateTime<Utc>,
    fx: &mut Effects,
) -> MigrateOutcome {
    if item.version == to.version() {
        return MigrateOutcome::AlreadyCurrent;
    }
    if item.cancelled || item.all_done() {
        return MigrateOutcome::Finished;
    }
    if item
        .stages
        .iter()
        .any(|s| s.unit.state == StageState::Running)
    {
        return MigrateOutcome::Busy;
    }
    debug_assert_eq!(item.version, from.version());
    let mut old: Vec<Option<StageRecord>> = item.stages.drain(..).map(Some).collect();
    let stages: Vec<StageRecord> = to
        .stages()
        .iter()
        .enumerate()
        .map(|(position, name)| {
            let kept = from.position(name).and_then(|p| old.get_mut(p)?.take());
            let name = to.name(position).clone();
            let mut row = kept.unwrap_or_else(|| StageRecord::new(name.clone(), 0, 0));
            row.unit.name = name;
            row.unit.position = position as u32;
            row
        })
        .collect();
    item.stages = stages;
    fx.event(
        at,
        None,
        EventKind::ItemMigrated {
            from: from.version(),
            to: to.version(),
        },
    );
    for position in 0..item.stages.len() {
        let waiting = (0..item.stages.len())
            .filter(|&up| to.dependents(up).contains(&position))
            .filter(|&up| !item.stages[up].unit.state.satisfies_dependents())
            .count() as u32;
        let row = &mut item.stages[position];
        row.waiting = waiting;
        if waiting == 0 && row.unit.state == StageState::Pending {
            fx.runnable.push(UnitRef::stage(position));
        }
    }
    item.version = to.version();
    fx.item_changed = true;
    fx.restructured = true;
    if item.all_done() {
        fx.event(at, None, EventKind::ItemCompleted);
    }
    MigrateOutcome::Moved
}

/// The keys of the units of stage `position` a worker is running: the stage
/// itself, or its running subtasks (every subtask row must be loaded).
fn running_units(item: &ItemRecord, position: usize) -> Vec<TaskKey> {
    let here = UnitRef::stage(position);
    let row = &item.stages[position];
    let mut running = Vec::new();
    if row.unit.state == StageState::Running && row.fan_out.is_none() {
        running.push(item.key(here));
    }
    for sub in row.fan_out.iter().flat_map(|f| &f.rows) {
        if sub.state == StageState::Running {
            running.push(item.key(UnitRef {
                subtask: Some(sub.position),
                ..here
            }));
        }
    }
    running
}
