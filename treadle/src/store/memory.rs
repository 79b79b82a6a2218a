//! A store that keeps everything in memory: fast, shared between the tasks of
//! one process, and gone when the process ends. Good for tests and for work
//! that need not survive a restart.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::broadcast;

use super::{
    Claim, ClaimBatch, ClaimRequest, Commit, DecisionCommit, EVENT_FEED_CAPACITY, EventQuery,
    FanIn, NewItem, PipelineDrift, StageCount, Store, SubtaskTransition, TaskKey, Transition,
    Verdict, check_json, fan_in,
};
use crate::definition::PipelineDef;
use crate::error::{Error, Result};
use crate::event::{Event, EventKind};
use crate::fast_hash::{FastMap, FastSet};
use crate::review::{DecisionRecord, ReviewStatus};
use crate::state::{DecisionKind, ItemState, StageState};
use crate::status::{AttemptRecord, AwaitingReview, ItemStatus, StageStatus, SubtaskStatus};

/// An in-memory [`Store`]. Cheap to clone: clones share the same data.
///
/// Runnable work is kept in a queue and indexes are maintained on every
/// transition, so claims and `items_in` never scan all items. Leases are not
/// enforced (a single process holds the data, and its engine renews what it
/// runs); claims are still fenced by generation, so cancelled or superseded
/// work cannot write.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    data: Arc<Mutex<Data>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            data: Arc::new(Mutex::new(Data {
                feed: broadcast::channel(EVENT_FEED_CAPACITY).0,
                pipeline: None,
                ids: FastMap::default(),
                items: Vec::new(),
                ready: VecDeque::new(),
                scheduled: BTreeSet::new(),
                by_state: FastMap::default(),
                events: Vec::new(),
            })),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Data> {
        // Every transition validates before it mutates, so a panic while
        // the lock was held cannot have left a half-applied transition.
        self.data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A unit of work by position: item, stage within the item, subtask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Unit {
    item: usize,
    stage: usize,
    subtask: Option<usize>,
}

#[derive(Debug)]
struct Data {
    feed: broadcast::Sender<Event>,
    pipeline: Option<PipelineDef>,
    /// Item positions by id.
    ids: FastMap<String, usize>,
    /// Items in submission order.
    items: Vec<ItemRow>,
    /// Units of work that may be claimable now, oldest first.
    ready: VecDeque<Unit>,
    /// Scheduled retries by due time.
    scheduled: BTreeSet<(DateTime<Utc>, Unit)>,
    /// Item positions by stage name, then state (unordered: cheap to keep
    /// in step on every transition; sorted when listed).
    by_state: FastMap<String, FastMap<StageState, FastSet<usize>>>,
    /// The event log, by position; names are resolved when events are read.
    events: Vec<LoggedEvent>,
}

/// An event as the log keeps it: positions instead of names.
#[derive(Debug)]
struct LoggedEvent {
    at: DateTime<Utc>,
    item: usize,
    /// The stage and subtask positions, for events about a stage.
    unit: Option<Unit>,
    kind: EventKind,
}

#[derive(Debug)]
struct ItemRow {
    id: String,
    payload: Arc<str>,
    submitted_at: DateTime<Utc>,
    cancelled: bool,
    /// Stages not yet completed or skipped.
    unfinished: usize,
    stages: Vec<StageRow>,
}

/// The fields a stage and a subtask share.
#[derive(Debug)]
struct UnitRow {
    name: String,
    state: StageState,
    attempt: u32,
    generation: u64,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    next_run_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    output: Option<Value>,
    attempts: Vec<AttemptRecord>,
}

#[derive(Debug)]
struct StageRow {
    unit: UnitRow,
    waiting: u32,
    subtasks: Vec<UnitRow>,
    review: Option<ReviewStatus>,
}

impl UnitRow {
    fn new(name: String) -> Self {
        UnitRow {
            name,
            state: StageState::Pending,
            attempt: 0,
            generation: 0,
            started_at: None,
            finished_at: None,
            next_run_at: None,
            last_error: None,
            output: None,
            attempts: Vec::new(),
        }
    }

    fn record_attempt(&mut self, attempt: &AttemptRecord) {
        self.attempts.push(attempt.clone());
        if attempt.result.is_failure() {
            self.last_error = attempt.error.clone();
        }
    }

    fn is_runnable(&self, now: DateTime<Utc>) -> bool {
        match self.state {
            StageState::Pending => true,
            StageState::RetryScheduled => self.next_run_at.is_none_or(|at| at <= now),
            _ => false,
        }
    }

    fn held_by(&self, generation: u64) -> bool {
        self.state == StageState::Running && self.generation == generation
    }
}

impl ItemRow {
    fn stage_position(&self, stage: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.unit.name == stage)
    }

    fn unit(&self, unit: Unit) -> &UnitRow {
        let row = &self.stages[unit.stage];
        unit.subtask.map_or(&row.unit, |i| &row.subtasks[i])
    }

    fn unit_mut(&mut self, unit: Unit) -> &mut UnitRow {
        let row = &mut self.stages[unit.stage];
        match unit.subtask {
            None => &mut row.unit,
            Some(i) => &mut row.subtasks[i],
        }
    }

    fn outputs(&self) -> BTreeMap<String, Value> {
        self.stages
            .iter()
            .filter(|s| s.unit.state == StageState::Completed)
            .filter_map(|s| Some((s.unit.name.clone(), s.unit.output.clone()?)))
            .collect()
    }

    fn status_of(&self, stage: usize) -> StageStatus {
        let row = &self.stages[stage];
        StageStatus {
            name: row.unit.name.clone(),
            state: row.unit.state,
            waiting_on: row.waiting,
            attempt: row.unit.attempt,
            started_at: row.unit.started_at,
            finished_at: row.unit.finished_at,
            next_run_at: row.unit.next_run_at,
            last_error: row.unit.last_error.clone(),
            output: row.unit.output.clone(),
            attempts: row.unit.attempts.clone(),
            subtasks: row
                .subtasks
                .iter()
                .map(|sub| SubtaskStatus {
                    name: sub.name.clone(),
                    state: sub.state,
                    attempt: sub.attempt,
                    next_run_at: sub.next_run_at,
                    last_error: sub.last_error.clone(),
                    output: sub.output.clone(),
                    attempts: sub.attempts.clone(),
                })
                .collect(),
            review: row.review.clone(),
        }
    }
}

