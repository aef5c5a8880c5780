//! Taking and loading snapshots of the grid.
//!
//! Owns the conversion between live profiles and their stored form, the coordinator that
//! asks each shard for small slices (so ingest never waits long) and commits a manifest,
//! and loading the newest good snapshot at start. Bytes and sled belong to
//! [`crate::store::snapshot`].

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::Grid;
use super::shard::{EncodeChunk, TruncateLog};
use crate::domain::event::{EventKind, EventRef, event_names};
use crate::domain::identity::{IdType, Identity};
use crate::domain::ids::ProfileId;
use crate::domain::profile::{HeldIdentity, Profile, TraitSlot};
use crate::domain::value::trait_keys;
use crate::store::snapshot::{
    ChunkInfo, DedupSection, EventRefSnap, Manifest, ProfileSnap, ShardChunk, SnapshotError,
    SnapshotStore,
};

/// Profiles per chunk: small enough that encoding one holds a shard for a few ms.
const CHUNK_PROFILES: usize = 4096;

/// How many committed snapshots are kept.
const KEEP: usize = 2;

/// Builds a chunk from live profiles (inside the shard's step).
pub fn encode_chunk<'a>(
    profiles: impl Iterator<Item = &'a Profile>,
    system_log: &[(ProfileId, EventRef)],
) -> ShardChunk {
    let mut names: Vec<String> = Vec::new();
    let mut name_index: HashMap<u32, u32> = HashMap::new();
    let mut event = |e: &EventRef| -> EventRefSnap {
        let idx = *name_index.entry(e.name).or_insert_with(|| {
            names.push(event_names().name(e.name).to_string());
            (names.len() - 1) as u32
        });
        EventRefSnap {
            ts_ms: e.ts_ms,
            seq: e.seq(),
            pos: e.pos,
            received_s: e.received_s,
            name: idx,
            kind: EventKind::ALL
                .iter()
                .position(|k| *k == e.kind())
                .unwrap_or(0) as u8,
        }
    };
    let profiles: Vec<ProfileSnap> = profiles
        .map(|p| ProfileSnap {
            id: p.id.0,
            created_at: p.created_at,
            updated_at: p.updated_at,
            first_seen: p.first_seen,
            last_seen: p.last_seen,
            identities: p
                .identities
                .iter()
                .map(|h| {
                    (
                        h.identity.ty.name().to_string(),
                        h.identity.value.to_string(),
                        h.first_seen,
                    )
                })
                .collect(),
            traits: p
                .traits
                .iter()
                .map(|t| {
                    (
                        trait_keys().name(t.key).to_string(),
                        t.value.clone(),
                        t.time,
                    )
                })
                .collect(),
            events: p.events.iter().map(&mut event).collect(),
            merged_from: p.merged_from.iter().map(|m| m.0).collect(),
            merge_notes: p
                .merge_notes
                .as_ref()
                .map(|n| n.iter().map(|x| x.to_string()).collect())
                .unwrap_or_default(),
            memberships: p.memberships.clone(),
            counters: p.counters.clone(),
        })
        .collect();
    let system_log = system_log.iter().map(|(p, e)| (p.0, event(e))).collect();
    ShardChunk {
        names,
        profiles,
        system_log,
        specs_json: String::new(),
        mappings_json: String::new(),
        outbox: Vec::new(),
        erased: Vec::new(),
    }
}

