//! Reads that change nothing: status, listings, the review queue, due
//! times and the event log. Text is ordered bytewise (`COLLATE "C"`), as
//! the other stores order Rust strings.

use chrono::{DateTime, Utc};

use super::codec::{Loc, int};
use super::conn::Db;
use super::load::{self, Lock};
use crate::definition::PipelineDef;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::state::StageState;
use crate::status::{AwaitingReview, ItemStatus};
use crate::store::{EventQuery, StageCount};

/// Events after `query.after`, in sequence order.
pub(super) async fn events(db: Db<'_>, query: &EventQuery) -> Result<Vec<Event>> {
    let after = i64::try_from(query.after).unwrap_or(i64::MAX);
    let limit = query.limit.map_or(i64::MAX, |l| int(l as u64));
    let rows = match &query.item_id {
        None => {
            db.query(
                "SELECT seq, at, item_id, stage, subtask, kind FROM events
                 WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &limit],
            )
            .await?
        }
        Some(item) => {
            db.query(
                "SELECT seq, at, item_id, stage, subtask, kind FROM events
                 WHERE item_id = $3 AND seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &limit, item],
            )
            .await?
        }
    };
    rows.iter()
        .map(|row| {
            let seq: i64 = row.get(0);
            let loc = Loc::new("events", format!("seq={seq}"));
            Ok(Event {
                seq: loc.count(row, 0, "seq")?,
                at: loc.get(row, 1, "at")?,
                item_id: loc.get(row, 2, "item_id")?,
                stage: loc.get(row, 3, "stage")?,
                subtask: loc.get(row, 4, "subtask")?,
                kind: loc.json(row, 5, "kind")?,
            })
        })
        .collect()
}

/// One item's full status.
pub(super) async fn status(db: Db<'_>, item_id: &str) -> Result<ItemStatus> {
    let mut loaded = load::items(db, &[item_id.to_owned()], Lock::None).await?;
    let mut item = loaded
        .pop()
        .ok_or_else(|| Error::UnknownItem(item_id.to_owned()))?;
    load::all_subtasks(db, &mut item.record).await?;
    let attempts = load::attempts(db, &item.record).await?;
    Ok(item.record.status(&attempts))
}

