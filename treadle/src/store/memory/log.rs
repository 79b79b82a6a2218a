//! The memory store's event log, kept compact: a million items with full
//! history log eight million events, so an entry is 48 bytes and names the
//! item, stage and worker by number rather than by string. The common
//! kinds (submitted, started, completed, item completed) live inline; any
//! other kind, and every event about a subtask, keeps its full
//! [`EventKind`] in a box.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use tokio::sync::broadcast;

use crate::event::{Event, EventKind};
use crate::fast_hash::{FastMap, FastSet};
use crate::rules::NewEvent;
use crate::store::EVENT_FEED_CAPACITY;

/// What every lane of the store shares: the log, the live feed, and the
/// count of items submitted (their submission order across lanes).
#[derive(Debug)]
pub(super) struct Journal {
    pub(super) log: EventLog,
    pub(super) feed: broadcast::Sender<Event>,
    submitted: u32,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            log: EventLog::default(),
            feed: broadcast::channel(EVENT_FEED_CAPACITY).0,
            submitted: 0,
        }
    }
}

impl Journal {
    /// The submission number of the next item stored (items are
    /// [`super::MAX_ITEMS`] at most, so it fits in `u32`).
    pub(super) fn next_submission(&mut self) -> u32 {
        let number = self.submitted;
        self.submitted += 1;
        number
    }
}

/// The log: entries in sequence order, with holes where a prune removed
/// the events of pruned items.
#[derive(Debug, Default)]
pub(super) struct EventLog {
    entries: Vec<Entry>,
    /// The sequence number of the latest event appended.
    last_seq: u64,
    /// The highest sequence number of an event a prune removed.
    pruned_through: u64,
    /// Worker ids of `Started` events, each kept once.
    owners: Owners,
}

/// One logged event.
#[derive(Debug)]
pub(super) struct Entry {
    seq: u64,
    at: DateTime<Utc>,
    /// The item's number in the store (see [`super::lane::Lane`]).
    item: u32,
    /// The pipeline version the item moved on at the time; 0 when the
    /// event is about the item, not one of its stages.
    version: u32,
    /// The stage's position in that version.
    stage: u32,
    kind: Kind,
}

/// What happened, compactly.
#[derive(Debug)]
enum Kind {
    ItemSubmitted,
    Started {
        attempt: u32,
        owner: u32,
    },
    Completed,
    ItemCompleted,
    /// Any other kind, or an event about a subtask.
    Other(Box<Detail>),
}

/// An event the compact kinds do not cover.
#[derive(Debug)]
struct Detail {
    subtask: Option<Box<str>>,
    kind: EventKind,
}

/// Where an entry points: its item's number and, for a stage event,
/// the version and stage position to name the stage by.
#[derive(Debug, Clone, Copy)]
pub(super) struct Subject {
    /// The item's number in the store.
    pub(super) item: usize,
    /// The pipeline version and the stage's position in it.
    pub(super) stage: Option<(u32, u32)>,
}

impl Entry {
    /// The item and stage the entry is about.
    pub(super) fn subject(&self) -> Subject {
        Subject {
            item: self.item as usize,
            stage: (self.version != 0).then_some((self.version, self.stage)),
        }
    }
}

impl EventLog {
    /// How many entries the log holds: a mark to read what is appended
    /// after it ([`EventLog::since_mark`]).
    pub(super) fn mark(&self) -> usize {
        self.entries.len()
    }

    /// The entries appended since `mark`.
    pub(super) fn since_mark(&self, mark: usize) -> &[Entry] {
        &self.entries[mark..]
    }

    /// The entries with a sequence number above `after`, in order.
    pub(super) fn after(&self, after: u64) -> &[Entry] {
        let start = self.entries.partition_point(|e| e.seq <= after);
        &self.entries[start..]
    }

    /// The highest sequence number a prune removed.
    pub(super) fn pruned_through(&self) -> u64 {
        self.pruned_through
    }

    /// Appends `new` about the item numbered `item` (which fits in
    /// `u32`: [`super::MAX_ITEMS`]), whose stage positions are those of
    /// `version`, naming a subtask `subtask`.
    pub(super) fn append(
        &mut self,
        item: usize,
        version: u32,
        new: NewEvent,
        subtask: Option<&str>,
    ) {
        self.last_seq += 1;
        let (version, stage) = match new.unit {
            Some(unit) => (version, unit.stage as u32),
            None => (0, 0),
        };
        let kind = match (subtask, new.kind) {
            (None, EventKind::ItemSubmitted) => Kind::ItemSubmitted,
            (None, EventKind::Completed) => Kind::Completed,
            (None, EventKind::ItemCompleted) => Kind::ItemCompleted,
            (None, EventKind::Started { attempt, owner }) => Kind::Started {
                attempt,
                owner: self.owners.intern(owner),
            },
            (subtask, kind) => Kind::Other(Box::new(Detail {
                subtask: subtask.map(Box::from),
                kind,
            })),
        };
        self.entries.push(Entry {
            seq: self.last_seq,
            at: new.at,
            item: item as u32,
            version,
            stage,
            kind,
        });
    }

