//! The key of one unit of work.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One unit of work: a stage of an item, or one subtask of a fanned-out stage.
/// Its names are shared (`Arc<str>`): a key is made on every claim from the
/// stored names, and copying one allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskKey {
    /// The item.
    pub item_id: Arc<str>,
    /// The stage.
    pub stage: Arc<str>,
    /// The subtask, for a fanned-out stage.
    pub subtask: Option<Arc<str>>,
}

impl TaskKey {
    /// The key of a whole stage.
    pub fn stage(item_id: impl Into<Arc<str>>, stage: impl Into<Arc<str>>) -> Self {
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
