//! The commands, written against any [`Store`] so they can be tested on a
//! [`treadle::MemoryStore`] and run on the SQLite store.
//!
//! Changes go through the same fenced store transitions the engine uses
//! ([`Store::decide`], [`Store::retry`], [`Store::cancel`]): a decision on a
//! stage that is not awaiting review, or for a stale round, is refused by
//! the store and changes nothing. The stages a decision unblocks are taken
//! from the pipeline definition recorded in the database.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::pin::pin;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use treadle::store::{DecisionCommit, EventQuery, MigrateOutcome, Verdict};
use treadle::{Decision, Event, PipelineDef, StageState, Store};

use crate::cli::{Command, DecisionArgs, GraphFormat, ReviewCommand};
use crate::error::CliError;
use crate::output::{
    self, Change, Counts, EventLog, Graph, ItemList, ItemReport, Migration, Overview, ReviewList,
    StageRow, emit,
};

/// The result type of the commands.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

/// How often `events --follow` looks for new events.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// How many events `events --follow` reads per query.
const FOLLOW_PAGE: usize = 1_000;

/// Runs `command` on `store`, printing its report on `out`. `stop` ends
/// `events --follow` (Ctrl-C, or its hidden time limit).
pub async fn run<S: Store>(
    store: &S,
    command: Command,
    json: bool,
    out: &mut dyn Write,
    stop: impl Future<Output = ()>,
) -> Result<()> {
    match command {
        Command::Status { item: None } => emit(&overview(store).await?, json, out)?,
        Command::Status { item: Some(item) } => {
            emit(&ItemReport(store.status(&item).await?), json, out)?;
        }
        Command::Items { stage, state } => emit(&items(store, &stage, &state).await?, json, out)?,
        Command::Review(ReviewCommand::List) => {
            emit(&ReviewList(store.awaiting_review().await?), json, out)?;
        }
        Command::Approve {
            item,
            stage,
            decision,
            edits,
        } => {
            let verdict = match edits {
                // Only a worker knows the stage's output type: it checks them.
                Some(path) => Verdict::ApproveWithEditsToCheck(read_edits(&path)?),
                None => Verdict::Approve,
            };
            emit(
                &decide(store, &item, &stage, verdict, decision).await?,
                json,
                out,
            )?;
        }
        Command::Reject {
            item,
            stage,
            decision,
            reason,
        } => {
            let verdict = Verdict::Reject { reason };
            emit(
                &decide(store, &item, &stage, verdict, decision).await?,
                json,
                out,
            )?;
        }
        Command::Retry { item, stage } => emit(&retry(store, &item, &stage).await?, json, out)?,
        Command::Rerun { item, stage } => emit(&rerun(store, &item, &stage).await?, json, out)?,
        Command::Cancel { item } => emit(&cancel(store, &item).await?, json, out)?,
        Command::Migrate { item, .. } => emit(&migrate(store, item).await?, json, out)?,
        Command::Events {
            item,
            after,
            limit,
            follow: false,
            ..
        } => {
            let events = events(store, item, after, limit).await?;
            emit(&EventLog(events), json, out)?;
        }
        Command::Events {
            item,
            after,
            follow: true,
            follow_for_ms,
            ..
        } => {
            let limit = async {
                match follow_for_ms {
                    Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                    None => std::future::pending().await,
                }
            };
            let stop = async {
                tokio::select! {
                    () = stop => {}
                    () = limit => {}
                }
            };
            follow(store, item, after, FOLLOW_INTERVAL, stop, json, out).await?;
        }
        Command::Graph { format, counts } => emit(&graph(store, format, counts).await?, json, out)?,
    }
    Ok(())
}

/// The recorded pipeline definition, or an empty one if no engine has
/// recorded one yet.
async fn definition<S: Store>(store: &S) -> Result<PipelineDef> {
    Ok(store
        .pipeline_definition()
        .await?
        .unwrap_or_else(|| PipelineDef {
            stages: Vec::new(),
            edges: Vec::new(),
        }))
}