    /// The event `entry` records, with the item's id and the stage's name
    /// supplied by the store.
    pub(super) fn event(&self, entry: &Entry, item_id: String, stage: Option<String>) -> Event {
        let (subtask, kind) = match &entry.kind {
            Kind::ItemSubmitted => (None, EventKind::ItemSubmitted),
            Kind::Completed => (None, EventKind::Completed),
            Kind::ItemCompleted => (None, EventKind::ItemCompleted),
            Kind::Started { attempt, owner } => (
                None,
                EventKind::Started {
                    attempt: *attempt,
                    owner: self.owners.name(*owner),
                },
            ),
            Kind::Other(detail) => (
                detail.subtask.as_deref().map(str::to_owned),
                detail.kind.clone(),
            ),
        };
        Event {
            seq: entry.seq,
            at: entry.at,
            item_id,
            stage,
            subtask,
            kind,
        }
    }

    /// Removes the events of the items at `doomed`; returns how many.
    pub(super) fn forget_items(&mut self, doomed: &FastSet<usize>) -> u64 {
        let before = self.entries.len();
        let mut through = self.pruned_through;
        self.entries.retain(|e| {
            let keep = !doomed.contains(&(e.item as usize));
            if !keep {
                through = through.max(e.seq);
            }
            keep
        });
        self.pruned_through = through;
        (before - self.entries.len()) as u64
    }
}

/// Worker ids, each stored once and named by number.
#[derive(Debug, Default)]
struct Owners {
    names: Vec<Arc<str>>,
    numbers: FastMap<Arc<str>, u32>,
}

impl Owners {
    /// The number of `owner`, adding it if it is new.
    fn intern(&mut self, owner: Arc<str>) -> u32 {
        // Claims come from a handful of workers, mostly the latest one,
        // whose claims share one copy of its id.
        if let Some(last) = self.names.last()
            && (Arc::ptr_eq(last, &owner) || **last == *owner)
        {
            return self.names.len() as u32 - 1;
        }
        if let Some(&number) = self.numbers.get(&*owner) {
            return number;
        }
        let number = self.names.len() as u32;
        self.names.push(owner.clone());
        self.numbers.insert(owner, number);
        number
    }

    /// The worker id numbered `number`.
    fn name(&self, number: u32) -> Arc<str> {
        self.names[number as usize].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::UnitRef;

    fn at(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(second, 0).unwrap()
    }

    fn new_event(unit: Option<UnitRef>, kind: EventKind) -> NewEvent {
        NewEvent {
            at: at(unit.map_or(0, |u| u.stage as i64)),
            unit,
            kind,
        }
    }

    #[test]
    fn an_entry_stays_48_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 48);
    }

    #[test]
    fn every_kind_reads_back_as_it_was_appended() {
        let stage = Some(UnitRef::stage(2));
        let subtask = Some(UnitRef {
            stage: 1,
            subtask: Some(0),
        });
        let appended = [
            (None, EventKind::ItemSubmitted, None),
            (
                stage,
                EventKind::Started {
                    attempt: 3,
                    owner: "worker-a".into(),
                },
                None,
            ),
            (
                stage,
                EventKind::Started {
                    attempt: 1,
                    owner: "worker-b".into(),
                },
                None,
            ),
            (
                stage,
                EventKind::Started {
                    attempt: 2,
                    owner: "worker-a".into(),
                },
                None,
            ),
            (stage, EventKind::Completed, None),
            (subtask, EventKind::Completed, Some("page-1")),
            (
                stage,
                EventKind::Failed {
                    reason: "no disk".into(),
                },
                None,
            ),
            (None, EventKind::ItemCompleted, None),
        ];
        let mut log = EventLog::default();
        for (unit, kind, subtask) in appended.clone() {
            log.append(7, 4, new_event(unit, kind), subtask);
        }
        let read: Vec<Event> = log
            .after(0)
            .iter()
            .map(|e| {
                let subject = e.subject();
                assert_eq!(subject.item, 7);
                log.event(
                    e,
                    "x".into(),
                    subject.stage.map(|(v, s)| format!("{v}/{s}")),
                )
            })
            .collect();
        assert_eq!(read.len(), appended.len());
        for (seq, (event, (unit, kind, subtask))) in read.iter().zip(appended).enumerate() {
            assert_eq!(event.seq, seq as u64 + 1);
            assert_eq!(event.at, new_event(unit, kind.clone()).at);
            assert_eq!(event.kind, kind);
            assert_eq!(event.subtask.as_deref(), subtask);
            assert_eq!(event.stage, unit.map(|u| format!("4/{}", u.stage)));
        }
    }

    #[test]
    fn forgetting_items_keeps_the_others_and_records_the_highest_seq_removed() {
        let mut log = EventLog::default();
        for item in [0, 1, 0, 2, 1] {
            log.append(item, 1, new_event(None, EventKind::ItemSubmitted), None);
        }
        let doomed: FastSet<usize> = [1].into_iter().collect();
        assert_eq!(log.forget_items(&doomed), 2);
        assert_eq!(log.pruned_through(), 5);
        let left: Vec<(u64, usize)> = log
            .after(0)
            .iter()
            .map(|e| (log.event(e, String::new(), None).seq, e.subject().item))
            .collect();
        assert_eq!(left, [(1, 0), (3, 0), (4, 2)]);
        assert_eq!(log.after(3).len(), 1);
    }
}
