//! The data dir's metadata in sled: the shard count it was created with and the
//! development keys. Opening it also locks the data dir against a second server.

use std::path::Path;

/// Why the data dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// sled failed (often: another process holds the data dir).
    #[error(
        "cannot open the data dir metadata at {path}: {source} (is another user360 using this data dir?)"
    )]
    Open {
        /// The metadata path.
        path: String,
        /// sled's error.
        source: sled::Error,
    },
    /// A read or write failed.
    #[error("data dir metadata: {0}")]
    Io(#[from] sled::Error),
}

/// Handle on `DATA_DIR/meta`; the sled database later also holds snapshots.
pub struct Meta {
    /// The sled database.
    db: sled::Db,
}

impl Meta {
    /// Opens (creating) the metadata store.
    pub fn open(data_dir: &Path) -> Result<Meta, MetaError> {
        let path = data_dir.join("meta");
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|source| MetaError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Meta { db })
    }

    /// The sled database (snapshots live in their own tree of it).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Reads a text value.
    pub fn get(&self, key: &str) -> Result<Option<String>, MetaError> {
        Ok(self
            .db
            .get(key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Writes a text value durably.
    pub fn set(&self, key: &str, value: &str) -> Result<(), MetaError> {
        self.db.insert(key, value.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }
}
