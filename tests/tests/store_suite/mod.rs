//! The behaviour every store must show, written once and run against each
//! store implementation through `store_suite!`.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Barrier;
use treadle::store::Store;
use treadle::{
    AttemptResult, Backoff, DEADLINE_REVIEWER, DeadlineAction, Decision, DecisionKind, Error,
    EventKind, ItemState, Pipeline, ReviewRequest, StageOutcome, StagePolicy, StageState,
};

use crate::support::*;

mod faults;
mod retention;
pub use faults::*;
mod versions;
pub use retention::*;
pub use versions::*;
mod typed;
pub use typed::*;

/// Generates one `#[tokio::test]` per suite case, each on a fresh store made
/// by `$make` (an async expression returning `(store, guard)`; the guard
/// lives as long as the test, e.g. a temporary directory). The tests run on
/// a multi-thread runtime, or with `current_thread:` first on a
/// current-thread one, where the engine runs attempts inline first on a
/// store that commits without waiting.
#[macro_export]
macro_rules! store_suite {
    (@cases [$test:meta] $make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[$test]
            async fn $case() {
                let (store, _guard) = $make.await;
                $crate::store_suite::$case(store).await;
            }
        )+
    };
    (current_thread: $make:expr) => {
        $crate::store_suite!(@all [tokio::test(flavor = "current_thread")] $make);
    };
    ($make:expr) => {
        $crate::store_suite!(
            @all [tokio::test(flavor = "multi_thread", worker_threads = 4)] $make
        );
    };
    (@all [$test:meta] $make:expr) => {
        $crate::store_suite!(@cases [$test] $make;
            stages_run_in_dependency_order,
            diamond_join_waits_for_both_branches,
            independent_stages_run_in_parallel,
            upstream_outputs_are_typed,
            skip_satisfies_dependents,
            errors_retry_with_backoff_until_attempts_run_out,
            a_retried_stage_can_succeed,
            a_retry_outcome_runs_again_after_its_delay,
            timeout_is_a_failed_attempt,
            panic_is_a_failed_attempt_and_others_go_on,
            fan_out_retries_only_failed_subtasks,
            fan_out_subtask_retries_follow_the_policy,
            approve_completes_with_the_proposed_output,
            reject_fails_the_stage_and_retry_asks_again,
            approve_with_edits_replaces_the_output,
            decisions_on_the_wrong_state_are_typed_errors,
            cancel_stops_running_stages,
            cancel_raises_the_running_stages_cancel_flag,
            events_are_logged_and_broadcast_in_commit_order,
            status_displays_every_stage,
            submit_is_idempotent,
            retry_of_a_stage_that_has_not_failed_is_an_error,
            items_by_stage_and_state,
            long_lived_worker_picks_up_new_items_and_decisions,
            review_deadlines_decide_when_they_pass,
            a_failure_leaves_the_item_active_while_a_branch_can_run,
            rerun_of_a_review_stage_reopens_the_review_and_reruns_downstream,
            rerun_of_a_fan_out_stage_fans_out_afresh,
            only_a_finished_or_failed_stage_can_be_rerun,
            edits_decided_outside_are_checked_by_the_worker_and_refused_ones_reopen_the_review,
            a_stage_added_at_the_end_applies_to_old_items_only_when_migrated,
            a_stage_inserted_in_the_middle_does_not_strand_old_items,
            a_removed_last_stage_fails_visibly_and_resumes_when_it_is_back,
            reordered_stages_keep_the_old_order_for_old_items,
            a_removed_review_stage_can_still_be_decided,
            a_renamed_review_stage_is_decided_by_its_old_name_or_migrated,
            prune_removes_finished_items_with_their_events_and_nothing_else,
            prune_keeps_what_finished_after_the_cutoff_and_works_in_batches,
            a_prune_beside_a_busy_worker_loses_nothing,
            a_worker_with_retention_prunes_by_itself,
            typed_outputs_flow_to_typed_reads,
            a_skipped_upstream_is_read_as_none,
            fan_out_outputs_are_read_by_subtask,
            edits_of_the_wrong_shape_are_refused_and_change_nothing,
            edits_of_the_right_shape_are_read_typed_downstream,
            outcomes_the_stage_did_not_declare_fail_it,
            a_stored_output_of_another_shape_fails_the_reader,
        );
    };
}

fn linear(names: &[&str], trace: &Trace) -> Pipeline<Doc> {
    let mut builder = Pipeline::builder();
    for name in names {
        let (trace, label) = (trace.clone(), name.to_string());
        builder = builder.stage(stage(name, move |doc, _| {
            let (trace, label) = (trace.clone(), label.clone());
            async move {
                trace.push(format!("{label}:{}", doc.id));
                Ok(StageOutcome::complete())
            }
        }));
    }
    for pair in names.windows(2) {
        builder = builder.edge(pair[0], pair[1]);
    }
    builder.build().unwrap()
}

