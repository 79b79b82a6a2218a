//! Releasing a worker's claims at once, as if their leases had expired.

use chrono::{DateTime, Utc};

use super::conn::Db;
use crate::error::Result;

/// Makes every unit still running under `owner`'s lease claimable at
/// `now` by ending its lease then; the next claim recovers it. The items
/// are locked first, as every writer locks them, so no concurrent
/// transition overwrites the release. Returns how many units.
pub(super) async fn release(
    client: &mut deadpool_postgres::Client,
    owner: &str,
    now: DateTime<Utc>,
) -> Result<u64> {
    let tx = client.transaction().await?;
    let db = Db::tx(&tx);
    let ids: Vec<String> = db
        .query(
            "SELECT item_id FROM stages WHERE state = 'running' AND lease_owner = $1
             UNION SELECT item_id FROM subtasks WHERE state = 'running' AND lease_owner = $1",
            &[&owner],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    db.query(
        "SELECT id FROM items WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        &[&ids],
    )
    .await?;
    let mut released = 0;
    for table in ["stages", "subtasks"] {
        released += db
            .execute(
                &format!(
                    "UPDATE {table} SET lease_expiry = $2
                     WHERE item_id = ANY($3) AND state = 'running' AND lease_owner = $1
                       AND lease_expiry IS NOT NULL"
                ),
                &[&owner, &now, &ids],
            )
            .await?;
    }
    tx.commit().await?;
    Ok(released)
}
