//! Opening the database without ever creating or adopting one.
//!
//! [`SqliteStore::open`] creates a missing file and initialises an empty
//! SQLite file as a treadle database. A tool must do neither, so the file is
//! checked first: it must exist, be SQLite, and carry treadle's application
//! id in its header. Only then is it opened (which also refuses a schema
//! newer than this build).
//!
//! Commands that change something open with [`SqliteStore::open`], so a
//! database of an *older* treadle schema is migrated to this build's
//! schema, as any engine of this version opening it would; the failed
//! checks above write nothing. Commands that only read open it read-only
//! ([`SqliteStore::open_read_only`]): they never write or wait for a lock,
//! and an older schema is an error that tells to migrate it.

use std::io::Read;
use std::path::Path;

use treadle::store::{PostgresOptions, PostgresStore, SqliteStore};

use crate::error::CliError;

/// The 16 bytes every SQLite database file starts with.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Where the header keeps `PRAGMA application_id` (4 bytes, big-endian).
const APPLICATION_ID_OFFSET: usize = 68;

/// The application id treadle stamps on its databases (`"TRDL"`).
const TREADLE_APPLICATION_ID: u32 = u32::from_be_bytes(*b"TRDL");

/// The PostgreSQL server `db` names, if it is a `postgres://` or
/// `postgresql://` URL rather than a file.
pub fn postgres_url(db: &Path) -> Option<&str> {
    db.to_str()
        .filter(|s| s.starts_with("postgres://") || s.starts_with("postgresql://"))
}

/// Opens schema `schema` on the server at `url`; a schema that no worker
/// has set up is refused, not created.
pub async fn open_postgres(url: &str, schema: &str) -> Result<PostgresStore, CliError> {
    let options = PostgresOptions::new(url)
        .schema(schema)
        .application_name("treadle-cli")
        .existing_only();
    Ok(PostgresStore::open(options).await?)
}

/// Checks that `path` is an existing treadle database, then opens it for
/// the commands that change something.
pub async fn open(path: &Path) -> Result<SqliteStore, CliError> {
    check(path)?;
    Ok(SqliteStore::open(path).await?)
}

/// Checks that `path` is an existing treadle database, then opens it
/// read-only for the commands that only read: they take no lock, so they
/// answer at once while workers write.
pub async fn open_read_only(path: &Path) -> Result<SqliteStore, CliError> {
    check(path)?;
    Ok(SqliteStore::open_read_only(path).await?)
}

/// Checks the file at `path` without writing to it.
pub fn check(path: &Path) -> Result<(), CliError> {
    let not_ours = |why| CliError::NotADatabase {
        path: path.to_owned(),
        why,
    };
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CliError::MissingDatabase(path.to_owned()));
        }
        Err(e) => return Err(CliError::Treadle(e.into())),
    };
    if !metadata.is_file() {
        return Err(not_ours("not a regular file"));
    }
    let mut header = [0u8; 100];
    let mut file = std::fs::File::open(path).map_err(|e| CliError::Treadle(e.into()))?;
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CliError::Treadle(e.into())),
        }
    }
    if filled < header.len() || &header[..16] != SQLITE_MAGIC {
        return Err(not_ours("not a SQLite file"));
    }
    let id = &header[APPLICATION_ID_OFFSET..APPLICATION_ID_OFFSET + 4];
    if u32::from_be_bytes([id[0], id[1], id[2], id[3]]) != TREADLE_APPLICATION_ID {
        return Err(not_ours("a SQLite file of another application"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_are_told_from_paths() {
        assert_eq!(
            postgres_url(Path::new("postgres://me@db/test")),
            Some("postgres://me@db/test")
        );
        assert!(postgres_url(Path::new("postgresql://db")).is_some());
        assert_eq!(postgres_url(Path::new("postgres.db")), None);
        assert_eq!(postgres_url(Path::new("./postgres://x")), None);
    }

    #[test]
    fn a_missing_file_is_reported_and_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nothing.db");
        assert!(matches!(check(&path), Err(CliError::MissingDatabase(_))));
        assert!(!path.exists());
    }

    #[test]
    fn an_empty_or_foreign_file_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(check(&empty), Err(CliError::NotADatabase { .. })));
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "hello\n".repeat(40)).unwrap();
        assert!(matches!(check(&text), Err(CliError::NotADatabase { .. })));
        assert!(matches!(
            check(dir.path()),
            Err(CliError::NotADatabase { .. })
        ));
    }

    #[tokio::test]
    async fn a_database_written_by_the_store_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(SqliteStore::open(&path).await.unwrap());
        check(&path).unwrap();
        open(&path).await.unwrap();
    }
}