/// Turns a stored chunk back into profiles and system-log entries.
pub fn decode_chunk(chunk: ShardChunk) -> (Vec<Profile>, Vec<(ProfileId, EventRef)>) {
    let syms: Vec<u32> = chunk
        .names
        .iter()
        .map(|n| event_names().intern(n))
        .collect();
    let event = |e: &EventRefSnap| {
        EventRef::new(
            e.ts_ms,
            e.seq,
            e.pos,
            e.received_s,
            syms.get(e.name as usize).copied().unwrap_or(0),
            EventKind::ALL[(e.kind as usize).min(EventKind::ALL.len() - 1)],
        )
    };
    let profiles = chunk
        .profiles
        .into_iter()
        .map(|s| {
            let id = ProfileId(s.id);
            let mut p = Profile::new(id, s.created_at);
            p.updated_at = s.updated_at;
            p.first_seen = s.first_seen;
            p.last_seen = s.last_seen;
            p.identities = s
                .identities
                .into_iter()
                .map(|(ty, value, first_seen)| HeldIdentity {
                    identity: Identity {
                        ty: IdType::named(&ty),
                        value: value.into_boxed_str(),
                    },
                    first_seen,
                })
                .collect();
            let mut traits: Vec<TraitSlot> = s
                .traits
                .into_iter()
                .map(|(k, value, time)| TraitSlot {
                    key: trait_keys().intern(&k),
                    value,
                    time,
                })
                .collect();
            traits.sort_by_key(|t| t.key);
            p.set_traits(traits);
            p.events = s.events.iter().map(event).collect();
            p.merged_from = s.merged_from.into_iter().map(ProfileId).collect();
            p.memberships = s.memberships;
            p.counters = s.counters;
            if !s.merge_notes.is_empty() {
                p.merge_notes = Some(Box::new(
                    s.merge_notes
                        .into_iter()
                        .map(String::into_boxed_str)
                        .collect(),
                ));
            }
            p
        })
        .collect();
    let system = chunk
        .system_log
        .iter()
        .map(|(p, e)| (ProfileId(*p), event(e)))
        .collect();
    (profiles, system)
}

/// What recovery starts from: the newest good snapshot, split by shard.
pub struct Loaded {
    /// Its manifest.
    pub manifest: Manifest,
    /// Per shard, its chunks in order.
    pub shards: Vec<Vec<(ChunkInfo, ShardChunk)>>,
    /// Remembered messageIds.
    pub dedup: DedupSection,
    /// Suppressed identity fingerprints.
    pub suppressed: Vec<u128>,
    /// The definitions (segments, ...) as JSON, when the snapshot holds them.
    pub definitions: Option<String>,
}

/// Loads the newest snapshot whose every part checks out; older ones are tried in turn.
pub fn load_newest(store: &SnapshotStore, shards: u16) -> Result<Option<Loaded>, SnapshotError> {
    for manifest in store.manifests()? {
        match load(store, &manifest, shards) {
            Ok(l) => return Ok(Some(l)),
            Err(e) => {
                tracing::error!(snapshot = manifest.id, error = %e, "skipping a damaged snapshot")
            }
        }
    }
    Ok(None)
}

fn load(store: &SnapshotStore, manifest: &Manifest, shards: u16) -> Result<Loaded, SnapshotError> {
    if manifest.shards != shards {
        return Err(SnapshotError::Damaged {
            id: manifest.id,
            what: format!(
                "made for {} shards, the data dir has {shards}",
                manifest.shards
            ),
        });
    }
    let mut by_shard: Vec<Vec<(ChunkInfo, ShardChunk)>> = (0..shards).map(|_| Vec::new()).collect();
    for info in &manifest.chunks {
        let chunk = store.chunk(manifest.id, info)?;
        by_shard[info.shard as usize].push((info.clone(), chunk));
    }
    let dedup = match manifest.sections.iter().find(|s| s.name == "dedup") {
        Some(s) => store.section(manifest.id, s)?,
        None => DedupSection { ids: Vec::new() },
    };
    let suppressed = match manifest.sections.iter().find(|s| s.name == "suppressed") {
        Some(s) => store.section(manifest.id, s)?,
        None => Vec::new(),
    };
    let definitions = match manifest.sections.iter().find(|s| s.name == "definitions") {
        Some(s) => Some(store.section::<String>(manifest.id, s)?),
        None => None,
    };
    Ok(Loaded {
        manifest: manifest.clone(),
        shards: by_shard,
        dedup,
        suppressed,
        definitions,
    })
}

/// One shard's part of a snapshot.
struct ShardPart {
    chunks: Vec<ChunkInfo>,
    min_covers: u64,
    cut: u64,
    store_time: std::time::Duration,
}

fn ask_chunk(
    grid: &Grid,
    shard: u16,
    after: Option<ProfileId>,
) -> oneshot::Receiver<std::io::Result<super::shard::EncodedChunk>> {
    let (tx, rx) = oneshot::channel();
    grid.shard(shard).do_send(EncodeChunk {
        after,
        max: CHUNK_PROFILES,
        reply: tx,
    });
    rx
}

