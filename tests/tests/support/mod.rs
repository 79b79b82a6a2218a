//! Shared fixtures for the integration tests: a document type and stages
//! made from closures, so each test states its stages' behaviour inline.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use treadle::store::{EventQuery, Store};
use treadle::{
    Engine, EngineConfig, Event, EventKind, Pipeline, Stage, StageContext, StageOutcome,
    StagePolicy, WorkItem,
};

/// The work item of the tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Doc {
    pub id: String,
    pub pages: u32,
}

impl WorkItem for Doc {
    fn id(&self) -> &str {
        &self.id
    }
}

pub fn doc(id: &str) -> Doc {
    Doc {
        id: id.to_owned(),
        pages: 3,
    }
}

type StageFuture = Pin<Box<dyn Future<Output = treadle::Result<StageOutcome>> + Send>>;
type StageBody = dyn Fn(Doc, StageContext) -> StageFuture + Send + Sync;

/// A stage whose body is a closure over an owned copy of the item and context.
pub struct FnStage {
    name: String,
    policy: StagePolicy,
    body: Arc<StageBody>,
}

/// A stage named `name` running `body`.
pub fn stage<F, Fut>(name: &str, body: F) -> FnStage
where
    F: Fn(Doc, StageContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = treadle::Result<StageOutcome>> + Send + 'static,
{
    FnStage {
        name: name.to_owned(),
        policy: StagePolicy::DEFAULT,
        body: Arc::new(move |doc, ctx| Box::pin(body(doc, ctx))),
    }
}

/// A stage that completes at once with no output.
pub fn done(name: &str) -> FnStage {
    stage(name, |_, _| async { Ok(StageOutcome::complete()) })
}

/// Two stages: `first`, then `publish`, which completes at once.
pub fn then_publish(first: FnStage) -> Pipeline<Doc> {
    let name = first.name.clone();
    Pipeline::builder()
        .stage(first)
        .stage(done("publish"))
        .edge(&name, "publish")
        .build()
        .unwrap()
}

impl FnStage {
    pub fn policy(mut self, policy: StagePolicy) -> Self {
        self.policy = policy;
        self
    }
}

#[treadle::async_trait]
impl Stage<Doc> for FnStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn policy(&self) -> StagePolicy {
        self.policy
    }

    async fn run(&self, item: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
        (self.body)(item.clone(), ctx.clone()).await
    }
}

/// A shared, ordered log of what stages did, for asserting order.
#[derive(Clone, Default)]
pub struct Trace(Arc<Mutex<Vec<String>>>);

impl Trace {
    pub fn push(&self, entry: impl Into<String>) {
        self.0.lock().unwrap().push(entry.into());
    }

    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Where `entry` first appears; panics with the whole trace if absent.
    pub fn position(&self, entry: &str) -> usize {
        let entries = self.entries();
        entries
            .iter()
            .position(|e| e == entry)
            .unwrap_or_else(|| panic!("`{entry}` not in trace {entries:?}"))
    }
}

/// A counter shared between a test and its stages.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU32>);

impl Counter {
    /// Adds one and returns the new value.
    pub fn bump(&self) -> u32 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn get(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

/// An engine with a quick lease and poll, for tests.
pub fn engine<S: Store>(pipeline: Pipeline<Doc>, store: S) -> Engine<Doc, S> {
    Engine::with_config(
        pipeline,
        store,
        EngineConfig {
            max_concurrency: 16,
            lease: Duration::from_secs(30),
            worker_id: "test-worker".into(),
            idle_poll: Duration::from_millis(20),
            ..EngineConfig::default()
        },
    )
}

/// Every event of one item, in log order.
pub async fn events_of<S: Store>(engine: &Engine<Doc, S>, item: &str) -> Vec<Event> {
    engine
        .events(EventQuery {
            item_id: Some(item.to_owned()),
            ..EventQuery::default()
        })
        .await
        .unwrap()
}

/// The kinds of an item's events at `stage` (stage-level only), as short names.
pub async fn stage_event_names<S: Store>(
    engine: &Engine<Doc, S>,
    item: &str,
    stage: &str,
) -> Vec<String> {
    events_of(engine, item)
        .await
        .into_iter()
        .filter(|e| e.stage.as_deref() == Some(stage) && e.subtask.is_none())
        .map(|e| kind_name(&e.kind))
        .collect()
}

/// A short name for an event kind: its serde tag.
pub fn kind_name(kind: &EventKind) -> String {
    serde_json::to_value(kind).unwrap()["type"]
        .as_str()
        .unwrap()
        .to_owned()
}
