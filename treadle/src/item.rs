//! Work items: the typed things that move through a pipeline.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// A unit of work (a document, a record, a file) with a stable id.
///
/// The item is stored as JSON when it is submitted, so a restarted process
/// resumes without the caller supplying items again, and stages receive the
/// item with all its fields.
pub trait WorkItem: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The item's stable id; submitting another item with the same id is a no-op.
    fn id(&self) -> &str;
}

/// Checks an item id: the empty string names no item, so it is refused.
pub fn check_item_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::EmptyItemId);
    }
    Ok(())
}
