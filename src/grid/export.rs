//! Streaming export and import over the grid.
//!
//! **Export** walks every shard's profiles in id order in slices (each slice rendered by its
//! shard in one step, so each row is consistent) and merges the shards' slices by id — a
//! k-way merge holding one slice per shard, so memory stays bounded whatever the size of
//! the export. **Import** parses the body on a blocking thread as it streams in and applies
//! rows in batches (identities resolved like ingest, so they link and may merge; traits set
//! like `PATCH`), with a bounded queue between the two: a large import is held back, it
//! does not grow memory.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use serde_json::Map;
use tokio::sync::{mpsc, oneshot};

use super::Grid;
use super::registry::Resolution;
use super::shard::EventFilter;
use super::shard::export::{EXPORT_SLICE, ExportEventsSlice, ExportSlice, ImportRows};
use crate::domain::event::with_profile_id;
use crate::domain::ids::ProfileId;
use crate::error::{ErrorCode, Problem};
use crate::export::Field;
use crate::export::import::{ImportRow, Parsed, RowError, parse_csv, parse_jsonl};
use crate::segment::compile::SegIdx;

/// Rows per import batch.
const IMPORT_BATCH: usize = 512;

/// How a profile export renders rows.
#[derive(Debug, Clone)]
pub enum ProfileFormat {
    /// One JSON line per profile: the profile object, or (with fields) a flat object.
    Jsonl(Option<Vec<Field>>),
    /// CSV with these columns.
    Csv(Vec<Field>),
}

/// A rendered row: a JSON line or a CSV record, with its line end (rendered in the shard,
/// so the shards share the work).
pub type Row = Vec<u8>;

/// The rows of one export slice.
type Slice = Vec<(ProfileId, Row)>;

/// One shard's side of the merge.
struct ShardCursor {
    /// Rows received and not yet merged.
    buf: VecDeque<(ProfileId, Row)>,
    /// The next slice, asked for before this one runs out (the shard renders it while the
    /// merge consumes the current one).
    pending: Option<oneshot::Receiver<Slice>>,
    /// Whether the shard has no more rows.
    done: bool,
}

/// Export bytes are sent in chunks of about this size (not one per row).
const EXPORT_CHUNK: usize = 64 * 1024;

/// Merges the shards' id-ordered slices into one id-ordered sequence of rows.
struct ProfileMerge {
    grid: Arc<Grid>,
    segment: Option<SegIdx>,
    format: Arc<ProfileFormat>,
    /// Per shard.
    shards: Vec<ShardCursor>,
}

impl ProfileMerge {
    /// Asks shard `i` for the slice after `after`.
    fn ask(&self, i: usize, after: Option<ProfileId>) -> oneshot::Receiver<Slice> {
        let (tx, rx) = oneshot::channel();
        self.grid.shard(i as u16).do_send(ExportSlice {
            after,
            segment: self.segment,
            format: self.format.clone(),
            reply: tx,
        });
        rx
    }

    async fn refill(&mut self, i: usize) -> std::io::Result<()> {
        let c = &self.shards[i];
        if !c.buf.is_empty() || c.done {
            return Ok(());
        }
        let rx = match self.shards[i].pending.take() {
            Some(rx) => rx,
            None => self.ask(i, None),
        };
        let rows = rx.await.map_err(|_| shard_gone(i))?;
        let done = rows.len() < EXPORT_SLICE;
        if !done {
            let next = self.ask(i, rows.last().map(|(id, _)| *id));
            self.shards[i].pending = Some(next);
        }
        let c = &mut self.shards[i];
        c.done = done;
        c.buf.extend(rows);
        Ok(())
    }

    /// The next row in id order.
    async fn next(&mut self) -> std::io::Result<Option<Row>> {
        for i in 0..self.shards.len() {
            self.refill(i).await?;
        }
        let Some(i) = (0..self.shards.len())
            .filter(|i| !self.shards[*i].buf.is_empty())
            .min_by_key(|i| self.shards[*i].buf.front().map(|(id, _)| *id))
        else {
            return Ok(None);
        };
        Ok(self.shards[i].buf.pop_front().map(|(_, r)| r))
    }

