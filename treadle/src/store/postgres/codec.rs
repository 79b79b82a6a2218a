//! Strict conversion between PostgreSQL columns and the rules' rows.
//!
//! Every decoder knows the location of the value (`table(key).column`), so
//! a bad value is reported as [`Error::Corrupt`] naming where it was read,
//! never replaced by a default. Timestamps are kept to the microsecond,
//! which is what `timestamptz` stores.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

use crate::error::{Error, Result};
use crate::rules::{Lease, UnitRecord};
use crate::state::UnknownVariant;

/// Where a stored value lives: a table and the key of its row.
#[derive(Debug, Clone)]
pub(super) struct Loc {
    table: &'static str,
    key: String,
}

impl Loc {
    /// A row of `table` with key `key` (as `column=value, ...`).
    pub(super) fn new(table: &'static str, key: String) -> Self {
        Loc { table, key }
    }

    /// A corruption error at `column` of this row.
    pub(super) fn corrupt(&self, column: &str, detail: impl ToString) -> Error {
        Error::Corrupt {
            location: format!("{}({}).{column}", self.table, self.key),
            detail: detail.to_string(),
        }
    }

    /// Column `idx` (named `name`) of `row`, of the type the schema gives it.
    pub(super) fn get<'a, T: FromSql<'a>>(
        &self,
        row: &'a Row,
        idx: usize,
        name: &str,
    ) -> Result<T> {
        row.try_get(idx).map_err(|e| self.corrupt(name, e))
    }

    /// A non-negative counter that fits `T`.
    pub(super) fn count<T: TryFrom<i64>>(&self, row: &Row, idx: usize, name: &str) -> Result<T> {
        let value: i64 = self.get(row, idx, name)?;
        T::try_from(value).map_err(|_| self.corrupt(name, format!("{value} is out of range")))
    }

    /// A nullable counter.
    pub(super) fn count_opt<T: TryFrom<i64>>(
        &self,
        row: &Row,
        idx: usize,
        name: &str,
    ) -> Result<Option<T>> {
        let value: Option<i64> = self.get(row, idx, name)?;
        value
            .map(|v| T::try_from(v).map_err(|_| self.corrupt(name, format!("{v} is out of range"))))
            .transpose()
    }

    /// A stored enum, decoded with its strict codec.
    pub(super) fn parse<T: FromStr<Err = UnknownVariant>>(
        &self,
        row: &Row,
        idx: usize,
        name: &str,
    ) -> Result<T> {
        let text: &str = self.get(row, idx, name)?;
        text.parse()
            .map_err(|e: UnknownVariant| self.corrupt(name, e))
    }

    /// A JSON column.
    pub(super) fn json<T: DeserializeOwned>(&self, row: &Row, idx: usize, name: &str) -> Result<T> {
        let text: &str = self.get(row, idx, name)?;
        serde_json::from_str(text).map_err(|e| self.corrupt(name, format!("invalid JSON: {e}")))
    }

    /// A nullable JSON column.
    pub(super) fn json_opt<T: DeserializeOwned>(
        &self,
        row: &Row,
        idx: usize,
        name: &str,
    ) -> Result<Option<T>> {
        let text: Option<&str> = self.get(row, idx, name)?;
        text.map(|text| {
            serde_json::from_str(text).map_err(|e| self.corrupt(name, format!("invalid JSON: {e}")))
        })
        .transpose()
    }
}

/// The columns of a unit (stage or subtask), in the order [`unit`] reads
/// them from the start of a row.
pub(super) const UNIT_COLUMNS: &str = "name, position, state, attempt, generation, started_at, \
     finished_at, next_run_at, last_error, output, lease_owner, lease_expiry, crashes";

/// How many columns [`UNIT_COLUMNS`] names.
pub(super) const UNIT_WIDTH: usize = 13;

/// Decodes the unit in the [`UNIT_WIDTH`] columns of `row` from column `at`.
pub(super) fn unit(loc: &Loc, row: &Row, at: usize) -> Result<UnitRecord> {
    let owner: Option<String> = loc.get(row, at + 10, "lease_owner")?;
    let expiry: Option<DateTime<Utc>> = loc.get(row, at + 11, "lease_expiry")?;
    let lease = match (owner, expiry) {
        (Some(owner), Some(expiry)) => Some(Lease {
            owner: owner.into(),
            expiry,
        }),
        (None, None) => None,
        _ => return Err(loc.corrupt("lease_owner", "a lease needs both an owner and an expiry")),
    };
    Ok(UnitRecord {
        name: loc.get::<String>(row, at, "name")?.into(),
        position: loc.count(row, at + 1, "position")?,
        state: loc.parse(row, at + 2, "state")?,
        attempt: loc.count(row, at + 3, "attempt")?,
        generation: loc.count(row, at + 4, "generation")?,
        started_at: loc.get(row, at + 5, "started_at")?,
        finished_at: loc.get(row, at + 6, "finished_at")?,
        next_run_at: loc.get(row, at + 7, "next_run_at")?,
        last_error: loc.get(row, at + 8, "last_error")?,
        output: loc.json_opt(row, at + 9, "output")?,
        lease,
        crashes: loc.count(row, at + 12, "crashes")?,
    })
}

/// A value as JSON text for storage.
pub(super) fn json<T: Serialize + ?Sized>(value: &T, what: &str) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::json(what, e))
}

/// A counter as the `bigint` it is stored as.
pub(super) fn int(value: impl Into<u64>) -> i64 {
    i64::try_from(value.into()).unwrap_or(i64::MAX)
}

/// `at` truncated to the microsecond, the precision of `timestamptz`:
/// every time a transition carries is truncated before the rules see it,
/// so what the store returns equals what it reads back later.
pub(super) fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = at.timestamp_subsec_nanos();
    at - chrono::TimeDelta::nanoseconds(i64::from(nanos % 1_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_drops_only_the_nanoseconds_below_a_microsecond() {
        let at = DateTime::parse_from_rfc3339("2026-03-01T10:00:00.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        let cut = micros(at);
        assert_eq!(cut.to_rfc3339(), "2026-03-01T10:00:00.123456+00:00");
        assert_eq!(micros(cut), cut);
    }
}