/// Item counts per stage and state, every state present.
async fn count_table<S: Store>(store: &S) -> Result<BTreeMap<String, Counts>> {
    let mut table: BTreeMap<String, Counts> = BTreeMap::new();
    for count in store.stage_counts().await? {
        *table
            .entry(count.stage)
            .or_insert_with(output::zero_counts)
            .entry(count.state.as_str())
            .or_default() += count.items;
    }
    Ok(table)
}

/// `status`: counts per stage and state, stages in the recorded pipeline's
/// topological order, then any stage only stored rows still have.
pub async fn overview<S: Store>(store: &S) -> Result<Overview> {
    let definition = definition(store).await?;
    let mut counts = count_table(store).await?;
    let mut stages: Vec<StageRow> = definition
        .stages
        .iter()
        .map(|stage| StageRow {
            stage: stage.clone(),
            counts: counts.remove(stage).unwrap_or_else(output::zero_counts),
        })
        .collect();
    stages.extend(
        counts
            .into_iter()
            .map(|(stage, counts)| StageRow { stage, counts }),
    );
    Ok(Overview {
        pipeline: store.pipeline_drift().await?,
        stages,
    })
}

/// `migrate`: moves one item (or, with `None`, every unfinished item of an
/// older version) to the latest registered pipeline version.
pub async fn migrate<S: Store>(store: &S, item: Option<String>) -> Result<Migration> {
    let version = store
        .pipeline_drift()
        .await?
        .ok_or(CliError::NoPipeline)?
        .version;
    let items = match item {
        Some(item) => vec![item],
        None => store.items_before_version(version).await?,
    };
    let mut report = Migration {
        version,
        items: Vec::new(),
    };
    for item in items {
        let (outcome, _) = store.migrate(&item, version, Utc::now()).await?;
        report.items.push((item, outcome_name(outcome)));
    }
    Ok(report)
}

/// How a migration outcome is printed.
fn outcome_name(outcome: MigrateOutcome) -> &'static str {
    match outcome {
        MigrateOutcome::Moved => "moved",
        MigrateOutcome::AlreadyCurrent => "already on it",
        MigrateOutcome::Finished => "finished: keeps its version",
        MigrateOutcome::Busy => "work running: try again when it is idle",
    }
}

/// Checks that `stage` is a stage of the recorded pipeline, or one that
/// stored rows still have.
async fn known_stage<S: Store>(store: &S, stage: &str) -> Result<()> {
    if definition(store).await?.stages.iter().any(|s| s == stage) {
        return Ok(());
    }
    if store.stage_counts().await?.iter().any(|c| c.stage == stage) {
        return Ok(());
    }
    Err(CliError::UnknownStage(stage.to_owned()))
}

/// `items`: the items whose `stage` is in `state` (parsed strictly).
pub async fn items<S: Store>(store: &S, stage: &str, state: &str) -> Result<ItemList> {
    let state: StageState = state
        .parse()
        .map_err(|_| CliError::UnknownState(state.to_owned()))?;
    known_stage(store, stage).await?;
    Ok(ItemList {
        stage: stage.to_owned(),
        state,
        items: store.items_in(stage, state).await?,
    })
}

/// `approve` / `reject`: applies a review decision.
pub async fn decide<S: Store>(
    store: &S,
    item: &str,
    stage: &str,
    verdict: Verdict,
    args: DecisionArgs,
) -> Result<Change> {
    treadle::check_reviewer(&args.by)?;
    if let Verdict::Reject { reason } = &verdict {
        treadle::check_reject_reason(reason)?;
    }
    let action = match verdict {
        Verdict::Approve => "approved",
        Verdict::ApproveWithEdits(_) | Verdict::ApproveWithEditsToCheck(_) => "approved_with_edits",
        Verdict::Reject { .. } => "rejected",
    };
    let decision = Decision {
        by: args.by,
        note: args.note,
        round: args.round,
    };
    let events = store
        .decide(DecisionCommit {
            item_id: item.to_owned(),
            stage: stage.to_owned(),
            verdict,
            decision,
            at: Utc::now(),
        })
        .await?;
    Ok(Change {
        action,
        item_id: item.to_owned(),
        stage: Some(stage.to_owned()),
        events,
    })
}