pub async fn stages_run_in_dependency_order<S: Store>(store: S) {
    let trace = Trace::default();
    let engine = engine(linear(&["scan", "enrich", "export"], &trace), store);
    for id in ["doc-1", "doc-2"] {
        assert!(engine.submit(doc(id)).await.unwrap());
    }
    let report = engine.run_until_idle().await.unwrap();
    assert_eq!(report.attempts, 6);
    for id in ["doc-1", "doc-2"] {
        assert!(trace.position(&format!("scan:{id}")) < trace.position(&format!("enrich:{id}")));
        assert!(trace.position(&format!("enrich:{id}")) < trace.position(&format!("export:{id}")));
        let status = engine.status(id).await.unwrap();
        assert_eq!(status.state, ItemState::Completed);
        assert!(
            status
                .stages
                .iter()
                .all(|s| s.state == StageState::Completed && s.attempt == 1)
        );
        let names: Vec<_> = status.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["scan", "enrich", "export"]);
        let last = events_of(&engine, id).await.pop().unwrap();
        assert_eq!(last.kind, EventKind::ItemCompleted);
    }
}

pub async fn diamond_join_waits_for_both_branches<S: Store>(store: S) {
    let trace = Trace::default();
    let branch = |name: &'static str, delay: u64| {
        let trace = trace.clone();
        stage(name, move |_, _| {
            let trace = trace.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                trace.push(name);
                StageOutcome::complete_with(name.len())
            }
        })
    };
    let join_trace = trace.clone();
    let pipeline = Pipeline::builder()
        .stage(done("scan"))
        .stage(branch("ocr", 60))
        .stage(branch("thumbnail", 5))
        .stage(stage("index", move |_, ctx| {
            let trace = join_trace.clone();
            async move {
                trace.push("index");
                let total: usize =
                    ctx.output_of::<usize>("ocr")? + ctx.output_of::<usize>("thumbnail")?;
                StageOutcome::complete_with(total)
            }
        }))
        .edge("scan", "ocr")
        .edge("scan", "thumbnail")
        .edge("ocr", "index")
        .edge("thumbnail", "index")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    assert!(trace.position("index") > trace.position("ocr"));
    assert!(trace.position("index") > trace.position("thumbnail"));
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.stages.last().unwrap().name, "index");
    assert_eq!(status.stages.last().unwrap().output, Some(json!(12)));
}

pub async fn independent_stages_run_in_parallel<S: Store>(store: S) {
    // Each branch waits until the other has started: they can only both
    // finish if they run at the same time.
    let barrier = Arc::new(Barrier::new(2));
    let meet = |name: &'static str| {
        let barrier = barrier.clone();
        stage(name, move |_, _| {
            let barrier = barrier.clone();
            async move {
                match tokio::time::timeout(Duration::from_secs(5), barrier.wait()).await {
                    Ok(_) => Ok(StageOutcome::complete()),
                    Err(_) => Ok(StageOutcome::failed("the other branch never started")),
                }
            }
        })
    };
    let pipeline = Pipeline::builder()
        .stage(done("scan"))
        .stage(meet("left"))
        .stage(meet("right"))
        .edge("scan", "left")
        .edge("scan", "right")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ScanReport {
    pages: u32,
    language: String,
}

pub async fn upstream_outputs_are_typed<S: Store>(store: S) {
    let pipeline = Pipeline::builder()
        .stage(stage("scan", |doc, _| async move {
            StageOutcome::complete_with(ScanReport {
                pages: doc.pages,
                language: "en".into(),
            })
        }))
        .stage(stage("enrich", |doc, ctx| async move {
            let report: ScanReport = ctx.output_of("scan")?;
            assert_eq!(ctx.item_id(), doc.id);
            StageOutcome::complete_with(
                json!({"pages_doubled": report.pages * 2, "lang": report.language}),
            )
        }))
        .edge("scan", "enrich")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    engine
        .submit(Doc {
            id: "d".into(),
            pages: 21,
        })
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(
        status.stages[0].output,
        Some(json!({"pages": 21, "language": "en"}))
    );
    assert_eq!(
        status.stages[1].output,
        Some(json!({"pages_doubled": 42, "lang": "en"}))
    );
}

pub async fn skip_satisfies_dependents<S: Store>(store: S) {
    let trace = Trace::default();
    let t = trace.clone();
    let pipeline = Pipeline::builder()
        .stage(stage("ocr", |_, _| async {
            Ok(StageOutcome::skip("already text"))
        }))
        .stage(stage("index", move |_, _| {
            let t = t.clone();
            async move {
                t.push("index");
                Ok(StageOutcome::complete())
            }
        }))
        .edge("ocr", "index")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.stages[0].state, StageState::Skipped);
    assert_eq!(
        status.stages[0].attempts[0].error.as_deref(),
        Some("already text")
    );
    assert_eq!(status.stages[1].state, StageState::Completed);
    assert_eq!(status.state, ItemState::Completed);
    assert_eq!(trace.entries(), ["index"]);
    assert_eq!(
        stage_event_names(&engine, "d", "ocr").await,
        ["started", "skipped"]
    );
}

