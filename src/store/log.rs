//! The per-shard segmented log: the write-ahead log and the event store in one.
//!
//! Each shard appends records to `shards/NNNN/SSSSSSSS.log` files (rolled at a size
//! limit). A record is `[len u32][crc32 u32][codec bytes]`. Every event's [`Position`] goes
//! into its profile's timeline index, so a timeline read is one `pread` per event and a
//! merge later splices index lists instead of copying events. Each segment keeps the range
//! of event times it holds (the time index for global scans and event export).

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bincode::{Decode, Encode};
use dashmap::DashMap;
use parking_lot::RwLock;

use super::codec;
use crate::domain::event::EventKind;

/// Where a record lies: shard (16 bits) | segment (16 bits) | byte offset (32 bits).
pub type Position = u64;

/// Builds a [`Position`].
pub fn position(shard: u16, segment: u32, offset: u64) -> Position {
    debug_assert!(segment < (1 << 16) && offset < (1 << 32));
    ((shard as u64) << 48) | ((segment as u64) << 32) | offset
}

/// Splits a [`Position`] into (shard, segment, offset).
pub fn split_position(pos: Position) -> (u16, u32, u64) {
    (
        (pos >> 48) as u16,
        ((pos >> 32) & 0xffff) as u32,
        pos & 0xffff_ffff,
    )
}

/// An identity linked by a record (so replay rebuilds the identity index).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct LinkedIdentity {
    /// Type name.
    pub ty: String,
    /// Normalised value.
    pub value: String,
    /// Server time it was linked.
    pub first_seen: i64,
}

/// An accepted message or a standard event.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct EventRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// Profile it was applied to.
    pub profile: u128,
    /// Corrected event time.
    pub ts_ms: i64,
    /// Receive time.
    pub received_ms: i64,
    /// Kind of call.
    pub kind: EventKind,
    /// Event name ("" when none).
    pub name: String,
    /// Whether this message created the profile.
    pub created: bool,
    /// Hash of its messageId for dedup (0 for standard events).
    pub dedup_hash: u64,
    /// A refused link to list in the profile's merges (JSON object), if any.
    pub note: Option<String>,
    /// Identities this message linked to the profile.
    pub linked: Vec<LinkedIdentity>,
    /// The event as the API shows it (without `profile_id`).
    pub json: String,
}

/// `PATCH /v1/profiles/{key}/traits`.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct PatchRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// Profile changed.
    pub profile: u128,
    /// Server time of the patch.
    pub now_ms: i64,
    /// Whether the patch created the profile.
    pub created: bool,
    /// Identities it linked.
    pub linked: Vec<LinkedIdentity>,
    /// The trait object as sent.
    pub traits_json: String,
}

/// `DELETE /v1/profiles/{key}`.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct DeleteRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// Profile erased.
    pub profile: u128,
    /// Server time of the erasure.
    pub now_ms: i64,
    /// Identity fingerprints suppressed by it (`?suppress=true`; empty otherwise).
    pub suppressed: Vec<u128>,
}

/// A profile merged away into another (written in the absorbed profile's shard).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct MergedAwayRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// The absorbed profile.
    pub profile: u128,
    /// The survivor.
    pub into: u128,
}

/// A profile absorbed into this one (written in the survivor's shard), with the absorbed
/// profile's whole state so replay needs nothing else.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct AbsorbedRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// The survivor.
    pub profile: u128,
    /// Server time of the merge.
    pub now_ms: i64,
    /// The absorbed profile, in its stored form (one profile).
    pub state: crate::store::snapshot::ShardChunk,
}

/// A profile entered or left a segment. It is also the `segment.entered` /
/// `segment.exited` event of the profile's timeline, rendered when read (these are many,
/// so they are stored compact).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct MembershipRecord {
    /// Server-wide accept sequence: the change sequence.
    pub seq: u64,
    /// The profile.
    pub profile: u128,
    /// Server time of the change (for a window, the instant it passed).
    pub at_ms: i64,
    /// The segment's internal index.
    pub segment: u32,
    /// The segment's API id.
    pub segment_id: String,
    /// Entered (true) or left.
    pub entered: bool,
    /// Why (`grid::membership::Reason` as a number).
    pub reason: u8,
}

