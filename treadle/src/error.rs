//! The one error type of the runtime.

use crate::definition::PipelineError;
use crate::state::StageState;

/// What went wrong, with enough context (item, stage, table, key) to act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The pipeline definition is invalid (a cycle, a duplicate, an unknown stage).
    #[error(transparent)]
    Pipeline(#[from] PipelineError),

    /// No item with this id was submitted.
    #[error("unknown item `{0}`")]
    UnknownItem(String),

    /// The item exists but the pipeline has no stage of this name.
    #[error("item `{item}` has no stage `{stage}`")]
    UnknownStage {
        /// The item that was addressed.
        item: String,
        /// The stage name that does not exist.
        stage: String,
    },

    /// A review decision was made on a stage that is not awaiting review,
    /// or against a review that has since been replaced by a newer one.
    #[error("stage `{stage}` of item `{item}` is {state}, not awaiting review")]
    NotAwaitingReview {
        /// The item that was addressed.
        item: String,
        /// The stage that was addressed.
        stage: String,
        /// The stage's current state.
        state: StageState,
    },

    /// A decision answered an older review round than the current one.
    #[error(
        "stage `{stage}` of item `{item}` is awaiting review round {current}; a decision for round {answered} is stale"
    )]
    StaleDecision {
        /// The item that was addressed.
        item: String,
        /// The stage that was addressed.
        stage: String,
        /// The round the decision answered.
        answered: u64,
        /// The current round.
        current: u64,
    },

    /// A manual retry was asked for a stage that has not failed.
    #[error("stage `{stage}` of item `{item}` is {state}; only a failed stage can be retried")]
    NotRetryable {
        /// The item that was addressed.
        item: String,
        /// The stage that was addressed.
        stage: String,
        /// The stage's current state.
        state: StageState,
    },

    /// A decision named no reviewer (an empty or blank name).
    #[error("a decision needs the reviewer's name; the name given is blank")]
    BlankReviewer,

    /// A person's decision used the name the engine reserves for the
    /// decisions of review deadlines.
    #[error(
        "the reviewer name `{0}` is reserved for the decisions the engine makes when a review deadline passes"
    )]
    ReservedReviewer(String),

    /// A rejection gave no reason (an empty or blank one).
    #[error("a rejection needs a reason; the reason given is blank")]
    BlankRejectReason,

    /// An item's id is the empty string.
    #[error("an item id cannot be empty")]
    EmptyItemId,

    /// An item's pipeline version has a stage that the running build's
    /// pipeline does not provide; the stage fails with this reason and
    /// resumes with a retry once a build provides it again.
    #[error(
        "stage `{stage}` of pipeline version {version} is not provided by this build: \
         deploy a build that has it and retry the stage, or migrate the item"
    )]
    StageNotInBuild {
        /// The stage.
        stage: String,
        /// The item's pipeline version.
        version: u32,
    },

    /// No pipeline version with this number is registered in the store.
    #[error("pipeline version {0} is not registered in this store")]
    UnknownVersion(u32),

    /// A rerun was asked for a stage that has not finished or failed.
    #[error(
        "stage `{stage}` of item `{item}` is {state}; only a completed, skipped or failed stage can be rerun"
    )]
    NotRerunnable {
        /// The item that was addressed.
        item: String,
        /// The stage that was addressed.
        stage: String,
        /// The stage's current state.
        state: StageState,
    },

    /// The item was cancelled; nothing more runs or changes for it.
    #[error("item `{0}` is cancelled")]
    ItemCancelled(String),

    /// A worker wrote for a claim it no longer holds (its lease expired or the
    /// item was cancelled); the write changed nothing.
    #[error("lease lost on {task} (generation {generation}): the write was rejected")]
    LeaseLost {
        /// The unit of work the stale claim was for.
        task: crate::task::TaskKey,
        /// The fencing generation the stale worker held.
        generation: u64,
    },

    /// A stage asked for the output of a stage that has none stored.
    #[error("stage `{0}` has no stored output for this item")]
    MissingOutput(String),

    /// A value could not be converted to or from JSON.
    #[error("cannot convert {what} to or from JSON")]
    Json {
        /// What was being converted.
        what: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// A JSON value does not have the shape of a stage's output type: review
    /// edits of the wrong shape, or a stored output that no longer decodes
    /// as its producer's output type.
    #[error("{what} is not a valid output of stage `{stage}`, a `{expected}`")]
    OutputShape {
        /// Which value: `the review edits`, `the stored output`, ...
        what: &'static str,
        /// The stage whose output type it was checked against.
        stage: String,
        /// The output type's name, without module paths.
        expected: String,
        /// Why it does not decode.
        #[source]
        source: serde_json::Error,
    },

    /// A stored value could not be decoded strictly: the location names the
    /// table (or map) and key.
    #[error("corrupt stored value at {location}: {detail}")]
    Corrupt {
        /// Where the value was read from, e.g. `stages(item=doc-1, stage=scan).state`.
        location: String,
        /// What was wrong with it.
        detail: String,
    },

    /// A stage returned an error of its own.
    #[error("{0}")]
    Stage(String),

    /// An I/O error inside a stage or the store.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// The database behind a store failed. `context` says what the store
    /// was doing; `cause` is what the database reported (a missing
    /// directory, a read-only file, a full disk, a lock timeout, ...).
    /// Shared (`Arc`) because one failed group commit is reported to every
    /// transition in it.
    #[error("{backend} store: {context}: {cause}")]
    Store {
        /// Which store: `memory`, `SQLite`, `PostgreSQL`.
        backend: &'static str,
        /// What the store was doing.
        context: String,
        /// What went wrong underneath.
        #[source]
        cause: std::sync::Arc<dyn std::error::Error + Send + Sync>,
    },

    /// A transition panicked inside the store; it was rolled back and
    /// changed nothing, and the store goes on serving other transitions.
    #[error("a {backend} store transition panicked and was rolled back: {message}")]
    TransitionPanicked {
        /// Which store.
        backend: &'static str,
        /// The panic's message.
        message: String,
    },

    /// The database was written by a newer version of treadle.
    #[error(
        "the database has schema version {found}; this version of treadle supports up to {supported}"
    )]
    SchemaTooNew {
        /// The version found in the database.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },

    /// The database carries treadle's mark and tables but schema version 0:
    /// its `user_version` was reset, so which migrations it has is unknown.
    #[error(
        "`{location}` is a treadle database whose schema version was reset to 0 (PRAGMA user_version); restore its version or a backup before using it"
    )]
    SchemaVersionLost {
        /// The file or schema that was opened.
        location: String,
    },

    /// A database opened read-only has an older schema, which only a
    /// writable open (`SqliteStore::open`) migrates.
    #[error(
        "the database has schema version {found}, older than this build's {supported}; open it once for writing to migrate it"
    )]
    SchemaTooOld {
        /// The version found in the database.
        found: i64,
        /// The version this build uses.
        supported: i64,
    },

    /// The database (a file, or a PostgreSQL schema) is not a treadle
    /// database: another application's, or not a database at all.
    #[error("`{location}` is not a treadle database")]
    NotATreadleDatabase {
        /// The file or schema that was opened.
        location: String,
    },

    /// The store was shut down; its background writer is gone.
    #[error("the store is closed")]
    StoreClosed,

    /// The PostgreSQL store's settings are invalid: the URL or the schema name.
    #[cfg(feature = "postgres")]
    #[error("invalid PostgreSQL store setting {setting}: {detail}")]
    PostgresConfig {
        /// Which setting.
        setting: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl Error {
    /// An error raised by stage code, carrying its message.
    pub fn stage(message: impl std::fmt::Display) -> Self {
        Error::Stage(message.to_string())
    }

    /// The error followed by the causes its message does not already show,
    /// joined with `: `, as one line for a person to read.
    pub fn with_causes(&self) -> impl std::fmt::Display + '_ {
        WithCauses(self)
    }

    /// A failure of the SQLite database while the store was doing `context`.
    #[cfg(feature = "sqlite")]
    pub(crate) fn sqlite(
        context: impl Into<String>,
        cause: std::sync::Arc<dyn std::error::Error + Send + Sync>,
    ) -> Self {
        Error::Store {
            backend: "SQLite",
            context: context.into(),
            cause,
        }
    }

    /// A failure of the PostgreSQL server, or of the connection to it,
    /// while the store was doing `context`.
    #[cfg(feature = "postgres")]
    pub(crate) fn postgres(
        context: impl Into<String>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Store {
            backend: "PostgreSQL",
            context: context.into(),
            cause: std::sync::Arc::new(cause),
        }
    }

    /// Wraps a serde_json error with a description of what was converted.
    pub fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        Error::Json {
            what: what.into(),
            source,
        }
    }
}

/// Displays an error and its causes; see [`Error::with_causes`].
struct WithCauses<'a>(&'a Error);

impl std::fmt::Display for WithCauses<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut line = self.0.to_string();
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            // A message that already shows its cause is not repeated.
            let text = cause.to_string();
            if !line.contains(&text) {
                line = format!("{line}: {text}");
            }
            source = cause.source();
        }
        f.write_str(&line)
    }
}

#[cfg(feature = "sqlite")]
impl From<rusqlite::Error> for Error {
    fn from(error: rusqlite::Error) -> Self {
        Error::sqlite("a database operation failed", std::sync::Arc::new(error))
    }
}

#[cfg(feature = "postgres")]
impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        Error::postgres("a database operation failed", error)
    }
}

/// The result type of treadle's API and of stage functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;
