//! Strict conversion between stored columns and runtime values.
//!
//! Every decoder takes the location of the value (`table(key).column`) so a
//! bad value is reported as [`Error::Corrupt`] naming where it was read,
//! never replaced by a default.

use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, SecondsFormat, Timelike, Utc};
use rusqlite::Row;
use rusqlite::types::{FromSql, ToSql, ToSqlOutput, Value, ValueRef};
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

    /// A text column, borrowed from the row (no copy); `None` for NULL.
    fn text<'r>(&self, row: &'r Row<'_>, column: usize, name: &str) -> Result<Option<&'r str>> {
        match row.get_ref(column)? {
            ValueRef::Null => Ok(None),
            ValueRef::Text(bytes) => std::str::from_utf8(bytes)
                .map(Some)
                .map_err(|e| self.corrupt(name, format!("invalid UTF-8: {e}"))),
            other => Err(self.corrupt(
                name,
                format!("expected text, found {:?}", other.data_type()),
            )),
        }
    }

    /// A text column that must not be NULL, borrowed from the row.
    fn text_required<'r>(&self, row: &'r Row<'_>, column: usize, name: &str) -> Result<&'r str> {
        self.text(row, column, name)?
            .ok_or_else(|| self.corrupt(name, "unexpected NULL"))
    }

    /// A stored enum, decoded with its strict codec.
    pub(crate) fn parse<T: FromStr<Err = UnknownVariant>>(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<T> {
        self.text_required(row, column, name)?
            .parse()
            .map_err(|e: UnknownVariant| self.corrupt(name, e))
    }

    /// A JSON column.
    pub(crate) fn json<T: DeserializeOwned>(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<T> {
        let text = self.text_required(row, column, name)?;
        serde_json::from_str(text).map_err(|e| self.corrupt(name, format!("invalid JSON: {e}")))
    }

    /// A nullable JSON column.
    pub(crate) fn json_opt<T: DeserializeOwned>(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<Option<T>> {
        self.text(row, column, name)?
            .map(|text| {
                serde_json::from_str(text)
                    .map_err(|e| self.corrupt(name, format!("invalid JSON: {e}")))
            })
            .transpose()
    }

    /// A timestamp column.
    pub(crate) fn time(&self, row: &Row<'_>, column: usize, name: &str) -> Result<DateTime<Utc>> {
        let text = self.text_required(row, column, name)?;
        decode_time(text).map_err(|detail| self.corrupt(name, detail))
    }

    /// A nullable timestamp column.
    pub(crate) fn time_opt(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<Option<DateTime<Utc>>> {
        self.text(row, column, name)?
            .map(|text| decode_time(text).map_err(|detail| self.corrupt(name, detail)))
            .transpose()
    }

    /// An integer column read straight from the row; `None` for NULL.
    fn integer(&self, row: &Row<'_>, column: usize, name: &str) -> Result<Option<i64>> {
        match row.get_ref(column)? {
            ValueRef::Null => Ok(None),
            ValueRef::Integer(value) => Ok(Some(value)),
            other => Err(self.corrupt(
                name,
                format!("expected an integer, found {:?}", other.data_type()),
            )),
        }
    }

    /// A nullable non-negative counter that fits `T`.
    pub(crate) fn count_opt<T: TryFrom<i64>>(
        &self,
        row: &Row<'_>,
        column: usize,
        name: &str,
    ) -> Result<Option<T>> {
        self.integer(row, column, name)?
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
        self.count_opt(row, column, name)?
            .ok_or_else(|| self.corrupt(name, "unexpected NULL"))
    }
}

/// Timestamps are stored as RFC 3339 text in UTC with nine fractional
/// digits: exact, readable, and ordered as text for years 0 to 9999.
pub(crate) fn time(at: DateTime<Utc>) -> String {
    match time_text(at) {
        TimeText::Canonical(bytes) => String::from_utf8(bytes.to_vec())
            .unwrap_or_else(|_| at.to_rfc3339_opts(SecondsFormat::Nanos, true)),
        TimeText::Other(text) => text,
    }
}

/// A timestamp's text as [`time`] writes it, the usual shape held inline
/// (no allocation) for binding.
#[derive(Debug, Clone)]
pub(crate) enum TimeText {
    /// Years 0 to 9999: digits and separators.
    Canonical([u8; CANONICAL_LEN]),
    /// Any other year, as chrono writes it.
    Other(String),
}

impl TimeText {
    /// The text's bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            TimeText::Canonical(bytes) => bytes,
            TimeText::Other(text) => text.as_bytes(),
        }
    }
}

/// [`time`]'s text without a `String`. Written by hand for the years 0 to
/// 9999 (chrono's general formatter is a hot spot of every transition);
/// the text is exactly chrono's.
pub(crate) fn time_text(at: DateTime<Utc>) -> TimeText {
    let (date, clock) = (at.date_naive(), at.time());
    if !(0..=9999).contains(&date.year()) || clock.nanosecond() >= 1_000_000_000 {
        return TimeText::Other(at.to_rfc3339_opts(SecondsFormat::Nanos, true));
    }
    // The separators in place; the digits two at a time.
    let mut out = *b"0000-00-00T00:00:00.000000000Z";
    let mut pair = |at: usize, value: u32| {
        out[at..at + 2].copy_from_slice(&DIGIT_PAIRS[value as usize % 100]);
    };
    let (year, nanos) = (date.year() as u32, clock.nanosecond());
    pair(0, year / 100);
    pair(2, year);
    pair(5, date.month());
    pair(8, date.day());
    pair(11, clock.hour());
    pair(14, clock.minute());
    pair(17, clock.second());
    pair(21, nanos / 1_000_000);
    pair(23, nanos / 10_000);
    pair(25, nanos / 100);
    pair(27, nanos);
    out[20] = b'0' + (nanos / 100_000_000) as u8;
    TimeText::Canonical(out)
}

/// The two digits of 0 to 99.
const DIGIT_PAIRS: [[u8; 2]; 100] = {
    let mut pairs = [[0; 2]; 100];
    let mut n = 0;
    while n < 100 {
        pairs[n] = [b'0' + (n / 10) as u8, b'0' + (n % 10) as u8];
        n += 1;
    }
    pairs
};

/// A value to bind that owns what it binds where it can without a
/// `String` of its own: a timestamp's text inline, a name shared with the
/// record it comes from, or text borrowed for the statement's use.
#[derive(Debug, Clone)]
pub(crate) enum Param<'a> {
    /// Any value.
    Value(Value),
    /// Borrowed.
    Borrowed(ValueRef<'a>),
    /// Text shared with a record or a task key.
    Shared(Arc<str>),
    /// A timestamp.
    Time(TimeText),
}

impl Param<'_> {
    /// An integer.
    pub(crate) fn int(value: i64) -> Self {
        Param::Value(Value::Integer(value))
    }

    /// A timestamp, or NULL.
    pub(crate) fn time_opt(at: Option<DateTime<Utc>>) -> Self {
        at.map_or(Param::Value(Value::Null), |at| Param::Time(time_text(at)))
    }

    /// Shared text, or NULL.
    pub(crate) fn shared_opt(text: Option<&Arc<str>>) -> Self {
        text.map_or(Param::Value(Value::Null), |text| {
            Param::Shared(text.clone())
        })
    }
}

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Param::Value(value) => value.into(),
            Param::Borrowed(value) => *value,
            Param::Shared(text) => ValueRef::Text(text.as_bytes()),
            Param::Time(text) => ValueRef::Text(text.as_bytes()),
        }))
    }
}

