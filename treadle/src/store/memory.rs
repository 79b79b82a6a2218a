//! A store that keeps everything in memory: fast, shared between the tasks of
//! one process, and gone when the process ends. Good for tests and for work
//! that need not survive a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::broadcast;

use super::{
    Claim, ClaimBatch, ClaimRequest, Commit, DecisionCommit, EVENT_FEED_CAPACITY, EventQuery,
    FanIn, NewItem, PipelineDrift, StageCount, Store, SubtaskTransition, TaskKey, Transition,
    Verdict, fan_in,
};
use crate::error::{Error, Result};
use crate::event::{Event, EventKind};
use crate::pipeline::PipelineDef;
use crate::review::{DecisionRecord, ReviewStatus};
use crate::state::{DecisionKind, ItemState, StageState};
use crate::status::{AttemptRecord, AwaitingReview, ItemStatus, StageStatus, SubtaskStatus};

/// An in-memory [`Store`]. Cheap to clone: clones share the same data.
///
/// Runnable work is kept in a queue and indexes are maintained on every
/// transition, so claims and `items_in` never scan all items. Leases are not
/// enforced across processes (there is only one); claims are still fenced by
/// generation, so cancelled or superseded work cannot write.
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
                items: HashMap::new(),
                order: Vec::new(),
                ready: VecDeque::new(),
                scheduled: BTreeSet::new(),
                by_state: HashMap::new(),
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
        // A panic while the lock was held cannot leave a half-applied
        // transition: every transition validates before it mutates.
        self.data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug)]
struct Data {
    feed: broadcast::Sender<Event>,
    pipeline: Option<PipelineDef>,
    items: HashMap<String, ItemRow>,
    /// Item ids by submission sequence.
    order: Vec<String>,
    /// Units of work that may be claimable now, oldest first.
    ready: VecDeque<TaskKey>,
    /// Scheduled retries by due time.
    scheduled: BTreeSet<(DateTime<Utc>, TaskKey)>,
    /// Item sequence numbers by (stage, state).
    by_state: HashMap<(String, StageState), BTreeSet<usize>>,
    events: Vec<Event>,
}

#[derive(Debug)]
struct ItemRow {
    seq: usize,
    payload: Arc<Value>,
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
}

impl ItemRow {
    fn stage_index(&self, item_id: &str, stage: &str) -> Result<usize> {
        self.stages
            .iter()
            .position(|s| s.unit.name == stage)
            .ok_or_else(|| Error::UnknownStage {
                item: item_id.to_owned(),
                stage: stage.to_owned(),
            })
    }

    fn outputs(&self) -> BTreeMap<String, Value> {
        self.stages
            .iter()
            .filter(|s| s.unit.state == StageState::Completed)
            .filter_map(|s| Some((s.unit.name.clone(), s.unit.output.clone()?)))
            .collect()
    }
}

impl Data {
    fn item(&self, id: &str) -> Result<&ItemRow> {
        self.items
            .get(id)
            .ok_or_else(|| Error::UnknownItem(id.to_owned()))
    }

    fn item_mut(&mut self, id: &str) -> Result<&mut ItemRow> {
        self.items
            .get_mut(id)
            .ok_or_else(|| Error::UnknownItem(id.to_owned()))
    }

    /// Appends an event about a stage (or, unless `stage_level`, its subtask).
    fn push_event(
        &mut self,
        at: DateTime<Utc>,
        key: &TaskKey,
        stage_level: bool,
        kind: EventKind,
    ) -> Event {
        let subtask = if stage_level {
            None
        } else {
            key.subtask.clone()
        };
        self.append(at, &key.item_id, Some(key.stage.clone()), subtask, kind)
    }

    /// Appends an event about a whole item.
    fn item_event(&mut self, at: DateTime<Utc>, item_id: &str, kind: EventKind) -> Event {
        self.append(at, item_id, None, None, kind)
    }

    fn append(
        &mut self,
        at: DateTime<Utc>,
        item_id: &str,
        stage: Option<String>,
        subtask: Option<String>,
        kind: EventKind,
    ) -> Event {
        let event = Event {
            seq: self.events.len() as u64 + 1,
            at,
            item_id: item_id.to_owned(),
            stage,
            subtask,
            kind,
        };
        self.events.push(event.clone());
        event
    }

