//! The key of one unit of work.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One unit of work: a stage of an item, or one subtask of a fanned-out stage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskKey {
    /// The item.
    pub item_id: String,
    /// The stage.
    pub stage: String,
    /// The subtask, for a fanned-out stage.
    pub subtask: Option<String>,
}

impl TaskKey {
    /// The key of a whole stage.
    pub fn stage(item_id: impl Into<String>, stage: impl Into<String>) -> Self {
        TaskKey {
            item_id: item_id.into(),
            stage: stage.into(),
            subtask: None,
        }
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "item `{}` stage `{}`", self.item_id, self.stage)?;
        if let Some(sub) = &self.subtask {
            write!(f, " subtask `{sub}`")?;
        }
        Ok(())
    }
}
