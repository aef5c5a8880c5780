//! Backup files: one snapshot plus the log up to its cut, in one self-checking file.
//!
//! Layout: the magic `U360BAK1`, then frames `[tag u8][len u64][bytes][crc32 u32]`, then an
//! end frame holding the frame count and a crc32 over every byte before it. Tags: manifest,
//! chunk, section, log slice, metadata. Restoring checks every frame before it touches
//! anything, so a damaged, truncated or foreign file is refused with the data dir as it was.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::codec;
use super::log::{shard_dir, split_position};
use super::snapshot::{Manifest, SnapshotStore};

/// First bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"U360BAK1";

const TAG_MANIFEST: u8 = 1;
const TAG_CHUNK: u8 = 2;
const TAG_SECTION: u8 = 3;
const TAG_LOG: u8 = 4;
const TAG_META: u8 = 5;
const TAG_END: u8 = 0xff;

/// Why a backup could not be written, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The file is not a User360 backup.
    #[error("not a User360 backup file (it does not start with {magic:?})", magic = std::str::from_utf8(MAGIC).unwrap_or(""))]
    Foreign,
    /// The file is cut short.
    #[error("the backup file is truncated: it ends inside frame {frame} (byte {offset})")]
    Truncated {
        /// Frame number.
        frame: usize,
        /// Byte offset.
        offset: u64,
    },
    /// A frame or the whole file fails its checksum, or holds nonsense.
    #[error("the backup file is damaged: {0}")]
    Damaged(String),
    /// The snapshot store failed.
    #[error("{0}")]
    Snapshot(#[from] super::snapshot::SnapshotError),
    /// The target cannot be used.
    #[error("{0}")]
    Target(String),
}

/// Writes frames while keeping a running checksum of everything written.
struct FrameWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    frames: u64,
}

impl<W: Write> FrameWriter<W> {
    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.crc.update(b);
        self.out.write_all(b)
    }

    fn frame(&mut self, tag: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut crc = crc32fast::Hasher::new();
        for p in parts {
            crc.update(p);
        }
        self.raw(&[tag])?;
        self.raw(&len.to_le_bytes())?;
        for p in parts {
            self.raw(p)?;
        }
        self.raw(&crc.finalize().to_le_bytes())?;
        self.frames += 1;
        Ok(())
    }
}

/// Writes the backup of a committed snapshot: its manifest, chunks and sections, the data
/// dir's shard count, and every log segment of every shard up to the snapshot's cut.
pub fn write_backup<W: Write>(
    out: W,
    store: &SnapshotStore,
    manifest: &Manifest,
    data_dir: &Path,
) -> Result<W, BackupError> {
    let mut w = FrameWriter {
        out: BufWriter::with_capacity(1 << 20, out),
        crc: crc32fast::Hasher::new(),
        frames: 0,
    };
    w.raw(MAGIC)?;
    let mut m = Vec::new();
    codec::encode_into(manifest, &mut m).map_err(|e| BackupError::Damaged(e.to_string()))?;
    w.frame(TAG_MANIFEST, &[&m])?;
    w.frame(
        TAG_META,
        &[b"shards=", manifest.shards.to_string().as_bytes()],
    )?;
    for c in &manifest.chunks {
        let bytes = store.raw_chunk(manifest.id, c)?;
        w.frame(
            TAG_CHUNK,
            &[&c.shard.to_le_bytes(), &c.index.to_le_bytes(), &bytes],
        )?;
    }
    for s in &manifest.sections {
        let bytes = store.raw_section(manifest.id, s)?;
        let name = s.name.as_bytes();
        w.frame(TAG_SECTION, &[&[name.len() as u8], name, &bytes])?;
    }
    for (shard, cut) in manifest.cut.iter().enumerate() {
        let (_, cut_segment, cut_offset) = split_position(*cut);
        let dir = shard_dir(data_dir, shard as u16);
        let mut segments: Vec<u32> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
            .filter(|n| *n <= cut_segment)
            .collect();
        segments.sort_unstable();
        for n in segments {
            let mut bytes = Vec::new();
            File::open(dir.join(format!("{n:08}.log")))?.read_to_end(&mut bytes)?;
            if n == cut_segment {
                bytes.truncate(cut_offset as usize);
            }
            w.frame(
                TAG_LOG,
                &[&(shard as u16).to_le_bytes(), &n.to_le_bytes(), &bytes],
            )?;
        }
    }
    let frames = w.frames + 1;
    let crc = w.crc.clone().finalize();
    w.frame(TAG_END, &[&frames.to_le_bytes(), &crc.to_le_bytes()])?;
    w.out.flush()?;
    w.out
        .into_inner()
        .map_err(|e| BackupError::Io(e.into_error()))
}