/// The counters this shard keeps from here on (after a segment was created, changed or
/// deleted), so replay counts events exactly as the live shard did.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct InstallRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// `[[spec id, spec], ...]` as JSON (`segment::counter::SpecDef`).
    pub specs_json: String,
    /// The mappings applied from here on: `[[index, id, body], ...]` as JSON.
    pub mappings_json: String,
}

/// A profile's counter for one spec, recomputed from its retained events (backfill).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct CounterRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// The profile.
    pub profile: u128,
    /// The spec id.
    pub spec: u32,
    /// The counter (None: nothing counted).
    pub counter: Option<crate::segment::counter::Counter>,
}

/// One webhook delivery waiting to be sent: made in the step of the membership change
/// it announces, kept until delivered or failed.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct OutboxEntry {
    /// Delivery id (derived from trigger, profile and change sequence).
    pub delivery: String,
    /// The trigger's internal index.
    pub trigger: u32,
    /// The profile the change is about.
    pub profile: u128,
    /// The change sequence (orders the deliveries of one trigger and profile).
    pub seq: u64,
    /// `segment.entered` (true) or `segment.exited`.
    pub entered: bool,
    /// The payload without its final `"attempt"` member (the JSON object text up to, not
    /// including, its closing brace).
    pub body: String,
    /// Server time the change happened.
    pub at_ms: i64,
}

/// Deliveries queued (or re-queued, or rewritten by an erasure) on this shard.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct OutboxRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// The entries (an entry with a known delivery id replaces it).
    pub entries: Vec<OutboxEntry>,
}

/// Deliveries that ended (delivered, failed, or their trigger deleted).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct OutboxDoneRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// Their ids.
    pub deliveries: Vec<String>,
}

/// A standard event (`user.created`, `user.updated`, …) stored compact: the grid renders
/// its API object when it is read (`grid::shard::expand_system`). These come with
/// nearly every change, so leaving out the ~330 bytes every rendered one repeats halves
/// what an import or a burst of new profiles writes.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct SystemRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// The profile.
    pub profile: u128,
    /// Server time (the event's time and its receive time).
    pub at_ms: i64,
    /// Event name.
    pub name: String,
    /// `properties` as JSON.
    pub properties_json: String,
}

/// An entry of a profile's merge list (`GET /v1/profiles/{key}/merges`) not carried by an
/// event: links refused for a `PATCH` or an import row.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct NoteRecord {
    /// Server-wide accept sequence.
    pub seq: u64,
    /// The profile.
    pub profile: u128,
    /// The entry, as JSON.
    pub note: String,
}

/// What an erased record is overwritten with: the same length, nothing in it.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct FillerRecord {
    /// Zero bytes making the record as long as the one it replaced.
    pub pad: Vec<u8>,
}

/// Every kind of state change a shard logs. New variants go at the end (older records
/// keep their encoding).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum LogRecord {
    /// An event on a timeline.
    Event(EventRecord),
    /// A trait patch.
    Patch(PatchRecord),
    /// An erasure.
    Delete(DeleteRecord),
    /// This profile was merged into another.
    MergedAway(MergedAwayRecord),
    /// Another profile was merged into this one.
    Absorbed(AbsorbedRecord),
    /// A segment membership change (with its timeline event).
    Membership(MembershipRecord),
    /// The counters kept from here on.
    Install(InstallRecord),
    /// A counter recomputed by a backfill.
    Counter(CounterRecord),
    /// Webhook deliveries queued.
    Outbox(OutboxRecord),
    /// Webhook deliveries that ended.
    OutboxDone(OutboxDoneRecord),
    /// The space of an erased record.
    Filler(FillerRecord),
    /// A standard event, stored compact.
    System(SystemRecord),
    /// A merge-list entry of a profile.
    Note(NoteRecord),
}

impl LogRecord {
    /// The profile the record is about.
    /// (0 for install and outbox records, which are about the whole shard).
    pub fn profile(&self) -> u128 {
        match self {
            LogRecord::Event(r) => r.profile,
            LogRecord::Patch(r) => r.profile,
            LogRecord::Delete(r) => r.profile,
            LogRecord::MergedAway(r) => r.profile,
            LogRecord::Absorbed(r) => r.profile,
            LogRecord::Membership(r) => r.profile,
            LogRecord::Install(_)
            | LogRecord::Outbox(_)
            | LogRecord::OutboxDone(_)
            | LogRecord::Filler(_) => 0,
            LogRecord::Counter(r) => r.profile,
            LogRecord::System(r) => r.profile,
            LogRecord::Note(r) => r.profile,
        }
    }