pub async fn errors_retry_with_backoff_until_attempts_run_out<S: Store>(store: S) {
    let calls = Counter::default();
    let c = calls.clone();
    let flaky = stage("fetch", move |_, ctx| {
        let c = c.clone();
        async move {
            c.bump();
            Err(treadle::Error::stage(format!(
                "upstream 503 on attempt {}",
                ctx.attempt()
            )))
        }
    })
    .policy(
        StagePolicy::new()
            .retries(2)
            .backoff(Backoff::Fixed(Duration::from_millis(80))),
    );
    let pipeline = Pipeline::builder()
        .stage(flaky)
        .stage(done("after"))
        .edge("fetch", "after")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    assert_eq!(calls.get(), 3);
    let status = engine.status("d").await.unwrap();
    let fetch = &status.stages[0];
    assert_eq!(fetch.state, StageState::Failed);
    assert_eq!(fetch.attempt, 3);
    assert_eq!(
        fetch.last_error.as_deref(),
        Some("upstream 503 on attempt 3 (after 3 attempts)")
    );
    assert_eq!(fetch.attempts.len(), 3);
    for (i, pair) in fetch.attempts.windows(2).enumerate() {
        assert_eq!(pair[0].result, AttemptResult::Error);
        assert_eq!(
            pair[0].error.as_deref(),
            Some(format!("upstream 503 on attempt {}", i + 1).as_str())
        );
        let waited = pair[1].started_at - pair[0].finished_at;
        assert!(
            waited >= chrono::Duration::milliseconds(40),
            "backoff waited only {waited}"
        );
    }
    assert_eq!(
        status.stages[1].state,
        StageState::Pending,
        "a failed stage blocks its dependents"
    );
    assert_eq!(status.state, ItemState::Failed);
    assert_eq!(
        stage_event_names(&engine, "d", "fetch").await,
        [
            "started",
            "retry_scheduled",
            "started",
            "retry_scheduled",
            "started",
            "failed",
        ]
    );
}

pub async fn a_retried_stage_can_succeed<S: Store>(store: S) {
    let calls = Counter::default();
    let c = calls.clone();
    let flaky = stage("fetch", move |_, _| {
        let c = c.clone();
        async move {
            if c.bump() < 3 {
                Err(Error::stage("not yet"))
            } else {
                StageOutcome::complete_with("fetched")
            }
        }
    })
    .policy(StagePolicy::new().retries(5).backoff(Backoff::Exponential {
        base: Duration::from_millis(5),
        max: Duration::from_millis(20),
    }));
    let engine = engine(Pipeline::builder().stage(flaky).build().unwrap(), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.stages[0].state, StageState::Completed);
    assert_eq!(status.stages[0].attempt, 3);
    assert_eq!(status.stages[0].output, Some(json!("fetched")));
    let results: Vec<_> = status.stages[0].attempts.iter().map(|a| a.result).collect();
    assert_eq!(
        results,
        [
            AttemptResult::Error,
            AttemptResult::Error,
            AttemptResult::Completed
        ]
    );
}

pub async fn a_retry_outcome_runs_again_after_its_delay<S: Store>(store: S) {
    let calls = Counter::default();
    let c = calls.clone();
    let limited = stage("api", move |_, _| {
        let c = c.clone();
        async move {
            Ok(match c.bump() {
                1 => StageOutcome::retry(Duration::from_millis(60), "rate limited"),
                _ => StageOutcome::complete(),
            })
        }
    })
    .policy(StagePolicy::new().retries(1));
    let engine = engine(Pipeline::builder().stage(limited).build().unwrap(), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    let api = &status.stages[0];
    assert_eq!(api.state, StageState::Completed);
    assert_eq!(api.attempts[0].result, AttemptResult::RetryRequested);
    assert_eq!(api.attempts[0].error.as_deref(), Some("rate limited"));
    assert!(
        api.attempts[1].started_at - api.attempts[0].finished_at
            >= chrono::Duration::milliseconds(60)
    );
}

pub async fn timeout_is_a_failed_attempt<S: Store>(store: S) {
    let slow = stage("slow", |_, _| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(StageOutcome::complete())
    })
    .policy(StagePolicy::new().timeout(Duration::from_millis(50)));
    let engine = engine(Pipeline::builder().stage(slow).build().unwrap(), store);
    engine.submit(doc("d")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), engine.run_until_idle())
        .await
        .expect("the timeout stopped the stage")
        .unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.stages[0].state, StageState::Failed);
    assert_eq!(status.stages[0].attempts[0].result, AttemptResult::TimedOut);
    assert_eq!(
        status.stages[0].last_error.as_deref(),
        Some("timed out after 50ms (after 1 attempts)")
    );
}

