//! What a rule did, for the store to save: rows changed, attempts and
//! events appended, units made runnable or scheduled.

use chrono::{DateTime, Utc};

use super::record::{ItemRecord, UnitRecord, UnitRef};
use crate::error::Result;
use crate::event::{Event, EventKind};
use crate::status::AttemptRecord;

/// An event a rule appended, about the item (`unit: None`) or one of its
/// units; the store gives it its sequence number when it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// When.
    pub at: DateTime<Utc>,
    /// The stage (and subtask) it concerns.
    pub unit: Option<UnitRef>,
    /// What happened.
    pub kind: EventKind,
}

impl NewEvent {
    /// The event with its names resolved against `item` and sequence number `seq`.
    pub fn resolve(&self, item: &ItemRecord, seq: u64) -> Event {
        let (stage, subtask) = match self.unit {
            None => (None, None),
            Some(unit) => {
                let row = &item.stages[unit.stage];
                let subtask = unit
                    .subtask
                    .and_then(|p| Some(String::from(&*row.fan_out.as_ref()?.row(p)?.name)));
                (Some(String::from(&*row.unit.name)), subtask)
            }
        };
        Event {
            seq,
            at: self.at,
            item_id: item.id.clone(),
            stage,
            subtask,
            kind: self.kind.clone(),
        }
    }
}

/// Everything a rule changed, in the order it happened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    /// Events to append, in log order.
    pub events: Vec<NewEvent>,
    /// Attempt records to append to the history.
    pub attempts: Vec<(UnitRef, AttemptRecord)>,
    /// Stage and subtask rows whose fields changed (may repeat).
    pub changed: Vec<UnitRef>,
    /// Whether the item's own row changed (cancelled, version).
    pub item_changed: bool,
    /// Stages whose subtask rows were replaced by a new fan-out, or dropped
    /// by a rerun: the old rows (and their attempts) go, every new row (if
    /// the stage has a fan-out) is written.
    pub fanned_out: Vec<usize>,
    /// Whether the item's set of stage rows was replaced (a migration):
    /// rows of stages it no longer has go, every stage row is written.
    pub restructured: bool,
    /// Units that became runnable, in the order they did.
    pub runnable: Vec<UnitRef>,
    /// Units whose retry was scheduled, with the due time.
    pub scheduled: Vec<(DateTime<Utc>, UnitRef)>,
    /// A stage whose current review round was just decided.
    pub decided: Option<usize>,
}

impl Effects {
    /// Appends an event about `unit` (or the item, for `None`).
    pub(crate) fn event(&mut self, at: DateTime<Utc>, unit: Option<UnitRef>, kind: EventKind) {
        self.events.push(NewEvent { at, unit, kind });
    }

    /// Empties every list, keeping their room for the next transition.
    pub fn clear(&mut self) {
        self.events.clear();
        self.attempts.clear();
        self.changed.clear();
        self.item_changed = false;
        self.fanned_out.clear();
        self.restructured = false;
        self.runnable.clear();
        self.scheduled.clear();
        self.decided = None;
    }

    /// Whether the rule changed nothing at all.
    pub fn is_empty(&self) -> bool {
        *self == Effects::default()
    }
}

/// Where a rule gets every subtask of a fanned-out stage when the rows the
/// store loaded are not all of them (fan-in, retry, cancel). A store that
/// always loads every subtask never needs to answer.
pub trait SubtaskSource {
    /// Every subtask row of `stage` of `item`, by position, as stored.
    fn subtasks(&mut self, item: &ItemRecord, stage: usize) -> Result<Vec<UnitRecord>>;
}

/// For stores that always load every subtask row.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllLoaded;

impl SubtaskSource for AllLoaded {
    fn subtasks(&mut self, item: &ItemRecord, stage: usize) -> Result<Vec<UnitRecord>> {
        Err(crate::error::Error::Corrupt {
            location: format!(
                "subtasks(item={}, stage={})",
                item.id, item.stages[stage].unit.name
            ),
            detail: "some subtask rows were not loaded".to_owned(),
        })
    }
}

/// Makes sure every subtask row of `stage` is loaded; rows already loaded
/// (and perhaps changed by the rule at hand) win over the stored ones.
pub(crate) fn load_all_subtasks(
    item: &mut ItemRecord,
    stage: usize,
    source: &mut dyn SubtaskSource,
) -> Result<()> {
    let complete = item.stages[stage]
        .fan_out
        .as_ref()
        .is_none_or(|fan| fan.complete);
    if complete {
        return Ok(());
    }
    let mut stored = source.subtasks(item, stage)?;
    let fan = item.stages[stage]
        .fan_out
        .as_mut()
        .expect("checked above: the stage fanned out");
    for loaded in fan.rows.drain(..) {
        if let Some(slot) = stored.get_mut(loaded.position as usize) {
            *slot = loaded;
        }
    }
    fan.rows = stored;
    fan.complete = true;
    Ok(())
}