/// The verified contents of a backup file.
#[derive(Debug)]
pub struct Backup {
    /// The snapshot's manifest.
    pub manifest: Manifest,
    /// Shard count of the data dir it came from.
    pub shards: u16,
    /// (shard, index, stored bytes).
    pub chunks: Vec<(u16, u32, Vec<u8>)>,
    /// (name, stored bytes).
    pub sections: Vec<(String, Vec<u8>)>,
    /// (shard, segment, bytes).
    pub logs: Vec<(u16, u32, Vec<u8>)>,
}

/// Reads and checks a whole backup file.
pub fn read_backup(path: &Path) -> Result<Backup, BackupError> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut whole = crc32fast::Hasher::new();
    let mut magic = [0u8; 8];
    if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(BackupError::Foreign);
    }
    whole.update(&magic);
    let mut offset = 8u64;
    let mut manifest: Option<Manifest> = None;
    let mut shards: Option<u16> = None;
    let mut backup_chunks = Vec::new();
    let mut sections = Vec::new();
    let mut logs = Vec::new();
    let mut frames = 0u64;
    loop {
        let truncated = |frame: u64| BackupError::Truncated {
            frame: frame as usize,
            offset,
        };
        let mut head = [0u8; 9];
        r.read_exact(&mut head).map_err(|_| truncated(frames))?;
        let tag = head[0];
        let len = u64::from_le_bytes(head[1..9].try_into().unwrap());
        if len > 64 << 30 {
            return Err(BackupError::Damaged(format!(
                "frame {frames} claims {len} bytes"
            )));
        }
        let before_end = whole.clone().finalize();
        whole.update(&head);
        let mut body = vec![0u8; len as usize];
        r.read_exact(&mut body).map_err(|_| truncated(frames))?;
        let mut crc = [0u8; 4];
        r.read_exact(&mut crc).map_err(|_| truncated(frames))?;
        whole.update(&body);
        whole.update(&crc);
        offset += 9 + len + 4;
        frames += 1;
        if crc32fast::hash(&body) != u32::from_le_bytes(crc) {
            return Err(BackupError::Damaged(format!(
                "frame {} fails its checksum",
                frames - 1
            )));
        }
        let damaged = |what: &str| BackupError::Damaged(format!("frame {}: {what}", frames - 1));
        match tag {
            TAG_MANIFEST => {
                manifest = Some(codec::decode(&body).map_err(|e| damaged(&e.to_string()))?);
            }
            TAG_META => {
                let text = String::from_utf8_lossy(&body);
                if let Some(n) = text.strip_prefix("shards=") {
                    shards = Some(n.parse().map_err(|_| damaged("bad shard count"))?);
                }
            }
            TAG_CHUNK => {
                if body.len() < 6 {
                    return Err(damaged("short chunk"));
                }
                let shard = u16::from_le_bytes(body[0..2].try_into().unwrap());
                let index = u32::from_le_bytes(body[2..6].try_into().unwrap());
                backup_chunks.push((shard, index, body[6..].to_vec()));
            }
            TAG_SECTION => {
                let n = *body.first().ok_or_else(|| damaged("short section"))? as usize;
                if body.len() < 1 + n {
                    return Err(damaged("short section"));
                }
                let name = String::from_utf8_lossy(&body[1..1 + n]).into_owned();
                sections.push((name, body[1 + n..].to_vec()));
            }
            TAG_LOG => {
                if body.len() < 6 {
                    return Err(damaged("short log slice"));
                }
                let shard = u16::from_le_bytes(body[0..2].try_into().unwrap());
                let segment = u32::from_le_bytes(body[2..6].try_into().unwrap());
                logs.push((shard, segment, body[6..].to_vec()));
            }
            TAG_END => {
                if body.len() != 12 {
                    return Err(damaged("bad end frame"));
                }
                let count = u64::from_le_bytes(body[0..8].try_into().unwrap());
                let crc = u32::from_le_bytes(body[8..12].try_into().unwrap());
                if count != frames || crc != before_end {
                    return Err(BackupError::Damaged(
                        "the end frame does not match the file (frames missing or altered)".into(),
                    ));
                }
                let mut rest = [0u8; 1];
                if r.read(&mut rest)? != 0 {
                    return Err(BackupError::Damaged("bytes after the end frame".into()));
                }
                break;
            }
            other => return Err(damaged(&format!("unknown frame tag {other}"))),
        }
    }
    let manifest = manifest.ok_or_else(|| BackupError::Damaged("no manifest".into()))?;
    let shards = shards.unwrap_or(manifest.shards);
    for c in &manifest.chunks {
        let found = backup_chunks
            .iter()
            .find(|(s, i, _)| *s == c.shard && *i == c.index)
            .ok_or_else(|| {
                BackupError::Damaged(format!("chunk {}/{} is missing", c.shard, c.index))
            })?;
        if crc32fast::hash(&found.2) != c.crc {
            return Err(BackupError::Damaged(format!(
                "chunk {}/{} does not match the manifest",
                c.shard, c.index
            )));
        }
    }
    Ok(Backup {
        manifest,
        shards,
        chunks: backup_chunks,
        sections,
        logs,
    })
}