pub async fn panic_is_a_failed_attempt_and_others_go_on<S: Store>(store: S) {
    let fragile = stage("parse", |doc, _| async move {
        if doc.id == "bad" {
            panic!("unexpected byte 0xff");
        }
        Ok(StageOutcome::complete())
    });
    let engine = engine(Pipeline::builder().stage(fragile).build().unwrap(), store);
    engine.submit(doc("bad")).await.unwrap();
    engine.submit(doc("good")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let bad = engine.status("bad").await.unwrap();
    assert_eq!(bad.stages[0].state, StageState::Failed);
    assert_eq!(bad.stages[0].attempts[0].result, AttemptResult::Panicked);
    assert_eq!(
        bad.stages[0].last_error.as_deref(),
        Some("panicked: unexpected byte 0xff (after 1 attempts)")
    );
    assert_eq!(
        engine.status("good").await.unwrap().state,
        ItemState::Completed
    );
}

fn fan_out_pipeline(
    runs: Trace,
    fail_once: &'static [&'static str],
    policy: StagePolicy,
) -> Pipeline<Doc> {
    let failures = Arc::new(std::sync::Mutex::new(fail_once.to_vec()));
    let enrich = stage("enrich", move |_, ctx| {
        let (runs, failures) = (runs.clone(), failures.clone());
        async move {
            let Some(source) = ctx.subtask() else {
                return Ok(StageOutcome::fan_out([
                    "musicbrainz",
                    "discogs",
                    "wikidata",
                ]));
            };
            runs.push(source);
            let mut failures = failures.lock().unwrap();
            if let Some(i) = failures.iter().position(|f| *f == source) {
                failures.remove(i);
                return Err(Error::stage(format!("{source} unreachable")));
            }
            StageOutcome::complete_with(format!("tags from {source}"))
        }
    })
    .policy(policy);
    Pipeline::builder()
        .stage(done("scan"))
        .stage(enrich)
        .stage(done("export"))
        .edge("scan", "enrich")
        .edge("enrich", "export")
        .build()
        .unwrap()
}

pub async fn fan_out_retries_only_failed_subtasks<S: Store>(store: S) {
    let runs = Trace::default();
    let engine = engine(
        fan_out_pipeline(runs.clone(), &["discogs"], StagePolicy::new()),
        store,
    );
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    let enrich = &status.stages[1];
    assert_eq!(enrich.state, StageState::Failed);
    assert_eq!(
        enrich.last_error.as_deref(),
        Some("subtasks failed: discogs")
    );
    let states: Vec<_> = enrich
        .subtasks
        .iter()
        .map(|s| (s.name.as_str(), s.state))
        .collect();
    assert_eq!(
        states,
        [
            ("musicbrainz", StageState::Completed),
            ("discogs", StageState::Failed),
            ("wikidata", StageState::Completed),
        ]
    );
    assert_eq!(
        enrich.subtasks[1].last_error.as_deref(),
        Some("discogs unreachable (after 1 attempts)")
    );
    assert_eq!(status.stages[2].state, StageState::Pending);

    engine.retry("d", "enrich").await.unwrap();
    engine.run_until_idle().await.unwrap();
    let mut ran = runs.entries();
    ran.sort();
    assert_eq!(
        ran,
        ["discogs", "discogs", "musicbrainz", "wikidata"],
        "only the failed subtask ran again"
    );
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    assert_eq!(
        status.stages[1].output,
        Some(json!({
            "musicbrainz": "tags from musicbrainz",
            "discogs": "tags from discogs",
            "wikidata": "tags from wikidata",
        }))
    );
}

pub async fn fan_out_subtask_retries_follow_the_policy<S: Store>(store: S) {
    let runs = Trace::default();
    let policy = StagePolicy::new()
        .retries(1)
        .backoff(Backoff::Fixed(Duration::from_millis(10)));
    let engine = engine(fan_out_pipeline(runs.clone(), &["wikidata"], policy), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed, "{status}");
    let attempts: Vec<_> = status.stages[1]
        .subtasks
        .iter()
        .map(|s| (s.name.as_str(), s.attempt))
        .collect();
    assert_eq!(
        attempts,
        [("musicbrainz", 1), ("discogs", 1), ("wikidata", 2)]
    );
    assert_eq!(
        runs.entries().iter().filter(|r| *r == "wikidata").count(),
        2
    );
}

fn review_pipeline(trace: Trace) -> Pipeline<Doc> {
    Pipeline::builder()
        .stage(stage("tag", |_, _| async {
            StageOutcome::complete_with(json!(["rock"]))
        }))
        .stage(stage("review", |_, ctx| async move {
            let tags: serde_json::Value = ctx.output_of("tag")?;
            Ok(StageOutcome::needs_review(
                ReviewRequest::new("Check the tags")
                    .details(json!({"tags": tags}))?
                    .proposed_output(json!({"tags": tags}))?,
            ))
        }))
        .stage(stage("export", move |_, ctx| {
            let trace = trace.clone();
            async move {
                let reviewed: serde_json::Value = ctx.output_of("review")?;
                trace.push(reviewed.to_string());
                Ok(StageOutcome::complete())
            }
        }))
        .edge("tag", "review")
        .edge("review", "export")
        .build()
        .unwrap()
}

