//! Snapshots in sled: each shard's profiles as large encoded chunks, plus tagged sections
//! (dedup now; definitions and the outbox later), committed by a manifest written last.
//!
//! A snapshot is fuzzy: each chunk records the log position it covers, and recovery
//! replays, for each profile, only the records at or after its chunk's position. A
//! snapshot without a manifest, or whose chunks do not match the manifest's checksums, is
//! ignored (the previous one is used). Chunks are encoded through [`super::codec`].

use bincode::{Decode, Encode};

use super::codec;
use crate::domain::value::Value;

/// One event index entry, as stored.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct EventRefSnap {
    /// Event time.
    pub ts_ms: i64,
    /// Accept sequence.
    pub seq: u64,
    /// Log position.
    pub pos: u64,
    /// Receive time (s).
    pub received_s: u32,
    /// Index into the chunk's name table.
    pub name: u32,
    /// Kind as its index in `EventKind::ALL`.
    pub kind: u8,
}

/// One profile, as stored (names instead of process-local symbols).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct ProfileSnap {
    /// Id.
    pub id: u128,
    /// Server times.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
    /// Earliest event time.
    pub first_seen: i64,
    /// Latest event time.
    pub last_seen: i64,
    /// (type, value, first seen).
    pub identities: Vec<(String, String, i64)>,
    /// (key, value or tombstone, key time).
    pub traits: Vec<(String, Option<Value>, i64)>,
    /// Timeline index.
    pub events: Vec<EventRefSnap>,
    /// Absorbed ids.
    pub merged_from: Vec<u128>,
    /// Merge notes (JSON objects).
    pub merge_notes: Vec<String>,
    /// Segment memberships: (segment index, since).
    pub memberships: Vec<(u32, i64)>,
    /// Event counters: (spec id, counter).
    pub counters: Vec<(u32, crate::segment::counter::Counter)>,
}

/// A slice of one shard's profiles (ascending ids), with the log position it covers.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct ShardChunk {
    /// Event names referenced by `EventRefSnap::name`.
    pub names: Vec<String>,
    /// The profiles.
    pub profiles: Vec<ProfileSnap>,
    /// Standard events of no live profile (`user.deleted`), in the shard's last chunk.
    pub system_log: Vec<(u128, EventRefSnap)>,
    /// The counters the shard kept when the chunk was cut (`[[id, spec], ...]` as JSON);
    /// replay from the chunk's position counts with these until an install record.
    pub specs_json: String,
    /// The mappings the shard applied when the chunk was cut (`[[index, id, body], ...]`).
    pub mappings_json: String,
    /// Webhook deliveries waiting, in the shard's last chunk (replay applies outbox
    /// records from that chunk's position on).
    pub outbox: Vec<crate::store::log::OutboxEntry>,
    /// Erased profile ids whose records the log may still hold (scrubbed after the next
    /// snapshot), in the shard's last chunk.
    pub erased: Vec<u128>,
}

/// Where a chunk sits and what it covers.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ChunkInfo {
    /// Shard.
    pub shard: u16,
    /// Chunk number within the shard.
    pub index: u32,
    /// Ids greater than this (None: from the start).
    pub after: Option<u128>,
    /// Ids up to and including this (None: to the end).
    pub through: Option<u128>,
    /// Log position (of this shard) the chunk's state includes everything before.
    pub covers: u64,
    /// Profiles in it.
    pub profiles: u32,
    /// crc32 of the stored bytes.
    pub crc: u32,
    /// Stored size.
    pub bytes: u64,
}

/// A tagged section (dedup, and later definitions, outbox, ...).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SectionInfo {
    /// Section name.
    pub name: String,
    /// crc32 of the stored bytes.
    pub crc: u32,
    /// Stored size.
    pub bytes: u64,
}

/// The record that makes a snapshot valid; written after everything it names.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Manifest {
    /// Snapshot id (increasing).
    pub id: u64,
    /// Server time it was cut.
    pub created_at: i64,
    /// Shard count of the data dir.
    pub shards: u16,
    /// Next accept sequence at the end of the snapshot.
    pub next_seq: u64,
    /// Profile chunks.
    pub chunks: Vec<ChunkInfo>,
    /// Other sections.
    pub sections: Vec<SectionInfo>,
    /// Per shard, the log position the snapshot is consistent at: every chunk plus the log
    /// up to here (a backup copies exactly that).
    pub cut: Vec<u64>,
}