impl Data {
    fn position(&self, item_id: &str) -> Result<usize> {
        self.ids
            .get(item_id)
            .copied()
            .ok_or_else(|| Error::UnknownItem(item_id.to_owned()))
    }

    /// The item and stage positions named by `item_id` and `stage`.
    fn locate(&self, item_id: &str, stage: &str) -> Result<(usize, usize)> {
        let item = self.position(item_id)?;
        let stage = self.items[item]
            .stage_position(stage)
            .ok_or_else(|| Error::UnknownStage {
                item: item_id.to_owned(),
                stage: stage.to_owned(),
            })?;
        Ok((item, stage))
    }

    fn key(&self, unit: Unit) -> TaskKey {
        let item = &self.items[unit.item];
        let row = &item.stages[unit.stage];
        TaskKey {
            item_id: item.id.clone(),
            stage: row.unit.name.clone(),
            subtask: unit.subtask.map(|i| row.subtasks[i].name.clone()),
        }
    }

    /// Appends an event about `unit` (its subtask too, if it has one) to
    /// the log and to `events`.
    fn log(&mut self, at: DateTime<Utc>, unit: Unit, kind: EventKind, events: &mut Vec<Event>) {
        self.append(at, unit.item, Some(unit), kind, events);
    }

    /// Appends an event about a whole item.
    fn log_item(
        &mut self,
        at: DateTime<Utc>,
        item: usize,
        kind: EventKind,
        events: &mut Vec<Event>,
    ) {
        self.append(at, item, None, kind, events);
    }

