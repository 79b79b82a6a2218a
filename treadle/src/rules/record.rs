//! The rows the rules read and change: an item, its stage rows (one per
//! stage of the item's pipeline version) and the subtasks of fanned-out
//! stages. A store loads these, hands them to a rule, and saves what the
//! rule reports as changed ([`super::Effects`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::review::ReviewStatus;
use crate::state::{ItemState, StageState};
use crate::status::{AttemptRecord, ItemStatus, StageStatus, SubtaskStatus};
use crate::task::TaskKey;

/// One item with every stage row of its pipeline version.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRecord {
    /// The item's id.
    pub id: String,
    /// The pipeline version the item moves on.
    pub version: u32,
    /// The item as JSON text.
    pub payload: Arc<str>,
    /// When it was submitted.
    pub submitted_at: DateTime<Utc>,
    /// Whether it was cancelled.
    pub cancelled: bool,
    /// One row per stage of the version, by stage position.
    pub stages: Vec<StageRecord>,
    /// Stored outputs of this item that could not be decoded, each as the
    /// reason naming where (a store may load leniently for transitions, so
    /// one bad value fails only the work that reads it; `output` is `None`
    /// for those rows and the stored value is left as it is).
    pub unreadable_outputs: Vec<String>,
}

/// The row of one stage of one item.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRecord {
    /// The stage's own unit of work.
    pub unit: UnitRecord,
    /// Upstream stages not yet completed or skipped.
    pub waiting: u32,
    /// The latest review, if the stage asked for one (boxed, as the
    /// subtasks: most stage rows never have one, and a million items keep
    /// three rows each in memory).
    pub review: Option<Box<ReviewStatus>>,
    /// The subtasks, once the stage fanned out.
    pub fan_out: Option<Box<FanOut>>,
    /// Whether the stage is pending only so that a worker checks the edits
    /// of an approval made where the output type is unknown (the CLI); the
    /// edits wait in the unit's `output` meanwhile.
    pub edits_to_check: bool,
}

/// The subtasks of a fanned-out stage, with counters that let a rule decide
/// the stage's fate without every subtask row at hand.
#[derive(Debug, Clone, PartialEq)]
pub struct FanOut {
    /// How many subtasks there are.
    pub total: u32,
    /// Subtasks not yet completed, skipped, failed or cancelled.
    pub open: u32,
    /// Subtasks that failed.
    pub failed: u32,
    /// Subtask rows, by position: all of them when [`FanOut::complete`],
    /// otherwise the ones the transition at hand touches. A rule that needs
    /// all of them asks the store's [`super::SubtaskSource`].
    pub rows: Vec<UnitRecord>,
    /// Whether `rows` holds every subtask.
    pub complete: bool,
}

/// A lease: who holds a running unit, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The worker that claimed the unit (shared with its claim request).
    pub owner: Arc<str>,
    /// When another worker may take it over.
    pub expiry: DateTime<Utc>,
}

/// The fields a stage and a subtask share.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitRecord {
    /// The stage or subtask name (shared: a stage row of every item of a
    /// version names its stage with the version's own copy).
    pub name: Arc<str>,
    /// The position among its siblings (stage position, or subtask position).
    pub position: u32,
    /// Its state.
    pub state: StageState,
    /// Attempts made in the current run.
    pub attempt: u32,
    /// Attempts of the current run abandoned by a worker that stopped
    /// mid-attempt (counted in `attempt` too, but not against the stage's
    /// own budget; see [`super::CrashRetries`]).
    pub crashes: u32,
    /// The fencing generation of the latest claim.
    pub generation: u64,
    /// When the latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached its current terminal or parked state.
    pub finished_at: Option<DateTime<Utc>>,
    /// When a scheduled retry is due.
    pub next_run_at: Option<DateTime<Utc>>,
    /// The latest error or failure reason.
    pub last_error: Option<String>,
    /// The stored output.
    pub output: Option<Value>,
    /// The claim's lease, while a worker runs it.
    pub lease: Option<Lease>,
}

impl UnitRecord {
    /// A pending unit that never ran.
    pub fn new(name: impl Into<Arc<str>>, position: u32) -> Self {
        UnitRecord {
            name: name.into(),
            position,
            state: StageState::Pending,
            attempt: 0,
            crashes: 0,
            generation: 0,
            started_at: None,
            finished_at: None,
            next_run_at: None,
            last_error: None,
            output: None,
            lease: None,
        }
    }

    /// Whether the claim with `generation` still holds this unit.
    pub fn held_by(&self, generation: u64) -> bool {
        self.state == StageState::Running && self.generation == generation
    }

    /// Whether a running unit's lease ran out at `now`: its worker is gone.
    pub fn lease_expired(&self, now: DateTime<Utc>) -> bool {
        self.state == StageState::Running && self.lease.as_ref().is_some_and(|l| l.expiry <= now)
    }
}

impl FanOut {
    /// A fresh fan-out: every subtask pending.
    pub fn new(names: &[String]) -> Self {
        FanOut {
            total: names.len() as u32,
            open: names.len() as u32,
            failed: 0,
            rows: names
                .iter()
                .enumerate()
                .map(|(i, name)| UnitRecord::new(name.as_str(), i as u32))
                .collect(),
            complete: true,
        }
    }