impl Manifest {
    /// Profiles in the snapshot.
    pub fn profiles(&self) -> u64 {
        self.chunks.iter().map(|c| c.profiles as u64).sum()
    }

    /// Bytes in the snapshot.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.bytes).sum::<u64>()
            + self.sections.iter().map(|s| s.bytes).sum::<u64>()
    }
}

/// The dedup section: accepted messageId hashes and when.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DedupSection {
    /// (hash, accepted at).
    pub ids: Vec<(u64, i64)>,
}

/// Why snapshots could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// sled failed.
    #[error("snapshot store: {0}")]
    Sled(#[from] sled::Error),
    /// Bytes did not decode.
    #[error("snapshot {id}: {what}")]
    Damaged {
        /// Snapshot id.
        id: u64,
        /// What is wrong.
        what: String,
    },
}

/// The snapshots tree of the data dir's sled database.
#[derive(Clone)]
pub struct SnapshotStore {
    /// `snapshots` tree.
    tree: sled::Tree,
    /// The database (for flushes and the id counter).
    db: sled::Db,
}

fn key(id: u64, rest: &str) -> String {
    format!("s/{id:020}/{rest}")
}

fn chunk_key(id: u64, shard: u16, index: u32) -> String {
    key(id, &format!("c/{shard:04}/{index:08}"))
}

impl SnapshotStore {
    /// The sled database the snapshots live in (other stores share it).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Opens the snapshot tree of `db`.
    pub fn open(db: &sled::Db) -> Result<SnapshotStore, SnapshotError> {
        Ok(SnapshotStore {
            tree: db.open_tree("snapshots")?,
            db: db.clone(),
        })
    }

    /// A new snapshot id, above every stored one (restored snapshots keep their ids).
    /// Callers take snapshots one at a time.
    pub fn next_id(&self) -> Result<u64, SnapshotError> {
        let newest = self.manifests()?.first().map(|m| m.id).unwrap_or(0);
        let mut highest = newest;
        for k in self.tree.scan_prefix("s/").keys() {
            let k = k?;
            if let Some(id) = std::str::from_utf8(&k[2..22.min(k.len())])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
            {
                highest = highest.max(id);
            }
        }
        Ok(highest + 1)
    }

    /// Stores one chunk's bytes; returns its info.
    pub fn put_chunk(
        &self,
        id: u64,
        mut info: ChunkInfo,
        chunk: &ShardChunk,
    ) -> Result<ChunkInfo, SnapshotError> {
        let mut bytes = Vec::with_capacity(1 << 20);
        codec::encode_into(chunk, &mut bytes).map_err(|e| SnapshotError::Damaged {
            id,
            what: e.to_string(),
        })?;
        info.crc = crc32fast::hash(&bytes);
        info.bytes = bytes.len() as u64;
        self.tree
            .insert(chunk_key(id, info.shard, info.index), bytes)?;
        Ok(info)
    }

    /// Stores a section.
    pub fn put_section<T: Encode>(
        &self,
        id: u64,
        name: &str,
        value: &T,
    ) -> Result<SectionInfo, SnapshotError> {
        let mut bytes = Vec::new();
        codec::encode_into(value, &mut bytes).map_err(|e| SnapshotError::Damaged {
            id,
            what: e.to_string(),
        })?;
        let info = SectionInfo {
            name: name.to_owned(),
            crc: crc32fast::hash(&bytes),
            bytes: bytes.len() as u64,
        };
        self.tree.insert(key(id, &format!("x/{name}")), bytes)?;
        Ok(info)
    }