    fn append(
        &mut self,
        at: DateTime<Utc>,
        item: usize,
        unit: Option<Unit>,
        kind: EventKind,
        events: &mut Vec<Event>,
    ) {
        let logged = LoggedEvent {
            at,
            item,
            unit,
            kind,
        };
        events.push(self.resolve(self.events.len(), &logged));
        self.events.push(logged);
    }

    /// The event at log position `index`, with its names.
    fn resolve(&self, index: usize, logged: &LoggedEvent) -> Event {
        let item = &self.items[logged.item];
        let (stage, subtask) = match logged.unit {
            None => (None, None),
            Some(unit) => {
                let row = &item.stages[unit.stage];
                let subtask = unit.subtask.map(|i| row.subtasks[i].name.clone());
                (Some(row.unit.name.clone()), subtask)
            }
        };
        Event {
            seq: index as u64 + 1,
            at: logged.at,
            item_id: item.id.clone(),
            stage,
            subtask,
            kind: logged.kind.clone(),
        }
    }

    /// Sends committed events to live subscribers, in log order.
    fn publish(&self, events: &[Event]) {
        if self.feed.receiver_count() == 0 {
            return;
        }
        for event in events {
            // A subscriber that has gone away is not an error: the log keeps every event.
            let _ = self.feed.send(event.clone());
        }
    }

    /// Changes a stage's state and keeps the (stage, state) index in step.
    fn set_stage_state(&mut self, item: usize, stage: usize, state: StageState) {
        let unit = &mut self.items[item].stages[stage].unit;
        let old = std::mem::replace(&mut unit.state, state);
        if old != state {
            let by_state = state_index(&mut self.by_state, &unit.name);
            if let Some(items) = by_state.get_mut(&old) {
                items.remove(&item);
            }
            by_state.entry(state).or_default().insert(item);
        }
    }

    /// Completes a stage with `output`: unblocks its dependents and records
    /// `ItemCompleted` after the item's last stage.
    fn complete_stage(
        &mut self,
        unit: Unit,
        output: Option<Value>,
        dependents: &[String],
        at: DateTime<Utc>,
        events: &mut Vec<Event>,
    ) {
        let stage = Unit {
            subtask: None,
            ..unit
        };
        self.items[unit.item].stages[unit.stage].unit.output = output;
        self.log(at, stage, EventKind::Completed, events);
        self.finish_stage(stage, StageState::Completed, dependents, at, events);
    }

    /// Marks a stage completed or skipped and unblocks its dependents.
    fn finish_stage(
        &mut self,
        unit: Unit,
        state: StageState,
        dependents: &[String],
        at: DateTime<Utc>,
        events: &mut Vec<Event>,
    ) {
        self.set_stage_state(unit.item, unit.stage, state);
        let item = &mut self.items[unit.item];
        item.stages[unit.stage].unit.finished_at = Some(at);
        item.unfinished -= 1;
        let all_done = item.unfinished == 0;
        for dependent in dependents {
            let Some(stage) = item.stage_position(dependent) else {
                continue;
            };
            let row = &mut item.stages[stage];
            row.waiting = row.waiting.saturating_sub(1);
            if row.waiting == 0 && row.unit.state == StageState::Pending {
                self.ready.push_back(Unit {
                    item: unit.item,
                    stage,
                    subtask: None,
                });
            }
        }
        if all_done {
            self.log_item(at, unit.item, EventKind::ItemCompleted, events);
        }
    }