pub async fn approve_completes_with_the_proposed_output<S: Store>(store: S) {
    let exported = Trace::default();
    let engine = engine(review_pipeline(exported.clone()), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::AwaitingReview);
    assert_eq!(status.stages[1].state, StageState::AwaitingReview);
    let waiting = engine.awaiting_review().await.unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(
        (waiting[0].item_id.as_str(), waiting[0].stage.as_str()),
        ("d", "review")
    );
    assert_eq!(waiting[0].review.request.summary, "Check the tags");
    assert_eq!(waiting[0].review.request.details, json!({"tags": ["rock"]}));
    assert_eq!(waiting[0].review.round, 1);
    assert!(
        exported.entries().is_empty(),
        "nothing runs past a parked review"
    );

    engine
        .approve("d", "review", Decision::by("alice").note("looks right"))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    assert_eq!(exported.entries(), [r#"{"tags":["rock"]}"#]);
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Completed);
    let decision = status.stages[1]
        .review
        .as_ref()
        .unwrap()
        .decision
        .as_ref()
        .unwrap();
    assert_eq!(decision.kind, DecisionKind::Approved);
    assert_eq!(decision.by, "alice");
    assert_eq!(decision.note.as_deref(), Some("looks right"));
    assert!(engine.awaiting_review().await.unwrap().is_empty());
    assert_eq!(
        stage_event_names(&engine, "d", "review").await,
        ["started", "review_requested", "review_decided", "completed"]
    );
}

pub async fn reject_fails_the_stage_and_retry_asks_again<S: Store>(store: S) {
    let exported = Trace::default();
    let engine = engine(review_pipeline(exported.clone()), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    engine
        .reject("d", "review", Decision::by("bob"), "wrong genre")
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Failed);
    assert_eq!(status.stages[1].state, StageState::Failed);
    assert_eq!(
        status.stages[1].last_error.as_deref(),
        Some("rejected by bob: wrong genre")
    );
    let decision = status.stages[1]
        .review
        .as_ref()
        .unwrap()
        .decision
        .clone()
        .unwrap();
    assert_eq!(
        (decision.kind, decision.reason.as_deref()),
        (DecisionKind::Rejected, Some("wrong genre"))
    );
    assert!(exported.entries().is_empty());

    engine.retry("d", "review").await.unwrap();
    engine.run_until_idle().await.unwrap();
    let waiting = engine.awaiting_review().await.unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(
        waiting[0].review.round, 2,
        "a new review round after the retry"
    );
    assert!(waiting[0].review.decision.is_none());
    let stale = engine
        .approve("d", "review", Decision::by("bob").for_round(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            stale,
            Error::StaleDecision {
                answered: 1,
                current: 2,
                ..
            }
        ),
        "{stale}"
    );
    engine
        .approve("d", "review", Decision::by("carol").for_round(2))
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    assert_eq!(
        engine.status("d").await.unwrap().state,
        ItemState::Completed
    );
}

pub async fn approve_with_edits_replaces_the_output<S: Store>(store: S) {
    let exported = Trace::default();
    let engine = engine(review_pipeline(exported.clone()), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    engine
        .approve_with_edits(
            "d",
            "review",
            Decision::by("alice"),
            json!({"tags": ["jazz"]}),
        )
        .await
        .unwrap();
    engine.run_until_idle().await.unwrap();
    assert_eq!(exported.entries(), [r#"{"tags":["jazz"]}"#]);
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.stages[1].output, Some(json!({"tags": ["jazz"]})));
    let decision = status.stages[1]
        .review
        .as_ref()
        .unwrap()
        .decision
        .clone()
        .unwrap();
    assert_eq!(decision.kind, DecisionKind::ApprovedWithEdits);
    assert_eq!(decision.edits, Some(json!({"tags": ["jazz"]})));
}

pub async fn decisions_on_the_wrong_state_are_typed_errors<S: Store>(store: S) {
    let engine = engine(review_pipeline(Trace::default()), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let before = engine.status("d").await.unwrap();
    let log_before = events_of(&engine, "d").await.len();

    let err = engine
        .approve("d", "tag", Decision::by("alice"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::NotAwaitingReview {
                state: StageState::Completed,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "stage `tag` of item `d` is completed, not awaiting review"
    );
    let err = engine
        .approve("nope", "review", Decision::by("alice"))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "unknown item `nope`");
    let err = engine
        .reject("d", "publish", Decision::by("alice"), "x")
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "item `d` has no stage `publish`");
    assert_eq!(
        engine.status("d").await.unwrap(),
        before,
        "failed decisions change nothing"
    );
    assert_eq!(events_of(&engine, "d").await.len(), log_before);

    engine
        .approve("d", "review", Decision::by("alice"))
        .await
        .unwrap();
    let again = engine
        .reject("d", "review", Decision::by("bob"), "late")
        .await
        .unwrap_err();
    assert!(matches!(
        again,
        Error::NotAwaitingReview {
            state: StageState::Completed,
            ..
        }
    ));
    let decision = engine.status("d").await.unwrap().stages[1]
        .review
        .clone()
        .unwrap()
        .decision
        .unwrap();
    assert_eq!(
        decision.by, "alice",
        "a late decision does not overwrite the first"
    );
}

/// Submits item `d`, runs the engine until idle in a task, and cancels the
/// item once `started` says its stage is running; returns the run.
async fn cancel_once_started<S: Store>(
    engine: &treadle::Engine<Doc, S>,
    started: &tokio::sync::Notify,
) -> tokio::task::JoinHandle<treadle::Result<treadle::RunReport>> {
    engine.submit(doc("d")).await.unwrap();
    let runner = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_until_idle().await }
    });
    started.notified().await;
    engine.cancel("d").await.unwrap();
    runner
}

pub async fn cancel_stops_running_stages<S: Store>(store: S) {
    let trace = Trace::default();
    let started = Arc::new(tokio::sync::Notify::new());
    let (t, s) = (trace.clone(), started.clone());
    let pipeline = then_publish(stage("transcode", move |_, _| {
        let (t, s) = (t.clone(), s.clone());
        async move {
            s.notify_one();
            tokio::time::sleep(Duration::from_secs(30)).await;
            t.push("transcode finished");
            Ok(StageOutcome::complete())
        }
    }));
    let engine = engine(pipeline, store);
    let runner = cancel_once_started(&engine, &started).await;
    let report = tokio::time::timeout(Duration::from_secs(5), runner)
        .await
        .expect("cancel stopped the running stage")
        .unwrap()
        .unwrap();
    assert_eq!(report.discarded, 1);
    assert!(trace.entries().is_empty());
    let status = engine.status("d").await.unwrap();
    assert_eq!(status.state, ItemState::Cancelled);
    assert_eq!(status.stages[0].state, StageState::Cancelled);
    assert_eq!(status.stages[1].state, StageState::Cancelled);
    assert_eq!(
        events_of(&engine, "d").await.last().unwrap().kind,
        EventKind::ItemCancelled
    );
    let err = engine.retry("d", "transcode").await.unwrap_err();
    assert!(matches!(err, Error::ItemCancelled(_)), "{err:?}");
    engine
        .cancel("d")
        .await
        .expect("cancelling twice is a no-op");
}

/// A stage doing blocking work watches `ctx.is_cancelled()`; cancelling the
/// item must raise the flag its context shares with the engine.
pub async fn cancel_raises_the_running_stages_cancel_flag<S: Store>(store: S) {
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<bool>();
    let seen_tx = Arc::new(std::sync::Mutex::new(seen_tx));
    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    let pipeline = Pipeline::builder()
        .stage(stage("watch", move |_, ctx| {
            let (seen, s) = (seen_tx.clone(), s.clone());
            async move {
                std::thread::spawn(move || {
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while !ctx.is_cancelled() && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let _ = seen.lock().unwrap().send(ctx.is_cancelled());
                });
                s.notify_one();
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(StageOutcome::complete())
            }
        }))
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    let runner = cancel_once_started(&engine, &started).await;
    let raised = tokio::task::spawn_blocking(move || seen_rx.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(raised, Ok(true), "the stage's context saw the cancellation");
    tokio::time::timeout(Duration::from_secs(5), runner)
        .await
        .expect("cancel stopped the running stage")
        .unwrap()
        .unwrap();
}

pub async fn events_are_logged_and_broadcast_in_commit_order<S: Store>(store: S) {
    let engine = engine(
        fan_out_pipeline(Trace::default(), &[], StagePolicy::new()),
        store,
    );
    let mut feed = engine.subscribe();
    for i in 0..8 {
        engine.submit(doc(&format!("d{i}"))).await.unwrap();
    }
    engine.run_until_idle().await.unwrap();
    let log = engine.events(Default::default()).await.unwrap();
    let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "gapless, in order"
    );
    // A store may deliver to subscribers after the call that committed
    // returned (PostgreSQL's feed runs in a task of its own): wait for as
    // many events as the log holds (the timeout only turns a hang into a
    // failure).
    let mut live = Vec::new();
    while live.len() < log.len() {
        match tokio::time::timeout(Duration::from_secs(10), feed.recv()).await {
            Ok(Ok(event)) => live.push(event),
            other => panic!("the feed stopped after {} events: {other:?}", live.len()),
        }
    }
    assert!(feed.try_recv().is_err(), "no event beyond the log");
    assert_eq!(live, log, "subscribers see exactly the log, in log order");
    // Per item: submitted first, completed last, and each stage's events in causal order.
    for i in 0..8 {
        let names: Vec<_> = events_of(&engine, &format!("d{i}"))
            .await
            .iter()
            .map(|e| kind_name(&e.kind))
            .collect();
        assert_eq!(names.first().unwrap(), "item_submitted");
        assert_eq!(names.last().unwrap(), "item_completed");
        assert_eq!(
            names.iter().filter(|n| *n == "completed").count(),
            3 + 3,
            "3 stages + 3 subtasks"
        );
    }
    let names = stage_event_names(&engine, "d0", "enrich").await;
    assert_eq!(names, ["started", "fanned_out", "completed"]);
}

pub async fn status_displays_every_stage<S: Store>(store: S) {
    let engine = engine(
        fan_out_pipeline(Trace::default(), &["discogs"], StagePolicy::new()),
        store,
    );
    engine.submit(doc("doc-7")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let text = engine.status("doc-7").await.unwrap().to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "item doc-7 — failed (pipeline version 1)");
    assert!(
        lines[1].starts_with("  scan    completed        attempt 1"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("  enrich  failed           attempt 1"),
        "{text}"
    );
    assert!(
        lines[2].ends_with("error: subtasks failed: discogs"),
        "{text}"
    );
    assert!(
        lines[4].contains("- discogs     failed           attempt 1  error: discogs unreachable"),
        "{text}"
    );
    assert_eq!(lines[6], "  export  pending        ");
}

pub async fn submit_is_idempotent<S: Store>(store: S) {
    let trace = Trace::default();
    let engine = engine(linear(&["only"], &trace), store);
    assert!(engine.submit(doc("d")).await.unwrap());
    engine.run_until_idle().await.unwrap();
    let changed = Doc {
        id: "d".into(),
        pages: 99,
    };
    assert!(
        !engine.submit(changed).await.unwrap(),
        "a known id is not submitted again"
    );
    engine.run_until_idle().await.unwrap();
    assert_eq!(trace.entries(), ["only:d"]);
    let submitted = events_of(&engine, "d")
        .await
        .iter()
        .filter(|e| e.kind == EventKind::ItemSubmitted)
        .count();
    assert_eq!(submitted, 1);
}

pub async fn retry_of_a_stage_that_has_not_failed_is_an_error<S: Store>(store: S) {
    let engine = engine(linear(&["a", "b"], &Trace::default()), store);
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let err = engine.retry("d", "a").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "stage `a` of item `d` is completed; only a failed stage can be retried"
    );
    assert!(
        matches!(engine.retry("x", "a").await.unwrap_err(), Error::UnknownItem(id) if id == "x")
    );
}

pub async fn items_by_stage_and_state<S: Store>(store: S) {
    let engine = engine(review_pipeline(Trace::default()), store);
    for id in ["c", "a", "b"] {
        engine.submit(doc(id)).await.unwrap();
    }
    engine.run_until_idle().await.unwrap();
    assert_eq!(
        engine
            .items_in("review", StageState::AwaitingReview)
            .await
            .unwrap(),
        ["c", "a", "b"]
    );
    assert_eq!(
        engine.items_in("tag", StageState::Completed).await.unwrap(),
        ["c", "a", "b"]
    );
    engine
        .approve("a", "review", Decision::by("x"))
        .await
        .unwrap();
    assert_eq!(
        engine
            .items_in("review", StageState::AwaitingReview)
            .await
            .unwrap(),
        ["c", "b"]
    );
    assert_eq!(
        engine
            .items_in("review", StageState::Completed)
            .await
            .unwrap(),
        ["a"]
    );
    assert!(
        engine
            .items_in("export", StageState::Failed)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn long_lived_worker_picks_up_new_items_and_decisions<S: Store>(store: S) {
    let exported = Trace::default();
    let engine = engine(review_pipeline(exported.clone()), store);
    let mut feed = engine.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run(async { stopped.await.unwrap_or(()) }).await }
    });
    engine.submit(doc("late")).await.unwrap();
    wait_for(
        &mut feed,
        EventKind::ReviewRequested {
            summary: "Check the tags".into(),
        },
    )
    .await;
    engine
        .approve("late", "review", Decision::by("alice"))
        .await
        .unwrap();
    wait_for(&mut feed, EventKind::ItemCompleted).await;
    stop.send(()).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.attempts, 3);
    assert_eq!(exported.entries().len(), 1);
}