/// Restores a verified backup into `data_dir`: builds it beside the target first, then
/// moves any existing data dir aside (to `<dir>.before-restore-<time>`) and puts the new
/// one in place. Refuses a data dir a running server holds.
pub fn restore(backup: &Backup, data_dir: &Path) -> Result<Option<PathBuf>, BackupError> {
    if data_dir.join("meta").exists() {
        // Opening the metadata takes its lock: a running server holds it.
        let probe = super::meta::Meta::open(data_dir).map_err(|e| {
            BackupError::Target(format!("cannot restore into {}: {e}", data_dir.display()))
        })?;
        drop(probe);
    }
    let parent = data_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let stamp = crate::grid::clock::wall_ms();
    let tmp = parent.join(format!(".{name}.restore-{stamp}"));
    let build = || -> Result<(), BackupError> {
        std::fs::create_dir_all(&tmp)?;
        for (shard, segment, bytes) in &backup.logs {
            let dir = shard_dir(&tmp, *shard);
            std::fs::create_dir_all(&dir)?;
            let mut f = File::create(dir.join(format!("{segment:08}.log")))?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        for shard in 0..backup.shards {
            std::fs::create_dir_all(shard_dir(&tmp, shard))?;
        }
        let meta = super::meta::Meta::open(&tmp).map_err(|e| BackupError::Target(e.to_string()))?;
        meta.set("shards", &backup.shards.to_string())
            .map_err(|e| BackupError::Target(e.to_string()))?;
        let store = SnapshotStore::open(meta.db())?;
        store.restore_raw(&backup.manifest, &backup.chunks, &backup.sections)?;
        Ok(())
    };
    if let Err(e) = build() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let mut moved = None;
    if data_dir.exists() {
        let aside = parent.join(format!("{name}.before-restore-{stamp}"));
        std::fs::rename(data_dir, &aside)?;
        moved = Some(aside);
    }
    std::fs::rename(&tmp, data_dir)?;
    Ok(moved)
}