    fn fail_stage(
        &mut self,
        unit: Unit,
        reason: String,
        at: DateTime<Utc>,
        events: &mut Vec<Event>,
    ) {
        let stage = Unit {
            subtask: None,
            ..unit
        };
        self.set_stage_state(unit.item, unit.stage, StageState::Failed);
        let row = &mut self.items[unit.item].stages[unit.stage].unit;
        row.finished_at = Some(at);
        row.last_error = Some(reason.clone());
        self.log(at, stage, EventKind::Failed { reason }, events);
    }

    fn schedule_retry(
        &mut self,
        unit: Unit,
        due: DateTime<Utc>,
        error: Option<String>,
    ) -> EventKind {
        let row = self.items[unit.item].unit_mut(unit);
        row.next_run_at = Some(due);
        self.scheduled.insert((due, unit));
        EventKind::RetryScheduled { at: due, error }
    }

    /// Stores one new item; `false` if its id is already known.
    fn insert_item(&mut self, item: NewItem, events: &mut Vec<Event>) -> bool {
        if self.ids.contains_key(&item.id) {
            return false;
        }
        let position = self.items.len();
        for (stage, seed) in item.stages.iter().enumerate() {
            state_index(&mut self.by_state, &seed.name)
                .entry(StageState::Pending)
                .or_default()
                .insert(position);
            if seed.upstream == 0 {
                self.ready.push_back(Unit {
                    item: position,
                    stage,
                    subtask: None,
                });
            }
        }
        let stages: Vec<StageRow> = item
            .stages
            .into_iter()
            .map(|seed| StageRow {
                unit: UnitRow::new(seed.name),
                waiting: seed.upstream,
                subtasks: Vec::new(),
                review: None,
            })
            .collect();
        self.ids.insert(item.id.clone(), position);
        self.items.push(ItemRow {
            id: item.id,
            payload: Arc::from(item.payload),
            submitted_at: item.at,
            cancelled: false,
            unfinished: stages.len(),
            stages,
        });
        self.log_item(item.at, position, EventKind::ItemSubmitted, events);
        true
    }

    fn claim_one(
        &mut self,
        unit: Unit,
        request: &ClaimRequest,
        events: &mut Vec<Event>,
    ) -> Option<Claim> {
        let item = &mut self.items[unit.item];
        if item.cancelled || (unit.subtask.is_none() && item.stages[unit.stage].waiting > 0) {
            return None;
        }
        let row = item.unit_mut(unit);
        if !row.is_runnable(request.now) {
            return None;
        }
        row.attempt += 1;
        row.generation += 1;
        row.started_at = Some(request.now);
        row.next_run_at = None;
        let (attempt, generation) = (row.attempt, row.generation);
        match unit.subtask {
            Some(_) => row.state = StageState::Running,
            None => self.set_stage_state(unit.item, unit.stage, StageState::Running),
        }
        let claim = Claim {
            task: self.key(unit),
            attempt,
            generation,
            started_at: request.now,
            payload: self.items[unit.item].payload.clone(),
            outputs: self.items[unit.item].outputs(),
        };
        let owner = request.owner.clone();
        self.log(
            request.now,
            unit,
            EventKind::Started { attempt, owner },
            events,
        );
        Some(claim)
    }

    /// The unit a commit is for, if the claim still holds.
    fn held_unit(&self, commit: &Commit) -> Result<Unit> {
        let (item, stage) = self.locate(&commit.task.item_id, &commit.task.stage)?;
        let subtask = match &commit.task.subtask {
            None => None,
            Some(name) => self.items[item].stages[stage]
                .subtasks
                .iter()
                .position(|s| &s.name == name),
        };
        let unit = Unit {
            item,
            stage,
            subtask,
        };
        let known = commit.task.subtask.is_none() || subtask.is_some();
        if known && self.items[item].unit(unit).held_by(commit.generation) {
            Ok(unit)
        } else {
            Err(Error::LeaseLost {
                task: commit.task.clone(),
                generation: commit.generation,
            })
        }
    }

