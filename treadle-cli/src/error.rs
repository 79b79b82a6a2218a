//! What can go wrong in a command, and the exit code each failure maps to.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use treadle::StageState;

/// The exit codes scripts can rely on (also listed in `treadle --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: the command did what was asked.
    Ok = 0,
    /// 1: any other error (I/O, SQLite, a corrupt stored value).
    Failure = 1,
    /// 2: bad arguments (a blank reviewer or reason, the reserved deadline
    /// reviewer), an unknown state name, an unreadable `--edits` file.
    /// Clap's own usage errors exit with 2 as well.
    Usage = 2,
    /// 3: no such item or stage.
    NotFound = 3,
    /// 4: the stage is not awaiting review, the decision is stale, the stage
    /// is not retryable, or the item is cancelled.
    Conflict = 4,
    /// 5: the database file is missing, is not a treadle database, its
    /// schema version was reset, or its schema is newer than this build's
    /// (or, for a read command, older).
    BadDatabase = 5,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// A failed command.
#[derive(Debug)]
pub enum CliError {
    /// The runtime refused or failed (unknown item, not awaiting review, ...).
    Treadle(treadle::Error),
    /// No `--db` was given.
    NoDatabaseGiven,
    /// The `--db` path does not exist.
    MissingDatabase(PathBuf),
    /// The `--db` path exists but is not a treadle database.
    NotADatabase {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A stage name that neither the recorded pipeline nor any item has.
    UnknownStage(String),
    /// A state name that is not one of [`StageState::ALL`].
    UnknownState(String),
    /// The `--edits` file could not be read or is not JSON.
    BadEdits {
        /// The file.
        path: PathBuf,
        /// Why it could not be used.
        why: String,
    },
    /// No engine has registered a pipeline in the database yet.
    NoPipeline,
    /// Writing the output failed.
    Output(std::io::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit(&self) -> Exit {
        use treadle::Error as E;
        match self {
            CliError::Treadle(error) => match error {
                E::UnknownItem(_) | E::UnknownStage { .. } => Exit::NotFound,
                E::NotAwaitingReview { .. }
                | E::StaleDecision { .. }
                | E::NotRetryable { .. }
                | E::NotRerunnable { .. }
                | E::ItemCancelled(_)
                | E::LeaseLost { .. } => Exit::Conflict,
                E::NotATreadleDatabase { .. }
                | E::SchemaTooNew { .. }
                | E::SchemaTooOld { .. }
                | E::SchemaVersionLost { .. } => Exit::BadDatabase,
                E::BlankReviewer | E::ReservedReviewer(_) | E::BlankRejectReason => Exit::Usage,
                _ => Exit::Failure,
            },
            CliError::NoDatabaseGiven | CliError::UnknownState(_) | CliError::BadEdits { .. } => {
                Exit::Usage
            }
            CliError::UnknownStage(_) | CliError::NoPipeline => Exit::NotFound,
            CliError::MissingDatabase(_) | CliError::NotADatabase { .. } => Exit::BadDatabase,
            CliError::Output(_) => Exit::Failure,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // One line, with the causes the message does not already show.
            CliError::Treadle(error) => write!(f, "{}", error.with_causes()),
            CliError::NoDatabaseGiven => f.write_str("no database given: pass --db PATH"),
            CliError::MissingDatabase(path) => {
                write!(f, "no database at `{}`", path.display())
            }
            CliError::NotADatabase { path, why } => {
                write!(f, "`{}` is not a treadle database ({why})", path.display())
            }
            CliError::UnknownStage(stage) => write!(f, "the pipeline has no stage `{stage}`"),
            CliError::UnknownState(value) => {
                write!(f, "unknown stage state `{value}`; valid states: ")?;
                for (i, state) in StageState::ALL.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(state.as_str())?;
                }
                Ok(())
            }
            CliError::BadEdits { path, why } => {
                write!(f, "cannot use edits file `{}`: {why}", path.display())
            }
            CliError::NoPipeline => f.write_str(
                "no pipeline is registered in this database yet: start a worker of the pipeline first",
            ),
            CliError::Output(error) => write!(f, "cannot write the output: {error}"),
        }
    }
}

impl std::error::Error for CliError {}

impl From<treadle::Error> for CliError {
    fn from(error: treadle::Error) -> Self {
        CliError::Treadle(error)
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> Self {
        CliError::Output(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_has_its_code() {
        let not_found = CliError::Treadle(treadle::Error::UnknownItem("x".into()));
        assert_eq!(not_found.exit(), Exit::NotFound);
        let conflict = CliError::Treadle(treadle::Error::NotRetryable {
            item: "x".into(),
            stage: "s".into(),
            state: StageState::Completed,
        });
        assert_eq!(conflict.exit(), Exit::Conflict);
        let too_new = CliError::Treadle(treadle::Error::SchemaTooNew {
            found: 9,
            supported: 1,
        });
        assert_eq!(too_new.exit(), Exit::BadDatabase);
        assert_eq!(CliError::UnknownState("x".into()).exit(), Exit::Usage);
        assert_eq!(
            CliError::MissingDatabase("x".into()).exit(),
            Exit::BadDatabase
        );
    }

    #[test]
    fn an_unknown_state_lists_every_valid_state() {
        let message = CliError::UnknownState("runing".into()).to_string();
        for state in StageState::ALL {
            assert!(message.contains(state.as_str()), "{message}");
        }
        assert!(message.starts_with("unknown stage state `runing`"));
    }
}
