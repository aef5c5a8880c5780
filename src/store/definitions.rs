//! User definitions (segments, and later triggers and mappings) as one JSON document in
//! the data dir's sled database, replaced whole and flushed before a change is answered.
//!
//! Owns the bytes only: what the document means is the grid's (`segment::set::Definitions`).

/// Why definitions could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionsError {
    /// sled failed.
    #[error("cannot read or write the definitions: {0}")]
    Store(#[from] sled::Error),
}

/// Handle on the definitions document.
#[derive(Clone)]
pub struct DefinitionStore {
    /// The data dir's sled database.
    db: sled::Db,
    /// Its `definitions` tree.
    tree: sled::Tree,
}

const KEY: &[u8] = b"current";

impl DefinitionStore {
    /// Opens (creating) the definitions tree.
    pub fn open(db: &sled::Db) -> Result<DefinitionStore, DefinitionsError> {
        Ok(DefinitionStore {
            db: db.clone(),
            tree: db.open_tree("definitions")?,
        })
    }

    /// The stored document, if any was ever saved.
    pub fn load(&self) -> Result<Option<String>, DefinitionsError> {
        Ok(self
            .tree
            .get(KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Replaces the document durably.
    pub fn save(&self, json: &str) -> Result<(), DefinitionsError> {
        self.tree.insert(KEY, json.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }
}
