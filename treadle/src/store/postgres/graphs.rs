//! Pipeline versions: stored once as numbered definitions, cached by every
//! process (a stored version never changes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::codec::{Loc, int};
use super::conn::Db;
use crate::definition::PipelineDef;
use crate::error::{Error, Result};
use crate::rules::VersionGraph;

/// The versions this process has read, by number.
#[derive(Debug, Default)]
pub(super) struct Graphs {
    known: Mutex<HashMap<u32, Arc<VersionGraph>>>,
}

impl Graphs {
    /// Version `version`, from the cache or the database;
    /// [`Error::UnknownVersion`] if it was never registered.
    pub(super) async fn get(&self, db: Db<'_>, version: u32) -> Result<Arc<VersionGraph>> {
        if let Some(graph) = self.cached(version) {
            return Ok(graph);
        }
        let rows = db
            .query(
                "SELECT definition FROM pipeline_versions WHERE version = $1",
                &[&int(version)],
            )
            .await?;
        let row = rows.first().ok_or(Error::UnknownVersion(version))?;
        let loc = Loc::new("pipeline_versions", format!("version={version}"));
        let definition: PipelineDef = loc.json(row, 0, "definition")?;
        let graph = Arc::new(VersionGraph::new(version, definition));
        self.lock().insert(version, graph.clone());
        Ok(graph)
    }

    fn cached(&self, version: u32) -> Option<Arc<VersionGraph>> {
        self.lock().get(&version).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<VersionGraph>>> {
        // Only whole entries are inserted, so a poisoned map is still sound.
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}
