//! The registered pipeline versions, read once from `pipeline_versions`
//! and kept: a version never changes once stored.

use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension};

use super::codec::Loc;
use crate::definition::PipelineDef;
use crate::error::{Error, Result};
use crate::fast_hash::FastMap;
use crate::rules::VersionGraph;

/// A cache of version graphs, shared by the writer and the readers.
#[derive(Debug, Default)]
pub(crate) struct Versions {
    known: Mutex<FastMap<u32, Arc<VersionGraph>>>,
}

impl Versions {
    /// The graph of `version`, read from the database the first time.
    pub(crate) fn get(&self, conn: &Connection, version: u32) -> Result<Arc<VersionGraph>> {
        if let Some(graph) = self.lock().get(&version) {
            return Ok(graph.clone());
        }
        let definition = definition(conn, version)?.ok_or(Error::UnknownVersion(version))?;
        let graph = Arc::new(VersionGraph::new(version, definition));
        self.lock().insert(version, graph.clone());
        Ok(graph)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<u32, Arc<VersionGraph>>> {
        // The map only ever gains complete entries; a panic cannot corrupt it.
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The definition stored as `version`, if any.
pub(crate) fn definition(conn: &Connection, version: u32) -> Result<Option<PipelineDef>> {
    let loc = Loc::row("pipeline_versions", format!("version={version}"));
    conn.prepare_cached("SELECT definition FROM pipeline_versions WHERE version = ?1")?
        .query_row([version], |row| Ok(loc.json(row, 0, "definition")))
        .optional()?
        .transpose()
}

/// Every stored version, oldest first.
pub(crate) fn all(conn: &Connection) -> Result<Vec<(u32, PipelineDef)>> {
    let mut statement =
        conn.prepare_cached("SELECT version, definition FROM pipeline_versions ORDER BY version")?;
    let rows = statement.query_map([], |row| {
        Ok((|| -> Result<(u32, PipelineDef)> {
            let version: u32 = row.get(0)?;
            let loc = Loc::row("pipeline_versions", format!("version={version}"));
            Ok((version, loc.json(row, 1, "definition")?))
        })())
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row??);
    }
    Ok(out)
}
