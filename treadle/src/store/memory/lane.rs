//! One lane of the memory store: the items whose id hashes to it, with
//! their queues and indexes, behind a lock of its own. Every transition of
//! an item runs in its lane; only the event log ([`Journal`]) is shared by
//! all lanes.
//!
//! A lane hands its events to the log in batches ([`LOG_BATCH`]), so that
//! lanes working in parallel seldom meet at the log's lock. Sequence
//! numbers are given when a batch is logged; every reader of the log has
//! the lanes log what they hold first ([`Lane::log_pending`]), and with
//! live subscribers each transition's events are logged and sent at once.
//! An item's events stay in the order they happened (an item is in one
//! lane); events of items in different lanes are ordered as logged.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};

use super::ids::IdIndex;
use super::log::{Entry, Journal};
use super::{MAX_ITEMS, Pruned};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::fast_hash::FastSet;
use crate::rules::{self, Effects, ItemRecord, NewEvent, UnitRef, VersionGraph, retention};
use crate::state::StageState;
use crate::status::{AttemptRecord, AwaitingReview};
use crate::store::NewItem;

/// A unit of work of one item, by position in its lane.
type Unit = (usize, UnitRef);

/// How many item positions one prune call looks at, per item it may remove.
const PRUNE_WINDOW: usize = 8;

/// How many events a lane holds before it hands them to the log. With 64,
/// two lanes at full speed still met at the log's lock often enough to
/// sleep on it; with 1,024 they seldom do (memory bench: about a third of
/// the context switches, and some 7% more items/s).
const LOG_BATCH: usize = 1024;

/// The log the lanes share, and whether anyone listens to its live feed
/// (kept apart from the lock, so lanes read it without contending).
#[derive(Debug, Default)]
pub(super) struct SharedLog {
    pub(super) journal: Mutex<Journal>,
    /// Set by a subscription; cleared once a batch finds no receiver left.
    pub(super) listening: AtomicBool,
}

/// An event not yet handed to the log.
#[derive(Debug)]
struct Unlogged {
    /// The item's number ([`Lane::number`]).
    item: usize,
    /// The item's pipeline version when it happened.
    version: u32,
    event: NewEvent,
    subtask: Option<Box<str>>,
}

/// One lane's items, queues and indexes.
#[derive(Debug)]
pub(super) struct Lane {
    /// This lane's number, and how many lanes the store has: an item's
    /// number in the log is its position here times `count` plus `index`.
    index: usize,
    count: usize,
    /// The log every lane appends to.
    log: Arc<SharedLog>,
    /// Events of this lane not handed to the log yet, in the order they
    /// happened.
    unlogged: Vec<Unlogged>,
    /// Registered pipeline versions; version `n` at index `n - 1` (every
    /// lane holds them all).
    pub(super) versions: Vec<Arc<VersionGraph>>,
    /// Item positions by id.
    ids: IdIndex,
    /// Items in submission order.
    items: Vec<StoredItem>,
    /// Units of work that may be claimable now, oldest first.
    ready: VecDeque<Unit>,
    /// Scheduled retries by due time.
    scheduled: BTreeSet<(DateTime<Utc>, Unit)>,
    /// Item positions by pipeline version, stage position and state.
    pub(super) by_state: StateIndex,
    /// The item position the next prune call looks at first.
    prune_cursor: usize,
    /// Scratch space of the transition under way.
    before: Before,
    /// Scratch space of the transition under way.
    effects: Effects,
}

/// An item's rows and its attempt history.
#[derive(Debug)]
pub(super) struct StoredItem {
    pub(super) record: ItemRecord,
    pub(super) attempts: Vec<(UnitRef, AttemptRecord)>,
    /// The item's place in the store's submission order, across lanes.
    pub(super) submitted: u32,
}

/// An item's version and stage states before a rule ran.
#[derive(Debug, Default)]
struct Before {
    version: u32,
    states: Vec<StageState>,
}