    /// The next rows, about [`EXPORT_CHUNK`] bytes of them; None at the end.
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        let mut chunk = Vec::with_capacity(EXPORT_CHUNK + 4096);
        while chunk.len() < EXPORT_CHUNK {
            match self.next().await? {
                Some(row) => chunk.extend_from_slice(&row),
                None => break,
            }
        }
        Ok((!chunk.is_empty()).then(|| Bytes::from(chunk)))
    }
}

fn shard_gone(i: usize) -> std::io::Error {
    std::io::Error::other(format!("shard {i} stopped during the export"))
}

/// One shard's side of the event export merge: (profile, its matching events' positions)
/// in id order.
struct EventCursor {
    buf: VecDeque<(ProfileId, Vec<u64>)>,
    after: Option<ProfileId>,
    done: bool,
}

/// Merges the shards' profile-ordered event positions, reads the events in batches off
/// the async threads, and renders them.
struct EventMerge {
    grid: Arc<Grid>,
    filter: EventFilter,
    segment: Option<SegIdx>,
    shards: Vec<EventCursor>,
}

/// Events read from the log per blocking task.
const EVENT_READ_BATCH: usize = 512;

impl EventMerge {
    async fn refill(&mut self, i: usize) -> std::io::Result<()> {
        while self.shards[i].buf.is_empty() && !self.shards[i].done {
            let (tx, rx) = oneshot::channel();
            self.grid.shard(i as u16).do_send(ExportEventsSlice {
                after: self.shards[i].after,
                segment: self.segment,
                filter: self.filter.clone(),
                reply: tx,
            });
            let (last, done, hits) = rx.await.map_err(|_| shard_gone(i))?;
            let c = &mut self.shards[i];
            c.done = done;
            c.after = last.or(c.after);
            // Hits come grouped by profile.
            for (pid, pos) in hits {
                match c.buf.back_mut() {
                    Some((p, list)) if *p == pid => list.push(pos),
                    _ => c.buf.push_back((pid, vec![pos])),
                }
            }
        }
        Ok(())
    }

    /// The next profile with matching events, in id order.
    async fn next(&mut self) -> std::io::Result<Option<(ProfileId, Vec<u64>)>> {
        for i in 0..self.shards.len() {
            self.refill(i).await?;
        }
        let Some(i) = (0..self.shards.len())
            .filter(|i| !self.shards[*i].buf.is_empty())
            .min_by_key(|i| self.shards[*i].buf.front().map(|(id, _)| *id))
        else {
            return Ok(None);
        };
        Ok(self.shards[i].buf.pop_front())
    }

    /// The rows of the next few profiles' events (about [`EVENT_READ_BATCH`] events).
    async fn next_chunk(&mut self, csv: bool) -> std::io::Result<Option<Bytes>> {
        let mut todo: Vec<(ProfileId, u64)> = Vec::new();
        while todo.len() < EVENT_READ_BATCH {
            match self.next().await? {
                Some((pid, positions)) => todo.extend(positions.into_iter().map(|p| (pid, p))),
                None => break,
            }
        }
        if todo.is_empty() {
            return Ok(None);
        }
        let grid = self.grid.clone();
        let chunk = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut out = Vec::with_capacity(todo.len() * 512);
            for (pid, pos) in todo {
                out.extend_from_slice(&event_row(&grid.read_event(pos)?, pid, csv));
            }
            Ok(out)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(Some(Bytes::from(chunk)))
    }
}

/// One CSV record as bytes (RFC 4180 quoting).
fn csv_record(cells: &[String]) -> Bytes {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::with_capacity(256));
    let _ = w.write_record(cells);
    Bytes::from(w.into_inner().unwrap_or_default())
}

