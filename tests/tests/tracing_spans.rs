//! The engine's tracing: one span per attempt carrying `item_id`, `stage`,
//! `subtask` and `attempt`, and a warning for every failed attempt.

mod support;

use std::sync::{Arc, Mutex};

use support::{doc, engine, stage};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use treadle::{MemoryStore, Pipeline, StageOutcome, StagePolicy};

/// A span's or event's fields as (name, value) pairs.
type FieldList = Vec<(String, String)>;

/// Records span names with their fields, and warning messages.
#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<Vec<(String, FieldList)>>>,
    warnings: Arc<Mutex<Vec<FieldList>>>,
}

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = Fields::default();
        span.record(&mut fields);
        let mut spans = self.spans.lock().unwrap();
        spans.push((span.metadata().name().to_owned(), fields.0));
        Id::from_u64(spans.len() as u64)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut fields = Fields::default();
            event.record(&mut fields);
            self.warnings.lock().unwrap().push(fields.0);
        }
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

// A current-thread runtime polls every task on this thread, where the
// recorder is the default subscriber.
#[tokio::test]
async fn every_attempt_has_a_span_with_its_coordinates() {
    let recorder = Recorder::default();
    let _guard = tracing::subscriber::set_default(recorder.clone());
    let pipeline = Pipeline::builder()
        .stage(
            stage("fetch", |_, ctx| async move {
                match (ctx.subtask(), ctx.attempt()) {
                    (None, _) => Ok(StageOutcome::fan_out(["a"])),
                    (Some(_), 1) => Err(treadle::Error::stage("flaky")),
                    (Some(_), _) => Ok(StageOutcome::complete()),
                }
            })
            .policy(
                StagePolicy::new()
                    .retries(1)
                    .backoff(treadle::Backoff::Fixed(std::time::Duration::from_millis(1))),
            ),
        )
        .build()
        .unwrap();
    let engine = engine(pipeline, MemoryStore::new());
    engine.submit(doc("doc-9")).await.unwrap();
    engine.run_until_idle().await.unwrap();

    let spans = recorder.spans.lock().unwrap().clone();
    let attempts: Vec<_> = spans
        .iter()
        .filter(|(name, _)| name == "treadle.attempt")
        .map(|(_, f)| f)
        .collect();
    let coordinates: Vec<_> = attempts
        .iter()
        .map(|f| {
            (
                field(f, "item_id"),
                field(f, "stage"),
                field(f, "subtask"),
                field(f, "attempt"),
            )
        })
        .collect();
    assert_eq!(
        coordinates,
        [
            (Some("doc-9"), Some("fetch"), None, Some("1")),
            (Some("doc-9"), Some("fetch"), Some("a"), Some("1")),
            (Some("doc-9"), Some("fetch"), Some("a"), Some("2")),
        ]
    );
    let warnings = recorder.warnings.lock().unwrap().clone();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(field(&warnings[0], "error"), Some("flaky"));
}
