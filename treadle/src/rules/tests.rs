//! The rules on their own, without a store: a partial fan-out load, the
//! event order of a linear run, decision checks and migration.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;

use super::*;
use crate::definition::PipelineDef;
use crate::error::Error;
use crate::review::{Decision, ReviewRequest};
use crate::state::AttemptResult;
use crate::status::AttemptRecord;

fn t(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_000_000 + s, 0).unwrap()
}

fn graph(version: u32, stages: &[&str], edges: &[(&str, &str)]) -> VersionGraph {
    VersionGraph::new(
        version,
        PipelineDef {
            stages: stages.iter().map(|s| s.to_string()).collect(),
            edges: edges
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        },
    )
}

fn submit(graph: &VersionGraph) -> (ItemRecord, Effects) {
    new_item(
        graph,
        NewItem {
            id: "i".into(),
            payload: "{}".into(),
            version: graph.version(),
            at: t(0),
        },
    )
}

fn request(now: DateTime<Utc>) -> ClaimRequest {
    ClaimRequest {
        owner: "w".into(),
        limit: 10,
        lease: Duration::from_secs(60),
        now,
        crash_retries: CrashRetries::DEFAULT,
        lane: None,
    }
}

fn end(claim: &Claim, transition: Transition, at: DateTime<Utc>) -> Commit {
    Commit {
        task: claim.task.clone(),
        generation: claim.generation,
        attempt: AttemptRecord {
            attempt: claim.attempt,
            started_at: claim.started_at,
            finished_at: at,
            result: AttemptResult::Completed,
            error: None,
        },
        transition,
    }
}

fn kinds(fx: &Effects) -> Vec<EventKind> {
    fx.events.iter().map(|e| e.kind.clone()).collect()
}

#[test]
fn a_linear_item_unblocks_each_stage_and_completes_once() {
    let g = graph(1, &["a", "b"], &[("a", "b")]);
    let (mut item, fx) = submit(&g);
    assert_eq!(fx.runnable, [UnitRef::stage(0)]);
    assert_eq!(item.stages[1].waiting, 1);
    let mut fx = Effects::default();
    assert!(claim(&mut item, UnitRef::stage(1), &request(t(1)), &mut fx).is_none());
    let a = claim(&mut item, UnitRef::stage(0), &request(t(1)), &mut fx).unwrap();
    assert_eq!((a.attempt, a.generation, a.version), (1, 1, 1));
    let mut fx = Effects::default();
    let complete = Transition::Complete {
        output: Some(json!(7)),
    };
    commit(
        &g,
        &mut item,
        end(&a, complete, t(2)),
        &mut AllLoaded,
        &mut fx,
    )
    .unwrap();
    assert_eq!(kinds(&fx), [EventKind::Completed]);
    assert_eq!(fx.runnable, [UnitRef::stage(1)]);
    let mut fx = Effects::default();
    let b = claim(&mut item, UnitRef::stage(1), &request(t(3)), &mut fx).unwrap();
    assert_eq!(b.outputs["a"], json!(7));
    let mut fx = Effects::default();
    let done = Transition::Complete { output: None };
    commit(
        &g,
        &mut item,
        end(&b, done.clone(), t(4)),
        &mut AllLoaded,
        &mut fx,
    )
    .unwrap();
    assert_eq!(kinds(&fx), [EventKind::Completed, EventKind::ItemCompleted]);
    // The same claim cannot commit twice.
    let again = commit(&g, &mut item, end(&b, done, t(5)), &mut AllLoaded, &mut fx);
    assert!(matches!(again, Err(Error::LeaseLost { .. })));
}

/// Answers a fan-in from a fixed list of stored rows, counting the calls.
struct Stored(Vec<UnitRecord>, usize);

impl SubtaskSource for Stored {
    fn subtasks(&mut self, _: &ItemRecord, _: usize) -> crate::error::Result<Vec<UnitRecord>> {
        self.1 += 1;
        Ok(self.0.clone())
    }
}