    /// Sends committed events to live subscribers, in log order.
    fn publish(&self, events: &[Event]) {
        for event in events {
            // No subscribers is not an error: the log keeps every event.
            let _ = self.feed.send(event.clone());
        }
    }

    /// Changes a stage's state and keeps the (stage, state) index in step.
    fn set_stage_state(&mut self, item_id: &str, stage: usize, state: StageState) {
        let item = self
            .items
            .get_mut(item_id)
            .expect("callers resolved the item");
        let unit = &mut item.stages[stage].unit;
        let old = std::mem::replace(&mut unit.state, state);
        if old == state {
            return;
        }
        let seq = item.seq;
        if let Some(set) = self.by_state.get_mut(&(unit.name.clone(), old)) {
            set.remove(&seq);
        }
        self.by_state
            .entry((unit.name.clone(), state))
            .or_default()
            .insert(seq);
    }

    /// Marks stage `stage` of the item completed or skipped: unblocks its
    /// dependents, and records `ItemCompleted` after the last stage.
    fn finish_stage(
        &mut self,
        key: &TaskKey,
        stage: usize,
        state: StageState,
        dependents: &[String],
        at: DateTime<Utc>,
        events: &mut Vec<Event>,
    ) {
        self.set_stage_state(&key.item_id, stage, state);
        let item = self.items.get_mut(&key.item_id).expect("resolved");
        item.stages[stage].unit.finished_at = Some(at);
        item.unfinished -= 1;
        let all_done = item.unfinished == 0;
        for dependent in dependents {
            if let Some(row) = item.stages.iter_mut().find(|s| &s.unit.name == dependent) {
                row.waiting = row.waiting.saturating_sub(1);
                if row.waiting == 0 && row.unit.state == StageState::Pending {
                    self.ready
                        .push_back(TaskKey::stage(key.item_id.clone(), dependent.clone()));
                }
            }
        }
        if all_done {
            events.push(self.item_event(at, &key.item_id, EventKind::ItemCompleted));
        }
    }

    fn fail_stage(
        &mut self,
        key: &TaskKey,
        stage: usize,
        reason: String,
        at: DateTime<Utc>,
        events: &mut Vec<Event>,
    ) {
        self.set_stage_state(&key.item_id, stage, StageState::Failed);
        let unit = &mut self.items.get_mut(&key.item_id).expect("resolved").stages[stage].unit;
        unit.finished_at = Some(at);
        unit.last_error = Some(reason.clone());
        events.push(self.push_event(at, key, true, EventKind::Failed { reason }));
    }

