//! A store that keeps everything in memory: fast, shared between the tasks of
//! one process, and gone when the process ends. Good for tests and for work
//! that need not survive a restart.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use super::{
    ClaimBatch, ClaimRequest, Commit, DecisionCommit, EVENT_FEED_CAPACITY, EventQuery,
    MigrateOutcome, NewItem, PipelineDrift, Pruned, StageCount, Store, TaskKey, check_payload,
};
use crate::definition::{PipelineChanges, PipelineDef, VersionInFlight};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::fast_hash::FastSet;
use crate::rules::{self, AllLoaded, Effects, ItemRecord, UnitRef, VersionGraph, retention};
use crate::state::StageState;
use crate::status::{AttemptRecord, AwaitingReview, ItemStatus};

mod ids;
mod log;
use ids::IdIndex;
use log::{Entry, EventLog};

/// An in-memory [`Store`]. Cheap to clone: clones share the same data.
///
/// Runnable work is kept in a queue and indexes are maintained on every
/// transition, so claims and `items_in` never scan all items. The rules of
/// every transition are those of [`crate::rules`]. Leases are recorded but
/// never expire here (a single process holds the data, and its engine renews
/// what it runs); claims are still fenced by generation, so cancelled or
/// superseded work cannot write. A prune frees a pruned item's rows,
/// history and events; its position in submission order stays behind as an
/// empty slot of about 140 bytes.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    data: Arc<Mutex<Data>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            data: Arc::new(Mutex::new(Data {
                feed: broadcast::channel(EVENT_FEED_CAPACITY).0,
                versions: Vec::new(),
                ids: IdIndex::default(),
                items: Vec::new(),
                ready: VecDeque::new(),
                scheduled: BTreeSet::new(),
                by_state: StateIndex::default(),
                log: EventLog::default(),
                prune_cursor: 0,
                before: Before::default(),
                effects: Effects::default(),
            })),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Commits the end of an attempt ([`Store::commit`]).
    fn commit_now(&self, commit: Commit) -> Result<()> {
        let mut data = self.lock();
        let item = data.position(&commit.task.item_id)?;
        data.transition(item, |graph, record, fx| {
            rules::commit(graph, record, commit, &mut AllLoaded, fx)
        })
    }

    fn lock(&self) -> MutexGuard<'_, Data> {
        // Every rule validates before it mutates, so a panic while the lock
        // was held cannot have left a half-applied transition.
        self.data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A unit of work of one item, by position.
type Unit = (usize, UnitRef);

/// How many item positions one prune call looks at, per item it may remove.
const PRUNE_WINDOW: usize = 8;

/// How many items one memory store holds at most (positions are kept as
/// `u32` in the event log); far beyond what fits in memory.
const MAX_ITEMS: usize = u32::MAX as usize;

#[derive(Debug)]
struct Data {
    feed: broadcast::Sender<Event>,
    /// Registered pipeline versions; version `n` at index `n - 1`.
    versions: Vec<Arc<VersionGraph>>,
    /// Item positions by id.
    ids: IdIndex,
    /// Items in submission order.
    items: Vec<StoredItem>,
    /// Units of work that may be claimable now, oldest first.
    ready: VecDeque<Unit>,
    /// Scheduled retries by due time.
    scheduled: BTreeSet<(DateTime<Utc>, Unit)>,
    /// Item positions by pipeline version, stage position and state.
    by_state: StateIndex,
    /// The event log.
    log: EventLog,
    /// The item position the next prune call looks at first.
    prune_cursor: usize,
    /// Scratch space of the transition under way.
    before: Before,
    /// Scratch space of the transition under way.
    effects: Effects,
}

/// An item's rows and its attempt history.
#[derive(Debug)]
struct StoredItem {
    record: ItemRecord,
    attempts: Vec<(UnitRef, AttemptRecord)>,
}

/// An item's version and stage states before a rule ran.
#[derive(Debug, Default)]
struct Before {
    version: u32,
    states: Vec<StageState>,
}

impl Data {
    fn position(&self, item_id: &str) -> Result<usize> {
        self.find(item_id)
            .ok_or_else(|| Error::UnknownItem(item_id.to_owned()))
    }