/// Reads the `--edits` file: one JSON value.
pub fn read_edits(path: &Path) -> Result<Value> {
    let bad = |why: String| CliError::BadEdits {
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))
}

/// `retry`: makes a failed stage runnable again.
pub async fn retry<S: Store>(store: &S, item: &str, stage: &str) -> Result<Change> {
    let events = store.retry(item, stage, Utc::now()).await?;
    Ok(Change {
        action: "retry_requested",
        item_id: item.to_owned(),
        stage: Some(stage.to_owned()),
        events,
    })
}

/// `rerun`: makes a finished or failed stage, and everything downstream of
/// it, run again. Downstream work running in another process loses its
/// lease, so that process stops it.
pub async fn rerun<S: Store>(store: &S, item: &str, stage: &str) -> Result<Change> {
    let (_running, events) = store.rerun(item, stage, Utc::now()).await?;
    Ok(Change {
        action: "rerun_requested",
        item_id: item.to_owned(),
        stage: Some(stage.to_owned()),
        events,
    })
}

/// `cancel`: cancels an item. Work running in another process loses its
/// lease, so that process stops it and its result is never committed.
pub async fn cancel<S: Store>(store: &S, item: &str) -> Result<Change> {
    let (_running, events) = store.cancel(item, Utc::now()).await?;
    Ok(Change {
        action: "cancelled",
        item_id: item.to_owned(),
        stage: None,
        events,
    })
}

/// `events`: a page of the log.
pub async fn events<S: Store>(
    store: &S,
    item: Option<String>,
    after: u64,
    limit: Option<usize>,
) -> Result<Vec<Event>> {
    if let Some(item) = &item {
        store.status(item).await?;
    }
    Ok(store
        .events(EventQuery {
            after,
            item_id: item,
            limit,
        })
        .await?)
}