async fn wait_for(feed: &mut tokio::sync::broadcast::Receiver<treadle::Event>, kind: EventKind) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while feed.recv().await.unwrap().kind != kind {}
    })
    .await
    .expect("the worker made progress")
}

pub async fn review_deadlines_decide_when_they_pass<S: Store>(store: S) {
    let pipeline = Pipeline::builder()
        .stage(stage("review", |doc, _| async move {
            let then = match doc.id.as_str() {
                "reject-me" => DeadlineAction::Reject {
                    reason: "nobody checked".into(),
                },
                _ => DeadlineAction::Approve,
            };
            // Deadlines that pass during the test, and ones that never do.
            let after = match doc.id.as_str() {
                "approve-me" | "reject-me" => Duration::from_millis(50),
                _ => Duration::from_secs(3600),
            };
            Ok(StageOutcome::needs_review(
                ReviewRequest::new("check")
                    .proposed_output("auto")?
                    .deadline_after(after, then),
            ))
        }))
        .stage(done("export"))
        .edge("review", "export")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    for id in ["decided", "later"] {
        engine.submit(doc(id)).await.unwrap();
    }
    engine.run_until_idle().await.unwrap();
    assert_eq!(engine.awaiting_review().await.unwrap().len(), 2);
    engine
        .approve("decided", "review", Decision::by("alice"))
        .await
        .unwrap();
    // Once decided, a review is never due, even past its deadline.
    let past_every_deadline = chrono::Utc::now() + chrono::Duration::hours(2);
    let due: Vec<String> = engine
        .store()
        .due_reviews(past_every_deadline)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.item_id)
        .collect();
    assert_eq!(due, ["later"], "a deadline never overrides a person");
    for id in ["approve-me", "reject-me"] {
        engine.submit(doc(id)).await.unwrap();
    }
    engine.run_until_idle().await.unwrap();
    // Wait until both short deadlines have passed (the run may already
    // have decided them), then run again: they are decided now.
    for id in ["approve-me", "reject-me"] {
        let review = engine.status(id).await.unwrap().stages[0].review.clone();
        let deadline = review.unwrap().request.deadline.unwrap().at;
        if let Ok(wait) = (deadline - chrono::Utc::now()).to_std() {
            tokio::time::sleep(wait).await;
        }
    }
    engine.run_until_idle().await.unwrap();

    let approved = engine.status("approve-me").await.unwrap();
    assert_eq!(approved.state, ItemState::Completed, "{approved}");
    assert_eq!(approved.stages[0].output, Some(json!("auto")));
    let decision = approved.stages[0].review.clone().unwrap().decision.unwrap();
    assert_eq!(
        (decision.kind, decision.by.as_str()),
        (DecisionKind::Approved, DEADLINE_REVIEWER)
    );
    assert!(decision.note.unwrap().starts_with("the review deadline "));

    let rejected = engine.status("reject-me").await.unwrap();
    assert_eq!(
        rejected.stages[0].last_error.as_deref(),
        Some("rejected by treadle:deadline: nobody checked")
    );
    let by_person = engine.status("decided").await.unwrap().stages[0]
        .review
        .clone()
        .unwrap();
    assert_eq!(
        by_person.decision.unwrap().by,
        "alice",
        "a deadline never overrides a person"
    );
    let waiting = engine.awaiting_review().await.unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(
        waiting[0].item_id, "later",
        "a deadline in the future has not fired"
    );
    assert_eq!(
        engine.store().next_review_deadline().await.unwrap(),
        waiting[0].review.request.deadline.as_ref().map(|d| d.at)
    );
}

