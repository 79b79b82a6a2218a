//! Strict conversion between stored columns and runtime values.
//!
//! Every decoder takes the location of the value (`table(key).column`) so a
//! bad value is reported as [`Error::Corrupt`] naming where it was read,
//! never replaced by a default.

use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::Row;
use rusqlite::types::FromSql;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::state::UnknownVariant;

/// Where a stored value lives: a table, its key and a column. Built for
/// every row read, so it only borrows the key; the text is made when an
/// error needs it.
#[derive(Debug, Clone)]
pub(crate) struct Loc<'a> {
    table: &'static str,
    key: Key<'a>,
}

#[derive(Debug, Clone)]
enum Key<'a> {
    Item(&'a str),
    Stage(&'a str, &'a str),
    Subtask(&'a str, &'a str, &'a str),
    Other(String),
}

impl<'a> Loc<'a> {
    /// A row of `stages`.
    pub(crate) fn stage(item: &'a str, stage: &'a str) -> Self {
        Loc {
            table: "stages",
            key: Key::Stage(item, stage),
        }
    }

    /// A row of `subtasks`.
    pub(crate) fn subtask(item: &'a str, stage: &'a str, subtask: &'a str) -> Self {
        Loc {
            table: "subtasks",
            key: Key::Subtask(item, stage, subtask),
        }
    }

    /// A row of `items`.
    pub(crate) fn item(item: &'a str) -> Self {
        Loc {
            table: "items",
            key: Key::Item(item),
        }
    }

    /// Any other row, keyed as given.
    pub(crate) fn row(table: &'static str, key: String) -> Self {
        Loc {
            table,
            key: Key::Other(key),
        }
    }

    /// The location of one column of the row.
    pub(crate) fn at(&self, column: &str) -> String {
        let key = match &self.key {
            Key::Item(item) => format!("id={item}"),
            Key::Stage(item, stage) => format!("item={item}, stage={stage}"),
            Key::Subtask(item, stage, subtask) => {
                format!("item={item}, stage={stage}, subtask={subtask}")
            }
            Key::Other(key) => key.clone(),
        };
        format!("{}({key}).{column}", self.table)
    }

    /// A corruption error at `column` of this row.
    pub(crate) fn corrupt(&self, column: &str, detail: impl ToString) -> Error {
        Error::Corrupt {
            location: self.at(column),
            detail: detail.to_string(),
        }
    }

    /// Reads column `column` (named `name` in errors) of `row`; a value of
    /// the wrong type (a NULL where none is allowed, text for a number) is
    /// corruption, not a database error.
    pub(crate) fn get<T: FromSql>(&self, row: &Row<'_>, column: usize, name: &str) -> Result<T> {
        row.get(column).map_err(|error| match error {
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => self.corrupt(name, error),
            other => other.into(),
        })
    }

    /// A stored enum, decoded with its strict codec.
    pub(crate) fn parse<T: FromStr<Err = UnknownVariant>>(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<T> {
        let text: String = self.get(row, column, name)?;
        text.parse()
            .map_err(|e: UnknownVariant| self.corrupt(name, e))
    }

    /// A JSON column.
    pub(crate) fn json<T: DeserializeOwned>(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<T> {
        let text: String = self.get(row, column, name)?;
        serde_json::from_str(&text).map_err(|e| self.corrupt(name, format!("invalid JSON: {e}")))
    }

    /// A nullable JSON column.
    pub(crate) fn json_opt<T: DeserializeOwned>(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<Option<T>> {
        let text: Option<String> = self.get(row, column, name)?;
        text.map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| self.corrupt(name, format!("invalid JSON: {e}")))
        })
        .transpose()
    }

    /// A timestamp column.
    pub(crate) fn time(&self, row: &Row<'_>, column: usize, name: &str) -> Result<DateTime<Utc>> {
        let text: String = self.get(row, column, name)?;
        decode_time(&text).map_err(|detail| self.corrupt(name, detail))
    }

    /// A nullable timestamp column.
    pub(crate) fn time_opt(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<Option<DateTime<Utc>>> {
        let text: Option<String> = self.get(row, column, name)?;
        text.map(|text| decode_time(&text).map_err(|detail| self.corrupt(name, detail)))
            .transpose()
    }

    /// A nullable non-negative counter that fits `T`.
    pub(crate) fn count_opt<T: TryFrom<i64>>(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<Option<T>> {
        let value: Option<i64> = self.get(row, column, name)?;
        value
            .map(|v| T::try_from(v).map_err(|_| self.corrupt(name, format!("{v} is out of range"))))
            .transpose()
    }

    /// A non-negative counter that fits `T`.
    pub(crate) fn count<T: TryFrom<i64>>(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<T> {
        let value: i64 = self.get(row, column, name)?;
        T::try_from(value).map_err(|_| self.corrupt(name, format!("{value} is out of range")))
    }
}

/// Timestamps are stored as RFC 3339 text in UTC with nine fractional
/// digits: exact, readable, and ordered as text for years 0 to 9999.
pub(crate) fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// An optional timestamp.
pub(crate) fn time_opt(at: Option<DateTime<Utc>>) -> Option<String> {
    at.map(time)
}

fn decode_time(text: &str) -> std::result::Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("invalid timestamp `{text}`: {e}"))
}

/// A value as JSON text for storage.
pub(crate) fn json<T: Serialize + ?Sized>(value: &T, what: &str) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::json(what, e))
}

/// An optional value as JSON text.
pub(crate) fn json_opt<T: Serialize>(value: Option<&T>, what: &str) -> Result<Option<String>> {
    value.map(|v| json(v, what)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_exactly_and_sort_as_text() {
        let early = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.000000001Z")
            .unwrap()
            .with_timezone(&Utc);
        let late = early + chrono::TimeDelta::milliseconds(900);
        assert_eq!(decode_time(&time(early)).unwrap(), early);
        assert!(time(early) < time(late));
        assert!(decode_time("yesterday").is_err());
    }
}