/// `events --follow`: prints the log from `after` on, then every new event
/// as other processes commit it, polling every `interval`, until `stop`.
/// With `json`, prints one JSON event per line. Returns the last sequence
/// number printed.
pub async fn follow<S: Store>(
    store: &S,
    item: Option<String>,
    mut after: u64,
    interval: Duration,
    stop: impl Future<Output = ()>,
    json: bool,
    out: &mut dyn Write,
) -> Result<u64> {
    if let Some(item) = &item {
        store.status(item).await?;
    }
    let mut stop = pin!(stop);
    loop {
        let page = store
            .events(EventQuery {
                after,
                item_id: item.clone(),
                limit: Some(FOLLOW_PAGE),
            })
            .await?;
        let mut text = String::new();
        for event in &page {
            if json {
                text.push_str(&serde_json::to_string(event).map_err(std::io::Error::from)?);
                text.push('\n');
            } else {
                output::event_line(event, &mut text);
            }
            after = event.seq;
        }
        out.write_all(text.as_bytes())?;
        out.flush()?;
        if page.len() == FOLLOW_PAGE {
            continue;
        }
        tokio::select! {
            () = &mut stop => return Ok(after),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// `graph`: the recorded pipeline, optionally labelled with item counts.
pub async fn graph<S: Store>(store: &S, format: GraphFormat, with_counts: bool) -> Result<Graph> {
    let definition = definition(store).await?;
    let counts = if with_counts {
        Some(count_table(store).await?)
    } else {
        None
    };
    Ok(Graph::draw(definition, format, counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use treadle::{
        Engine, MemoryStore, Pipeline, ReviewRequest, StageContext, StageOutcome, WorkItem,
    };

    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Doc {
        id: String,
        fail: bool,
    }

    impl WorkItem for Doc {
        fn id(&self) -> &str {
            &self.id
        }
    }

    #[treadle::stage]
    async fn tag(doc: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
        if doc.fail {
            return Ok(StageOutcome::failed("cannot tag"));
        }
        StageOutcome::complete_with(format!("tags of {}", doc.id))
    }

    #[treadle::stage]
    async fn review(doc: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::needs_review(
            ReviewRequest::new(format!("check {}", doc.id)).proposed_output("proposed")?,
        ))
    }

    #[treadle::stage]
    async fn export(_doc: &Doc, ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
        let reviewed: String = ctx.output_of("review")?;
        StageOutcome::complete_with(format!("exported {reviewed}"))
    }

    fn doc(id: &str, fail: bool) -> Doc {
        Doc {
            id: id.into(),
            fail,
        }
    }

    async fn engine() -> Engine<Doc, MemoryStore> {
        let pipeline: Pipeline<Doc> = treadle::pipeline! { tag -> review -> export };
        let engine = Engine::new(pipeline, MemoryStore::new());
        engine
            .submit_all([doc("a", false), doc("b", false), doc("c", true)])
            .await
            .unwrap();
        engine.run_until_idle().await.unwrap();
        engine
    }

    fn by(name: &str) -> DecisionArgs {
        DecisionArgs {
            by: name.into(),
            note: Some("fine".into()),
            round: None,
        }
    }

    async fn text<S: Store>(store: &S, command: Command) -> Result<String> {
        let mut out = Vec::new();
        run(store, command, false, &mut out, std::future::ready(())).await?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn the_overview_follows_the_pipeline_order() {
        let engine = engine().await;
        let overview = overview(engine.store()).await.unwrap();
        let names: Vec<_> = overview.stages.iter().map(|r| r.stage.as_str()).collect();
        assert_eq!(names, ["tag", "review", "export"]);
        assert_eq!(overview.stages[0].counts["completed"], 2);
        assert_eq!(overview.stages[0].counts["failed"], 1);
        assert_eq!(overview.stages[1].counts["awaiting_review"], 2);
        assert_eq!(overview.stages[2].counts["pending"], 3);
    }

    #[tokio::test]
    async fn migrate_moves_unfinished_items_to_the_latest_version() {
        let engine = engine().await;
        let store = engine.store();
        let none = migrate(store, None).await.unwrap();
        assert!(none.items.is_empty(), "everything is on the latest version");
        let mut v2 = store.pipeline_definition().await.unwrap().unwrap();
        v2.stages.push("archive".into());
        v2.edges.push(("export".into(), "archive".into()));
        assert_eq!(store.register_pipeline(&v2).await.unwrap().version, 2);
        let one = migrate(store, Some("a".into())).await.unwrap();
        assert_eq!(one.items, [("a".to_owned(), "moved")]);
        assert_eq!(store.status("a").await.unwrap().version, 2);
        let rest = migrate(store, None).await.unwrap();
        let moved: Vec<&str> = rest.items.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(moved, ["b", "c"], "the unfinished items of version 1");
        let mut out = String::new();
        crate::output::Report::text(&rest, &mut out);
        assert!(out.contains("item `b` to version 2: moved"), "{out}");
        let overview = text(store, Command::Status { item: None }).await.unwrap();
        assert!(overview.starts_with("pipeline version 2 ("), "{overview}");
        assert!(
            !overview.contains("unfinished items on version 1"),
            "{overview}"
        );
    }

    #[tokio::test]
    async fn approving_unblocks_the_dependents_from_the_stored_edges() {
        let engine = engine().await;
        let store = engine.store();
        let change = decide(store, "a", "review", Verdict::Approve, by("alice"))
            .await
            .unwrap();
        assert!(!change.events.is_empty());
        engine.run_until_idle().await.unwrap();
        let status = store.status("a").await.unwrap();
        let export = status.stages.iter().find(|s| s.name == "export").unwrap();
        assert_eq!(export.state, StageState::Completed);
        assert_eq!(export.output, Some(Value::from("exported proposed")));
    }

    #[tokio::test]
    async fn a_decision_on_a_stage_not_awaiting_review_is_a_conflict_and_changes_nothing() {
        let engine = engine().await;
        let store = engine.store();
        let before = store.events(EventQuery::default()).await.unwrap().len();
        let err = decide(store, "a", "tag", Verdict::Approve, by("alice"))
            .await
            .unwrap_err();
        assert_eq!(err.exit(), crate::error::Exit::Conflict, "{err}");
        assert!(err.to_string().contains("not awaiting review"), "{err}");
        let err = decide(store, "a", "nope", Verdict::Approve, by("alice"))
            .await
            .unwrap_err();
        assert_eq!(err.exit(), crate::error::Exit::NotFound, "{err}");
        let err = decide(store, "zz", "review", Verdict::Approve, by("alice"))
            .await
            .unwrap_err();
        assert_eq!(err.exit(), crate::error::Exit::NotFound, "{err}");
        assert!(err.to_string().contains("unknown item `zz`"), "{err}");
        let after = store.events(EventQuery::default()).await.unwrap().len();
        assert_eq!(before, after);
    }

    #[tokio::test]
    async fn a_stale_round_is_refused() {
        let engine = engine().await;
        let mut args = by("alice");
        args.round = Some(7);
        let err = decide(engine.store(), "a", "review", Verdict::Approve, args)
            .await
            .unwrap_err();
        assert_eq!(err.exit(), crate::error::Exit::Conflict, "{err}");
    }

    #[tokio::test]
    async fn items_parses_the_state_strictly() {
        let engine = engine().await;
        let list = items(engine.store(), "review", "awaiting_review")
            .await
            .unwrap();
        assert_eq!(list.items, ["a", "b"]);
        let err = items(engine.store(), "review", "Awaiting")
            .await
            .unwrap_err();
        assert_eq!(err.exit(), crate::error::Exit::Usage);
        let err = items(engine.store(), "revue", "pending").await.unwrap_err();
        assert_eq!(err.exit(), crate::error::Exit::NotFound);
    }

    #[tokio::test]
    async fn retry_and_cancel_go_through_the_store() {
        let engine = engine().await;
        let store = engine.store();
        let err = retry(store, "a", "tag").await.unwrap_err();
        assert_eq!(err.exit(), crate::error::Exit::Conflict, "{err}");
        retry(store, "c", "tag").await.unwrap();
        assert_eq!(
            store.items_in("tag", StageState::Pending).await.unwrap(),
            ["c"]
        );
        let change = cancel(store, "b").await.unwrap();
        assert!(!change.events.is_empty());
        let status = store.status("b").await.unwrap();
        assert_eq!(status.state, treadle::ItemState::Cancelled);
    }

    #[tokio::test]
    async fn the_text_of_each_read_command() {
        let engine = engine().await;
        let store = engine.store();
        let status = text(store, Command::Status { item: None }).await.unwrap();
        assert!(status.starts_with("pipeline version 1\nstage "), "{status}");
        assert!(status.contains("awaiting_review"), "{status}");
        let item = text(
            store,
            Command::Status {
                item: Some("a".into()),
            },
        )
        .await
        .unwrap();
        assert!(item.contains("review #1"), "{item}");
        assert!(item.contains("proposed output: \"proposed\""), "{item}");
        let reviews = text(store, Command::Review(ReviewCommand::List))
            .await
            .unwrap();
        assert!(
            reviews.contains("a review (pipeline version 1, round 1"),
            "{reviews}"
        );
        assert!(reviews.contains(": check b"), "{reviews}");
        let log = text(
            store,
            Command::Events {
                item: Some("c".into()),
                after: 0,
                limit: None,
                follow: false,
                follow_for_ms: None,
            },
        )
        .await
        .unwrap();
        assert!(log.contains("failed reason=cannot tag"), "{log}");
        assert!(log.lines().all(|l| l.contains("  c  ")), "{log}");
    }

    #[tokio::test]
    async fn follow_prints_events_committed_while_it_runs() {
        let engine = engine().await;
        let store = engine.store().clone();
        let start = store.events(EventQuery::default()).await.unwrap().len() as u64;
        let mut out = Vec::new();
        let writer = {
            let store = store.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                cancel(&store, "b").await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let (last, ()) = tokio::join!(
            follow(
                &store,
                None,
                start,
                Duration::from_millis(10),
                tokio::time::sleep(Duration::from_millis(300)),
                true,
                &mut out,
            ),
            writer
        );
        let last = last.unwrap();
        let lines: Vec<Event> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(!lines.is_empty(), "the cancellation's events were printed");
        assert!(lines.iter().all(|e| e.seq > start && e.item_id == "b"));
        assert_eq!(lines.last().unwrap().seq, last);
    }
}