    /// The position of item `item_id`, if it is stored.
    fn find(&self, item_id: &str) -> Option<usize> {
        self.ids.get(item_id, |p| &self.items[p].record.id)
    }

    fn graph(&self, version: u32) -> Result<Arc<VersionGraph>> {
        version
            .checked_sub(1)
            .and_then(|i| self.versions.get(i as usize))
            .cloned()
            .ok_or_else(|| Error::UnknownVersion(version))
    }

    /// [`Data::transition`], returning the events it appended too.
    fn transition_with_events<R>(
        &mut self,
        item: usize,
        rule: impl FnOnce(&VersionGraph, &mut ItemRecord, &mut Effects) -> Result<R>,
    ) -> Result<(R, Vec<Event>)> {
        let mark = self.log.mark();
        let answer = self.transition(item, rule)?;
        let events = self.resolve_from(mark);
        Ok((answer, events))
    }

    /// Runs a rule on item `item` and keeps queues, indexes, history and
    /// the log in step with what it did; live subscribers get the events.
    fn transition<R>(
        &mut self,
        item: usize,
        rule: impl FnOnce(&VersionGraph, &mut ItemRecord, &mut Effects) -> Result<R>,
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
            self.apply(item, Some(&before), &mut fx);
        }
        self.before = before;
        self.effects = fx;
        answer
    }

    /// Saves what a rule did to item `item`, whose stages were `before`
    /// (`None` for a new item).
    fn apply(&mut self, item: usize, before: Option<&Before>, fx: &mut Effects) {
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
        let record = &self.items[item].record;
        let mark = self.log.mark();
        for new in fx.events.drain(..) {
            let subtask = new.unit.and_then(|unit| {
                let fan_out = record.stages[unit.stage].fan_out.as_ref()?;
                Some(&*fan_out.row(unit.subtask?)?.name)
            });
            self.log.append(item, record.version, new, subtask);
        }
        self.publish(mark);
    }

    /// A logged event, with its names.
    fn resolve(&self, entry: &Entry) -> Event {
        let subject = entry.subject();
        let stage = subject.stage.map(|(version, position)| {
            self.versions[version as usize - 1].stages()[position as usize].clone()
        });
        let item_id = self.items[subject.item].record.id.clone();
        self.log.event(entry, item_id, stage)
    }

    /// The events logged since `mark`, with their names.
    fn resolve_from(&self, mark: usize) -> Vec<Event> {
        self.log
            .since_mark(mark)
            .iter()
            .map(|e| self.resolve(e))
            .collect()
    }

    /// Sends the events logged since `mark` to live subscribers, in log
    /// order; with nobody listening, none is copied out of the log.
    fn publish(&self, mark: usize) {
        if self.feed.receiver_count() == 0 {
            return;
        }
        for entry in self.log.since_mark(mark) {
            // A subscriber that has gone away is not an error: the log keeps every event.
            let _ = self.feed.send(self.resolve(entry));
        }
    }

    /// Stores one new item; `false` if its id is already known.
    fn insert_item(&mut self, item: NewItem) -> Result<bool> {
        if self.find(&item.id).is_some() {
            return Ok(false);
        }
        let graph = self.graph(item.version)?;
        let position = self.items.len();
        if position >= MAX_ITEMS {
            return Err(Error::Store {
                backend: "memory",
                context: format!("cannot store item `{}`", item.id),
                cause: Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(format!(
                    "the store holds {MAX_ITEMS} items, its limit"
                ))),
            });
        }
        let (record, mut fx) = rules::new_item(&graph, item);
        self.ids.insert(&record.id, position);
        self.items.push(StoredItem {
            record,
            attempts: Vec::new(),
        });
        self.apply(position, None, &mut fx);
        Ok(true)
    }

    /// Every stage awaiting review, from the index.
    fn reviews_waiting(&self) -> impl Iterator<Item = AwaitingReview> + '_ {
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

    /// How version `version` stands: its changes from `previous`, and the
    /// unfinished items of other versions.
    fn drift(&self, version: u32, previous: Option<&PipelineDef>) -> Result<PipelineDrift> {
        let current = self.graph(version)?;
        let mut in_flight: Vec<VersionInFlight> = Vec::new();
        for item in (0..self.items.len()).filter(|&i| self.unfinished(i)) {
            let old = self.items[item].record.version;
            if old == version {
                continue;
            }
            match in_flight.iter_mut().find(|v| v.version == old) {
                Some(entry) => entry.items += 1,
                None => in_flight.push(VersionInFlight {
                    version: old,
                    items: 1,
                    changes: PipelineChanges::between(
                        self.graph(old)?.definition(),
                        current.definition(),
                    ),
                }),
            }
        }
        in_flight.sort_by_key(|v| v.version);
        Ok(PipelineDrift {
            version,
            changes: previous
                .map(|p| PipelineChanges::between(p, current.definition()))
                .unwrap_or_default(),
            in_flight,
        })
    }

    /// Removes up to `batch` items that finished for good before `cutoff`
    /// ([`retention::prunable`]), looking at no more than
    /// `batch * PRUNE_WINDOW` positions, from where the previous call
    /// stopped: a call's work is bounded whatever the number of items.
    /// `more` until a call reaches the last position (the next one starts
    /// over). The log loses the items' events in one pass over it.
    fn prune(&mut self, cutoff: DateTime<Utc>, batch: usize) -> Pruned {
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
            events = self.log.forget_items(&doomed);
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

    /// Whether the item at `item` is unfinished: not cancelled, not completed.
    fn unfinished(&self, item: usize) -> bool {
        let record = &self.items[item].record;
        !record.cancelled && !record.all_done()
    }
}