/// How many items are in each (stage, state), ordered by stage then state.
pub(super) async fn stage_counts(db: Db<'_>) -> Result<Vec<StageCount>> {
    let rows = db
        .query(
            "SELECT name, state, count(*) FROM stages GROUP BY name, state",
            &[],
        )
        .await?;
    let mut counts = rows
        .iter()
        .map(|row| {
            let name: String = row.get(0);
            let loc = Loc::new("stages", format!("stage={name}"));
            Ok(StageCount {
                state: loc.parse(row, 1, "state")?,
                items: loc.count(row, 2, "count")?,
                stage: name,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    counts.sort_by(|a, b| (&a.stage, a.state).cmp(&(&b.stage, b.state)));
    Ok(counts)
}

/// The ids of items whose `stage` is in `state`, in submission order.
pub(super) async fn items_in(db: Db<'_>, stage: &str, state: StageState) -> Result<Vec<String>> {
    let rows = db
        .query(
            "SELECT item_id FROM stages WHERE name = $1 AND state = $2 ORDER BY item_seq",
            &[&stage, &state.as_str()],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Stages awaiting review that match `filter` (SQL after the WHERE clause:
/// more conditions, then the ORDER BY), decoded.
async fn reviews(
    db: Db<'_>,
    filter: &str,
    now: Option<DateTime<Utc>>,
) -> Result<Vec<AwaitingReview>> {
    let sql = format!(
        "SELECT s.item_id, s.name, i.version, s.review FROM stages s
         JOIN items i ON i.id = s.item_id
         WHERE s.state = 'awaiting_review' {filter}"
    );
    let rows = match now {
        Some(now) => db.query(&sql, &[&now]).await?,
        None => db.query(&sql, &[]).await?,
    };
    rows.iter()
        .map(|row| {
            let (item, stage): (String, String) = (row.get(0), row.get(1));
            let loc = Loc::new("stages", format!("item={item}, stage={stage}"));
            Ok(AwaitingReview {
                version: loc.count(row, 2, "version")?,
                review: loc.json(row, 3, "review")?,
                item_id: item,
                stage,
            })
        })
        .collect()
}

/// Every stage awaiting review, oldest request first.
pub(super) async fn awaiting_review(db: Db<'_>) -> Result<Vec<AwaitingReview>> {
    reviews(
        db,
        r#"ORDER BY s.review_requested_at, s.item_id COLLATE "C", s.name COLLATE "C""#,
        None,
    )
    .await
}

/// Reviews awaiting a decision whose deadline is at or before `now`.
pub(super) async fn due_reviews(db: Db<'_>, now: DateTime<Utc>) -> Result<Vec<AwaitingReview>> {
    reviews(
        db,
        r#"AND s.review_deadline <= $1 ORDER BY s.item_id COLLATE "C", s.name COLLATE "C""#,
        Some(now),
    )
    .await
}

/// The earliest deadline of a review awaiting a decision.
pub(super) async fn next_review_deadline(db: Db<'_>) -> Result<Option<DateTime<Utc>>> {
    let row = db
        .one(
            "SELECT min(review_deadline) FROM stages
             WHERE state = 'awaiting_review' AND review_deadline IS NOT NULL",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The earliest lease expiry of a running unit.
pub(super) async fn next_lease_expiry(db: Db<'_>) -> Result<Option<DateTime<Utc>>> {
    let row = db
        .one(
            "SELECT least(
                (SELECT min(lease_expiry) FROM stages WHERE state = 'running'),
                (SELECT min(lease_expiry) FROM subtasks WHERE state = 'running'))",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The distinct owners of the leases of running units.
pub(super) async fn lease_owners(db: Db<'_>) -> Result<Vec<String>> {
    let rows = db
        .query(
            "SELECT lease_owner FROM stages
             WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_owner IS NOT NULL
             UNION
             SELECT lease_owner FROM subtasks
             WHERE state = 'running' AND lease_expiry IS NOT NULL AND lease_owner IS NOT NULL",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// The earliest time a scheduled retry falls due.
pub(super) async fn next_due(db: Db<'_>) -> Result<Option<DateTime<Utc>>> {
    let row = db.one("SELECT min(due) FROM scheduled", &[]).await?;
    Ok(row.get(0))
}

/// The condition on `items i` that it is unfinished: not cancelled, and
/// some stage neither completed nor skipped.
const UNFINISHED: &str = "NOT i.cancelled AND EXISTS (SELECT 1 FROM stages s
    WHERE s.item_id = i.id AND s.state NOT IN ('completed', 'skipped'))";

/// Unfinished items on versions before `version`, oldest version first,
/// then in submission order.
pub(super) async fn items_before_version(db: Db<'_>, version: u32) -> Result<Vec<String>> {
    let rows = db
        .query(
            &format!(
                "SELECT i.id FROM items i WHERE i.version < $1 AND {UNFINISHED}
                 ORDER BY i.version, i.seq"
            ),
            &[&int(version)],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// How many unfinished items each version other than `version` has.
pub(super) async fn in_flight(db: Db<'_>, version: u32) -> Result<Vec<(u32, u64)>> {
    let rows = db
        .query(
            &format!(
                "SELECT i.version, count(*) FROM items i WHERE i.version <> $1 AND {UNFINISHED}
                 GROUP BY i.version ORDER BY i.version"
            ),
            &[&int(version)],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let loc = Loc::new("items", format!("version={}", row.get::<_, i64>(0)));
            Ok((loc.count(row, 0, "version")?, loc.count(row, 1, "count")?))
        })
        .collect()
}

/// Every stored pipeline version, oldest first.
pub(super) async fn versions(db: Db<'_>) -> Result<Vec<(u32, PipelineDef)>> {
    let rows = db
        .query(
            "SELECT version, definition FROM pipeline_versions ORDER BY version",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let loc = Loc::new(
                "pipeline_versions",
                format!("version={}", row.get::<_, i64>(0)),
            );
            Ok((
                loc.count(row, 0, "version")?,
                loc.json(row, 1, "definition")?,
            ))
        })
        .collect()
}