/// Locks `mutex`. Every rule validates before it mutates, so a panic while
/// the lock was held cannot have left a half-applied transition.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Lane {
    /// Lane `index` of `count`, appending to `journal`.
    pub(super) fn new(index: usize, count: usize, log: Arc<SharedLog>) -> Self {
        Lane {
            index,
            count,
            log,
            unlogged: Vec::new(),
            versions: Vec::new(),
            ids: IdIndex::default(),
            items: Vec::new(),
            ready: VecDeque::new(),
            scheduled: BTreeSet::new(),
            by_state: StateIndex::default(),
            prune_cursor: 0,
            before: Before::default(),
            effects: Effects::default(),
        }
    }

    /// The items of this lane, in submission order; a pruned item's slot
    /// has no stages.
    pub(super) fn items(&self) -> &[StoredItem] {
        &self.items
    }

    /// The number of the item at `position` in the log: unique across lanes.
    fn number(&self, position: usize) -> usize {
        position * self.count + self.index
    }

    /// The position in this lane of the item numbered `number` in the log.
    pub(super) fn position_of_number(&self, number: usize) -> usize {
        number / self.count
    }

    /// The log number of item `item_id`, if this lane holds it.
    pub(super) fn number_of(&self, item_id: &str) -> Option<usize> {
        self.find(item_id).map(|p| self.number(p))
    }

    pub(super) fn position(&self, item_id: &str) -> Result<usize> {
        self.find(item_id)
            .ok_or_else(|| Error::UnknownItem(item_id.to_owned()))
    }

    /// The position of item `item_id`, if this lane holds it.
    pub(super) fn find(&self, item_id: &str) -> Option<usize> {
        self.ids.get(item_id, |p| &self.items[p].record.id)
    }

    pub(super) fn graph(&self, version: u32) -> Result<Arc<VersionGraph>> {
        version
            .checked_sub(1)
            .and_then(|i| self.versions.get(i as usize))
            .cloned()
            .ok_or_else(|| Error::UnknownVersion(version))
    }

    /// [`Lane::transition`], returning the events it appended too.
    pub(super) fn transition_with_events<R>(
        &mut self,
        item: usize,
        rule: impl FnOnce(&VersionGraph, &mut ItemRecord, &mut Effects) -> Result<R>,
    ) -> Result<(R, Vec<Event>)> {
        let mut events = Vec::new();
        let answer = self.run_rule(item, rule, Some(&mut events))?;
        Ok((answer, events))
    }

    /// Runs a rule on item `item` and keeps queues, indexes, history and
    /// the log in step with what it did; live subscribers get the events.
    pub(super) fn transition<R>(
        &mut self,
        item: usize,
        rule: impl FnOnce(&VersionGraph, &mut ItemRecord, &mut Effects) -> Result<R>,
    ) -> Result<R> {
        self.run_rule(item, rule, None)
    }

    fn run_rule<R>(
        &mut self,
        item: usize,
        rule: impl FnOnce(&VersionGraph, &mut ItemRecord, &mut Effects) -> Result<R>,
        events: Option<&mut Vec<Event>>,
    ) -> Result<R> {
        let record = &self.items[item].record;
        let graph = self.graph(record.version)?;
        // Buffers kept between transitions, so a transition allocates none.
        let mut before = std::mem::take(&mut self.before);
        before.version = record.version;
        before.states.clear();
        before
            .states
            .extend(record.stages.iter().map(|s| s.unit.state));
        let mut fx = std::mem::take(&mut self.effects);
        fx.clear();
        let answer = rule(&graph, &mut self.items[item].record, &mut fx);
        if answer.is_ok() {
            self.apply(item, Some(&before), &mut fx, events);
        }
        self.before = before;
        self.effects = fx;
        answer
    }

    /// Saves what a rule did to item `item`, whose stages were `before`
    /// (`None` for a new item), and logs its events, copying them to
    /// `events` if given.
    fn apply(
        &mut self,
        item: usize,
        before: Option<&Before>,
        fx: &mut Effects,
        events: Option<&mut Vec<Event>>,
    ) {
        let old_names = match before {
            Some(before) => self.versions[before.version as usize - 1].clone(),
            None => self
                .graph(self.items[item].record.version)
                .expect("checked at submit"),
        };
        let stored = &mut self.items[item];
        if fx.restructured {
            // Positions changed: file the history under the new positions,
            // dropping the history of stages the item no longer has.
            let record = &stored.record;
            stored.attempts.retain_mut(|(unit, _)| {
                match record.stage_position(&old_names.stages()[unit.stage]) {
                    Some(position) => {
                        unit.stage = position;
                        true
                    }
                    None => false,
                }
            });
        }
        for &stage in &fx.fanned_out {
            stored
                .attempts
                .retain(|(unit, _)| unit.stage != stage || unit.subtask.is_none());
        }
        if stored.attempts.capacity() == 0 && !fx.attempts.is_empty() {
            // A finished item keeps its history for good: room for one
            // attempt per stage, the usual count, rather than a doubling
            // vector's slack.
            let usual = stored.record.stages.len().max(fx.attempts.len());
            stored.attempts.reserve_exact(usual);
        }
        stored.attempts.append(&mut fx.attempts);
        let record = &stored.record;
        let same_rows = !fx.restructured && before.is_some();
        if fx.restructured
            && let Some(before) = before
        {
            for (position, &state) in before.states.iter().enumerate() {
                self.by_state.remove(before.version, position, state, item);
            }
        }
        for (position, row) in record.stages.iter().enumerate() {
            let old = before.and_then(|b| b.states.get(position).copied());
            if same_rows && old == Some(row.unit.state) {
                continue;
            }
            if same_rows && let Some(old) = old {
                self.by_state.remove(record.version, position, old, item);
            }
            self.by_state
                .insert(record.version, position, row.unit.state, item);
        }
        self.ready
            .extend(fx.runnable.iter().map(|&unit| (item, unit)));
        self.scheduled
            .extend(fx.scheduled.iter().map(|&(due, unit)| (due, (item, unit))));
        if fx.events.is_empty() {
            return;
        }
        let record = &self.items[item].record;
        let number = self.number(item);
        let mine = fx.events.len();
        for event in fx.events.drain(..) {
            let subtask = event.unit.and_then(|unit| {
                let fan_out = record.stages[unit.stage].fan_out.as_ref()?;
                Some(Box::from(&*fan_out.row(unit.subtask?)?.name))
            });
            self.unlogged.push(Unlogged {
                item: number,
                version: record.version,
                event,
                subtask,
            });
        }
        let listening = self.log.listening.load(Ordering::Acquire);
        if events.is_none() && !listening && self.unlogged.len() < LOG_BATCH {
            return;
        }
        let mut journal = lock(&self.log.journal);
        let mark = journal.log.mark();
        log_into(&mut self.unlogged, &mut journal);
        if listening && journal.feed.receiver_count() == 0 {
            self.log.listening.store(false, Ordering::Release);
        }
        // Named once for the feed (all that was logged) and the caller
        // (this transition's own events, the last ones).
        let flushed = journal.log.since_mark(mark);
        let from = if listening { 0 } else { flushed.len() - mine };
        let logged: Vec<Event> = flushed[from..]
            .iter()
            .map(|entry| self.resolve(&journal, entry))
            .collect();
        if listening {
            for event in &logged {
                // A subscriber that has gone away is not an error: the log keeps every event.
                let _ = journal.feed.send(event.clone());
            }
        }
        if let Some(events) = events {
            events.extend_from_slice(&logged[logged.len() - mine..]);
        }
    }

    /// Hands the events this lane holds to the log (see the module docs);
    /// called by every reader of the log, with the lane locked.
    pub(super) fn log_pending(&mut self) {
        if !self.unlogged.is_empty() {
            log_into(&mut self.unlogged, &mut lock(&self.log.journal));
        }
    }

    /// A logged event about an item of this lane, with its names.
    pub(super) fn resolve(&self, journal: &Journal, entry: &Entry) -> Event {
        let subject = entry.subject();
        let stage = subject.stage.map(|(version, position)| {
            self.versions[version as usize - 1].stages()[position as usize].clone()
        });
        let item_id = self.items[self.position_of_number(subject.item)]
            .record
            .id
            .clone();
        journal.log.event(entry, item_id, stage)
    }

    /// Stores one new item; `false` if its id is already known.
    pub(super) fn insert_item(&mut self, item: NewItem) -> Result<bool> {
        if self.find(&item.id).is_some() {
            return Ok(false);
        }
        let graph = self.graph(item.version)?;
        let position = self.items.len();
        if self.number(position) >= MAX_ITEMS {
            return Err(Error::Store {
                backend: "memory",
                context: format!("cannot store item `{}`", item.id),
                cause: Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(format!(
                    "the store holds {MAX_ITEMS} items, its limit"
                ))),
            });
        }
        let submitted = lock(&self.log.journal).next_submission();
        let (record, mut fx) = rules::new_item(&graph, item);
        self.ids.insert(&record.id, position);
        self.items.push(StoredItem {
            record,
            attempts: Vec::new(),
            submitted,
        });
        self.apply(position, None, &mut fx, None);
        Ok(true)
    }

    /// Moves the retries due by `now` to the ready queue and claims up to
    /// `limit` units from it, oldest first, into `claims`.
    pub(super) fn claim(
        &mut self,
        request: &rules::ClaimRequest,
        claims: &mut Vec<rules::Claim>,
    ) -> Result<()> {
        while let Some(&(due, unit)) = self.scheduled.first() {
            if due > request.now {
                break;
            }
            self.scheduled.pop_first();
            self.ready.push_back(unit);
        }
        claims.reserve(
            request
                .limit
                .saturating_sub(claims.len())
                .min(self.ready.len()),
        );
        while claims.len() < request.limit {
            let Some((item, unit)) = self.ready.pop_front() else {
                break;
            };
            let claim = self.transition(item, |_, record, fx| {
                Ok(rules::claim(record, unit, request, fx))
            })?;
            claims.extend(claim);
        }
        Ok(())
    }

    /// When the earliest scheduled retry of this lane is due.
    pub(super) fn next_due(&self) -> Option<DateTime<Utc>> {
        self.scheduled.first().map(|(at, _)| *at)
    }

    /// Every stage awaiting review, from the index.
    pub(super) fn reviews_waiting(&self) -> impl Iterator<Item = AwaitingReview> + '_ {
        self.by_state.each().flat_map(move |(_, position, stage)| {
            let items = &stage.items[StageState::AwaitingReview as usize];
            items.iter().filter_map(move |&item| {
                let record = &self.items[item as usize].record;
                let row = record.stages.get(position)?;
                Some(AwaitingReview {
                    item_id: record.id.clone(),
                    stage: String::from(&*row.unit.name),
                    version: record.version,
                    review: row.review.as_deref()?.clone(),
                })
            })
        })
    }

    /// The submission order and id of the items of this lane whose stage
    /// `stage` is in `state`, unordered.
    pub(super) fn items_in(&self, stage: &str, state: StageState) -> Vec<(u32, String)> {
        let entry = |stored: &StoredItem| (stored.submitted, stored.record.id.clone());
        if !StateIndex::lists(state) {
            let in_state = |record: &ItemRecord| {
                record
                    .stage_position(stage)
                    .is_some_and(|position| record.stages[position].unit.state == state)
            };
            // A pruned item has no stages.
            return self
                .items
                .iter()
                .filter(|stored| in_state(&stored.record))
                .map(entry)
                .collect();
        }
        self.by_state
            .each()
            .filter(|&(version, position, _)| {
                self.versions[version as usize - 1].stages()[position] == stage
            })
            .flat_map(|(_, _, index)| index.items[state as usize].iter())
            .map(|&i| entry(&self.items[i as usize]))
            .collect()
    }

    /// Removes up to `batch` items that finished for good before `cutoff`
    /// ([`retention::prunable`]), looking at no more than
    /// `batch * PRUNE_WINDOW` positions, from where the previous call
    /// stopped: a call's work is bounded whatever the number of items.
    /// `more` until a call reaches the last position (the next one starts
    /// over). The log loses the items' events in one pass over it.
    pub(super) fn prune(&mut self, cutoff: DateTime<Utc>, batch: usize) -> Pruned {
        if batch == 0 {
            return Pruned::default();
        }
        let end = self
            .items
            .len()
            .min(self.prune_cursor + batch.saturating_mul(PRUNE_WINDOW));
        let mut doomed = FastSet::default();
        let mut position = self.prune_cursor;
        while position < end && doomed.len() < batch {
            let record = &self.items[position].record;
            if !record.stages.is_empty() && retention::prunable(record, cutoff) {
                doomed.insert(position);
            }
            position += 1;
        }
        self.prune_cursor = if position >= self.items.len() {
            0
        } else {
            position
        };
        for &item in &doomed {
            self.forget(item);
        }
        let mut events = 0;
        if !doomed.is_empty() {
            // The pruned items' events must all be in the log to go.
            self.log_pending();
            let numbers = doomed.iter().map(|&p| self.number(p)).collect();
            events = lock(&self.log.journal).log.forget_items(&numbers);
            self.scheduled
                .retain(|(_, (item, _))| !doomed.contains(item));
        }
        Pruned {
            items: doomed.len() as u64,
            events,
            more: self.prune_cursor != 0,
        }
    }

    /// Drops item `item`'s rows, attempt history and index entries. Its
    /// position stays (positions are submission order) as an empty,
    /// cancelled slot of about 140 bytes that no claim or listing sees;
    /// stale queue entries for it find nothing to claim.
    fn forget(&mut self, item: usize) {
        let stored = &mut self.items[item];
        let version = stored.record.version;
        for (position, row) in stored.record.stages.iter().enumerate() {
            self.by_state
                .remove(version, position, row.unit.state, item);
        }
        self.ids.remove(&stored.record.id, item);
        let record = &mut stored.record;
        record.id = String::new();
        record.payload = Arc::from("");
        record.cancelled = true;
        record.stages = Vec::new();
        stored.attempts = Vec::new();
    }

    /// The unfinished items of this lane: not cancelled, not completed.
    pub(super) fn unfinished(&self) -> impl Iterator<Item = &StoredItem> {
        self.items
            .iter()
            .filter(|stored| !stored.record.cancelled && !stored.record.all_done())
    }
}

