//! The writer's hot statements, prepared once and held for the life of its
//! connection.
//!
//! rusqlite's statement cache finds a statement by its text on every use
//! (trimming and hashing it, taking it out of an LRU list and putting it
//! back, clearing its bindings): a few hundred instructions a statement,
//! several times per transition. The writer instead keeps the statements
//! of its transitions here, each found by the address of its `'static`
//! text (and, for a statement built from one, a variant number). Each use
//! ends, as with the cache, by clearing the statement's bindings: a text
//! value bound and left there would keep the connection's lookaside memory
//! (a few hundred small slots, shared by all its statements), and with
//! every held statement keeping some, most of SQLite's small allocations
//! would fall back to `malloc`.

use std::ops::{Deref, DerefMut};

use rusqlite::{Connection, PrepFlags, Statement};

use crate::error::Result;
use crate::fast_hash::FastMap;

/// What a held statement is found by: the address and length of its
/// `'static` text (or of the text it is built from) and a variant (0: the
/// text itself).
type Key = (usize, usize, u32);

/// The writer's connection and the statements it holds prepared.
pub(crate) struct Statements<'c> {
    /// The writer's connection.
    conn: &'c Connection,
    /// Every statement prepared so far, by key.
    held: FastMap<Key, Statement<'c>>,
}

impl<'c> Statements<'c> {
    /// Nothing prepared yet.
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Statements {
            conn,
            held: FastMap::default(),
        }
    }

    /// The connection, for statements that are not held.
    pub(crate) fn conn(&self) -> &'c Connection {
        self.conn
    }

    /// The statement `sql`, prepared on its first use.
    pub(crate) fn get(&mut self, sql: &'static str) -> Result<Held<'_, 'c>> {
        self.built(sql, 0, || sql.to_owned())
    }

    /// Variant `variant` (not 0) of the statements built from `base`:
    /// `build` makes its text on its first use.
    pub(crate) fn built(
        &mut self,
        base: &'static str,
        variant: u32,
        build: impl FnOnce() -> String,
    ) -> Result<Held<'_, 'c>> {
        use std::collections::hash_map::Entry;
        let key = (base.as_ptr() as usize, base.len(), variant);
        Ok(Held(match self.held.entry(key) {
            Entry::Occupied(held) => held.into_mut(),
            Entry::Vacant(slot) => slot.insert(
                self.conn
                    .prepare_with_flags(&build(), PrepFlags::SQLITE_PREPARE_PERSISTENT)?,
            ),
        }))
    }
}

/// A held statement in use; its bindings are cleared when it is dropped.
pub(crate) struct Held<'s, 'c>(&'s mut Statement<'c>);

impl<'c> Deref for Held<'_, 'c> {
    type Target = Statement<'c>;

    fn deref(&self) -> &Statement<'c> {
        self.0
    }
}

impl<'c> DerefMut for Held<'_, 'c> {
    fn deref_mut(&mut self) -> &mut Statement<'c> {
        self.0
    }
}

impl Drop for Held<'_, '_> {
    fn drop(&mut self) {
        self.0.clear_bindings();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_prepared_once_and_each_variant_apart() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER)").unwrap();
        const INSERT: &str = "INSERT INTO t (n) VALUES (?1)";
        let mut statements = Statements::new(&conn);
        for n in 0..3 {
            statements.get(INSERT).unwrap().execute([n]).unwrap();
        }
        let two_rows = || format!("{INSERT}, (?2)");
        for n in 0..2 {
            let mut statement = statements.built(INSERT, 2, two_rows).unwrap();
            statement.execute([10 + n, 20 + n]).unwrap();
        }
        assert_eq!(statements.held.len(), 2);
        let sum: i64 = conn
            .query_row("SELECT sum(n) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sum, 3 + 21 + 41);
    }
}