    /// The loaded subtask at `position`.
    pub fn row(&self, position: u32) -> Option<&UnitRecord> {
        if self.complete {
            self.rows.get(position as usize)
        } else {
            self.rows.iter().find(|r| r.position == position)
        }
    }

    /// The loaded subtask at `position`, to change.
    pub fn row_mut(&mut self, position: u32) -> Option<&mut UnitRecord> {
        if self.complete {
            self.rows.get_mut(position as usize)
        } else {
            self.rows.iter_mut().find(|r| r.position == position)
        }
    }
}

impl StageRecord {
    /// A pending stage row waiting for `waiting` upstream stages.
    pub fn new(name: impl Into<Arc<str>>, position: u32, waiting: u32) -> Self {
        StageRecord {
            unit: UnitRecord::new(name, position),
            waiting,
            review: None,
            fan_out: None,
            edits_to_check: false,
        }
    }
}

impl ItemRecord {
    /// The unit `unit` names, if it is loaded.
    pub fn unit(&self, unit: UnitRef) -> Option<&UnitRecord> {
        let stage = self.stages.get(unit.stage)?;
        match unit.subtask {
            None => Some(&stage.unit),
            Some(position) => stage.fan_out.as_ref()?.row(position),
        }
    }

    /// The unit `unit` names, if it is loaded, to change.
    pub fn unit_mut(&mut self, unit: UnitRef) -> Option<&mut UnitRecord> {
        let stage = self.stages.get_mut(unit.stage)?;
        match unit.subtask {
            None => Some(&mut stage.unit),
            Some(position) => stage.fan_out.as_mut()?.row_mut(position),
        }
    }

    /// The position of stage `name`.
    pub fn stage_position(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| *s.unit.name == *name)
    }

    /// The unit a task key names: its stage position and, for a subtask,
    /// the loaded subtask's position. `None` if the item has no such unit
    /// loaded.
    pub fn locate(&self, key: &TaskKey) -> Option<UnitRef> {
        let stage = self.stage_position(&key.stage)?;
        let subtask = match &key.subtask {
            None => None,
            Some(name) => Some(
                self.stages[stage]
                    .fan_out
                    .as_ref()?
                    .rows
                    .iter()
                    .find(|r| *r.name == **name)?
                    .position,
            ),
        };
        Some(UnitRef { stage, subtask })
    }

    /// The task key of a loaded unit.
    pub fn key(&self, unit: UnitRef) -> TaskKey {
        let stage = &self.stages[unit.stage];
        TaskKey {
            item_id: Arc::from(self.id.as_str()),
            stage: stage.unit.name.clone(),
            subtask: unit
                .subtask
                .and_then(|p| Some(stage.fan_out.as_ref()?.row(p)?.name.clone())),
        }
    }

    /// The outputs of the completed stages that stored one, by stage name.
    pub fn outputs(&self) -> BTreeMap<String, Value> {
        self.stages
            .iter()
            .filter(|s| s.unit.state == StageState::Completed)
            .filter_map(|s| Some((String::from(&*s.unit.name), s.unit.output.clone()?)))
            .collect()
    }

    /// Whether every stage completed or skipped.
    pub fn all_done(&self) -> bool {
        self.stages
            .iter()
            .all(|s| s.unit.state.satisfies_dependents())
    }
}

/// A unit of work within one item: a stage position and, for a subtask,
/// its position within the stage's fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnitRef {
    /// The stage position.
    pub stage: usize,
    /// The subtask position.
    pub subtask: Option<u32>,
}

impl UnitRef {
    /// The stage itself.
    pub fn stage(stage: usize) -> Self {
        UnitRef {
            stage,
            subtask: None,
        }
    }
}

impl ItemRecord {
    /// The item's full status, with `attempts` (in history order) filed
    /// under the units they belong to.
    pub fn status(&self, attempts: &[(UnitRef, AttemptRecord)]) -> ItemStatus {
        let history = |unit: UnitRef| -> Vec<AttemptRecord> {
            attempts
                .iter()
                .filter(|(u, _)| *u == unit)
                .map(|(_, a)| a.clone())
                .collect()
        };
        let stages: Vec<StageStatus> = self
            .stages
            .iter()
            .enumerate()
            .map(|(position, row)| StageStatus {
                name: String::from(&*row.unit.name),
                state: row.unit.state,
                waiting_on: row.waiting,
                attempt: row.unit.attempt,
                started_at: row.unit.started_at,
                finished_at: row.unit.finished_at,
                next_run_at: row.unit.next_run_at,
                last_error: row.unit.last_error.clone(),
                output: row.unit.output.clone(),
                attempts: history(UnitRef::stage(position)),
                subtasks: row
                    .fan_out
                    .iter()
                    .flat_map(|f| &f.rows)
                    .map(|sub| SubtaskStatus {
                        name: String::from(&*sub.name),
                        state: sub.state,
                        attempt: sub.attempt,
                        next_run_at: sub.next_run_at,
                        last_error: sub.last_error.clone(),
                        output: sub.output.clone(),
                        attempts: history(UnitRef {
                            stage: position,
                            subtask: Some(sub.position),
                        }),
                    })
                    .collect(),
                review: row.review.as_deref().cloned(),
            })
            .collect();
        ItemStatus {
            item_id: self.id.clone(),
            state: ItemState::derive(self.cancelled, &stages),
            submitted_at: self.submitted_at,
            version: self.version,
            stages,
        }
    }
}