    fn commit_stage(&mut self, unit: Unit, c: Commit, events: &mut Vec<Event>) {
        let at = c.attempt.finished_at;
        let row = &mut self.items[unit.item].stages[unit.stage];
        row.unit.record_attempt(&c.attempt);
        match c.transition {
            Transition::Complete { output } => {
                self.complete_stage(unit, output, &c.dependents, at, events)
            }
            Transition::Skip { reason } => {
                self.log(at, unit, EventKind::Skipped { reason }, events);
                self.finish_stage(unit, StageState::Skipped, &c.dependents, at, events);
            }
            Transition::AwaitReview(request) => {
                let round = row.review.as_ref().map_or(1, |r| r.round + 1);
                let summary = request.summary.clone();
                row.review = Some(ReviewStatus {
                    round,
                    request,
                    requested_at: at,
                    decision: None,
                });
                row.unit.finished_at = Some(at);
                self.set_stage_state(unit.item, unit.stage, StageState::AwaitingReview);
                self.log(at, unit, EventKind::ReviewRequested { summary }, events);
            }
            Transition::RetryAt { at: due } => {
                self.set_stage_state(unit.item, unit.stage, StageState::RetryScheduled);
                let kind = self.schedule_retry(unit, due, c.attempt.error);
                self.log(at, unit, kind, events);
            }
            Transition::Fail { reason } => self.fail_stage(unit, reason, at, events),
            Transition::FanOut { subtasks } => {
                row.subtasks = subtasks.iter().cloned().map(UnitRow::new).collect();
                let count = subtasks.len();
                self.log(at, unit, EventKind::FannedOut { subtasks }, events);
                if count == 0 {
                    let empty = Some(Value::Object(Default::default()));
                    self.complete_stage(unit, empty, &c.dependents, at, events);
                }
                self.ready.extend((0..count).map(|i| Unit {
                    subtask: Some(i),
                    ..unit
                }));
            }
        }
    }

    fn commit_subtask(&mut self, unit: Unit, c: Commit, events: &mut Vec<Event>) {
        let at = c.attempt.finished_at;
        let sub = self.items[unit.item].unit_mut(unit);
        sub.record_attempt(&c.attempt);
        let kind = match c.transition.for_subtask() {
            SubtaskTransition::Complete { output } => {
                sub.output = output;
                sub.state = StageState::Completed;
                sub.finished_at = Some(at);
                EventKind::Completed
            }
            SubtaskTransition::Skip { reason } => {
                sub.state = StageState::Skipped;
                sub.finished_at = Some(at);
                EventKind::Skipped { reason }
            }
            SubtaskTransition::RetryAt { at: due } => {
                sub.state = StageState::RetryScheduled;
                self.schedule_retry(unit, due, c.attempt.error)
            }
            SubtaskTransition::Fail { reason } => {
                sub.state = StageState::Failed;
                sub.finished_at = Some(at);
                sub.last_error = Some(reason.clone());
                EventKind::Failed { reason }
            }
        };
        self.log(at, unit, kind, events);
        let row = &self.items[unit.item].stages[unit.stage];
        match fan_in(row.subtasks.iter().map(|s| (s.name.as_str(), s.state))) {
            FanIn::Waiting => {}
            FanIn::Completed => {
                let output = row
                    .subtasks
                    .iter()
                    .map(|s| (s.name.clone(), s.output.clone().unwrap_or(Value::Null)))
                    .collect();
                self.complete_stage(unit, Some(Value::Object(output)), &c.dependents, at, events);
            }
            FanIn::Failed(failed) => {
                self.fail_stage(unit, FanIn::failure_reason(&failed), at, events)
            }
        }
    }
}

impl Data {
    /// Every stage awaiting review: (item id, stage name, review), from the index.
    fn reviews_waiting(&self) -> impl Iterator<Item = (&str, &str, &ReviewStatus)> {
        self.by_state.iter().flat_map(move |(stage, states)| {
            states
                .get(&StageState::AwaitingReview)
                .into_iter()
                .flatten()
                .filter_map(move |&item| {
                    let row = &self.items[item];
                    let review = row.stages[row.stage_position(stage)?].review.as_ref()?;
                    Some((row.id.as_str(), stage.as_str(), review))
                })
        })
    }
}