async fn snapshot_shard(
    grid: &Arc<Grid>,
    store: &SnapshotStore,
    id: u64,
    shard: u16,
) -> Result<ShardPart, SnapshotError> {
    let mut part = ShardPart {
        chunks: Vec::new(),
        min_covers: u64::MAX,
        cut: 0,
        store_time: std::time::Duration::ZERO,
    };
    let mut after: Option<ProfileId> = None;
    let mut index = 0u32;
    let mut pending = ask_chunk(grid, shard, None);
    loop {
        let (chunk, last, covers, done) = pending
            .await
            .map_err(|_| SnapshotError::Damaged {
                id,
                what: "a shard stopped during the snapshot".into(),
            })?
            .map_err(|e| SnapshotError::Damaged {
                id,
                what: format!("cannot flush shard {shard}'s log: {e}"),
            })?;
        if !done {
            pending = ask_chunk(grid, shard, last);
        } else {
            pending = oneshot::channel().1;
        }
        part.min_covers = part.min_covers.min(covers);
        let info = ChunkInfo {
            shard,
            index,
            after: after.map(|p| p.0),
            through: if done { None } else { last.map(|p| p.0) },
            covers,
            profiles: chunk.profiles.len() as u32,
            crc: 0,
            bytes: 0,
        };
        let store2 = store.clone();
        let asked = std::time::Instant::now();
        let info = tokio::task::spawn_blocking(move || store2.put_chunk(id, info, &chunk))
            .await
            .expect("snapshot chunk task")?;
        part.store_time += asked.elapsed();
        part.chunks.push(info);
        if done {
            part.cut = covers;
            return Ok(part);
        }
        after = last;
        index += 1;
    }
}

/// After a snapshot: overwrites in every shard's log the records of profiles erased since
/// the last scrub (their events, membership changes, patches, counters, the states they
/// absorbed, and outbox records before the snapshot's cut holding their deliveries), so
/// the erased person leaves the log (API.md: "it leaves the log at the next snapshot").
/// The ids are in the snapshot's last chunks until the scrub is done, so a crash mid-way
/// scrubs again after the next snapshot.
async fn scrub_erased(grid: &Arc<Grid>, cut: &[u64]) {
    use super::shard::{ErasedIds, ForgetErased};
    use crate::store::log::LogRecord;
    let mut erased = std::collections::HashSet::new();
    for shard in 0..grid.shard_count() as u16 {
        let (tx, rx) = oneshot::channel();
        grid.shard(shard).do_send(ErasedIds { reply: tx });
        erased.extend(rx.await.unwrap_or_default());
    }
    if erased.is_empty() {
        return;
    }
    let erased = Arc::new(erased);
    let started = std::time::Instant::now();
    let jobs = (0..grid.shard_count() as u16).map(|shard| {
        let erased = erased.clone();
        let dir = grid.settings.data_dir.clone();
        let cut = cut.get(shard as usize).copied().unwrap_or(0);
        tokio::task::spawn_blocking(move || {
            crate::store::log::scrub(&dir, shard, &|pos, rec| match rec {
                // `user.deleted` carries only the id and stays readable.
                LogRecord::Event(e) => {
                    erased.contains(&e.profile)
                        && !(e.kind == crate::domain::event::EventKind::System
                            && e.name == "user.deleted")
                }
                LogRecord::Membership(_)
                | LogRecord::System(_)
                | LogRecord::Note(_)
                | LogRecord::Patch(_)
                | LogRecord::Counter(_)
                | LogRecord::Absorbed(_) => erased.contains(&rec.profile()),
                // The snapshot holds what the outbox still needs from before its cut.
                LogRecord::Outbox(o) => {
                    pos < cut && o.entries.iter().any(|e| erased.contains(&e.profile))
                }
                _ => false,
            })
        })
    });
    let mut overwritten = 0;
    let mut ok = true;
    for r in futures_util::future::join_all(jobs).await {
        match r {
            Ok(Ok(n)) => overwritten += n,
            Ok(Err(e)) => {
                ok = false;
                tracing::error!(error = %e, "cannot scrub erased profiles from the log; retried after the next snapshot");
            }
            Err(e) => {
                ok = false;
                tracing::error!(error = %e, "log scrub task failed");
            }
        }
    }
    if ok {
        let ids: Vec<u128> = erased.iter().copied().collect();
        for shard in 0..grid.shard_count() as u16 {
            grid.shard(shard).do_send(ForgetErased { ids: ids.clone() });
        }
        tracing::info!(
            profiles = erased.len(),
            records = overwritten,
            ms = started.elapsed().as_millis() as u64,
            "erased profiles scrubbed from the log"
        );
    }
}