/// Appends `unlogged` to `journal`'s log, in order, leaving it empty.
fn log_into(unlogged: &mut Vec<Unlogged>, journal: &mut Journal) {
    for unlogged in unlogged.drain(..) {
        let subtask = unlogged.subtask.as_deref();
        journal
            .log
            .append(unlogged.item, unlogged.version, unlogged.event, subtask);
    }
}

/// How many items are in each state at each stage of each pipeline
/// version, and which ones for the states few transitions enter: kept in
/// step on every transition without hashing a name. Every stage passes
/// through pending, running and completed, so those are only counted (a
/// listing of them walks the items instead); the others are listed too
/// (unordered; sorted when listed).
#[derive(Debug, Default)]
pub(super) struct StateIndex {
    /// `stages[version - 1][stage position]`.
    stages: Vec<Vec<StageIndex>>,
}

/// The items of one stage of one pipeline version, by state.
#[derive(Debug, Default)]
pub(super) struct StageIndex {
    pub(super) counts: [u32; StageState::ALL.len()],
    /// Empty for the states not [`StateIndex::lists`]. Positions are kept
    /// as `u32` ([`MAX_ITEMS`]).
    items: [FastSet<u32>; StageState::ALL.len()],
}

impl StateIndex {
    /// Whether the items in `state` are listed, not only counted.
    fn lists(state: StageState) -> bool {
        !matches!(
            state,
            StageState::Pending | StageState::Running | StageState::Completed
        )
    }

