//! A store that keeps everything in memory: fast, shared between the tasks of
//! one process, and gone when the process ends. Good for tests and for work
//! that need not survive a restart.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, BuildHasherDefault};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use super::{
    ClaimBatch, ClaimRequest, Commit, DecisionCommit, EventQuery, MigrateOutcome, NewItem,
    PipelineDrift, Pruned, StageCount, Store, TaskKey, check_payload,
};
use crate::definition::{PipelineChanges, PipelineDef, VersionInFlight};
use crate::error::Result;
use crate::event::Event;
use crate::fast_hash::FastHasher;
use crate::rules::{self, AllLoaded, Effects, ItemRecord, VersionGraph};
use crate::state::StageState;
use crate::status::{AwaitingReview, ItemStatus};

mod ids;
mod lane;
mod log;
use lane::{Lane, SharedLog, lock};

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
///
/// A store made by [`MemoryStore::with_lanes`] splits its items into lanes
/// by a hash of their id, each behind its own lock; an engine runs one
/// claim loop per lane, so on a multi-thread runtime the lanes run in
/// parallel. The event log stays one log, in one sequence, for all lanes.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

/// The lanes and the log they share.
#[derive(Debug)]
struct Shared {
    lanes: Box<[Mutex<Lane>]>,
    log: Arc<SharedLog>,
    /// The lane the next prune call starts in.
    prune_lane: Mutex<usize>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_lanes(1)
    }
}

/// Every lane, locked in lane order (the one order any code locks them in).
type AllLanes<'a> = Vec<MutexGuard<'a, Lane>>;

impl MemoryStore {
    /// An empty store with one lane.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose items are split into `lanes` lanes (at least
    /// one), worked in parallel by an engine on a multi-thread runtime:
    /// one lane per core the engine may use is the usual choice. Work is
    /// claimed in the order it became runnable within a lane; across lanes
    /// there is no such order.
    pub fn with_lanes(lanes: usize) -> Self {
        let lanes = lanes.max(1);
        let log = Arc::new(SharedLog::default());
        MemoryStore {
            shared: Arc::new(Shared {
                lanes: (0..lanes)
                    .map(|i| Mutex::new(Lane::new(i, lanes, log.clone())))
                    .collect(),
                log,
                prune_lane: Mutex::new(0),
            }),
        }
    }

    /// The lane that holds item `item_id`.
    fn lane_of(&self, item_id: &str) -> usize {
        let lanes = self.shared.lanes.len();
        if lanes == 1 {
            return 0;
        }
        // The high half of the hash: the id index's hash table places
        // entries by the low bits, which must not all agree in one lane.
        let hash = BuildHasherDefault::<FastHasher>::default().hash_one(item_id);
        ((hash >> 32) % lanes as u64) as usize
    }

    /// The lane that holds item `item_id`, locked.
    fn lane_for(&self, item_id: &str) -> MutexGuard<'_, Lane> {
        lock(&self.shared.lanes[self.lane_of(item_id)])
    }

    fn lock_all(&self) -> AllLanes<'_> {
        self.shared.lanes.iter().map(lock).collect()
    }

    /// Every lane, locked, each having handed the events it held to the
    /// log: what a reader of the log starts from.
    fn lock_all_logged(&self) -> AllLanes<'_> {
        let mut lanes = self.lock_all();
        for lane in &mut lanes {
            lane.log_pending();
        }
        lanes
    }

    /// Commits the end of an attempt ([`Store::commit`]) in its lane.
    fn commit_in(lane: &mut Lane, commit: Commit) -> Result<()> {
        let item = lane.position(&commit.task.item_id)?;
        lane.transition(item, |graph, record, fx| {
            rules::commit(graph, record, commit, &mut AllLoaded, fx)
        })
    }

    /// Runs `rule` on item `item_id` in its lane; returns its answer and
    /// the events it appended.
    fn transition<R>(
        &self,
        item_id: &str,
        rule: impl FnOnce(&VersionGraph, &mut ItemRecord, &mut Effects) -> Result<R>,
    ) -> Result<(R, Vec<Event>)> {
        let mut lane = self.lane_for(item_id);
        let item = lane.position(item_id)?;
        lane.transition_with_events(item, rule)
    }
}

