//! Inspection queries. Each runs inside one read transaction, so it sees
//! one committed snapshot, and decodes every value strictly.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::codec::Loc;
use crate::definition::PipelineDef;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::review::ReviewRequest;
use crate::review::{DecisionRecord, ReviewStatus};
use crate::state::{ItemState, StageState};
use crate::status::{AttemptRecord, AwaitingReview, ItemStatus, StageStatus, SubtaskStatus};
use crate::store::{EventQuery, StageCount};

/// Collects the rows of a query whose row decoder returns a `Result`.
fn collect<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    mut decode: impl FnMut(&Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(decode(row)?);
    }
    Ok(out)
}

pub(crate) fn pipeline_definition(conn: &Connection) -> Result<Option<PipelineDef>> {
    let loc = Loc::row("pipeline", "id=1".into());
    conn.prepare_cached("SELECT definition FROM pipeline WHERE id = 1")?
        .query_row([], |row| Ok(loc.json(row, 0, "definition")))
        .optional()?
        .transpose()
}

pub(crate) fn next_due(conn: &Connection) -> Result<Option<DateTime<Utc>>> {
    conn.prepare_cached("SELECT id, due FROM scheduled ORDER BY due LIMIT 1")?
        .query_row([], |row| {
            let id: i64 = row.get(0)?;
            Ok(Loc::row("scheduled", format!("id={id}")).time(row, 1, "due"))
        })
        .optional()?
        .transpose()
}