    /// Makes a snapshot valid: flushes its data, then writes and flushes the manifest.
    pub fn commit(&self, manifest: &Manifest) -> Result<(), SnapshotError> {
        self.db.flush()?;
        let mut bytes = Vec::new();
        codec::encode_into(manifest, &mut bytes).map_err(|e| SnapshotError::Damaged {
            id: manifest.id,
            what: e.to_string(),
        })?;
        self.tree.insert(key(manifest.id, "manifest"), bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// Every committed manifest, newest first.
    pub fn manifests(&self) -> Result<Vec<Manifest>, SnapshotError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix("s/") {
            let (k, v) = kv?;
            if k.ends_with(b"/manifest")
                && let Ok(m) = codec::decode::<Manifest>(&v)
            {
                out.push(m);
            }
        }
        out.sort_by_key(|m| std::cmp::Reverse(m.id));
        Ok(out)
    }

    /// The stored bytes of a chunk, checked against the manifest.
    pub fn raw_chunk(&self, id: u64, info: &ChunkInfo) -> Result<Vec<u8>, SnapshotError> {
        let bytes = self
            .tree
            .get(chunk_key(id, info.shard, info.index))?
            .ok_or_else(|| SnapshotError::Damaged {
                id,
                what: format!("chunk {}/{} is missing", info.shard, info.index),
            })?;
        if crc32fast::hash(&bytes) != info.crc {
            return Err(SnapshotError::Damaged {
                id,
                what: format!("chunk {}/{} fails its checksum", info.shard, info.index),
            });
        }
        Ok(bytes.to_vec())
    }

    /// The stored bytes of a section.
    pub fn raw_section(&self, id: u64, info: &SectionInfo) -> Result<Vec<u8>, SnapshotError> {
        let bytes = self
            .tree
            .get(key(id, &format!("x/{}", info.name)))?
            .ok_or_else(|| SnapshotError::Damaged {
                id,
                what: format!("section {} is missing", info.name),
            })?;
        Ok(bytes.to_vec())
    }

    /// Writes a snapshot copied from a backup, then commits its manifest.
    pub fn restore_raw(
        &self,
        manifest: &Manifest,
        chunks: &[(u16, u32, Vec<u8>)],
        sections: &[(String, Vec<u8>)],
    ) -> Result<(), SnapshotError> {
        for (shard, index, bytes) in chunks {
            self.tree
                .insert(chunk_key(manifest.id, *shard, *index), bytes.as_slice())?;
        }
        for (name, bytes) in sections {
            self.tree
                .insert(key(manifest.id, &format!("x/{name}")), bytes.as_slice())?;
        }
        self.commit(manifest)
    }

    /// Reads and checks one chunk.
    pub fn chunk(&self, id: u64, info: &ChunkInfo) -> Result<ShardChunk, SnapshotError> {
        let damaged = |what: String| SnapshotError::Damaged { id, what };
        let bytes = self
            .tree
            .get(chunk_key(id, info.shard, info.index))?
            .ok_or_else(|| damaged(format!("chunk {}/{} is missing", info.shard, info.index)))?;
        if crc32fast::hash(&bytes) != info.crc {
            return Err(damaged(format!(
                "chunk {}/{} fails its checksum",
                info.shard, info.index
            )));
        }
        codec::decode_evolved::<ShardChunk, super::compat::v1::ShardChunk>(&bytes)
            .map_err(|e| damaged(e.to_string()))
    }

    /// Reads and checks one section.
    pub fn section<T: Decode<()>>(&self, id: u64, info: &SectionInfo) -> Result<T, SnapshotError> {
        let damaged = |what: String| SnapshotError::Damaged { id, what };
        let bytes = self
            .tree
            .get(key(id, &format!("x/{}", info.name)))?
            .ok_or_else(|| damaged(format!("section {} is missing", info.name)))?;
        if crc32fast::hash(&bytes) != info.crc {
            return Err(damaged(format!("section {} fails its checksum", info.name)));
        }
        codec::decode(&bytes).map_err(|e| damaged(e.to_string()))
    }

    /// Deletes a snapshot (manifest first, so a half-deleted one is never taken as valid).
    pub fn delete(&self, id: u64) -> Result<(), SnapshotError> {
        self.tree.remove(key(id, "manifest"))?;
        let prefix = format!("s/{id:020}/");
        let keys: Vec<sled::IVec> = self
            .tree
            .scan_prefix(prefix.as_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        for k in keys {
            self.tree.remove(k)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Deletes everything but the newest `keep` committed snapshots and any uncommitted ones
    /// older than the newest.
    pub fn prune(&self, keep: usize) -> Result<(), SnapshotError> {
        let manifests = self.manifests()?;
        let keep_ids: Vec<u64> = manifests.iter().take(keep).map(|m| m.id).collect();
        let newest = keep_ids.first().copied().unwrap_or(0);
        let mut ids: Vec<u64> = Vec::new();
        for k in self.tree.scan_prefix("s/").keys() {
            let k = k?;
            if let Some(id) = std::str::from_utf8(&k[2..22])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                && ids.last() != Some(&id)
            {
                ids.push(id);
            }
        }
        for id in ids {
            if !keep_ids.contains(&id) && id < newest {
                self.delete(id)?;
            }
        }
        Ok(())
    }
}