/// How version `version` stands: its changes from `previous`, and the
/// unfinished items of other versions, over every lane.
fn drift(
    lanes: &AllLanes<'_>,
    version: u32,
    previous: Option<&PipelineDef>,
) -> Result<PipelineDrift> {
    let current = lanes[0].graph(version)?;
    let mut in_flight: Vec<VersionInFlight> = Vec::new();
    for stored in lanes.iter().flat_map(|lane| lane.unfinished()) {
        let old = stored.record.version;
        if old == version {
            continue;
        }
        match in_flight.iter_mut().find(|v| v.version == old) {
            Some(entry) => entry.items += 1,
            None => in_flight.push(VersionInFlight {
                version: old,
                items: 1,
                changes: PipelineChanges::between(
                    lanes[0].graph(old)?.definition(),
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

/// How many items one memory store holds at most (items are numbered as
/// `u32` in the event log); far beyond what fits in memory.
const MAX_ITEMS: usize = u32::MAX as usize;

#[async_trait]
impl Store for MemoryStore {
    fn subscribe(&self) -> broadcast::Receiver<Event> {
        // Every event logged before this is not sent to it; every one after is.
        let _lanes = self.lock_all_logged();
        let receiver = lock(&self.shared.log.journal).feed.subscribe();
        self.shared.log.listening.store(true, Ordering::Release);
        receiver
    }

    /// A commit only takes its lane's lock.
    fn commits_without_waiting(&self) -> bool {
        true
    }

    fn lanes(&self) -> usize {
        self.shared.lanes.len()
    }

    async fn register_pipeline(&self, definition: &PipelineDef) -> Result<PipelineDrift> {
        let mut lanes = self.lock_all();
        let latest = lanes[0].versions.last().cloned();
        let known = lanes[0]
            .versions
            .iter()
            .find(|v| v.definition() == definition)
            .map(|v| v.version());
        let version = match known {
            Some(version) => version,
            None => {
                let version = lanes[0].versions.len() as u32 + 1;
                // A copy per lane: the lanes' transitions never share a
                // reference count (nor the stage names items copy).
                for lane in &mut lanes {
                    let graph = VersionGraph::new(version, definition.clone());
                    lane.versions.push(Arc::new(graph));
                }
                version
            }
        };
        drift(&lanes, version, latest.as_ref().map(|l| l.definition()))
    }

    async fn pipeline_drift(&self) -> Result<Option<PipelineDrift>> {
        let lanes = self.lock_all();
        let versions = &lanes[0].versions;
        let Some(latest) = versions.last() else {
            return Ok(None);
        };
        let previous = versions.iter().rev().nth(1).map(|v| v.definition());
        drift(&lanes, latest.version(), previous).map(Some)
    }

    async fn submit(&self, items: Vec<NewItem>) -> Result<usize> {
        let mut lanes = self.lock_all();
        // Check every item first: a batch is stored whole or not at all.
        for item in &items {
            check_payload(item)?;
            lanes[0].graph(item.version)?;
        }
        let mut new = 0;
        for item in items {
            let lane = self.lane_of(&item.id);
            new += usize::from(lanes[lane].insert_item(item)?);
        }
        Ok(new)
    }

    /// Claims from the request's lane first, then, while the batch has
    /// room, from the lanes after it in turn: a lane whose own work ran out
    /// helps the others instead of waiting for them.
    async fn claim(&self, request: ClaimRequest) -> Result<ClaimBatch> {
        let mut batch = ClaimBatch { claims: Vec::new() };
        let lanes = &self.shared.lanes;
        let first = request.lane.unwrap_or(0);
        for turn in 0..lanes.len() {
            if batch.claims.len() >= request.limit {
                break;
            }
            let lane = &lanes[(first + turn) % lanes.len()];
            lock(lane).claim(&request, &mut batch.claims)?;
        }
        Ok(batch)
    }

    /// Takes a lane's lock once for each run of commits in that lane, not
    /// once per commit: the loops of other lanes then seldom wait for it.
    fn commit_at_once(
        &self,
        commits: Vec<Commit>,
    ) -> std::result::Result<Vec<Result<()>>, Vec<Commit>> {
        let mut answers = Vec::with_capacity(commits.len());
        let mut held: Option<(usize, MutexGuard<'_, Lane>)> = None;
        for commit in commits {
            let index = self.lane_of(&commit.task.item_id);
            let lane = match &mut held {
                Some((locked, lane)) if *locked == index => lane,
                _ => {
                    // One lane locked at a time: never one while waiting
                    // for another.
                    held = None;
                    &mut held.insert((index, lock(&self.shared.lanes[index]))).1
                }
            };
            answers.push(Self::commit_in(lane, commit));
        }
        Ok(answers)
    }

    async fn commit(&self, commit: Commit) -> Result<()> {
        Self::commit_in(&mut self.lane_for(&commit.task.item_id), commit)
    }

    async fn decide(&self, decision: DecisionCommit) -> Result<Vec<Event>> {
        let item_id = decision.item_id.clone();
        let ((), events) = self.transition(&item_id, |graph, record, fx| {
            rules::decide(graph, record, decision, fx)
        })?;
        Ok(events)
    }

    async fn retry(&self, item_id: &str, stage: &str, at: DateTime<Utc>) -> Result<Vec<Event>> {
        let ((), events) = self.transition(item_id, |_, record, fx| {
            rules::retry(record, stage, at, &mut AllLoaded, fx)
        })?;
        Ok(events)
    }

    async fn renew(&self, claims: &[(TaskKey, u64)], until: DateTime<Utc>) -> Result<Vec<TaskKey>> {
        let mut lost = Vec::new();
        for (key, generation) in claims {
            let mut lane = self.lane_for(&key.item_id);
            let held = match lane.position(&key.item_id) {
                Ok(item) => lane.transition(item, |_, record, fx| {
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
        self.transition(item_id, |graph, record, fx| {
            rules::rerun(graph, record, stage, at, &mut AllLoaded, fx)
        })
    }

    async fn cancel(&self, item_id: &str, at: DateTime<Utc>) -> Result<(Vec<TaskKey>, Vec<Event>)> {
        self.transition(item_id, |_, record, fx| {
            rules::cancel(record, at, &mut AllLoaded, fx)
        })
    }

    async fn migrate(
        &self,
        item_id: &str,
        version: u32,
        at: DateTime<Utc>,
    ) -> Result<(MigrateOutcome, Vec<Event>)> {
        let mut lane = self.lane_for(item_id);
        let item = lane.position(item_id)?;
        let to = lane.graph(version)?;
        lane.transition_with_events(item, |from, record, fx| {
            Ok(rules::migrate(from, &to, record, at, fx))
        })
    }

    async fn items_before_version(&self, version: u32) -> Result<Vec<String>> {
        let lanes = self.lock_all();
        let mut older: Vec<(u32, u32, &str)> = lanes
            .iter()
            .flat_map(|lane| lane.unfinished())
            .filter(|stored| stored.record.version < version)
            .map(|stored| (stored.record.version, stored.submitted, &*stored.record.id))
            .collect();
        older.sort_unstable();
        Ok(older.into_iter().map(|(_, _, id)| id.to_owned()).collect())
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(self
            .lock_all()
            .iter()
            .filter_map(|lane| lane.next_due())
            .min())
    }

    async fn next_review_deadline(&self) -> Result<Option<DateTime<Utc>>> {
        let lanes = self.lock_all();
        Ok(lanes
            .iter()
            .flat_map(|lane| lane.reviews_waiting())
            .filter_map(|waiting| Some(waiting.review.request.deadline?.at))
            .min())
    }

    async fn due_reviews(&self, now: DateTime<Utc>) -> Result<Vec<AwaitingReview>> {
        let lanes = self.lock_all();
        let mut due: Vec<AwaitingReview> = lanes
            .iter()
            .flat_map(|lane| lane.reviews_waiting())
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
        let lane = lock(&self.shared.lanes[0]);
        Ok(lane.versions.last().map(|v| v.definition().clone()))
    }

    async fn pipeline_version(&self, version: u32) -> Result<Option<PipelineDef>> {
        let lane = lock(&self.shared.lanes[0]);
        Ok(lane.graph(version).ok().map(|v| v.definition().clone()))
    }

    async fn stage_counts(&self) -> Result<Vec<StageCount>> {
        let lanes = self.lock_all();
        // One stage may sit at different positions in different versions.
        let mut totals: BTreeMap<(&str, StageState), u64> = BTreeMap::new();
        for lane in &lanes {
            for (version, position, index) in lane.by_state.each() {
                let stage = &lane.versions[version as usize - 1].stages()[position];
                for &state in StageState::ALL {
                    let items = index.counts[state as usize];
                    if items > 0 {
                        *totals.entry((stage.as_str(), state)).or_default() += u64::from(items);
                    }
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
        let lane = self.lane_for(item_id);
        let stored = &lane.items()[lane.position(item_id)?];
        Ok(stored.record.status(&stored.attempts))
    }

    async fn items_in(&self, stage: &str, state: StageState) -> Result<Vec<String>> {
        let lanes = self.lock_all();
        let mut items: Vec<(u32, String)> = lanes
            .iter()
            .flat_map(|lane| lane.items_in(stage, state))
            .collect();
        // In submission order.
        items.sort_unstable_by_key(|&(submitted, _)| submitted);
        Ok(items.into_iter().map(|(_, id)| id).collect())
    }

    async fn awaiting_review(&self) -> Result<Vec<AwaitingReview>> {
        let lanes = self.lock_all();
        let mut waiting: Vec<AwaitingReview> = lanes
            .iter()
            .flat_map(|lane| lane.reviews_waiting())
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

    /// Prunes lane after lane, `batch` items in all: each call goes on
    /// where the last one stopped, and `more` stays set until a pass over
    /// every lane is complete.
    async fn prune(&self, finished_before: DateTime<Utc>, batch: usize) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        if batch == 0 {
            return Ok(pruned);
        }
        let lanes = self.shared.lanes.len();
        let mut next = lock(&self.shared.prune_lane);
        while *next < lanes && (pruned.items as usize) < batch {
            let left = batch - pruned.items as usize;
            let this = lock(&self.shared.lanes[*next]).prune(finished_before, left);
            pruned.items += this.items;
            pruned.events += this.events;
            if this.more {
                // The lane's pass goes on next call.
                pruned.more = true;
                return Ok(pruned);
            }
            *next += 1;
        }
        if *next == lanes {
            *next = 0;
        } else {
            pruned.more = true;
        }
        Ok(pruned)
    }

    async fn pruned_through(&self) -> Result<u64> {
        Ok(lock(&self.shared.log.journal).log.pruned_through())
    }

    async fn events(&self, query: EventQuery) -> Result<Vec<Event>> {
        let lanes = self.lock_all_logged();
        let item = match &query.item_id {
            None => None,
            Some(id) => match lanes[self.lane_of(id)].number_of(id) {
                Some(number) => Some(number),
                None => return Ok(Vec::new()),
            },
        };
        let journal = lock(&self.shared.log.journal);
        let lane_count = lanes.len();
        Ok(journal
            .log
            .after(query.after)
            .iter()
            .filter(|e| item.is_none_or(|item| e.subject().item == item))
            .take(query.limit.unwrap_or(usize::MAX))
            .map(|e| lanes[e.subject().item % lane_count].resolve(&journal, e))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pruned_items_slot_is_about_140_bytes() {
        let slot = std::mem::size_of::<lane::StoredItem>();
        assert!((128..=144).contains(&slot), "{slot} bytes");
    }
}