/// The earliest expiry of a lease on a running stage or subtask (each
/// query is served by its table's `*_leased` partial index).
pub(crate) fn next_lease_expiry(conn: &Connection) -> Result<Option<DateTime<Utc>>> {
    let stage = conn
        .prepare_cached(
            "SELECT item_id, stage, lease_expiry FROM stages
             WHERE state = 'running' AND lease_expiry IS NOT NULL
             ORDER BY lease_expiry LIMIT 1",
        )?
        .query_row([], |row| {
            let (item_id, stage): (String, String) = (row.get(0)?, row.get(1)?);
            Ok(Loc::stage(&item_id, &stage).time(row, 2, "lease_expiry"))
        })
        .optional()?
        .transpose()?;
    let subtask = conn
        .prepare_cached(
            "SELECT item_id, stage, name, lease_expiry FROM subtasks
             WHERE state = 'running' AND lease_expiry IS NOT NULL
             ORDER BY lease_expiry LIMIT 1",
        )?
        .query_row([], |row| {
            let (item_id, stage, name): (String, String, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            Ok(Loc::subtask(&item_id, &stage, &name).time(row, 3, "lease_expiry"))
        })
        .optional()?
        .transpose()?;
    Ok(stage.into_iter().chain(subtask).min())
}

/// The distinct owners of the leases on running stages and subtasks.
pub(crate) fn lease_owners(conn: &Connection) -> Result<Vec<String>> {
    collect(
        conn,
        "SELECT lease_owner FROM stages
         WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_owner IS NOT NULL
         UNION
         SELECT lease_owner FROM subtasks
         WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_owner IS NOT NULL",
        [],
        |row| Ok(row.get(0)?),
    )
}

pub(crate) fn stage_counts(conn: &Connection) -> Result<Vec<StageCount>> {
    let mut counts = collect(
        conn,
        "SELECT stage, state, count(*) FROM stages GROUP BY stage, state",
        [],
        |row| {
            let stage: String = row.get(0)?;
            let loc = Loc::row("stages", format!("stage={stage}"));
            Ok(StageCount {
                state: loc.parse(row, 1, "state")?,
                items: loc.count(row, 2, "count")?,
                stage,
            })
        },
    )?;
    counts.sort_by(|a, b| (&a.stage, a.state).cmp(&(&b.stage, b.state)));
    Ok(counts)
}

pub(crate) fn items_in(conn: &Connection, stage: &str, state: StageState) -> Result<Vec<String>> {
    collect(
        conn,
        "SELECT item_id FROM stages WHERE stage = ?1 AND state = ?2 ORDER BY item_seq",
        params![stage, state.as_str()],
        |row| Ok(row.get(0)?),
    )
}

fn decision(
    conn: &Connection,
    item_id: &str,
    stage: &str,
    round: u64,
) -> Result<Option<DecisionRecord>> {
    let loc = Loc::row(
        "review_decisions",
        format!("item={item_id}, stage={stage}, round={round}"),
    );
    conn.prepare_cached(
        "SELECT kind, decided_by, decided_at, note, reason, edits FROM review_decisions
         WHERE item_id = ?1 AND stage = ?2 AND round = ?3",
    )?
    .query_row(params![item_id, stage, round], |row| {
        Ok((|| {
            Ok(DecisionRecord {
                kind: loc.parse(row, 0, "kind")?,
                by: loc.get(row, 1, "decided_by")?,
                at: loc.time(row, 2, "decided_at")?,
                note: loc.get(row, 3, "note")?,
                reason: loc.get(row, 4, "reason")?,
                edits: loc.json_opt(row, 5, "edits")?,
            })
        })())
    })
    .optional()?
    .transpose()
}

/// The review of a stage from its columns (`round`, request, requested at)
/// starting at `column`; `None` if it never asked.
fn review(
    conn: &Connection,
    loc: &Loc,
    row: &Row<'_>,
    column: usize,
    (item_id, stage): (&str, &str),
) -> Result<Option<ReviewStatus>> {
    let round: u64 = loc.count(row, column, "review_round")?;
    if round == 0 {
        return Ok(None);
    }
    let request: Option<ReviewRequest> = loc.json_opt(row, column + 1, "review_request")?;
    let requested_at = loc.time_opt(row, column + 2, "review_requested_at")?;
    let (Some(request), Some(requested_at)) = (request, requested_at) else {
        return Err(loc.corrupt(
            "review_request",
            format!("review round {round} has no request or request time"),
        ));
    };
    Ok(Some(ReviewStatus {
        round,
        request,
        requested_at,
        decision: decision(conn, item_id, stage, round)?,
    }))
}

pub(crate) fn status(conn: &Connection, item_id: &str) -> Result<ItemStatus> {
    let loc = Loc::item(item_id);
    let (submitted_at, cancelled) = conn
        .prepare_cached("SELECT submitted_at, cancelled FROM items WHERE id = ?1")?
        .query_row([item_id], |row| {
            Ok((|| -> Result<(DateTime<Utc>, bool)> {
                let submitted_at = loc.time(row, 0, "submitted_at")?;
                let cancelled = match loc.get::<i64>(row, 1, "cancelled")? {
                    0 => false,
                    1 => true,
                    n => return Err(loc.corrupt("cancelled", format!("{n} is not 0 or 1"))),
                };
                Ok((submitted_at, cancelled))
            })())
        })
        .optional()?
        .ok_or_else(|| Error::UnknownItem(item_id.to_owned()))??;

    let mut attempts: HashMap<(String, Option<String>), Vec<AttemptRecord>> = HashMap::new();
    for (stage, subtask, record) in collect(
        conn,
        "SELECT id, stage, subtask, attempt, started_at, finished_at, result, error
         FROM attempts WHERE item_id = ?1 ORDER BY id",
        [item_id],
        |row| {
            let id: i64 = row.get(0)?;
            let loc = Loc::row("attempts", format!("id={id}"));
            Ok((
                loc.get::<String>(row, 1, "stage")?,
                loc.get::<Option<String>>(row, 2, "subtask")?,
                AttemptRecord {
                    attempt: loc.count(row, 3, "attempt")?,
                    started_at: loc.time(row, 4, "started_at")?,
                    finished_at: loc.time(row, 5, "finished_at")?,
                    result: loc.parse(row, 6, "result")?,
                    error: loc.get(row, 7, "error")?,
                },
            ))
        },
    )? {
        attempts.entry((stage, subtask)).or_default().push(record);
    }

    let mut subtasks: HashMap<String, Vec<SubtaskStatus>> = HashMap::new();
    for (stage, sub) in collect(
        conn,
        "SELECT stage, name, state, attempt, next_run_at, last_error, output
         FROM subtasks WHERE item_id = ?1 ORDER BY stage, position",
        [item_id],
        |row| {
            let stage: String = row.get(0)?;
            let name: String = row.get(1)?;
            let loc = Loc::subtask(item_id, &stage, &name);
            let key = (stage.clone(), Some(name.clone()));
            Ok((
                stage,
                SubtaskStatus {
                    state: loc.parse(row, 2, "state")?,
                    attempt: loc.count(row, 3, "attempt")?,
                    next_run_at: loc.time_opt(row, 4, "next_run_at")?,
                    last_error: loc.get(row, 5, "last_error")?,
                    output: loc.json_opt(row, 6, "output")?,
                    attempts: attempts.remove(&key).unwrap_or_default(),
                    name,
                },
            ))
        },
    )? {
        subtasks.entry(stage).or_default().push(sub);
    }

    let stages = collect(
        conn,
        "SELECT stage, state, attempt, started_at, finished_at, next_run_at, last_error, output,
                review_round, review_request, review_requested_at, waiting
         FROM stages WHERE item_id = ?1 ORDER BY position",
        [item_id],
        |row| {
            let name: String = row.get(0)?;
            let loc = Loc::stage(item_id, &name);
            Ok(StageStatus {
                state: loc.parse(row, 1, "state")?,
                waiting_on: loc.count(row, 11, "waiting")?,
                attempt: loc.count(row, 2, "attempt")?,
                started_at: loc.time_opt(row, 3, "started_at")?,
                finished_at: loc.time_opt(row, 4, "finished_at")?,
                next_run_at: loc.time_opt(row, 5, "next_run_at")?,
                last_error: loc.get(row, 6, "last_error")?,
                output: loc.json_opt(row, 7, "output")?,
                review: review(conn, &loc, row, 8, (item_id, &name))?,
                attempts: attempts.remove(&(name.clone(), None)).unwrap_or_default(),
                subtasks: subtasks.remove(&name).unwrap_or_default(),
                name,
            })
        },
    )?;
    if stages.is_empty() {
        return Err(Loc::item(item_id).corrupt("stages", "the item has no stage rows"));
    }
    Ok(ItemStatus {
        item_id: item_id.to_owned(),
        state: ItemState::derive(cancelled, &stages),
        submitted_at,
        stages,
    })
}

pub(crate) fn next_review_deadline(conn: &Connection) -> Result<Option<DateTime<Utc>>> {
    conn.prepare_cached(
        "SELECT item_id, stage, review_deadline FROM stages
         WHERE state = 'awaiting_review' AND review_deadline IS NOT NULL
         ORDER BY review_deadline LIMIT 1",
    )?
    .query_row([], |row| {
        let item_id: String = row.get(0)?;
        let stage: String = row.get(1)?;
        Ok(Loc::stage(&item_id, &stage).time(row, 2, "review_deadline"))
    })
    .optional()?
    .transpose()
}

pub(crate) fn due_reviews(conn: &Connection, now: DateTime<Utc>) -> Result<Vec<AwaitingReview>> {
    reviews(
        conn,
        "SELECT item_id, stage, review_round, review_request, review_requested_at
         FROM stages
         WHERE state = 'awaiting_review' AND review_deadline IS NOT NULL
           AND review_deadline <= ?1
         ORDER BY item_id, stage",
        [super::codec::time(now)],
    )
}

pub(crate) fn awaiting_review(conn: &Connection) -> Result<Vec<AwaitingReview>> {
    reviews(
        conn,
        "SELECT item_id, stage, review_round, review_request, review_requested_at
         FROM stages WHERE state = 'awaiting_review'
         ORDER BY review_requested_at, item_id, stage",
        [],
    )
}

fn reviews(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<AwaitingReview>> {
    collect(conn, sql, params, |row| {
        let item_id: String = row.get(0)?;
        let stage: String = row.get(1)?;
        let loc = Loc::stage(&item_id, &stage);
        let review = review(conn, &loc, row, 2, (&item_id, &stage))?
            .ok_or_else(|| loc.corrupt("review_round", "awaiting review without a review"))?;
        Ok(AwaitingReview {
            item_id,
            stage,
            review,
        })
    })
}

pub(crate) fn events(conn: &Connection, query: &EventQuery) -> Result<Vec<Event>> {
    let limit = query
        .limit
        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let decode = |row: &Row<'_>| -> Result<Event> {
        let seq: u64 = row.get(0)?;
        let loc = Loc::row("events", format!("seq={seq}"));
        Ok(Event {
            seq,
            at: loc.time(row, 1, "at")?,
            item_id: loc.get(row, 2, "item_id")?,
            stage: loc.get(row, 3, "stage")?,
            subtask: loc.get(row, 4, "subtask")?,
            kind: loc.json(row, 5, "kind")?,
        })
    };
    match &query.item_id {
        None => collect(
            conn,
            "SELECT seq, at, item_id, stage, subtask, kind FROM events
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![query.after, limit],
            decode,
        ),
        Some(item_id) => collect(
            conn,
            "SELECT seq, at, item_id, stage, subtask, kind FROM events
             WHERE item_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            params![item_id, query.after, limit],
            decode,
        ),
    }
}