/// The columns of an event export.
pub const EVENT_COLUMNS: &[&str] = &[
    "profile_id",
    "message_id",
    "seq",
    "type",
    "event",
    "name",
    "category",
    "properties",
    "traits",
    "context",
    "user_id",
    "anonymous_id",
    "group_id",
    "previous_id",
    "timestamp",
    "received_at",
];

/// An event export's row for one stored event.
fn event_row(json: &str, profile: ProfileId, csv: bool) -> Bytes {
    if !csv {
        let mut line = with_profile_id(json, profile);
        line.push('\n');
        return Bytes::from(line);
    }
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let cells: Vec<String> = EVENT_COLUMNS
        .iter()
        .map(|c| match (*c, v.get(*c)) {
            ("profile_id", _) => profile.to_string(),
            (_, None | Some(serde_json::Value::Null)) => String::new(),
            (_, Some(serde_json::Value::String(s))) => crate::export::guard(s.clone()),
            (_, Some(other)) => other.to_string(),
        })
        .collect();
    csv_record(&cells)
}

/// One row resolved for its shard: (index in the batch, resolution, traits).
pub type ImportItem = (
    usize,
    Resolution,
    Map<String, serde_json::Value>,
    Option<String>,
);

/// What an import did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ImportAnswer {
    /// Rows applied.
    pub imported: u64,
    /// Rows refused (the first 1,000 are listed).
    pub rejected: Vec<RejectedRow>,
    /// How many rows were refused in all.
    pub rejected_total: u64,
}

/// A refused import row.
#[derive(Debug, serde::Serialize)]
pub struct RejectedRow {
    /// 1-based physical line.
    pub line: u64,
    /// Error code.
    pub code: &'static str,
    /// Why, naming the column or field and the value.
    pub message: String,
}

/// Most rejected rows listed in an answer (the count goes on in `rejected_total`).
const MAX_REJECTED_LISTED: usize = 1000;

/// A `Read` over the chunks of a streaming body (for the blocking parser).
pub struct ChunkReader {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    cur: Bytes,
}

