//! What a stage knows about the attempt it is running.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::task::TaskKey;

/// The context of one attempt: which item, stage, subtask and attempt it is,
/// the stored outputs of the item's finished stages, and a cancellation signal.
#[derive(Debug, Clone)]
pub struct StageContext {
    /// Shared with the engine's bookkeeping of the attempt, so building a
    /// context copies no strings; it carries the cancellation flag.
    unit: Arc<AttemptUnit>,
    attempt: u32,
    outputs: BTreeMap<String, Value>,
}

impl StageContext {
    /// A context for `stage` of `item_id`, attempt 1, with no outputs.
    ///
    /// The engine builds contexts itself; this is for calling stage functions
    /// directly, e.g. in unit tests.
    pub fn new(item_id: impl Into<String>, stage: impl Into<String>) -> Self {
        StageContext {
            unit: AttemptUnit::new(TaskKey::stage(item_id.into(), stage.into())),
            attempt: 1,
            outputs: BTreeMap::new(),
        }
    }

    /// Sets the subtask this attempt runs (for fan-out stages).
    pub fn with_subtask(mut self, subtask: impl Into<String>) -> Self {
        let mut key = self.unit.key.clone();
        key.subtask = Some(subtask.into().into());
        self.unit = AttemptUnit::new(key);
        self
    }

    /// A context for the unit of work `unit`, attempt `attempt`.
    pub(crate) fn for_unit(unit: Arc<AttemptUnit>, attempt: u32) -> Self {
        StageContext {
            unit,
            attempt,
            outputs: BTreeMap::new(),
        }
    }

    /// Sets the attempt number (1-based).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Adds the stored output of another stage.
    pub fn with_output(mut self, stage: impl Into<String>, output: Value) -> Self {
        self.outputs.insert(stage.into(), output);
        self
    }

    /// Replaces all stored outputs at once.
    pub(crate) fn with_outputs(mut self, outputs: BTreeMap<String, Value>) -> Self {
        self.outputs = outputs;
        self
    }

    /// The id of the item being processed.
    pub fn item_id(&self) -> &str {
        &self.unit.key.item_id
    }

    /// The name of the running stage.
    pub fn stage(&self) -> &str {
        &self.unit.key.stage
    }

    /// The subtask being run, when the stage has fanned out.
    pub fn subtask(&self) -> Option<&str> {
        self.unit.key.subtask.as_deref()
    }

    /// The attempt number, starting at 1 (reset by a manual retry).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The stored output of an earlier stage of this item, decoded into `T`.
    ///
    /// The escape hatch for hand-written [`Stage`](crate::Stage) impls,
    /// which declare the names in [`Stage::reads`](crate::Stage::reads). A
    /// `#[stage]` function reads typed parameters instead
    /// (`#[from(scan)] report: &ScanReport`), checked at compile time.
    pub fn output_of<T: DeserializeOwned>(&self, stage: &str) -> Result<T> {
        let value = self
            .outputs
            .get(stage)
            .ok_or_else(|| Error::MissingOutput(stage.to_owned()))?;
        T::deserialize(value).map_err(|e| Error::json(format!("the output of stage `{stage}`"), e))
    }

    /// The raw JSON output of an earlier stage of this item, if it stored one.
    pub fn raw_output_of(&self, stage: &str) -> Option<&Value> {
        self.outputs.get(stage)
    }

    /// Whether the item has been cancelled; long stages should check this.
    pub fn is_cancelled(&self) -> bool {
        self.unit.is_cancelled()
    }

    /// Completes when the item is cancelled.
    pub async fn cancelled(&self) {
        self.unit.cancelled().await
    }
}

/// The unit of work an attempt runs, with its one-way cancellation flag:
/// shared, in one allocation, by the stage's context and the engine.
#[derive(Debug)]
pub(crate) struct AttemptUnit {
    /// The unit of work.
    pub(crate) key: TaskKey,
    cancelled: AtomicBool,
    notify: Notify,
}

impl AttemptUnit {
    /// The unit `key`, not cancelled.
    pub(crate) fn new(key: TaskKey) -> Arc<Self> {
        Arc::new(AttemptUnit {
            key,
            cancelled: AtomicBool::new(false),
            notify: Notify::new(),
        })
    }

    /// Raises the flag and wakes every waiter.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_of_decodes_a_stored_output_and_names_missing_ones() {
        let ctx = StageContext::new("doc-1", "enrich").with_output("scan", json!({"pages": 3}));
        #[derive(Debug, serde::Deserialize)]
        struct Report {
            pages: u32,
        }
        assert_eq!(ctx.output_of::<Report>("scan").unwrap().pages, 3);
        let missing = ctx.output_of::<Report>("ocr").unwrap_err();
        assert_eq!(
            missing.to_string(),
            "stage `ocr` has no stored output for this item"
        );
        let wrong = ctx.output_of::<String>("scan").unwrap_err();
        assert!(wrong.to_string().contains("the output of stage `scan`"));
    }

    #[tokio::test]
    async fn cancelled_wakes_after_cancel() {
        let unit = AttemptUnit::new(TaskKey::stage("a", "b"));
        let ctx = StageContext::for_unit(unit.clone(), 1);
        assert!(!ctx.is_cancelled());
        let waiter = tokio::spawn(async move { ctx.cancelled().await });
        tokio::task::yield_now().await;
        unit.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter woke")
            .unwrap();
    }
}
