#![doc = include_str!("../../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate self as treadle;

mod context;
mod definition;
mod engine;
mod error;
mod event;
mod fast_hash;
mod item;
mod outcome;
mod output;
mod pipeline;
mod reads;
mod review;
pub mod rules;
mod stage;
mod state;
mod status;
pub mod store;
mod task;

#[doc(hidden)]
pub mod __private;

/// Re-exported for implementing [`Stage`] by hand: `#[treadle::async_trait]`.
pub use async_trait::async_trait;
pub use context::StageContext;
pub use definition::{
    PipelineChanges, PipelineDef, PipelineDrift, PipelineError, PipelineProblem, VersionInFlight,
};
pub use engine::{Engine, EngineConfig, LeaseOwner, PRUNE_BATCH, ProcessMark, RunReport};
pub use error::{Error, Result};
pub use event::{Event, EventKind};
pub use item::{WorkItem, check_item_id};
pub use outcome::StageOutcome;
pub use output::{StageOutput, Subtasks};
pub use pipeline::{Pipeline, PipelineBuilder};
pub use reads::{ReadFault, ReadProblem};
pub use review::{
    DEADLINE_REVIEWER, DeadlineAction, Decision, DecisionRecord, ReviewDeadline, ReviewRequest,
    ReviewStatus, check_reject_reason, check_reviewer,
};
pub use rules::CrashRetries;
pub use stage::{Backoff, Stage, StagePolicy};
pub use state::{AttemptResult, DecisionKind, ItemState, StageState, UnknownVariant};
pub use status::{AttemptRecord, AwaitingReview, ItemStatus, StageStatus, SubtaskStatus};
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{MemoryStore, Store};
#[cfg(feature = "postgres")]
pub use store::{PostgresOptions, PostgresStore};
#[cfg(feature = "macros")]
pub use treadle_macros::{pipeline, stage};

/// The names most programs need: `use treadle::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Decision, Engine, EngineConfig, ItemState, Pipeline, ReviewRequest, Stage, StageContext,
        StageOutcome, StageOutput, StageState, Subtasks, WorkItem,
    };
    #[cfg(feature = "macros")]
    pub use treadle_macros::{pipeline, stage};

    pub use crate::store::MemoryStore;
    #[cfg(feature = "sqlite")]
    pub use crate::store::SqliteStore;
    pub use serde::{Deserialize, Serialize};
}