/// The length of a timestamp as [`time`] writes it.
const CANONICAL_LEN: usize = 30;

/// Reads what [`time`] writes without chrono's general parser; `None` for
/// any other shape.
fn decode_canonical(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    let shape = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (29, b'Z'),
    ];
    if b.len() != CANONICAL_LEN || shape.iter().any(|&(i, c)| b[i] != c) {
        return None;
    }
    let num = |from: usize, width: usize| -> Option<u32> {
        b[from..from + width].iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let date = NaiveDate::from_ymd_opt(num(0, 4)? as i32, num(5, 2)?, num(8, 2)?)?;
    let clock = NaiveTime::from_hms_nano_opt(num(11, 2)?, num(14, 2)?, num(17, 2)?, num(20, 9)?)?;
    Some(date.and_time(clock).and_utc())
}

fn decode_time(text: &str) -> std::result::Result<DateTime<Utc>, String> {
    if let Some(at) = decode_canonical(text) {
        return Ok(at);
    }
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
    fn a_counter_is_an_integer_in_range_and_anything_else_is_named_corruption() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let loc = Loc::stage("i", "s");
        conn.query_row("SELECT 7, NULL, 'x', -1, 1.5", [], |row| {
            assert_eq!(loc.count::<u32>(row, 0, "attempt").unwrap(), 7);
            assert_eq!(loc.count_opt::<u32>(row, 1, "fan_total").unwrap(), None);
            for (column, detail) in [
                (1, "unexpected NULL"),
                (2, "expected an integer, found Text"),
                (3, "-1 is out of range"),
                (4, "expected an integer, found Real"),
            ] {
                match loc.count::<u32>(row, column, "attempt") {
                    Err(Error::Corrupt {
                        location,
                        detail: found,
                    }) => {
                        assert_eq!(location, "stages(item=i, stage=s).attempt");
                        assert_eq!(found, detail);
                    }
                    other => panic!("column {column}: {other:?}"),
                }
            }
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn timestamps_round_trip_exactly_and_sort_as_text() {
        let early = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.000000001Z")
            .unwrap()
            .with_timezone(&Utc);
        let late = early + chrono::TimeDelta::milliseconds(900);
        assert_eq!(decode_time(&time(early)).unwrap(), early);
        assert!(time(early) < time(late));
        assert!(decode_time("yesterday").is_err());
        for text in [
            "1999-12-31T23:59:59.999999999Z",
            "0001-01-01T00:00:00.000000000Z",
            "2026-02-28T12:00:00.500000000Z",
        ] {
            let at = DateTime::parse_from_rfc3339(text).unwrap().to_utc();
            assert_eq!(time(at), at.to_rfc3339_opts(SecondsFormat::Nanos, true));
            assert_eq!(decode_time(text).unwrap(), at);
        }
        // Every digit position, across years, days and fractions.
        let mut at = DateTime::parse_from_rfc3339("0007-03-04T05:06:07.000000008Z")
            .unwrap()
            .to_utc();
        for _ in 0..2_000 {
            assert!(matches!(time_text(at), TimeText::Canonical(_)), "{at}");
            assert_eq!(time(at), at.to_rfc3339_opts(SecondsFormat::Nanos, true));
            at += chrono::TimeDelta::seconds(156_789_123)
                + chrono::TimeDelta::nanoseconds(123_456_791);
        }
        // A year past 9999 is chrono's text, bound the same way.
        let far = DateTime::parse_from_rfc3339("9999-12-31T23:59:59Z")
            .unwrap()
            .to_utc()
            + chrono::TimeDelta::days(2);
        assert!(matches!(time_text(far), TimeText::Other(_)));
        assert_eq!(time_text(far).as_bytes(), time(far).as_bytes());
        assert_eq!(time(far), far.to_rfc3339_opts(SecondsFormat::Nanos, true));
        // Other RFC 3339 shapes still decode, through chrono.
        let offset = decode_time("2026-01-02T04:04:05+01:00").unwrap();
        assert_eq!(time(offset), "2026-01-02T03:04:05.000000000Z");
        assert!(decode_time("2026-02-30T00:00:00.000000000Z").is_err());
    }
}