    fn stage(&mut self, version: u32, position: usize) -> &mut StageIndex {
        let version = version as usize - 1;
        if self.stages.len() <= version {
            self.stages.resize_with(version + 1, Vec::new);
        }
        let stages = &mut self.stages[version];
        if stages.len() <= position {
            stages.resize_with(position + 1, Default::default);
        }
        &mut stages[position]
    }

    fn insert(&mut self, version: u32, position: usize, state: StageState, item: usize) {
        let stage = self.stage(version, position);
        stage.counts[state as usize] += 1;
        if Self::lists(state) {
            stage.items[state as usize].insert(item as u32);
        }
    }

    fn remove(&mut self, version: u32, position: usize, state: StageState, item: usize) {
        let stage = self.stage(version, position);
        let count = &mut stage.counts[state as usize];
        *count = count.saturating_sub(1);
        if Self::lists(state) {
            stage.items[state as usize].remove(&(item as u32));
        }
    }

    /// Every stage of every version, as `(version, stage position, index)`.
    pub(super) fn each(&self) -> impl Iterator<Item = (u32, usize, &StageIndex)> {
        self.stages
            .iter()
            .enumerate()
            .flat_map(move |(version, stages)| {
                stages
                    .iter()
                    .enumerate()
                    .map(move |(position, stage)| (version as u32 + 1, position, stage))
            })
    }
}