    /// The stored event a record is (accepted messages and standard events stored in
    /// full; compact ones are [`LogRecord::System`]).
    pub fn event(&self) -> Option<&EventRecord> {
        match self {
            LogRecord::Event(e) => Some(e),
            _ => None,
        }
    }

    /// The time of the timeline entry a record makes, if it makes one.
    pub fn event_time(&self) -> Option<i64> {
        match self {
            LogRecord::Event(e) => Some(e.ts_ms),
            LogRecord::Membership(m) => Some(m.at_ms),
            LogRecord::System(r) => Some(r.at_ms),
            _ => None,
        }
    }

    /// The record's accept sequence.
    pub fn seq(&self) -> u64 {
        match self {
            LogRecord::Event(r) => r.seq,
            LogRecord::Patch(r) => r.seq,
            LogRecord::Delete(r) => r.seq,
            LogRecord::MergedAway(r) => r.seq,
            LogRecord::Absorbed(r) => r.seq,
            LogRecord::Membership(r) => r.seq,
            LogRecord::Install(r) => r.seq,
            LogRecord::Counter(r) => r.seq,
            LogRecord::Outbox(r) => r.seq,
            LogRecord::OutboxDone(r) => r.seq,
            LogRecord::Filler(_) => 0,
            LogRecord::System(r) => r.seq,
            LogRecord::Note(r) => r.seq,
        }
    }
}

/// The encoded payload of a filler exactly `len` bytes long (records are never shorter
/// than the smallest filler).
fn filler_payload(len: usize) -> io::Result<Vec<u8>> {
    // version byte + variant + length varint (1, 3 or 5 bytes) + pad
    for varint in [1usize, 3, 5] {
        let Some(n) = len.checked_sub(2 + varint) else {
            continue;
        };
        let mut out = Vec::with_capacity(len);
        codec::encode_into(
            &LogRecord::Filler(FillerRecord { pad: vec![0; n] }),
            &mut out,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if out.len() == len {
            return Ok(out);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("no filler of {len} bytes"),
    ))
}

/// Overwrites, in place and durably, every record of one shard's log segments that
/// `erase` selects, with a filler of the same length: positions of every other record stay
/// valid, and replay skips fillers. Answers how many records were overwritten. The current
/// segment may be appended to meanwhile (only complete records are touched).
pub fn scrub(
    data_dir: &Path,
    shard: u16,
    erase: &dyn Fn(Position, &LogRecord) -> bool,
) -> io::Result<usize> {
    let dir = shard_dir(data_dir, shard);
    let mut total = 0;
    for n in list_segments(&dir)? {
        let path = segment_path(&dir, n);
        let mut hits: Vec<(u64, usize)> = Vec::new();
        scan_records(&path, |offset, len, rec| {
            if erase(position(shard, n, offset), &rec) {
                hits.push((offset, len));
            }
        })?;
        if hits.is_empty() {
            continue;
        }
        let file = OpenOptions::new().write(true).open(&path)?;
        for (offset, len) in &hits {
            let payload = filler_payload(*len)?;
            let mut rec = Vec::with_capacity(8 + len);
            rec.extend_from_slice(&(*len as u32).to_le_bytes());
            rec.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            rec.extend_from_slice(&payload);
            file.write_all_at(&rec, *offset)?;
        }
        file.sync_data()?;
        total += hits.len();
    }
    Ok(total)
}

/// What one segment holds, for skipping it in time-bounded scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentMeta {
    /// Segment number.
    pub number: u32,
    /// Earliest event time in it (i64::MAX when none).
    pub min_ts: i64,
    /// Latest event time in it (i64::MIN when none).
    pub max_ts: i64,
}

/// The append side of one shard's log; owned by that shard's actor alone.
pub struct ShardLog {
    /// Shard number.
    shard: u16,
    /// `shards/NNNN`.
    dir: PathBuf,
    /// The segment being appended to (shared with the flusher for `fsync`).
    file: Arc<File>,
    /// Its number.
    segment: u32,
    /// Bytes in it that reached the OS.
    written: u64,
    /// Records appended but not yet written (one write per batch).
    pending: Vec<u8>,
    /// Roll to a new segment past this size.
    max_segment_bytes: u64,
    /// Time ranges of the segments (shared with readers).
    segments: Arc<RwLock<Vec<SegmentMeta>>>,
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:08}.log"))
}