/// Takes a snapshot of every shard, commits it, prunes old ones and deletes log segments
/// it made unnecessary.
pub async fn take(grid: &Arc<Grid>, store: &SnapshotStore) -> Result<Manifest, SnapshotError> {
    let started = std::time::Instant::now();
    let id = store.next_id()?;
    // Shards are copied in parallel; within a shard, the next slice is being encoded while
    // the previous one is stored.
    let per_shard = futures_util::future::join_all(
        (0..grid.shard_count() as u16).map(|shard| snapshot_shard(grid, store, id, shard)),
    )
    .await;
    let mut chunks = Vec::new();
    let mut covers_by_shard = Vec::new();
    let mut cut = Vec::new();
    let mut store_time = std::time::Duration::ZERO;
    for r in per_shard {
        let s = r?;
        chunks.extend(s.chunks);
        covers_by_shard.push(s.min_covers);
        cut.push(s.cut);
        store_time += s.store_time;
    }
    let dedup = DedupSection {
        ids: grid.dedup.export(grid.clock.now_ms()),
    };
    let suppressed = grid.registry.suppressed_list();
    let definitions = grid.segments.definitions_json();
    let store2 = store.clone();
    let sections = tokio::task::spawn_blocking(move || {
        Ok::<_, SnapshotError>(vec![
            store2.put_section(id, "dedup", &dedup)?,
            store2.put_section(id, "suppressed", &suppressed)?,
            store2.put_section(id, "definitions", &definitions)?,
        ])
    })
    .await
    .expect("snapshot section task")?;
    let manifest = Manifest {
        id,
        created_at: grid.clock.now_ms(),
        shards: grid.shard_count() as u16,
        next_seq: grid.next_seq.load(std::sync::atomic::Ordering::Acquire),
        chunks,
        sections,
        cut,
    };
    let store2 = store.clone();
    let m2 = manifest.clone();
    tokio::task::spawn_blocking(move || {
        store2.commit(&m2)?;
        store2.prune(KEEP)
    })
    .await
    .expect("snapshot commit task")?;
    scrub_erased(grid, &manifest.cut).await;
    // Segments referenced by any profile of any shard stay (merges make them cross-shard).
    let mut live = std::collections::HashSet::new();
    for shard in 0..grid.shard_count() as u16 {
        let (tx, rx) = oneshot::channel();
        grid.shard(shard)
            .do_send(super::shard::LiveSegments { reply: tx });
        match rx.await {
            Ok(set) => live.extend(set),
            Err(_) => return Ok(manifest),
        }
    }
    let live = Arc::new(live);
    let mut deleted = 0;
    for (shard, before) in covers_by_shard.into_iter().enumerate() {
        let (tx, rx) = oneshot::channel();
        grid.shard(shard as u16).do_send(TruncateLog {
            before,
            live: live.clone(),
            reply: tx,
        });
        match rx.await {
            Ok(Ok(n)) => deleted += n,
            Ok(Err(e)) => tracing::warn!(shard, error = %e, "cannot delete old log segments"),
            Err(_) => {}
        }
        grid.reader.forget_deleted(shard as u16);
    }
    let secs = started.elapsed().as_secs_f64();
    metrics::histogram!("user360_snapshot_seconds").record(secs);
    metrics::gauge!("user360_snapshot_last_unix_seconds").set(manifest.created_at as f64 / 1000.0);
    tracing::info!(
        snapshot = id,
        profiles = manifest.profiles(),
        bytes = manifest.bytes(),
        segments_deleted = deleted,
        ms = (secs * 1000.0) as u64,
        store_ms = store_time.as_millis() as u64,
        "snapshot taken"
    );
    Ok(manifest)
}