pub async fn a_failure_leaves_the_item_active_while_a_branch_can_run<S: Store>(store: S) {
    use treadle::store::{ClaimRequest, Commit, Transition};
    // Two independent stages: claim one and fail it, before the other runs.
    let pipeline = Pipeline::builder()
        .stage(done("left"))
        .stage(done("right"))
        .stage(done("join"))
        .edge("left", "join")
        .edge("right", "join")
        .build()
        .unwrap();
    let engine = engine(pipeline, store);
    engine.submit(doc("d")).await.unwrap();
    let now = chrono::Utc::now();
    let request = ClaimRequest {
        owner: "test".into(),
        limit: 1,
        lease: Duration::from_secs(30),
        now,
        crash_retries: treadle::CrashRetries::DEFAULT,
        lane: None,
    };
    let claim = engine
        .store()
        .claim(request)
        .await
        .unwrap()
        .claims
        .remove(0);
    let failed = claim.task.stage.to_string();
    engine
        .store()
        .commit(Commit {
            task: claim.task.clone(),
            generation: claim.generation,
            attempt: treadle::AttemptRecord {
                attempt: 1,
                started_at: now,
                finished_at: now,
                result: AttemptResult::Failed,
                error: Some("broken".into()),
            },
            transition: Transition::Fail {
                reason: "broken".into(),
            },
        })
        .await
        .unwrap();
    let status = engine.status("d").await.unwrap();
    let other = status
        .stages
        .iter()
        .find(|s| s.name != failed && s.name != "join")
        .unwrap();
    assert_eq!((other.state, other.waiting_on), (StageState::Pending, 0));
    assert_eq!(
        status.stages.last().unwrap().waiting_on,
        2,
        "join still waits for both"
    );
    assert_eq!(
        status.state,
        ItemState::Active,
        "the other branch can still run: {status}"
    );
    engine.run_until_idle().await.unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(
        status.state,
        ItemState::Failed,
        "only the blocked join is left: {status}"
    );
    assert_eq!(status.stages.last().unwrap().waiting_on, 1);
}
