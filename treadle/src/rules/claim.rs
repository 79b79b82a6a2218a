//! Claiming a unit of work: when it is runnable, and what a claim sets.

use chrono::{DateTime, TimeDelta, Utc};

use super::{Claim, ClaimRequest, Effects, ItemRecord, Lease, UnitRef, set_state};
use crate::event::EventKind;
use crate::state::{AttemptResult, StageState};
use crate::status::AttemptRecord;

/// Claims `unit` for `request.owner` if it is runnable at `request.now`: a
/// pending stage whose upstream stages are all done, a pending subtask, a
/// scheduled retry that is due, or a running unit whose lease expired (its
/// abandoned attempt is recorded and a `Recovered` event appended first;
/// then, by `request.crash_retries`, the unit is scheduled to run again
/// after the crash backoff, or claimed at once, or, with its crash retries
/// spent, claimed with [`Claim::cannot_run`] so the engine fails it).
/// Never a unit of a cancelled item. The claim counts the attempt, bumps
/// the fencing generation and takes a lease; `None` if not runnable.
pub fn claim(
    item: &mut ItemRecord,
    unit: UnitRef,
    request: &ClaimRequest,
    fx: &mut Effects,
) -> Option<Claim> {
    if item.cancelled || (unit.subtask.is_none() && item.stages.get(unit.stage)?.waiting > 0) {
        return None;
    }
    let item_id = item.id.as_str();
    let stage = &mut item.stages[unit.stage];
    let check_edits = unit.subtask.is_none() && stage.edits_to_check;
    let row = match unit.subtask {
        None => &mut stage.unit,
        Some(position) => stage.fan_out.as_mut()?.row_mut(position)?,
    };
    let abandoned = row.lease_expired(request.now);
    let runnable = match row.state {
        StageState::Pending => true,
        StageState::RetryScheduled => row.next_run_at.is_none_or(|at| at <= request.now),
        _ => abandoned,
    };
    if !runnable {
        return None;
    }
    let mut cannot_run = None;
    if let Some(lease) = row.lease.take().filter(|_| abandoned) {
        tracing::warn!(
            item_id = %item_id, unit = ?unit, attempt = row.attempt,
            previous_owner = %lease.owner, "recovering work whose lease expired"
        );
        let error = format!("the lease of worker `{}` expired", lease.owner);
        fx.attempts.push((
            unit,
            AttemptRecord {
                attempt: row.attempt,
                started_at: row.started_at.unwrap_or(lease.expiry),
                finished_at: lease.expiry,
                result: AttemptResult::Abandoned,
                error: Some(error.clone()),
            },
        ));
        fx.event(
            request.now,
            Some(unit),
            EventKind::Recovered {
                previous_owner: String::from(&*lease.owner),
                attempt: row.attempt,
            },
        );
        row.crashes = row.crashes.saturating_add(1);
        let policy = request.crash_retries;
        if row.crashes > policy.limit {
            cannot_run = Some(format!(
                "abandoned {} times by workers that stopped mid-attempt; the crash-retry limit is {}",
                row.crashes, policy.limit
            ));
        } else {
            let delay = policy.backoff.nominal_delay(row.crashes);
            if !delay.is_zero() {
                let due = after(request.now, delay);
                set_state(row, StageState::RetryScheduled);
                row.next_run_at = Some(due);
                fx.changed.push(unit);
                fx.scheduled.push((due, unit));
                let error = Some(format!(
                    "{error}; crash retry {} of {}",
                    row.crashes, policy.limit
                ));
                fx.event(
                    request.now,
                    Some(unit),
                    EventKind::RetryScheduled { at: due, error },
                );
                return None;
            }
        }
    }
    row.attempt = row.attempt.saturating_add(1);
    row.generation = row.generation.saturating_add(1);
    row.started_at = Some(request.now);
    row.next_run_at = None;
    set_state(row, StageState::Running);
    row.lease = Some(Lease {
        owner: request.owner.clone(),
        expiry: lease_expiry(request),
    });
    let (attempt, generation, crashes) = (row.attempt, row.generation, row.crashes);
    let edits_to_check = if check_edits {
        row.output.clone()
    } else {
        None
    };
    fx.changed.push(unit);
    fx.event(
        request.now,
        Some(unit),
        EventKind::Started {
            attempt,
            owner: request.owner.clone(),
        },
    );
    Some(Claim {
        task: item.key(unit),
        attempt,
        generation,
        started_at: request.now,
        payload: item.payload.clone(),
        outputs: item.outputs(),
        version: item.version,
        crashes,
        cannot_run: cannot_run.or_else(|| item.unreadable_outputs.first().cloned()),
        edits_to_check,
    })
}

/// When a lease taken by `request` runs out.
fn lease_expiry(request: &ClaimRequest) -> DateTime<Utc> {
    after(request.now, request.lease)
}

/// `delay` after `now`, saturating at the end of time.
fn after(now: DateTime<Utc>, delay: std::time::Duration) -> DateTime<Utc> {
    let delay = TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX);
    now.checked_add_signed(delay)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}
