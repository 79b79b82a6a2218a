//! Retention: whether an item is finished for good, and since when. Every
//! store's prune asks this rule about each item it would remove.

use chrono::{DateTime, Utc};

use super::ItemRecord;
use crate::state::ItemState;

/// When `item` finished for good, or `None` while something can still
/// happen to it without an operator.
///
/// Finished for good means the item's state ([`ItemState::of_stages`]) is
/// completed (every stage completed or skipped), cancelled, or failed: a
/// stage failed and no stage is running, awaiting review, waiting for a
/// scheduled retry, or pending with nothing left to wait for (stages still
/// pending behind the failure wait on it, so only an operator's retry can
/// move them). The time is the latest one recorded on its rows: submission,
/// each stage's start and finish, each review's request and decision (a
/// fanned-out stage finishes after its subtasks).
pub fn finished_since(item: &ItemRecord) -> Option<DateTime<Utc>> {
    let state = ItemState::of_stages(
        item.cancelled,
        item.stages.iter().map(|s| (s.unit.state, s.waiting)),
    );
    if !matches!(
        state,
        ItemState::Completed | ItemState::Failed | ItemState::Cancelled
    ) {
        return None;
    }
    let stage_times = item.stages.iter().flat_map(|s| {
        let review = s.review.as_ref();
        [
            s.unit.started_at,
            s.unit.finished_at,
            review.map(|r| r.requested_at),
            review.and_then(|r| Some(r.decision.as_ref()?.at)),
        ]
    });
    Some(stage_times.flatten().fold(item.submitted_at, DateTime::max))
}

/// Whether a prune with `cutoff` removes `item`: it finished for good
/// strictly before `cutoff`.
pub fn prunable(item: &ItemRecord, cutoff: DateTime<Utc>) -> bool {
    finished_since(item).is_some_and(|at| at < cutoff)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::definition::PipelineDef;
    use crate::rules::{NewItem, VersionGraph, new_item};
    use crate::state::StageState;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_000_000 + s, 0).unwrap()
    }

    /// An item of `a -> b` and `a -> c`, submitted at `t(0)`.
    fn item() -> ItemRecord {
        let graph = VersionGraph::new(
            1,
            PipelineDef {
                stages: vec!["a".into(), "b".into(), "c".into()],
                edges: vec![("a".into(), "b".into()), ("a".into(), "c".into())],
            },
        );
        let new = NewItem {
            id: "i".into(),
            payload: "{}".into(),
            version: 1,
            at: t(0),
        };
        new_item(&graph, new).0
    }

    /// Sets stage `position` to `state`, started at `started` and (if
    /// given) finished at `finished`; a done stage unblocks its dependents.
    fn set(item: &mut ItemRecord, position: usize, state: StageState, at: (i64, Option<i64>)) {
        let unit = &mut item.stages[position].unit;
        unit.state = state;
        unit.started_at = Some(t(at.0));
        unit.finished_at = at.1.map(t);
        if state.satisfies_dependents() && position == 0 {
            item.stages[1].waiting = 0;
            item.stages[2].waiting = 0;
        }
    }

    #[test]
    fn a_new_or_running_item_is_not_finished() {
        let mut item = item();
        assert_eq!(finished_since(&item), None, "its first stage is runnable");
        set(&mut item, 0, StageState::Running, (1, None));
        assert_eq!(finished_since(&item), None);
        assert!(!prunable(&item, t(1_000)));
    }

    #[test]
    fn a_completed_item_finished_at_its_latest_time() {
        let mut item = item();
        set(&mut item, 0, StageState::Completed, (1, Some(2)));
        set(&mut item, 1, StageState::Completed, (3, Some(9)));
        assert_eq!(finished_since(&item), None, "stage c is runnable");
        set(&mut item, 2, StageState::Skipped, (4, Some(5)));
        assert_eq!(finished_since(&item), Some(t(9)));
        assert!(prunable(&item, t(10)));
        assert!(!prunable(&item, t(9)), "the cutoff is exclusive");
    }

    #[test]
    fn a_failure_is_final_only_when_nothing_else_can_run() {
        let mut item = item();
        set(&mut item, 0, StageState::Completed, (1, Some(2)));
        set(&mut item, 1, StageState::Failed, (3, Some(4)));
        set(&mut item, 2, StageState::Running, (3, None));
        assert_eq!(finished_since(&item), None, "c still runs");
        set(&mut item, 2, StageState::RetryScheduled, (3, Some(5)));
        assert_eq!(finished_since(&item), None, "c will run again");
        set(&mut item, 2, StageState::AwaitingReview, (3, Some(5)));
        assert_eq!(finished_since(&item), None, "c waits for a person");
        set(&mut item, 2, StageState::Completed, (3, Some(6)));
        assert_eq!(finished_since(&item), Some(t(6)));
    }

    #[test]
    fn stages_pending_behind_a_failure_do_not_keep_the_item_open() {
        let mut item = item();
        set(&mut item, 0, StageState::Failed, (1, Some(7)));
        assert_eq!(item.stages[1].unit.state, StageState::Pending);
        assert_eq!(finished_since(&item), Some(t(7)));
    }

    #[test]
    fn a_cancelled_item_is_finished_whatever_its_stages_say() {
        let mut item = item();
        item.cancelled = true;
        assert_eq!(
            finished_since(&item),
            Some(t(0)),
            "cancelled before any stage ran: only its submission is recorded"
        );
        set(&mut item, 0, StageState::Cancelled, (1, Some(3)));
        assert_eq!(finished_since(&item), Some(t(3)));
    }
}