/// The (state -> items) index of `stage`, created on first use.
fn state_index<'a>(
    index: &'a mut FastMap<String, FastMap<StageState, FastSet<usize>>>,
    stage: &str,
) -> &'a mut FastMap<StageState, FastSet<usize>> {
    if !index.contains_key(stage) {
        index.insert(stage.to_owned(), FastMap::default());
    }
    index.get_mut(stage).expect("inserted above")
}

#[async_trait]
impl Store for MemoryStore {
    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.lock().feed.subscribe()
    }

    async fn register_pipeline(&self, definition: &PipelineDef) -> Result<PipelineDrift> {
        let mut data = self.lock();
        let drift = data
            .pipeline
            .as_ref()
            .map(|stored| PipelineDrift::between(stored, definition))
            .unwrap_or_default();
        data.pipeline = Some(definition.clone());
        Ok(drift)
    }

    async fn submit(&self, items: Vec<NewItem>) -> Result<Vec<Event>> {
        let mut data = self.lock();
        let mut events = Vec::with_capacity(items.len());
        // Check every payload first: a batch is stored whole or not at all.
        for item in &items {
            check_json(&item.payload, &format!("the payload of item `{}`", item.id))?;
        }
        for item in items {
            data.insert_item(item, &mut events);
        }
        data.publish(&events);
        Ok(events)
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
        let mut batch = ClaimBatch::default();
        while batch.claims.len() < request.limit {
            let Some(unit) = data.ready.pop_front() else {
                break;
            };
            if let Some(claim) = data.claim_one(unit, &request, &mut batch.events) {
                batch.claims.push(claim);
            }
        }
        data.publish(&batch.events);
        Ok(batch)
    }

    async fn commit(&self, commit: Commit) -> Result<Vec<Event>> {
        let mut data = self.lock();
        let unit = data.held_unit(&commit)?;
        let mut events = Vec::new();
        match unit.subtask {
            None => data.commit_stage(unit, commit, &mut events),
            Some(_) => data.commit_subtask(unit, commit, &mut events),
        }
        data.publish(&events);
        Ok(events)
    }

    async fn decide(&self, d: DecisionCommit) -> Result<Vec<Event>> {
        let mut data = self.lock();
        let (item, stage) = data.locate(&d.item_id, &d.stage)?;
        let row = &mut data.items[item].stages[stage];
        let review = match (&mut row.review, row.unit.state) {
            (Some(review), StageState::AwaitingReview) => review,
            _ => {
                return Err(Error::NotAwaitingReview {
                    item: d.item_id,
                    stage: d.stage,
                    state: row.unit.state,
                });
            }
        };
        if let Some(answered) = d.decision.round.filter(|&r| r != review.round) {
            return Err(Error::StaleDecision {
                item: d.item_id,
                stage: d.stage,
                answered,
                current: review.round,
            });
        }
        let (kind, reason, edits) = match d.verdict {
            Verdict::Approve => (DecisionKind::Approved, None, None),
            Verdict::ApproveWithEdits(v) => (DecisionKind::ApprovedWithEdits, None, Some(v)),
            Verdict::Reject { reason } => (DecisionKind::Rejected, Some(reason), None),
        };
        let proposed = review.request.proposed_output.clone();
        review.decision = Some(DecisionRecord {
            kind,
            by: d.decision.by.clone(),
            at: d.at,
            note: d.decision.note,
            reason: reason.clone(),
            edits: edits.clone(),
        });
        let unit = Unit {
            item,
            stage,
            subtask: None,
        };
        let mut events = Vec::new();
        let by = d.decision.by;
        data.log(
            d.at,
            unit,
            EventKind::ReviewDecided {
                decision: kind,
                by: by.clone(),
            },
            &mut events,
        );
        match reason {
            Some(reason) => data.fail_stage(
                unit,
                format!("rejected by {by}: {reason}"),
                d.at,
                &mut events,
            ),
            None => data.complete_stage(unit, edits.or(proposed), &d.dependents, d.at, &mut events),
        }
        data.publish(&events);
        Ok(events)
    }

    async fn retry(&self, item_id: &str, stage: &str, at: DateTime<Utc>) -> Result<Vec<Event>> {
        let mut data = self.lock();
        let (item, stage) = data.locate(item_id, stage)?;
        if data.items[item].cancelled {
            return Err(Error::ItemCancelled(item_id.to_owned()));
        }
        let row = &mut data.items[item].stages[stage];
        let row_state = row.unit.state;
        if row_state != StageState::Failed {
            return Err(Error::NotRetryable {
                item: item_id.to_owned(),
                stage: row.unit.name.clone(),
                state: row_state,
            });
        }
        row.unit.attempt = 0;
        row.unit.finished_at = None;
        let unit = Unit {
            item,
            stage,
            subtask: None,
        };
        let mut requeue = Vec::new();
        for (i, sub) in row.subtasks.iter_mut().enumerate() {
            if sub.state == StageState::Failed {
                sub.state = StageState::Pending;
                sub.attempt = 0;
                sub.finished_at = None;
                requeue.push(Unit {
                    subtask: Some(i),
                    ..unit
                });
            }
        }
        let new_state = if requeue.is_empty() {
            requeue.push(unit);
            StageState::Pending
        } else {
            StageState::Running
        };
        data.set_stage_state(item, stage, new_state);
        data.ready.extend(requeue);
        let mut events = Vec::new();
        data.log(at, unit, EventKind::RetryRequested, &mut events);
        data.publish(&events);
        Ok(events)
    }

    async fn renew(
        &self,
        claims: &[(TaskKey, u64)],
        _until: DateTime<Utc>,
    ) -> Result<Vec<TaskKey>> {
        let data = self.lock();
        let held = |key: &TaskKey, generation: u64| -> Option<bool> {
            let (item, stage) = data.locate(&key.item_id, &key.stage).ok()?;
            let row = &data.items[item].stages[stage];
            let unit = match &key.subtask {
                None => &row.unit,
                Some(name) => row.subtasks.iter().find(|s| &s.name == name)?,
            };
            Some(unit.held_by(generation))
        };
        Ok(claims
            .iter()
            .filter(|(key, generation)| held(key, *generation) != Some(true))
            .map(|(key, _)| key.clone())
            .collect())
    }

    async fn cancel(&self, item_id: &str, at: DateTime<Utc>) -> Result<(Vec<TaskKey>, Vec<Event>)> {
        let mut data = self.lock();
        let item = data.position(item_id)?;
        if data.items[item].cancelled {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut running = Vec::new();
        for stage in 0..data.items[item].stages.len() {
            let unit = Unit {
                item,
                stage,
                subtask: None,
            };
            let row = &data.items[item].stages[stage];
            if row.unit.state == StageState::Running && row.subtasks.is_empty() {
                running.push(data.key(unit));
            }
            for (i, sub) in row.subtasks.iter().enumerate() {
                if sub.state == StageState::Running {
                    running.push(data.key(Unit {
                        subtask: Some(i),
                        ..unit
                    }));
                }
            }
            if row.unit.state.is_terminal() {
                continue;
            }
            data.set_stage_state(item, stage, StageState::Cancelled);
            let row = &mut data.items[item].stages[stage];
            row.unit.generation += 1;
            row.unit.finished_at = Some(at);
            for sub in row.subtasks.iter_mut().filter(|s| !s.state.is_terminal()) {
                sub.state = StageState::Cancelled;
                sub.generation += 1;
            }
        }
        data.items[item].cancelled = true;
        let mut events = Vec::new();
        data.log_item(at, item, EventKind::ItemCancelled, &mut events);
        data.publish(&events);
        Ok((running, events))
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(self.lock().scheduled.first().map(|(at, _)| *at))
    }

    async fn next_review_deadline(&self) -> Result<Option<DateTime<Utc>>> {
        let data = self.lock();
        Ok(data
            .reviews_waiting()
            .filter_map(|(_, _, review)| Some(review.request.deadline.as_ref()?.at))
            .min())
    }

    async fn due_reviews(&self, now: DateTime<Utc>) -> Result<Vec<AwaitingReview>> {
        let data = self.lock();
        let mut due: Vec<AwaitingReview> = data
            .reviews_waiting()
            .filter(|(_, _, review)| {
                review
                    .request
                    .deadline
                    .as_ref()
                    .is_some_and(|d| d.at <= now)
            })
            .map(|(item_id, stage, review)| AwaitingReview {
                item_id: item_id.to_owned(),
                stage: stage.to_owned(),
                review: review.clone(),
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
        Ok(self.lock().pipeline.clone())
    }

    async fn stage_counts(&self) -> Result<Vec<StageCount>> {
        let data = self.lock();
        let mut counts: Vec<StageCount> =
            data.by_state
                .iter()
                .flat_map(|(stage, states)| {
                    states.iter().filter(|(_, items)| !items.is_empty()).map(
                        move |(state, items)| StageCount {
                            stage: stage.clone(),
                            state: *state,
                            items: items.len() as u64,
                        },
                    )
                })
                .collect();
        counts.sort_by(|a, b| (&a.stage, a.state).cmp(&(&b.stage, b.state)));
        Ok(counts)
    }

    async fn status(&self, item_id: &str) -> Result<ItemStatus> {
        let data = self.lock();
        let item = &data.items[data.position(item_id)?];
        let stages: Vec<StageStatus> = (0..item.stages.len()).map(|i| item.status_of(i)).collect();
        Ok(ItemStatus {
            item_id: item.id.clone(),
            state: ItemState::derive(item.cancelled, &stages),
            submitted_at: item.submitted_at,
            stages,
        })
    }

    async fn items_in(&self, stage: &str, state: StageState) -> Result<Vec<String>> {
        let data = self.lock();
        Ok(data
            .by_state
            .get(stage)
            .and_then(|states| states.get(&state))
            .map(|items| {
                // The index is unordered; positions are submission order.
                let mut positions: Vec<usize> = items.iter().copied().collect();
                positions.sort_unstable();
                positions
                    .into_iter()
                    .map(|i| data.items[i].id.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn awaiting_review(&self) -> Result<Vec<AwaitingReview>> {
        let data = self.lock();
        let mut waiting: Vec<AwaitingReview> = data
            .reviews_waiting()
            .map(|(item_id, stage, review)| AwaitingReview {
                item_id: item_id.to_owned(),
                stage: stage.to_owned(),
                review: review.clone(),
            })
            .collect();
        waiting.sort_by(|a, b| {
            (a.review.requested_at, &a.item_id, &a.stage).cmp(&(
                b.review.requested_at,
                &b.item_id,
                &b.stage,
            ))
        });
        Ok(waiting)
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>> {
        let data = self.lock();
        let item = match &query.item_id {
            None => None,
            Some(id) => match data.ids.get(id) {
                Some(&item) => Some(item),
                None => return Ok(Vec::new()),
            },
        };
        let start =
            usize::try_from(query.after).map_or(data.events.len(), |a| a.min(data.events.len()));
        Ok(data.events[start..]
            .iter()
            .enumerate()
            .filter(|(_, e)| item.is_none_or(|item| e.item == item))
            .take(query.limit.unwrap_or(usize::MAX))
            .map(|(offset, e)| data.resolve(start + offset, e))
            .collect())
    }
}