/// The directory of one shard's log.
pub fn shard_dir(data_dir: &Path, shard: u16) -> PathBuf {
    data_dir.join("shards").join(format!("{shard:04}"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".log").and_then(|n| n.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

impl ShardLog {
    /// Opens (or creates) a shard's log and replays every intact record through `apply`
    /// in log order. A torn record at the end of the last segment is cut off.
    /// Records before `from` (a snapshot covers them) are not read: whole segments before
    /// it are skipped.
    pub fn open(
        data_dir: &Path,
        shard: u16,
        max_segment_bytes: u64,
        from: Position,
        mut apply: impl FnMut(Position, LogRecord),
    ) -> io::Result<ShardLog> {
        let dir = shard_dir(data_dir, shard);
        std::fs::create_dir_all(&dir)?;
        let numbers = list_segments(&dir)?;
        let mut metas = Vec::with_capacity(numbers.len().max(1));
        let mut last_len = 0;
        let (_, from_segment, from_offset) = split_position(from);
        for (i, &n) in numbers.iter().enumerate() {
            let path = segment_path(&dir, n);
            if n < from_segment && i + 1 < numbers.len() {
                // Covered by the snapshot: unknown time range, kept for event reads.
                metas.push(SegmentMeta {
                    number: n,
                    min_ts: i64::MIN,
                    max_ts: i64::MAX,
                });
                continue;
            }
            let start = if n == from_segment { from_offset } else { 0 };
            let mut meta = SegmentMeta {
                number: n,
                min_ts: i64::MAX,
                max_ts: i64::MIN,
            };
            let good_len = scan_file(&path, start, |offset, rec| {
                if let LogRecord::Event(e) = &rec {
                    meta.min_ts = meta.min_ts.min(e.ts_ms);
                    meta.max_ts = meta.max_ts.max(e.ts_ms);
                }
                apply(position(shard, n, offset), rec);
            })?;
            let file_len = std::fs::metadata(&path)?.len();
            if good_len < file_len {
                if i + 1 == numbers.len() {
                    tracing::warn!(
                        shard,
                        segment = n,
                        good_len,
                        file_len,
                        "cutting torn log tail"
                    );
                    OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(good_len)?;
                } else {
                    tracing::error!(
                        shard,
                        segment = n,
                        good_len,
                        file_len,
                        "damaged record inside the log; later records of this segment are skipped"
                    );
                }
            }
            last_len = good_len;
            metas.push(meta);
        }
        let segment = match numbers.last() {
            Some(&n) => n,
            None => {
                metas.push(SegmentMeta {
                    number: 0,
                    min_ts: i64::MAX,
                    max_ts: i64::MIN,
                });
                0
            }
        };
        let file = Arc::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(segment_path(&dir, segment))?,
        );
        sync_dir(&dir)?;
        Ok(ShardLog {
            shard,
            dir,
            file,
            segment,
            written: last_len,
            pending: Vec::with_capacity(64 * 1024),
            max_segment_bytes,
            segments: Arc::new(RwLock::new(metas)),
        })
    }

    /// Queues a record for the next [`ShardLog::flush`] and returns where it will lie.
    pub fn append(&mut self, record: &LogRecord) -> io::Result<Position> {
        if self.written + self.pending.len() as u64 >= self.max_segment_bytes {
            self.roll()?;
        }
        let offset = self.written + self.pending.len() as u64;
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0u8; 8]);
        codec::encode_into(record, &mut self.pending)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let len = (self.pending.len() - start - 8) as u32;
        let crc = crc32fast::hash(&self.pending[start + 8..]);
        self.pending[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.pending[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        if let Some(ts) = record.event_time() {
            let mut metas = self.segments.write();
            if let Some(m) = metas.last_mut() {
                m.min_ts = m.min_ts.min(ts);
                m.max_ts = m.max_ts.max(ts);
            }
        }
        Ok(position(self.shard, self.segment, offset))
    }

    /// Writes queued records to the OS; with `sync`, also to the disk.
    pub fn flush(&mut self, sync: bool) -> io::Result<()> {
        self.write_pending()?;
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// After a failed write or `fsync`, never trusts the current file again: copies what it
    /// holds (what this process wrote, as the OS still has it) into a new file, syncs that,
    /// and puts it in place under the same name, so positions stay valid.
    pub fn rewrite_current(&mut self) -> io::Result<()> {
        self.pending.clear();
        let path = segment_path(&self.dir, self.segment);
        let tmp = path.with_extension("log.rewrite");
        let result = (|| {
            let mut bytes = vec![0u8; self.written as usize];
            self.file.read_exact_at(&mut bytes, 0)?;
            let mut out = File::create(&tmp)?;
            out.write_all(&bytes)?;
            out.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(&self.dir)?;
            self.file = Arc::new(OpenOptions::new().append(true).read(true).open(&path)?);
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Checks that the shard's directory takes and syncs a write again (after a failed
    /// write such as a full disk, where the file itself was left intact).
    pub fn probe_writable(&mut self) -> io::Result<()> {
        self.pending.clear();
        let probe = self.dir.join("probe.tmp");
        let result = (|| {
            let mut f = File::create(&probe)?;
            f.write_all(&[0u8; 64 * 1024])?;
            f.sync_all()
        })();
        let _ = std::fs::remove_file(&probe);
        result
    }

    /// The segment file being appended to, for a group-commit `fsync`.
    pub fn current_file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Writes queued records to the OS (one `write` per batch), without syncing.
    pub fn write_pending(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            if let Err(e) = (&*self.file).write_all(&self.pending) {
                // Leave the file as it was before this batch, so nothing half-written stays.
                let _ = self.file.set_len(self.written);
                self.pending.clear();
                return Err(e);
            }
            self.written += self.pending.len() as u64;
            metrics::counter!("user360_log_bytes_written_total")
                .increment(self.pending.len() as u64);
            self.pending.clear();
        }
        Ok(())
    }

    /// Drops records queued since the last flush (their request is not persisted).
    pub fn discard_pending(&mut self) {
        self.pending.clear();
    }

    fn roll(&mut self) -> io::Result<()> {
        self.flush(true)?;
        self.segment += 1;
        self.file = Arc::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(segment_path(&self.dir, self.segment))?,
        );
        sync_dir(&self.dir)?;
        self.written = 0;
        self.segments.write().push(SegmentMeta {
            number: self.segment,
            min_ts: i64::MAX,
            max_ts: i64::MIN,
        });
        Ok(())
    }

    /// The position the next record will get (everything before it was written).
    pub fn end_position(&self) -> Position {
        position(
            self.shard,
            self.segment,
            self.written + self.pending.len() as u64,
        )
    }

    /// Deletes segment files before `before` that `keep` does not name (no live event
    /// lies in them, and a snapshot covers their other records). Returns how many.
    pub fn delete_segments_before(
        &mut self,
        before: Position,
        keep: &std::collections::HashSet<u32>,
    ) -> io::Result<usize> {
        let (_, seg, _) = split_position(before);
        let mut deleted = 0;
        let mut metas = self.segments.write();
        let mut kept = Vec::with_capacity(metas.len());
        for m in metas.drain(..) {
            if m.number < seg && m.number != self.segment && !keep.contains(&m.number) {
                std::fs::remove_file(segment_path(&self.dir, m.number))?;
                deleted += 1;
            } else {
                kept.push(m);
            }
        }
        *metas = kept;
        drop(metas);
        if deleted > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(deleted)
    }

    /// The time index of this shard's segments, shared with readers.
    pub fn segments(&self) -> Arc<RwLock<Vec<SegmentMeta>>> {
        self.segments.clone()
    }
}

/// Makes a new file's directory entry durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads every intact record of a segment file, with its offset and payload length.
fn scan_records(path: &Path, mut f: impl FnMut(u64, usize, LogRecord)) -> io::Result<u64> {
    let mut lens: Vec<(u64, usize)> = Vec::new();
    let mut recs = Vec::new();
    let end = scan_file(path, 0, |offset, rec| {
        recs.push((offset, rec));
    })?;
    // Lengths come from the offsets of the next records (and the end of the intact part).
    for (i, (offset, _)) in recs.iter().enumerate() {
        let next = recs.get(i + 1).map_or(end, |(o, _)| *o);
        lens.push((*offset, (next - offset - 8) as usize));
    }
    for ((offset, rec), (_, len)) in recs.into_iter().zip(lens) {
        f(offset, len, rec);
    }
    Ok(end)
}

/// Reads every intact record of one segment file from `start` (a record boundary); returns
/// the length of the intact prefix. A record whose checksum fails but which a valid record
/// follows is skipped (an overwrite by an erasure was interrupted: its length is intact);
/// one at the end is a torn tail.
fn scan_file(path: &Path, start: u64, mut f: impl FnMut(u64, LogRecord)) -> io::Result<u64> {
    let mut file = File::open(path)?;
    if start > 0 {
        use std::io::Seek;
        if file.metadata()?.len() < start {
            return Ok(file.metadata()?.len());
        }
        file.seek(io::SeekFrom::Start(start))?;
    }
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut offset = start;
    let mut header = [0u8; 8];
    let mut buf = Vec::new();
    loop {
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(offset),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
        buf.resize(len, 0);
        match r.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(offset),
            Err(e) => return Err(e),
        }
        if crc32fast::hash(&buf) != crc {
            // Is a valid record next? Then this one is a half-overwritten erased record.
            let mut next_header = [0u8; 8];
            if r.read_exact(&mut next_header).is_err() {
                return Ok(offset);
            }
            let next_len = u32::from_le_bytes(next_header[..4].try_into().unwrap()) as usize;
            let next_crc = u32::from_le_bytes(next_header[4..].try_into().unwrap());
            let mut next = vec![0u8; next_len];
            if r.read_exact(&mut next).is_err() || crc32fast::hash(&next) != next_crc {
                return Ok(offset);
            }
            tracing::warn!(path = %path.display(), offset, "skipping a record whose erasure was interrupted");
            offset += 8 + len as u64;
            match codec::decode_evolved::<LogRecord, super::compat::v1::LogRecord>(&next) {
                Ok(rec) => f(offset, rec),
                Err(_) => return Ok(offset),
            }
            offset += 8 + next_len as u64;
            continue;
        }
        match codec::decode_evolved::<LogRecord, super::compat::v1::LogRecord>(&buf) {
            Ok(rec) => f(offset, rec),
            Err(_) => return Ok(offset),
        }
        offset += 8 + len as u64;
    }
}

/// Random-access reads of any shard's log; shared by every reader, lock-free per read.
pub struct LogReader {
    /// The data dir.
    data_dir: PathBuf,
    /// Open segment files by (shard, segment).
    files: DashMap<(u16, u32), Arc<File>>,
}

impl LogReader {
    /// A reader over the logs of `data_dir`.
    pub fn new(data_dir: &Path) -> LogReader {
        LogReader {
            data_dir: data_dir.to_path_buf(),
            files: DashMap::new(),
        }
    }

    fn file(&self, shard: u16, segment: u32) -> io::Result<Arc<File>> {
        if let Some(f) = self.files.get(&(shard, segment)) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(segment_path(
            &shard_dir(&self.data_dir, shard),
            segment,
        ))?);
        self.files.insert((shard, segment), f.clone());
        Ok(f)
    }

    /// Drops cached handles of a shard's deleted segments.
    pub fn forget_deleted(&self, shard: u16) {
        self.files.retain(|(s, seg), _| {
            *s != shard || segment_path(&shard_dir(&self.data_dir, *s), *seg).exists()
        });
    }

    /// Reads the record at `pos`.
    pub fn read(&self, pos: Position) -> io::Result<LogRecord> {
        let (shard, segment, offset) = split_position(pos);
        let file = self.file(shard, segment)?;
        let mut header = [0u8; 8];
        file.read_exact_at(&mut header, offset)?;
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset + 8)?;
        if crc32fast::hash(&buf) != crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("checksum mismatch at shard {shard} segment {segment} offset {offset}"),
            ));
        }
        codec::decode_evolved::<LogRecord, super::compat::v1::LogRecord>(&buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubbed_records_become_fillers_and_everything_else_stays_put() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ShardLog::open(dir.path(), 0, 1 << 30, 0, |_, _| {}).unwrap();
        let mut positions = Vec::new();
        for seq in 1..=6u64 {
            let mut e = match event(seq, seq as i64) {
                LogRecord::Event(e) => e,
                _ => unreachable!(),
            };
            e.profile = if seq % 2 == 0 { 42 } else { 7 };
            let ch = if e.profile == 42 { "y" } else { "x" };
            e.json = format!("{{\"secret\":\"{}\"}}", ch.repeat(seq as usize * 40));
            positions.push(log.append(&LogRecord::Event(e)).unwrap());
        }
        log.flush(true).unwrap();
        let n = scrub(dir.path(), 0, &|_, r| r.profile() == 42).unwrap();
        assert_eq!(n, 3);
        let reader = LogReader::new(dir.path());
        for (i, p) in positions.iter().enumerate() {
            match reader.read(*p).unwrap() {
                LogRecord::Event(e) => assert_eq!(e.profile, 7, "record {i}"),
                LogRecord::Filler(_) => assert_eq!(i % 2, 1, "record {i}"),
                other => panic!("{other:?}"),
            }
        }
        let bytes = std::fs::read(segment_path(&shard_dir(dir.path(), 0), 0)).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains(&"x".repeat(200)));
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&"y".repeat(40)),
            "the erased text is gone"
        );
        // A half-written filler (its checksum broken) is skipped, the records after it kept.
        let (_, _, off) = split_position(positions[2]);
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(&shard_dir(dir.path(), 0), 0))
            .unwrap();
        f.write_all_at(&[0xAB; 4], off + 20).unwrap();
        drop(f);
        let mut seen = Vec::new();
        drop(log);
        ShardLog::open(dir.path(), 0, 1 << 30, 0, |_, r| seen.push(r.seq())).unwrap();
        assert_eq!(seen, vec![1, 0, 0, 5, 0], "the damaged record 3 is skipped");
    }

    fn event(seq: u64, ts: i64) -> LogRecord {
        LogRecord::Event(EventRecord {
            seq,
            profile: 7,
            ts_ms: ts,
            received_ms: ts,
            kind: EventKind::Track,
            name: "Viewed".into(),
            created: seq == 1,
            dedup_hash: seq,
            note: None,
            linked: vec![],
            json: format!("{{\"seq\":{seq}}}"),
        })
    }

    #[test]
    fn compact_standard_events_read_back_and_replay_with_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ShardLog::open(dir.path(), 0, 1 << 30, 0, |_, _| {}).unwrap();
        let rec = LogRecord::System(SystemRecord {
            seq: 9,
            profile: 42,
            at_ms: 1_700_000_000_123,
            name: "user.updated".into(),
            properties_json: r#"{"changes":{"plan":{"from":null,"to":"pro"}}}"#.into(),
        });
        assert_eq!(rec.event_time(), Some(1_700_000_000_123));
        assert_eq!((rec.seq(), rec.profile()), (9, 42));
        let pos = log.append(&rec).unwrap();
        log.flush(true).unwrap();
        assert_eq!(LogReader::new(dir.path()).read(pos).unwrap(), rec);
        drop(log);
        let mut seen = Vec::new();
        ShardLog::open(dir.path(), 0, 1 << 30, 0, |_, r| seen.push(r)).unwrap();
        assert_eq!(seen, vec![rec]);
    }

    #[test]
    fn append_read_replay_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ShardLog::open(dir.path(), 2, 200, 0, |_, _| panic!("empty")).unwrap();
        let mut positions = Vec::new();
        for seq in 1..=10 {
            positions.push(log.append(&event(seq, seq as i64 * 10)).unwrap());
            if seq % 3 == 0 {
                log.flush(false).unwrap();
            }
        }
        log.flush(true).unwrap();
        assert!(log.segments().read().len() > 1, "small segments roll");
        let reader = LogReader::new(dir.path());
        for (i, pos) in positions.iter().enumerate() {
            assert_eq!(
                reader.read(*pos).unwrap(),
                event(i as u64 + 1, (i as i64 + 1) * 10)
            );
        }
        drop(log);
        // Tear the last record: replay stops before it and the file is cut there.
        let last = split_position(*positions.last().unwrap());
        let path = segment_path(&shard_dir(dir.path(), 2), last.1);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let mut seen = Vec::new();
        let mut log = ShardLog::open(dir.path(), 2, 200, 0, |_, r| seen.push(r.seq())).unwrap();
        assert_eq!(seen, (1..=9).collect::<Vec<_>>());
        let p = log.append(&event(11, 5)).unwrap();
        log.flush(false).unwrap();
        assert_eq!(LogReader::new(dir.path()).read(p).unwrap().seq(), 11);
    }
}