impl ChunkReader {
    /// Reads what `rx` delivers, in order, until it closes.
    pub fn new(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> ChunkReader {
        ChunkReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Import body formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    /// CSV with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Grid {
    /// `GET /v1/export/profiles`: the export's bytes as they are produced (the CSV header
    /// first), profiles by ascending id.
    pub fn export_profiles(
        self: &Arc<Self>,
        format: ProfileFormat,
        segment: Option<SegIdx>,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let header = match &format {
            ProfileFormat::Csv(cols) => Some(csv_record(
                &cols.iter().map(Field::name).collect::<Vec<_>>(),
            )),
            ProfileFormat::Jsonl(_) => None,
        };
        let merge = ProfileMerge {
            grid: self.clone(),
            segment,
            format: Arc::new(format),
            shards: (0..self.shard_count())
                .map(|_| ShardCursor {
                    buf: VecDeque::new(),
                    pending: None,
                    done: false,
                })
                .collect(),
        };
        let head = futures_util::stream::iter(header.map(Ok));
        let rows = futures_util::stream::unfold(Some(merge), |m| async move {
            let mut m = m?;
            match m.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some(m))),
                Ok(None) => None,
                // The error ends the stream: the response is cut without its last chunk.
                Err(e) => Some((Err(e), None)),
            }
        });
        use futures_util::StreamExt;
        head.chain(rows)
    }

    /// `GET /v1/export/events`: every matching event with its `profile_id`, profile by
    /// profile in ascending id order, each profile's events oldest first. An event that
    /// cannot be read aborts the stream (so a cut export never looks complete).
    pub fn export_events(
        self: &Arc<Self>,
        filter: EventFilter,
        segment: Option<SegIdx>,
        csv: bool,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let header = csv.then(|| {
            csv_record(
                &EVENT_COLUMNS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )
        });
        let merge = EventMerge {
            grid: self.clone(),
            filter,
            segment,
            shards: (0..self.shard_count())
                .map(|_| EventCursor {
                    buf: VecDeque::new(),
                    after: None,
                    done: false,
                })
                .collect(),
        };
        let head = futures_util::stream::iter(header.map(Ok));
        let rows = futures_util::stream::unfold(Some(merge), move |m| async move {
            let mut m = m?;
            match m.next_chunk(csv).await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some(m))),
                Ok(None) => None,
                // The error ends the stream: the response is cut without its last chunk.
                Err(e) => Some((Err(e), None)),
            }
        });
        use futures_util::StreamExt;
        head.chain(rows)
    }

    /// `POST /v1/import/profiles`: parses `body` as it arrives and upserts each row.
    pub async fn import(
        self: &Arc<Self>,
        format: ImportFormat,
        gzip: bool,
        body: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> Result<ImportAnswer, Problem> {
        let (rows_tx, mut rows_rx) = mpsc::channel::<Vec<Parsed>>(4);
        let rules = Arc::new(crate::domain::identity::IdentityRules::new(
            &self.settings.identity,
        ));
        // A line is one profile: as large as its traits may be (with its identities), so
        // an export always imports back; never less than a request body.
        let max_line = (2 * self.settings.ingest.max_trait_bytes + (1 << 16))
            .max(self.settings.ingest.max_body_bytes);
        let max_depth = self.settings.ingest.max_depth;
        let parser = tokio::task::spawn_blocking(move || -> Result<(), RowError> {
            let mut batch = Vec::with_capacity(IMPORT_BATCH);
            let mut emit = |r: Parsed| {
                batch.push(r);
                if batch.len() >= IMPORT_BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(IMPORT_BATCH));
                    return rows_tx.blocking_send(full).is_ok();
                }
                true
            };
            let chunks = ChunkReader::new(body);
            let reader: Box<dyn Read> = if gzip {
                Box::new(flate2::read::MultiGzDecoder::new(chunks))
            } else {
                Box::new(chunks)
            };
            let result = match format {
                ImportFormat::Csv => parse_csv(reader, &rules, max_line, &mut emit),
                ImportFormat::Jsonl => parse_jsonl(reader, &rules, max_line, max_depth, &mut emit)
                    .map_err(|e| RowError {
                        line: 0,
                        code: ErrorCode::InvalidBody,
                        message: format!(
                            "cannot read the body from here on: {e} (the rows before are \
                             imported)"
                        ),
                    }),
            };
            if !batch.is_empty() {
                let _ = rows_tx.blocking_send(batch);
            }
            result
        });
        let mut answer = ImportAnswer::default();
        let reject = |answer: &mut ImportAnswer, line: u64, code: ErrorCode, message: String| {
            answer.rejected_total += 1;
            if answer.rejected.len() < MAX_REJECTED_LISTED {
                answer.rejected.push(RejectedRow {
                    line,
                    code: code.as_str(),
                    message,
                });
            }
        };
        // Batches are pipelined: the next one is resolved and sent while the shards apply
        // and commit the ones before (a shard's mailbox keeps their order).
        let mut in_flight: std::collections::VecDeque<PendingBatch> = Default::default();
        let settle = |answer: &mut ImportAnswer,
                      done: Vec<(u64, Result<(), Problem>)>|
         -> Result<(), Problem> {
            for (line, result) in done {
                match result {
                    Ok(()) => answer.imported += 1,
                    Err(p) if p.code == ErrorCode::Unavailable => return Err(p),
                    Err(p) => reject(answer, line, p.code, p.message),
                }
            }
            Ok(())
        };
        while let Some(batch) = rows_rx.recv().await {
            let mut good: Vec<ImportRow> = Vec::with_capacity(batch.len());
            for r in batch {
                match r {
                    Ok(row) => good.push(row),
                    Err(e) => reject(&mut answer, e.line, e.code, e.message),
                }
            }
            in_flight.push_back(
                self.send_import_batch(good, format == ImportFormat::Csv)
                    .await,
            );
            if in_flight.len() > IMPORT_IN_FLIGHT {
                let done = in_flight.pop_front().expect("non-empty").finish().await;
                settle(&mut answer, done)?;
            }
        }
        while let Some(p) = in_flight.pop_front() {
            settle(&mut answer, p.finish().await)?;
        }
        match parser.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if answer.imported == 0 && answer.rejected_total == 0 => {
                return Err(Problem::new(
                    e.code,
                    format!("line {}: {}", e.line, e.message),
                ));
            }
            Ok(Err(e)) => reject(&mut answer, e.line, e.code, e.message),
            Err(e) => {
                return Err(Problem::new(
                    ErrorCode::Internal,
                    format!("import parser failed: {e}"),
                ));
            }
        }
        // Rows are rejected by the parser as read and by the shards as applied: listed in
        // line order.
        answer.rejected.sort_by_key(|r| r.line);
        metrics::counter!("user360_import_rows_total", "outcome" => "imported")
            .increment(answer.imported);
        metrics::counter!("user360_import_rows_total", "outcome" => "rejected")
            .increment(answer.rejected_total);
        Ok(answer)
    }

    /// Resolves one batch of rows (merging where they join profiles) and sends each shard
    /// its part; the answer waits for what the shards report.
    async fn send_import_batch(&self, rows: Vec<ImportRow>, merge_nested: bool) -> PendingBatch {
        let now = self.clock.now_ms();
        let mut out = Vec::with_capacity(rows.len());
        let mut by_shard: Vec<Vec<ImportItem>> =
            (0..self.shard_count()).map(|_| Vec::new()).collect();
        let lines: Vec<u64> = rows.iter().map(|r| r.line).collect();
        for (i, row) in rows.into_iter().enumerate() {
            if let Some(id) = self.registry.suppressed_among(&row.identities) {
                out.push((
                    row.line,
                    Err(Problem::new(
                        ErrorCode::Suppressed,
                        format!(
                            "{} {:?} belongs to a person erased with suppression; the row is refused",
                            id.ty.name(),
                            id.value
                        ),
                    )),
                ));
                continue;
            }
            let r = match self.registry.resolve(&row.identities, now) {
                Ok(r) => r,
                Err(e) => {
                    out.push((
                        row.line,
                        Err(Problem::new(ErrorCode::MissingId, e.to_string())),
                    ));
                    continue;
                }
            };
            if !r.merged.is_empty() {
                let cause = format!("import:line {}", row.line);
                if let Err(p) = self
                    .merge_into(r.profile, &r.merged, &cause, &row.identities)
                    .await
                {
                    out.push((row.line, Err(p)));
                    continue;
                }
            }
            let note = super::registry::refused_links_note(
                &r.dropped_ids,
                &format!("import:line {}", row.line),
                now,
            );
            by_shard[r.profile.shard() as usize].push((i, r, row.traits, note));
        }
        let mut waits = Vec::new();
        for (s, rows) in by_shard.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            self.shard(s as u16).do_send(ImportRows {
                rows,
                merge_nested,
                reply: tx,
            });
            waits.push(rx);
        }
        PendingBatch { out, lines, waits }
    }
}

/// Import batches sent to the shards and not yet answered, at most (bounds the memory an
/// import holds while keeping the shards busy).
const IMPORT_IN_FLIGHT: usize = 4;

/// A batch of import rows sent to the shards.
struct PendingBatch {
    /// Rows answered before reaching a shard.
    out: Vec<(u64, Result<(), Problem>)>,
    /// Line of each row of the batch, by index.
    lines: Vec<u64>,
    /// One answer per shard that got rows.
    waits: Vec<oneshot::Receiver<crate::grid::shard::export::RowResults>>,
}

impl PendingBatch {
    /// Waits for the shards (each answers once its rows are durable): (line, result) per row.
    async fn finish(self) -> Vec<(u64, Result<(), Problem>)> {
        let mut out = self.out;
        for rx in self.waits {
            match rx.await {
                Ok(results) => out.extend(results.into_iter().map(|(i, r)| (self.lines[i], r))),
                Err(_) => return vec![(0, Err(super::gone()))],
            }
        }
        out
    }
}
