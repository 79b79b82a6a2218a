//! Inspection queries. Each runs inside one read transaction, so it sees
//! one committed snapshot, and decodes every value strictly.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::codec::Loc;
use super::rows::{self, Outputs, Subtasks};
use super::versions;
use crate::definition::{PipelineChanges, PipelineDef, PipelineDrift, VersionInFlight};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::state::StageState;
use crate::status::{AwaitingReview, ItemStatus};
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
    // The states every stage passes through have no index (schema version
    // 5): the stage's rows are read in submission order. The others have
    // `stages_in_rare_states`, over `rare_state` (schema version 7), which
    // the condition repeated here selects.
    let sql = match rows::rare_state(state) {
        None => "SELECT item_id FROM stages WHERE stage = +?1 AND state = +?2 ORDER BY item_seq",
        Some(_) => {
            "SELECT item_id FROM stages WHERE stage = +?1 AND rare_state = +?2
                AND rare_state IS NOT NULL
             ORDER BY item_seq"
        }
    };
    collect(conn, sql, params![stage, state.as_str()], |row| {
        Ok(row.get(0)?)
    })
}

pub(crate) fn status(conn: &Connection, item_id: &str) -> Result<ItemStatus> {
    let loaded = rows::load_item(conn, item_id, Subtasks::All, Outputs::Strict)?
        .ok_or_else(|| Error::UnknownItem(item_id.to_owned()))?;
    let attempts = rows::attempts(conn, &loaded.record)?;
    Ok(loaded.record.status(&attempts))
}

pub(crate) fn next_review_deadline(conn: &Connection) -> Result<Option<DateTime<Utc>>> {
    conn.prepare_cached(
        "SELECT item_id, stage, review_deadline FROM stages
         WHERE rare_state = 'awaiting_review' AND review_deadline IS NOT NULL
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
        "SELECT s.item_id, s.stage, s.review_round, s.review_request, s.review_requested_at,
                i.version
         FROM stages s JOIN items i ON i.id = s.item_id
         WHERE s.rare_state = 'awaiting_review' AND s.review_deadline IS NOT NULL
           AND s.review_deadline <= ?1
         ORDER BY s.item_id, s.stage",
        [super::codec::time(now)],
    )
}

pub(crate) fn awaiting_review(conn: &Connection) -> Result<Vec<AwaitingReview>> {
    reviews(
        conn,
        "SELECT s.item_id, s.stage, s.review_round, s.review_request, s.review_requested_at,
                i.version
         FROM stages s JOIN items i ON i.id = s.item_id
         WHERE s.rare_state = 'awaiting_review'
         ORDER BY s.review_requested_at, s.item_id, s.stage",
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
        let review = rows::review(conn, &loc, row, 2, (&item_id, &stage))?
            .ok_or_else(|| loc.corrupt("review_round", "awaiting review without a review"))?;
        Ok(AwaitingReview {
            version: Loc::item(&item_id).count(row, 5, "version")?,
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
    // An event names its item by `items.seq`; the id is joined in.
    match &query.item_id {
        None => collect(
            conn,
            "SELECT e.seq, e.at, i.id, e.stage, e.subtask, e.kind
             FROM events e JOIN items i ON i.seq = e.item_seq
             WHERE e.seq > +?1 ORDER BY e.seq LIMIT +?2",
            params![query.after, limit],
            decode,
        ),
        Some(item_id) => collect(
            conn,
            "SELECT e.seq, e.at, i.id, e.stage, e.subtask, e.kind
             FROM items i JOIN events e ON e.item_seq = i.seq
             WHERE i.id = +?1 AND e.seq > +?2 ORDER BY e.seq LIMIT +?3",
            params![item_id, query.after, limit],
            decode,
        ),
    }
}

/// The ids of unfinished items of versions older than `version`.
pub(crate) fn items_before_version(conn: &Connection, version: u32) -> Result<Vec<String>> {
    let mut statement = conn.prepare_cached(
        "SELECT id FROM items i
         WHERE version < ?1 AND cancelled = 0
           AND EXISTS (SELECT 1 FROM stages s WHERE s.item_id = i.id
                       AND s.state NOT IN ('completed', 'skipped'))
         ORDER BY version, seq",
    )?;
    let ids = statement
        .query_map([version], |row| row.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(ids)
}

/// How `version` (defined as `definition`) stands: its changes from
/// `previous`, and the unfinished items of the other `stored` versions.
pub(crate) fn drift(
    conn: &Connection,
    version: u32,
    definition: &PipelineDef,
    previous: Option<&PipelineDef>,
    stored: &[(u32, PipelineDef)],
) -> Result<PipelineDrift> {
    let mut in_flight = Vec::new();
    for (old, older) in stored.iter().filter(|(v, _)| *v != version) {
        let items: u64 = conn
            .prepare_cached(
                "SELECT count(*) FROM items i
                 WHERE version = +?1 AND cancelled = 0
                   AND EXISTS (SELECT 1 FROM stages s WHERE s.item_id = i.id
                               AND s.state NOT IN ('completed', 'skipped'))",
            )?
            .query_row([old], |row| row.get(0))?;
        if items > 0 {
            in_flight.push(VersionInFlight {
                version: *old,
                items,
                changes: PipelineChanges::between(older, definition),
            });
        }
    }
    Ok(PipelineDrift {
        version,
        changes: previous
            .map(|p| PipelineChanges::between(p, definition))
            .unwrap_or_default(),
        in_flight,
    })
}

/// How the latest registered version stands (see [`drift`]).
pub(crate) fn latest_drift(conn: &Connection) -> Result<Option<PipelineDrift>> {
    let stored = versions::all(conn)?;
    let Some((version, latest)) = stored.last() else {
        return Ok(None);
    };
    let previous = stored.iter().rev().nth(1).map(|(_, d)| d);
    drift(conn, *version, latest, previous, &stored).map(Some)
}