#[test]
fn a_fan_in_with_partial_rows_loads_the_rest_only_for_the_last_subtask() {
    let g = graph(1, &["fan"], &[]);
    let (mut item, _) = submit(&g);
    let mut fx = Effects::default();
    let stage = claim(&mut item, UnitRef::stage(0), &request(t(1)), &mut fx).unwrap();
    let names = vec!["x".to_owned(), "y".to_owned()];
    let fan_out = Transition::FanOut { subtasks: names };
    commit(
        &g,
        &mut item,
        end(&stage, fan_out, t(2)),
        &mut AllLoaded,
        &mut fx,
    )
    .unwrap();
    // What a store with row-by-row loading holds: the counters, one row.
    let mut stored_rows = item.stages[0].fan_out.as_ref().unwrap().rows.clone();
    let fan = item.stages[0].fan_out.as_mut().unwrap();
    fan.rows.truncate(1);
    fan.complete = false;
    let x = claim(
        &mut item,
        UnitRef {
            stage: 0,
            subtask: Some(0),
        },
        &request(t(3)),
        &mut fx,
    )
    .unwrap();
    let mut source = Stored(Vec::new(), 0);
    let mut fx = Effects::default();
    let out = Transition::Complete {
        output: Some(json!("x!")),
    };
    commit(&g, &mut item, end(&x, out, t(4)), &mut source, &mut fx).unwrap();
    assert_eq!(source.1, 0, "one of two ended: no need for the others");
    assert_eq!(item.stages[0].fan_out.as_ref().unwrap().open, 1);
    // The other subtask ended elsewhere; its row is what the store has.
    stored_rows[0] = item.stages[0].fan_out.as_ref().unwrap().rows[0].clone();
    stored_rows[1].state = StageState::Running;
    stored_rows[1].generation = 1;
    item.stages[0].fan_out.as_mut().unwrap().rows = vec![stored_rows[1].clone()];
    stored_rows[1].output = Some(json!("stale"));
    let y = Claim {
        task: item.key(UnitRef {
            stage: 0,
            subtask: Some(1),
        }),
        attempt: 1,
        generation: 1,
        started_at: t(4),
        payload: "{}".into(),
        outputs: Default::default(),
        version: 1,
        crashes: 0,
        cannot_run: None,
        edits_to_check: None,
    };
    let mut source = Stored(stored_rows, 0);
    let out = Transition::Complete {
        output: Some(json!("y!")),
    };
    commit(&g, &mut item, end(&y, out, t(5)), &mut source, &mut fx).unwrap();
    assert_eq!(source.1, 1);
    assert_eq!(item.stages[0].unit.state, StageState::Completed);
    assert_eq!(
        item.stages[0].unit.output,
        Some(json!({"x": "x!", "y": "y!"})),
        "the row changed in this transition wins over the stored one"
    );
}

#[test]
fn decisions_check_the_state_and_the_round_and_change_nothing_when_refused() {
    let g = graph(1, &["review", "next"], &[("review", "next")]);
    let (mut item, _) = submit(&g);
    let mut fx = Effects::default();
    let decision = |round| DecisionCommit {
        item_id: "i".into(),
        stage: "review".into(),
        verdict: Verdict::Approve,
        decision: match round {
            Some(r) => Decision::by("ann").for_round(r),
            None => Decision::by("ann"),
        },
        at: t(9),
    };
    let early = decide(&g, &mut item, decision(None), &mut fx);
    assert!(matches!(early, Err(Error::NotAwaitingReview { .. })));
    let c = claim(&mut item, UnitRef::stage(0), &request(t(1)), &mut fx).unwrap();
    let ask = Transition::AwaitReview(ReviewRequest::new("look"));
    commit(&g, &mut item, end(&c, ask, t(2)), &mut AllLoaded, &mut fx).unwrap();
    let before = item.clone();
    let mut fx = Effects::default();
    let stale = decide(&g, &mut item, decision(Some(2)), &mut fx);
    assert!(matches!(
        stale,
        Err(Error::StaleDecision {
            answered: 2,
            current: 1,
            ..
        })
    ));
    assert_eq!(item, before);
    assert!(fx.is_empty());
    decide(&g, &mut item, decision(Some(1)), &mut fx).unwrap();
    assert_eq!(fx.decided, Some(0));
    assert_eq!(fx.runnable, [UnitRef::stage(1)]);
}