    /// Stores one new item; `None` if its id is already known.
    fn insert_item(&mut self, item: NewItem) -> Option<Event> {
        if self.items.contains_key(&item.id) {
            return None;
        }
        let seq = self.order.len();
        for seed in &item.stages {
            self.by_state
                .entry((seed.name.clone(), StageState::Pending))
                .or_default()
                .insert(seq);
            if seed.upstream == 0 {
                self.ready
                    .push_back(TaskKey::stage(item.id.clone(), seed.name.clone()));
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
        self.order.push(item.id.clone());
        let row = ItemRow {
            seq,
            payload: Arc::new(item.payload),
            submitted_at: item.at,
            cancelled: false,
            unfinished: stages.len(),
            stages,
        };
        self.items.insert(item.id.clone(), row);
        Some(self.item_event(item.at, &item.id, EventKind::ItemSubmitted))
    }

    fn claim_one(&mut self, key: TaskKey, request: &ClaimRequest) -> Option<(Claim, Event)> {
        let item = self.items.get_mut(&key.item_id)?;
        if item.cancelled {
            return None;
        }
        let stage = item.stages.iter().position(|s| s.unit.name == key.stage)?;
        let row = &mut item.stages[stage];
        let unit = match &key.subtask {
            None if row.waiting == 0 => &mut row.unit,
            None => return None,
            Some(name) => row.subtasks.iter_mut().find(|s| &s.name == name)?,
        };
        let runnable = match unit.state {
            StageState::Pending => true,
            StageState::RetryScheduled => unit.next_run_at.is_none_or(|at| at <= request.now),
            _ => false,
        };
        if !runnable {
            return None;
        }
        unit.attempt += 1;
        unit.generation += 1;
        unit.started_at = Some(request.now);
        unit.next_run_at = None;
        let (attempt, generation) = (unit.attempt, unit.generation);
        if key.subtask.is_some() {
            unit.state = StageState::Running;
        }
        let claim = Claim {
            task: key.clone(),
            attempt,
            generation,
            started_at: request.now,
            payload: item.payload.clone(),
            outputs: item.outputs(),
        };
        if key.subtask.is_none() {
            self.set_stage_state(&key.item_id, stage, StageState::Running);
        }
        let event = self.push_event(
            request.now,
            &key,
            false,
            EventKind::Started {
                attempt,
                owner: request.owner.clone(),
            },
        );
        Some((claim, event))
    }

    fn commit_stage(&mut self, c: Commit, stage: usize, events: &mut Vec<Event>) -> Result<()> {
        let key = &c.task;
        let at = c.attempt.finished_at;
        let item = self.item_mut(&key.item_id)?;
        let row = &mut item.stages[stage];
        if row.unit.state != StageState::Running || row.unit.generation != c.generation {
            return Err(Error::LeaseLost {
                task: key.clone(),
                generation: c.generation,
            });
        }
        record_attempt(&mut row.unit, &c.attempt);
        let finished = attempt_event(&c.attempt);
        events.push(self.push_event(at, key, true, finished));
        match c.transition {
            Transition::Complete { output } => {
                self.item_mut(&key.item_id)?.stages[stage].unit.output = output;
                events.push(self.push_event(at, key, true, EventKind::Completed));
                self.finish_stage(key, stage, StageState::Completed, &c.dependents, at, events);
            }
            Transition::Skip { reason } => {
                events.push(self.push_event(at, key, true, EventKind::Skipped { reason }));
                self.finish_stage(key, stage, StageState::Skipped, &c.dependents, at, events);
            }
            Transition::AwaitReview(request) => {
                let row = &mut self.item_mut(&key.item_id)?.stages[stage];
                let round = row.review.as_ref().map_or(1, |r| r.round + 1);
                let summary = request.summary.clone();
                row.review = Some(ReviewStatus {
                    round,
                    request,
                    requested_at: at,
                    decision: None,
                });
                row.unit.finished_at = Some(at);
                self.set_stage_state(&key.item_id, stage, StageState::AwaitingReview);
                events.push(self.push_event(at, key, true, EventKind::ReviewRequested { summary }));
            }
            Transition::RetryAt { at: due } => {
                let unit = &mut self.item_mut(&key.item_id)?.stages[stage].unit;
                unit.next_run_at = Some(due);
                unit.last_error = c.attempt.error.clone();
                self.set_stage_state(&key.item_id, stage, StageState::RetryScheduled);
                self.scheduled.insert((due, key.clone()));
                events.push(self.push_event(at, key, true, EventKind::RetryScheduled { at: due }));
            }
            Transition::Fail { reason } => self.fail_stage(key, stage, reason, at, events),
            Transition::FanOut { subtasks } => {
                let row = &mut self.item_mut(&key.item_id)?.stages[stage];
                row.subtasks = subtasks.iter().cloned().map(UnitRow::new).collect();
                events.push(self.push_event(
                    at,
                    key,
                    true,
                    EventKind::FannedOut {
                        subtasks: subtasks.clone(),
                    },
                ));
                if subtasks.is_empty() {
                    self.item_mut(&key.item_id)?.stages[stage].unit.output =
                        Some(Value::Object(Default::default()));
                    events.push(self.push_event(at, key, true, EventKind::Completed));
                    self.finish_stage(key, stage, StageState::Completed, &c.dependents, at, events);
                }
                for name in subtasks {
                    self.ready.push_back(TaskKey {
                        subtask: Some(name),
                        ..key.clone()
                    });
                }
            }
        }
        Ok(())
    }

    fn commit_subtask(
        &mut self,
        c: Commit,
        stage: usize,
        name: &str,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let key = &c.task;
        let at = c.attempt.finished_at;
        let row = &mut self.item_mut(&key.item_id)?.stages[stage];
        let lease_lost = || Error::LeaseLost {
            task: key.clone(),
            generation: c.generation,
        };
        let sub = row
            .subtasks
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(lease_lost)?;
        if sub.state != StageState::Running || sub.generation != c.generation {
            return Err(lease_lost());
        }
        record_attempt(sub, &c.attempt);
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
                sub.next_run_at = Some(due);
                sub.last_error = c.attempt.error.clone();
                self.scheduled.insert((due, key.clone()));
                EventKind::RetryScheduled { at: due }
            }
            SubtaskTransition::Fail { reason } => {
                sub.state = StageState::Failed;
                sub.finished_at = Some(at);
                sub.last_error = Some(reason.clone());
                EventKind::Failed { reason }
            }
        };
        let finished = attempt_event(&c.attempt);
        events.push(self.push_event(at, key, false, finished));
        events.push(self.push_event(at, key, false, kind));
        let row = &self.item(&key.item_id)?.stages[stage];
        match fan_in(row.subtasks.iter().map(|s| (s.name.as_str(), s.state))) {
            FanIn::Waiting => {}
            FanIn::Completed => {
                let output = row
                    .subtasks
                    .iter()
                    .map(|s| (s.name.clone(), s.output.clone().unwrap_or(Value::Null)))
                    .collect();
                self.item_mut(&key.item_id)?.stages[stage].unit.output =
                    Some(Value::Object(output));
                events.push(self.push_event(at, key, true, EventKind::Completed));
                self.finish_stage(key, stage, StageState::Completed, &c.dependents, at, events);
            }
            FanIn::Failed(failed) => {
                self.fail_stage(key, stage, FanIn::failure_reason(&failed), at, events)
            }
        }
        Ok(())
    }
}

