//! Review decisions: which are allowed, and what they do to the stage.

use super::{
    DecisionCommit, Effects, ItemRecord, UnitRef, Verdict, VersionGraph, complete_stage,
    fail_stage, set_state,
};
use crate::error::{Error, Result};
use crate::event::EventKind;
use crate::review::DecisionRecord;
use crate::state::{DecisionKind, StageState};

/// Applies a review decision if the stage is awaiting review and, when the
/// decision names a round, that round is current; otherwise
/// [`Error::NotAwaitingReview`] or [`Error::StaleDecision`] and nothing
/// changes. The decision is recorded with a `ReviewDecided` event; an
/// approval completes the stage with the proposed output (or the edits),
/// a rejection fails it with the reviewer's reason. Edits to check make the
/// stage pending with the edits as its output, for a worker to check
/// (see [`super::commit`]'s `RefuseEdits`).
pub fn decide(
    graph: &VersionGraph,
    item: &mut ItemRecord,
    d: DecisionCommit,
    fx: &mut Effects,
) -> Result<()> {
    let stage = item
        .stage_position(&d.stage)
        .ok_or_else(|| Error::UnknownStage {
            item: d.item_id.clone(),
            stage: d.stage.clone(),
        })?;
    let row = &mut item.stages[stage];
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
    let to_check = matches!(d.verdict, Verdict::ApproveWithEditsToCheck(_));
    let (kind, reason, edits) = match d.verdict {
        Verdict::Approve => (DecisionKind::Approved, None, None),
        Verdict::ApproveWithEdits(v) | Verdict::ApproveWithEditsToCheck(v) => {
            (DecisionKind::ApprovedWithEdits, None, Some(v))
        }
        Verdict::Reject { reason } => (DecisionKind::Rejected, Some(reason), None),
    };
    let proposed = review.request.proposed_output.clone();
    let by = d.decision.by;
    review.decision = Some(DecisionRecord {
        kind,
        by: by.clone(),
        at: d.at,
        note: d.decision.note,
        reason: reason.clone(),
        edits: edits.clone(),
    });
    fx.decided = Some(stage);
    fx.changed.push(UnitRef::stage(stage));
    let here = Some(UnitRef::stage(stage));
    fx.event(
        d.at,
        here,
        EventKind::ReviewDecided {
            decision: kind,
            by: by.clone(),
        },
    );
    match reason {
        Some(reason) => fail_stage(item, stage, format!("rejected by {by}: {reason}"), d.at, fx),
        // A worker checks the edits against the stage's output type first.
        None if to_check => {
            let row = &mut item.stages[stage];
            row.unit.output = edits;
            row.edits_to_check = true;
            set_state(&mut row.unit, StageState::Pending);
            fx.runnable.push(UnitRef::stage(stage));
        }
        None => complete_stage(graph, item, stage, edits.or(proposed), d.at, fx),
    }
    Ok(())
}