#[test]
fn migrating_adds_a_stage_at_the_end_and_keeps_completed_ones() {
    let v1 = graph(1, &["a", "b"], &[("a", "b")]);
    let v2 = graph(2, &["a", "b", "c"], &[("a", "b"), ("b", "c")]);
    let (mut item, _) = submit(&v1);
    let mut fx = Effects::default();
    let a = claim(&mut item, UnitRef::stage(0), &request(t(1)), &mut fx).unwrap();
    let done = Transition::Complete { output: None };
    commit(&v1, &mut item, end(&a, done, t(2)), &mut AllLoaded, &mut fx).unwrap();
    let mut fx = Effects::default();
    assert_eq!(
        migrate(&v1, &v2, &mut item, t(3), &mut fx),
        MigrateOutcome::Moved
    );
    assert_eq!(item.version, 2);
    assert_eq!(item.stages.len(), 3);
    assert_eq!(item.stages[0].unit.state, StageState::Completed);
    assert_eq!(item.stages[1].waiting, 0);
    assert_eq!(item.stages[2].waiting, 1);
    assert_eq!(item.stages[2].unit.position, 2);
    assert_eq!(fx.runnable, [UnitRef::stage(1)]);
    assert_eq!(kinds(&fx), [EventKind::ItemMigrated { from: 1, to: 2 }]);
    let mut fx = Effects::default();
    assert_eq!(
        migrate(&v1, &v2, &mut item, t(4), &mut fx),
        MigrateOutcome::AlreadyCurrent
    );
    assert!(fx.is_empty());
}

#[test]
fn an_expired_lease_is_recovered_by_the_next_claim() {
    let g = graph(1, &["a"], &[]);
    let (mut item, _) = submit(&g);
    let mut fx = Effects::default();
    claim(&mut item, UnitRef::stage(0), &request(t(0)), &mut fx).unwrap();
    let mut fx = Effects::default();
    assert!(claim(&mut item, UnitRef::stage(0), &request(t(30)), &mut fx).is_none());
    // Without a crash backoff the unit runs again in the same claim.
    let at_once = ClaimRequest {
        crash_retries: CrashRetries {
            backoff: crate::stage::Backoff::Fixed(Duration::ZERO),
            ..CrashRetries::DEFAULT
        },
        ..request(t(61))
    };
    let again = claim(&mut item, UnitRef::stage(0), &at_once, &mut fx).unwrap();
    assert_eq!((again.attempt, again.generation), (2, 2));
    assert_eq!(fx.attempts[0].1.result, AttemptResult::Abandoned);
    assert!(matches!(
        kinds(&fx)[..],
        [
            EventKind::Recovered { attempt: 1, .. },
            EventKind::Started { attempt: 2, .. }
        ]
    ));
}

#[test]
fn an_abandoned_attempt_is_retried_after_the_crash_backoff_until_the_limit() {
    let g = graph(1, &["a"], &[]);
    let (mut item, _) = submit(&g);
    let a = UnitRef::stage(0);
    let mut now = t(0);
    let mut first = Effects::default();
    let claimed = claim(&mut item, a, &request(now), &mut first).unwrap();
    assert_eq!((claimed.attempt, claimed.crashes), (1, 0));
    for crash in 1..=CrashRetries::DEFAULT.limit {
        // The worker died: its lease (60 s) ran out.
        now += chrono::Duration::seconds(61);
        let mut fx = Effects::default();
        assert!(
            claim(&mut item, a, &request(now), &mut fx).is_none(),
            "backs off first"
        );
        let unit = &item.stages[0].unit;
        assert_eq!(unit.state, StageState::RetryScheduled);
        assert_eq!(unit.crashes, crash);
        let delay = CrashRetries::DEFAULT.backoff.nominal_delay(crash);
        let due = now + chrono::Duration::from_std(delay).unwrap();
        assert_eq!(fx.scheduled, [(due, a)]);
        assert_eq!(fx.attempts[0].1.result, AttemptResult::Abandoned);
        assert!(matches!(
            kinds(&fx)[..],
            [
                EventKind::Recovered { .. },
                EventKind::RetryScheduled { .. }
            ]
        ));
        now = due;
        let mut fx = Effects::default();
        let again = claim(&mut item, a, &request(now), &mut fx).unwrap();
        assert_eq!((again.attempt, again.crashes), (crash + 1, crash));
        assert_eq!(again.cannot_run, None);
    }
    // One crash more than the limit: claimed only to be failed, saying why.
    now += chrono::Duration::seconds(61);
    let mut fx = Effects::default();
    let last = claim(&mut item, a, &request(now), &mut fx).unwrap();
    let reason = last.cannot_run.clone().expect("the limit is spent");
    assert!(reason.contains("abandoned 4 times"), "{reason}");
    assert!(reason.contains("crash-retry limit is 3"), "{reason}");

    // A manual retry starts a new run: crashes count from zero again.
    let mut fx = Effects::default();
    commit(
        &g,
        &mut item,
        end(&last, Transition::Fail { reason }, now),
        &mut AllLoaded,
        &mut fx,
    )
    .unwrap();
    retry(&mut item, "a", now, &mut AllLoaded, &mut fx).unwrap();
    assert_eq!(item.stages[0].unit.crashes, 0);
}