fn record_attempt(unit: &mut UnitRow, attempt: &AttemptRecord) {
    unit.attempts.push(attempt.clone());
    if attempt.result.is_failure() {
        unit.last_error = attempt.error.clone();
    }
}

fn attempt_event(attempt: &AttemptRecord) -> EventKind {
    EventKind::AttemptFinished {
        attempt: attempt.attempt,
        result: attempt.result,
        error: attempt.error.clone(),
    }
}

fn unit_fields(unit: &UnitRow) -> (StageState, u32, Option<String>, Option<Value>) {
    (
        unit.state,
        unit.attempt,
        unit.last_error.clone(),
        unit.output.clone(),
    )
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
        for item in items {
            if let Some(event) = data.insert_item(item) {
                events.push(event);
            }
        }
        data.publish(&events);
        Ok(events)
    }

    async fn claim(&self, request: ClaimRequest) -> Result<ClaimBatch> {
        let mut data = self.lock();
        while let Some(first) = data.scheduled.first() {
            if first.0 > request.now {
                break;
            }
            let (_, key) = data.scheduled.pop_first().expect("just looked");
            data.ready.push_back(key);
        }
        let mut batch = ClaimBatch::default();
        while batch.claims.len() < request.limit {
            let Some(key) = data.ready.pop_front() else {
                break;
            };
            if let Some((claim, event)) = data.claim_one(key, &request) {
                batch.claims.push(claim);
                batch.events.push(event);
            }
        }
        data.publish(&batch.events);
        Ok(batch)
    }

    async fn commit(&self, commit: Commit) -> Result<Vec<Event>> {
        let mut data = self.lock();
        let item = data.item(&commit.task.item_id)?;
        let stage = item.stage_index(&commit.task.item_id, &commit.task.stage)?;
        let mut events = Vec::new();
        match commit.task.subtask.clone() {
            None => data.commit_stage(commit, stage, &mut events)?,
            Some(name) => data.commit_subtask(commit, stage, &name, &mut events)?,
        }
        data.publish(&events);
        Ok(events)
    }

    async fn decide(&self, d: DecisionCommit) -> Result<Vec<Event>> {
        let mut data = self.lock();
        let item = data.item(&d.item_id)?;
        let stage = item.stage_index(&d.item_id, &d.stage)?;
        let row = &item.stages[stage];
        let current = match (&row.review, row.unit.state) {
            (Some(review), StageState::AwaitingReview) => review.round,
            _ => {
                return Err(Error::NotAwaitingReview {
                    item: d.item_id,
                    stage: d.stage,
                    state: row.unit.state,
                });
            }
        };
        if let Some(answered) = d.decision.round.filter(|&r| r != current) {
            return Err(Error::StaleDecision {
                item: d.item_id,
                stage: d.stage,
                answered,
                current,
            });
        }
        let key = TaskKey::stage(d.item_id.clone(), d.stage.clone());
        let (kind, reason, edits) = match &d.verdict {
            Verdict::Approve => (DecisionKind::Approved, None, None),
            Verdict::ApproveWithEdits(v) => {
                (DecisionKind::ApprovedWithEdits, None, Some(v.clone()))
            }
            Verdict::Reject { reason } => (DecisionKind::Rejected, Some(reason.clone()), None),
        };
        let row = &mut data.item_mut(&d.item_id)?.stages[stage];
        let review = row.review.as_mut().expect("checked above");
        let proposed = review.request.proposed_output.clone();
        review.decision = Some(DecisionRecord {
            kind,
            by: d.decision.by.clone(),
            at: d.at,
            note: d.decision.note.clone(),
            reason: reason.clone(),
            edits: edits.clone(),
        });
        let mut events = vec![data.push_event(
            d.at,
            &key,
            true,
            EventKind::ReviewDecided {
                decision: kind,
                by: d.decision.by.clone(),
            },
        )];
        match reason {
            Some(reason) => {
                let reason = format!("rejected by {}: {reason}", d.decision.by);
                data.fail_stage(&key, stage, reason, d.at, &mut events);
            }
            None => {
                data.item_mut(&d.item_id)?.stages[stage].unit.output = edits.or(proposed);
                events.push(data.push_event(d.at, &key, true, EventKind::Completed));
                data.finish_stage(
                    &key,
                    stage,
                    StageState::Completed,
                    &d.dependents,
                    d.at,
                    &mut events,
                );
            }
        }
        data.publish(&events);
        Ok(events)
    }

    async fn retry(&self, item_id: &str, stage: &str, at: DateTime<Utc>) -> Result<Vec<Event>> {
        let mut data = self.lock();
        let item = data.item(item_id)?;
        let index = item.stage_index(item_id, stage)?;
        if item.cancelled {
            return Err(Error::ItemCancelled(item_id.to_owned()));
        }
        let state = item.stages[index].unit.state;
        if state != StageState::Failed {
            return Err(Error::NotRetryable {
                item: item_id.to_owned(),
                stage: stage.to_owned(),
                state,
            });
        }
        let key = TaskKey::stage(item_id, stage);
        let row = &mut data.item_mut(item_id)?.stages[index];
        row.unit.attempt = 0;
        row.unit.finished_at = None;
        let mut requeue = Vec::new();
        for sub in row
            .subtasks
            .iter_mut()
            .filter(|s| s.state == StageState::Failed)
        {
            sub.state = StageState::Pending;
            sub.attempt = 0;
            sub.finished_at = None;
            requeue.push(TaskKey {
                subtask: Some(sub.name.clone()),
                ..key.clone()
            });
        }
        let new_state = if requeue.is_empty() {
            requeue.push(key.clone());
            StageState::Pending
        } else {
            StageState::Running
        };
        data.set_stage_state(item_id, index, new_state);
        data.ready.extend(requeue);
        let events = vec![data.push_event(at, &key, true, EventKind::RetryRequested)];
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
            let item = data.items.get(&key.item_id)?;
            let row = item.stages.iter().find(|s| s.unit.name == key.stage)?;
            let unit = match &key.subtask {
                None => &row.unit,
                Some(name) => row.subtasks.iter().find(|s| &s.name == name)?,
            };
            Some(unit.state == StageState::Running && unit.generation == generation)
        };
        Ok(claims
            .iter()
            .filter(|(key, generation)| held(key, *generation) != Some(true))
            .map(|(key, _)| key.clone())
            .collect())
    }

    async fn cancel(&self, item_id: &str, at: DateTime<Utc>) -> Result<(Vec<TaskKey>, Vec<Event>)> {
        let mut data = self.lock();
        let item = data.item(item_id)?;
        if item.cancelled {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut running = Vec::new();
        let mut to_cancel = Vec::new();
        for (index, row) in item.stages.iter().enumerate() {
            if !row.unit.state.is_terminal() {
                to_cancel.push(index);
            }
            if row.unit.state == StageState::Running && row.subtasks.is_empty() {
                running.push(TaskKey::stage(item_id, row.unit.name.clone()));
            }
            for sub in row
                .subtasks
                .iter()
                .filter(|s| s.state == StageState::Running)
            {
                running.push(TaskKey {
                    item_id: item_id.to_owned(),
                    stage: row.unit.name.clone(),
                    subtask: Some(sub.name.clone()),
                });
            }
        }
        for index in to_cancel {
            data.set_stage_state(item_id, index, StageState::Cancelled);
            let row = &mut data.item_mut(item_id)?.stages[index];
            row.unit.generation += 1;
            row.unit.finished_at = Some(at);
            for sub in row.subtasks.iter_mut().filter(|s| !s.state.is_terminal()) {
                sub.state = StageState::Cancelled;
                sub.generation += 1;
            }
        }
        data.item_mut(item_id)?.cancelled = true;
        let events = vec![data.item_event(at, item_id, EventKind::ItemCancelled)];
        data.publish(&events);
        Ok((running, events))
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(self.lock().scheduled.first().map(|(at, _)| *at))
    }

    async fn pipeline_definition(&self) -> Result<Option<PipelineDef>> {
        Ok(self.lock().pipeline.clone())
    }

    async fn stage_counts(&self) -> Result<Vec<StageCount>> {
        let data = self.lock();
        let mut counts: Vec<StageCount> = data
            .by_state
            .iter()
            .filter(|(_, items)| !items.is_empty())
            .map(|((stage, state), items)| StageCount {
                stage: stage.clone(),
                state: *state,
                items: items.len() as u64,
            })
            .collect();
        counts.sort_by(|a, b| (&a.stage, a.state).cmp(&(&b.stage, b.state)));
        Ok(counts)
    }

    async fn status(&self, item_id: &str) -> Result<ItemStatus> {
        let data = self.lock();
        let item = data.item(item_id)?;
        let stages: Vec<StageStatus> = item
            .stages
            .iter()
            .map(|row| {
                let (state, attempt, last_error, output) = unit_fields(&row.unit);
                StageStatus {
                    name: row.unit.name.clone(),
                    state,
                    attempt,
                    started_at: row.unit.started_at,
                    finished_at: row.unit.finished_at,
                    next_run_at: row.unit.next_run_at,
                    last_error,
                    output,
                    attempts: row.unit.attempts.clone(),
                    subtasks: row
                        .subtasks
                        .iter()
                        .map(|sub| {
                            let (state, attempt, last_error, output) = unit_fields(sub);
                            SubtaskStatus {
                                name: sub.name.clone(),
                                state,
                                attempt,
                                next_run_at: sub.next_run_at,
                                last_error,
                                output,
                                attempts: sub.attempts.clone(),
                            }
                        })
                        .collect(),
                    review: row.review.clone(),
                }
            })
            .collect();
        Ok(ItemStatus {
            item_id: item_id.to_owned(),
            state: ItemState::derive(item.cancelled, stages.iter().map(|s| s.state)),
            submitted_at: item.submitted_at,
            stages,
        })
    }

    async fn items_in(&self, stage: &str, state: StageState) -> Result<Vec<String>> {
        let data = self.lock();
        Ok(data
            .by_state
            .get(&(stage.to_owned(), state))
            .map(|seqs| seqs.iter().map(|&seq| data.order[seq].clone()).collect())
            .unwrap_or_default())
    }

    async fn awaiting_review(&self) -> Result<Vec<AwaitingReview>> {
        let guard = self.lock();
        let data = &*guard;
        let mut waiting: Vec<AwaitingReview> = data
            .by_state
            .iter()
            .filter(|((_, state), _)| *state == StageState::AwaitingReview)
            .flat_map(|((stage, _), seqs)| {
                seqs.iter().filter_map(move |&seq| {
                    let item_id = &data.order[seq];
                    let row = data.items[item_id]
                        .stages
                        .iter()
                        .find(|s| &s.unit.name == stage)?;
                    Some(AwaitingReview {
                        item_id: item_id.clone(),
                        stage: stage.clone(),
                        review: row.review.clone()?,
                    })
                })
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
        let start = (query.after as usize).min(data.events.len());
        Ok(data.events[start..]
            .iter()
            .filter(|e| query.item_id.as_ref().is_none_or(|id| &e.item_id == id))
            .take(query.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect())
    }
}