/// How many items are in each state at each stage of each pipeline
/// version, and which ones for the states few transitions enter: kept in
/// step on every transition without hashing a name. Every stage passes
/// through pending, running and completed, so those are only counted (a
/// listing of them walks the items instead); the others are listed too
/// (unordered; sorted when listed).
#[derive(Debug, Default)]
struct StateIndex {
    /// `stages[version - 1][stage position]`.
    stages: Vec<Vec<StageIndex>>,
}

/// The items of one stage of one pipeline version, by state.
#[derive(Debug, Default)]
struct StageIndex {
    counts: [u32; StageState::ALL.len()],
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
    fn each(&self) -> impl Iterator<Item = (u32, usize, &StageIndex)> {
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

#[async_trait]
impl Store for MemoryStore {
    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.lock().feed.subscribe()
    }

    /// A commit only takes the store's lock.
    fn commits_without_waiting(&self) -> bool {
        true
    }

    async fn register_pipeline(&self, definition: &PipelineDef) -> Result<PipelineDrift> {
        let mut data = self.lock();
        let latest = data.versions.last().cloned();
        let version = match data.versions.iter().find(|v| v.definition() == definition) {
            Some(known) => known.version(),
            None => {
                let version = data.versions.len() as u32 + 1;
                data.versions
                    .push(Arc::new(VersionGraph::new(version, definition.clone())));
                version
            }
        };
        data.drift(version, latest.as_ref().map(|l| l.definition()))
    }

    async fn pipeline_drift(&self) -> Result<Option<PipelineDrift>> {
        let data = self.lock();
        let Some(latest) = data.versions.last() else {
            return Ok(None);
        };
        let previous = data.versions.iter().rev().nth(1).map(|v| v.definition());
        data.drift(latest.version(), previous).map(Some)
    }

    async fn submit(&self, items: Vec<NewItem>) -> Result<Vec<Event>> {
        let mut data = self.lock();
        let mark = data.log.mark();
        // Check every item first: a batch is stored whole or not at all.
        for item in &items {
            check_payload(item)?;
            data.graph(item.version)?;
        }
        for item in items {
            data.insert_item(item)?;
        }
        Ok(data.resolve_from(mark))
    }

    async fn claim(&self, request: ClaimRequest) -> Result<ClaimBatch> {
        let mut data = self.lock();
        while let Some(&(due, unit)) = data.scheduled.first() {
            if due > request.now {
                break;
            }
            data.scheduled.pop_first();
            data.ready.push_back(unit);
        }
        let mut batch = ClaimBatch {
            claims: Vec::with_capacity(request.limit.min(data.ready.len())),
        };
        while batch.claims.len() < request.limit {
            let Some((item, unit)) = data.ready.pop_front() else {
                break;
            };
            let claim = data.transition(item, |_, record, fx| {
                Ok(rules::claim(record, unit, &request, fx))
            })?;
            batch.claims.extend(claim);
        }
        Ok(batch)
    }

    fn commit_at_once(&self, commit: Commit) -> std::result::Result<Result<()>, Box<Commit>> {
        Ok(self.commit_now(commit))
    }

    async fn commit(&self, commit: Commit) -> Result<()> {
        self.commit_now(commit)
    }

    async fn decide(&self, decision: DecisionCommit) -> Result<Vec<Event>> {
        let mut data = self.lock();
        let item = data.position(&decision.item_id)?;
        let ((), events) = data.transition_with_events(item, |graph, record, fx| {
            rules::decide(graph, record, decision, fx)
        })?;
        Ok(events)
    }

    async fn retry(&self, item_id: &str, stage: &str, at: DateTime<Utc>) -> Result<Vec<Event>> {
        let mut data = self.lock();
        let item = data.position(item_id)?;
        let ((), events) = data.transition_with_events(item, |_, record, fx| {
            rules::retry(record, stage, at, &mut AllLoaded, fx)
        })?;
        Ok(events)
    }

    async fn renew(&self, claims: &[(TaskKey, u64)], until: DateTime<Utc>) -> Result<Vec<TaskKey>> {
        let mut data = self.lock();
        let mut lost = Vec::new();
        for (key, generation) in claims {
            let held = match data.position(&key.item_id) {
                Ok(item) => data.transition(item, |_, record, fx| {
                    Ok(rules::renew(record, key, *generation, until, fx))
                })?,
                Err(_) => false,
            };
            if !held {
                lost.push(key.clone());
            }
        }
        Ok(lost)
    }

    async fn rerun(
        &self,
        item_id: &str,
        stage: &str,
        at: DateTime<Utc>,
    ) -> Result<(Vec<TaskKey>, Vec<Event>)> {
        let mut data = self.lock();
        let item = data.position(item_id)?;
        let (running, events) = data.transition_with_events(item, |graph, record, fx| {
            rules::rerun(graph, record, stage, at, &mut AllLoaded, fx)
        })?;
        Ok((running, events))
    }

    async fn cancel(&self, item_id: &str, at: DateTime<Utc>) -> Result<(Vec<TaskKey>, Vec<Event>)> {
        let mut data = self.lock();
        let item = data.position(item_id)?;
        let (running, events) = data.transition_with_events(item, |_, record, fx| {
            rules::cancel(record, at, &mut AllLoaded, fx)
        })?;
        Ok((running, events))
    }

    async fn migrate(
        &self,
        item_id: &str,
        version: u32,
        at: DateTime<Utc>,
    ) -> Result<(MigrateOutcome, Vec<Event>)> {
        let mut data = self.lock();
        let item = data.position(item_id)?;
        let to = data.graph(version)?;
        let (outcome, events) = data.transition_with_events(item, |from, record, fx| {
            Ok(rules::migrate(from, &to, record, at, fx))
        })?;
        Ok((outcome, events))
    }

    async fn items_before_version(&self, version: u32) -> Result<Vec<String>> {
        let data = self.lock();
        let mut older: Vec<usize> = (0..data.items.len())
            .filter(|&i| data.items[i].record.version < version && data.unfinished(i))
            .collect();
        older.sort_by_key(|&i| (data.items[i].record.version, i));
        Ok(older
            .into_iter()
            .map(|i| data.items[i].record.id.clone())
            .collect())
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(self.lock().scheduled.first().map(|(at, _)| *at))
    }

    async fn next_review_deadline(&self) -> Result<Option<DateTime<Utc>>> {
        let data = self.lock();
        Ok(data
            .reviews_waiting()
            .filter_map(|waiting| Some(waiting.review.request.deadline?.at))
            .min())
    }

    async fn due_reviews(&self, now: DateTime<Utc>) -> Result<Vec<AwaitingReview>> {
        let data = self.lock();
        let mut due: Vec<AwaitingReview> = data
            .reviews_waiting()
            .filter(|waiting| {
                let deadline = waiting.review.request.deadline.as_ref();
                deadline.is_some_and(|d| d.at <= now)
            })
            .collect();
        due.sort_by(|a, b| (&a.item_id, &a.stage).cmp(&(&b.item_id, &b.stage)));
        Ok(due)
    }

    /// A memory store lives and dies with its process, so no claim outlives
    /// the worker that took it: there is nothing to release.
    async fn release_claims(&self, _owner: &str, _now: DateTime<Utc>) -> Result<u64> {
        Ok(0)
    }

    /// Leases are not enforced: nothing waits for one to expire.
    async fn next_lease_expiry(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(None)
    }

    /// Leases are not enforced: no owner is ever taken over.
    async fn lease_owners(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn pipeline_definition(&self) -> Result<Option<PipelineDef>> {
        Ok(self.lock().versions.last().map(|v| v.definition().clone()))
    }

    async fn pipeline_version(&self, version: u32) -> Result<Option<PipelineDef>> {
        Ok(self
            .lock()
            .graph(version)
            .ok()
            .map(|v| v.definition().clone()))
    }

    async fn stage_counts(&self) -> Result<Vec<StageCount>> {
        let data = self.lock();
        // One stage may sit at different positions in different versions.
        let mut totals: BTreeMap<(&str, StageState), u64> = BTreeMap::new();
        for (version, position, index) in data.by_state.each() {
            let stage = &data.versions[version as usize - 1].stages()[position];
            for &state in StageState::ALL {
                let items = index.counts[state as usize];
                if items > 0 {
                    *totals.entry((stage.as_str(), state)).or_default() += u64::from(items);
                }
            }
        }
        Ok(totals
            .into_iter()
            .map(|((stage, state), items)| StageCount {
                stage: stage.to_owned(),
                state,
                items,
            })
            .collect())
    }

    async fn status(&self, item_id: &str) -> Result<ItemStatus> {
        let data = self.lock();
        let stored = &data.items[data.position(item_id)?];
        Ok(stored.record.status(&stored.attempts))
    }

    async fn items_in(&self, stage: &str, state: StageState) -> Result<Vec<String>> {
        let data = self.lock();
        let in_state = |record: &ItemRecord| {
            record
                .stage_position(stage)
                .is_some_and(|position| record.stages[position].unit.state == state)
        };
        if !StateIndex::lists(state) {
            // Item positions are submission order; a pruned item has no stages.
            return Ok(data
                .items
                .iter()
                .filter(|stored| in_state(&stored.record))
                .map(|stored| stored.record.id.clone())
                .collect());
        }
        // The index is unordered; item positions are submission order.
        let mut positions: Vec<u32> = data
            .by_state
            .each()
            .filter(|&(version, position, _)| {
                data.versions[version as usize - 1].stages()[position] == stage
            })
            .flat_map(|(_, _, index)| index.items[state as usize].iter().copied())
            .collect();
        positions.sort_unstable();
        Ok(positions
            .into_iter()
            .map(|i| data.items[i as usize].record.id.clone())
            .collect())
    }

    async fn awaiting_review(&self) -> Result<Vec<AwaitingReview>> {
        let data = self.lock();
        let mut waiting: Vec<AwaitingReview> = data.reviews_waiting().collect();
        waiting.sort_by(|a, b| {
            (a.review.requested_at, &a.item_id, &a.stage).cmp(&(
                b.review.requested_at,
                &b.item_id,
                &b.stage,
            ))
        });
        Ok(waiting)
    }

    async fn prune(&self, finished_before: DateTime<Utc>, batch: usize) -> Result<Pruned> {
        Ok(self.lock().prune(finished_before, batch))
    }

    async fn pruned_through(&self) -> Result<u64> {
        Ok(self.lock().log.pruned_through())
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>> {
        let data = self.lock();
        let item = match &query.item_id {
            None => None,
            Some(id) => match data.find(id) {
                Some(item) => Some(item),
                None => return Ok(Vec::new()),
            },
        };
        Ok(data
            .log
            .after(query.after)
            .iter()
            .filter(|e| item.is_none_or(|item| e.subject().item == item))
            .take(query.limit.unwrap_or(usize::MAX))
            .map(|e| data.resolve(e))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pruned_items_slot_is_about_140_bytes() {
        let slot = std::mem::size_of::<StoredItem>();
        assert!((128..=144).contains(&slot), "{slot} bytes");
    }
}
