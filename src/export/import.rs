//! Import rows: CSV or JSONL text → identities and traits per row, with the row rules of
//! API.md section 6. Parsing is synchronous over any `Read` (the grid feeds it the request
//! body as it streams in) and yields rows in batches, each row with its physical line.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Read;
use std::rc::Rc;

use serde_json::{Map, Value as Json};

use super::Field;
use crate::domain::identity::{IdType, Identity, IdentityRules, normalize};
use crate::error::ErrorCode;

/// One row to upsert.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportRow {
    /// 1-based physical line of the body where the row starts.
    pub line: u64,
    /// Usable identities (normalised, not blocked), in column order.
    pub identities: Vec<Identity>,
    /// Traits to set (top-level keys; an empty cell set nothing).
    pub traits: Map<String, Json>,
}

/// A row that cannot be imported.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    /// 1-based physical line.
    pub line: u64,
    /// Error code.
    pub code: ErrorCode,
    /// What was wrong, naming the column or field and the value.
    pub message: String,
}

/// What a parser gives for one row.
pub type Parsed = Result<ImportRow, RowError>;

/// Why a row has no identity: the values it had that could not be used.
#[derive(Default)]
struct IdentityNotes {
    blocked: bool,
    notes: Vec<String>,
}

/// Adds a raw identity value if it is usable; notes it when it is blocked or unusable.
fn push_identity(
    out: &mut Vec<Identity>,
    notes: &mut IdentityNotes,
    rules: &IdentityRules,
    ty: IdType,
    raw: &str,
) {
    let shown = crate::segment::cond::show_str(raw);
    match normalize(ty, raw) {
        Some(v) if rules.is_blocked(ty, &v) => {
            notes.blocked = true;
            notes
                .notes
                .push(format!("{} {shown} is a blocked value", ty.name()));
        }
        Some(v) => {
            let id = Identity {
                ty,
                value: v.into_boxed_str(),
            };
            if !out.contains(&id) {
                out.push(id);
            }
        }
        None if raw.trim().is_empty() => {}
        None => notes.notes.push(format!(
            "{} {shown} is not a usable {}",
            ty.name(),
            ty.name()
        )),
    }
}

fn no_identity(line: u64, notes: &IdentityNotes, empty: &[String]) -> RowError {
    let mut why = notes.notes.clone();
    if !empty.is_empty() {
        why.push(format!("{} empty", empty.join(", ")));
    }
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(": {}", why.join("; "))
    };
    if notes.blocked {
        RowError {
            line,
            code: ErrorCode::BlockedId,
            message: format!("every identity of the row is a blocked value{why}"),
        }
    } else {
        RowError {
            line,
            code: ErrorCode::MissingId,
            message: format!(
                "the row has no identity (user_id, email, phone, anonymous_id or \
                 identity:<type>){why}"
            ),
        }
    }
}

/// Parses JSONL rows: each line `{"identities": [{"type", "value"}], "traits": {...}}`
/// (the export's line shape; other fields are ignored). Calls `emit` per row.
pub fn parse_jsonl(
    body: impl Read,
    rules: &IdentityRules,
    max_line_bytes: usize,
    max_depth: usize,
    mut emit: impl FnMut(Parsed) -> bool,
) -> std::io::Result<()> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, body);
    let mut line = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // At most one byte past the limit is kept: a longer line is skipped to its end
        // without being held in memory.
        let n = match (&mut reader)
            .take(max_line_bytes as u64 + 1)
            .read_until(b'\n', &mut buf)
        {
            Ok(n) => n,
            // A corrupt or cut (gzip) body: reported at the line it stopped in (before any
            // line, the whole import fails).
            Err(e) if line == 0 => return Err(e),
            Err(e) => {
                emit(Err(RowError {
                    line: line + 1,
                    code: ErrorCode::InvalidBody,
                    message: format!(
                        "cannot read the body from here on: {e} (the rows before are imported)"
                    ),
                }));
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
        line += 1;
        if buf.len() > max_line_bytes && buf.last() != Some(&b'\n') {
            let rest = skip_line(&mut reader)?;
            let row = Err(RowError {
                line,
                code: ErrorCode::TooLarge,
                message: format!(
                    "the line has {} bytes, more than the limit of {max_line_bytes}",
                    buf.len() as u64 + rest
                ),
            });
            if !emit(row) {
                return Ok(());
            }
            continue;
        }
        // A byte-order mark some editors put first is not part of the JSON.
        let raw = match (line, buf.strip_prefix(b"\xEF\xBB\xBF")) {
            (1, Some(rest)) => rest,
            _ => &buf[..],
        };
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t.trim(),
            Err(_) => {
                if !emit(Err(RowError {
                    line,
                    code: ErrorCode::InvalidJson,
                    message: "the line is not UTF-8".into(),
                })) {
                    return Ok(());
                }
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        let row = if text.len() > max_line_bytes {
            Err(RowError {
                line,
                code: ErrorCode::TooLarge,
                message: format!(
                    "the line has {} bytes, more than the limit of {max_line_bytes}",
                    text.len()
                ),
            })
        } else {
            jsonl_row(text, line, rules, max_depth)
        };
        if !emit(row) {
            return Ok(());
        }
    }
}

/// Reads past the rest of a line (through its newline); answers how many bytes that was
/// (the newline not counted).
fn skip_line(reader: &mut impl std::io::BufRead) -> std::io::Result<u64> {
    let mut skipped = 0u64;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(skipped);
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(skipped + i as u64);
            }
            None => {
                let n = chunk.len();
                reader.consume(n);
                skipped += n as u64;
            }
        }
    }
}

/// The `value` of each element of a line's `identities`, as written when it is a number.
fn raw_identity_values(text: &str) -> Vec<Option<String>> {
    #[derive(serde::Deserialize)]
    struct Line<'a> {
        #[serde(borrow, default)]
        identities: Vec<Item<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Item<'a> {
        #[serde(borrow, default)]
        value: Option<&'a serde_json::value::RawValue>,
    }
    serde_json::from_str::<Line>(text)
        .map(|l| {
            l.identities
                .iter()
                .map(|it| {
                    it.value
                        .map(|r| r.get())
                        .filter(|t| t.starts_with(|c: char| c == '-' || c.is_ascii_digit()))
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One JSONL line. Traits may nest as deep as `max_depth` allows a trait to (the line adds
/// two levels: the line object and `traits`), so every export imports back.
fn jsonl_row(text: &str, line: u64, rules: &IdentityRules, max_depth: usize) -> Parsed {
    let bad = |code, message: String| RowError {
        line,
        code,
        message,
    };
    if let Err(e) = crate::ingest::scan::check_value(text.as_bytes(), max_depth + 2) {
        let code = match e.kind {
            crate::ingest::scan::ScanErrorKind::TooDeep { .. } => ErrorCode::TooDeep,
            _ => ErrorCode::InvalidJson,
        };
        return Err(bad(code, e.to_string()));
    }
    let v: Json = serde_json::from_str(text)
        .map_err(|e| bad(ErrorCode::InvalidJson, format!("the line is not JSON: {e}")))?;
    let Json::Object(obj) = v else {
        return Err(bad(
            ErrorCode::InvalidField,
            format!(
                "a line must be a JSON object; got {}",
                crate::segment::cond::show(&v)
            ),
        ));
    };
    let mut identities = Vec::new();
    let mut notes = IdentityNotes::default();
    match obj.get("identities") {
        None | Some(Json::Null) => {}
        Some(Json::Array(items)) => {
            // Numbers are ids as written (`12345678901234567890123`, `1.50`), never through a
            // float, as at ingest: their text comes from a second, raw read of the line.
            let raw_numbers: Vec<Option<String>> = if items
                .iter()
                .any(|it| it.get("value").is_some_and(Json::is_number))
            {
                raw_identity_values(text)
            } else {
                Vec::new()
            };
            for (i, item) in items.iter().enumerate() {
                // A null value is no identity, like an empty one.
                if item.get("value").is_some_and(Json::is_null) {
                    continue;
                }
                let (Some(ty), Some(value)) = (
                    item.get("type").and_then(Json::as_str),
                    item.get("value").and_then(|v| match v {
                        Json::String(s) => Some(s.clone()),
                        Json::Number(n) => Some(
                            raw_numbers
                                .get(i)
                                .cloned()
                                .flatten()
                                .unwrap_or_else(|| n.to_string()),
                        ),
                        _ => None,
                    }),
                ) else {
                    return Err(bad(
                        ErrorCode::InvalidField,
                        format!(
                            "identities[{i}] must be {{\"type\": ..., \"value\": ...}}; got {}",
                            crate::segment::cond::show(item)
                        ),
                    ));
                };
                if !crate::domain::identity::valid_type_name(ty) {
                    return Err(bad(
                        ErrorCode::InvalidField,
                        format!(
                            "identities[{i}].type {ty:?} must match [a-z0-9_.]{{1,64}} and not \
                             be \"id\" (the profile id is not an identity)"
                        ),
                    ));
                }
                push_identity(
                    &mut identities,
                    &mut notes,
                    rules,
                    IdType::named(ty),
                    &value,
                );
            }
        }
        Some(other) => {
            return Err(bad(
                ErrorCode::InvalidField,
                format!(
                    "identities must be a list; got {}",
                    crate::segment::cond::show(other)
                ),
            ));
        }
    }
    let traits = match obj.get("traits") {
        None | Some(Json::Null) => Map::new(),
        Some(Json::Object(t)) => t.clone(),
        Some(other) => {
            return Err(bad(
                ErrorCode::InvalidField,
                format!(
                    "traits must be an object; got {}",
                    crate::segment::cond::show(other)
                ),
            ));
        }
    };
    if identities.is_empty() {
        return Err(no_identity(line, &notes, &[]));
    }
    Ok(ImportRow {
        line,
        identities,
        traits,
    })
}

/// One CSV column of an import.
#[derive(Debug, Clone)]
enum Column {
    Ignored,
    Identity(IdType),
    Trait(Vec<String>),
}

/// A cell as a trait value: one `'` before a formula character removed, `true`/`false`
/// as booleans, anything else text.
fn csv_value(cell: &str) -> Json {
    let unguarded = match cell.strip_prefix('\'') {
        Some(rest) if rest.starts_with(['=', '+', '-', '@', '\t', '\r']) => rest,
        _ => cell,
    };
    match unguarded {
        "true" => Json::Bool(true),
        "false" => Json::Bool(false),
        s => Json::String(s.to_owned()),
    }
}

/// Sets a nested path inside a trait object, creating objects on the way.
fn set_path(traits: &mut Map<String, Json>, path: &[String], v: Json) {
    let (first, rest) = path.split_first().expect("paths have a key");
    if rest.is_empty() {
        traits.insert(first.clone(), v);
        return;
    }
    let entry = traits
        .entry(first.clone())
        .or_insert_with(|| Json::Object(Map::new()));
    if !entry.is_object() {
        *entry = Json::Object(Map::new());
    }
    if let Json::Object(m) = entry {
        set_path(m, rest, v);
    }
}

/// Passes the body through to the CSV reader and notes where its line breaks are, so the
/// byte offset of a record becomes the physical line API.md asks for (the reader reads
/// ahead, and its own line count and offsets treat a CRLF inside or after a record
/// unevenly). Only the breaks not yet passed are kept: memory is bounded by the reader's
/// look-ahead.
///
/// It also keeps the raw bytes from the start of the record being read (the `Tail`), so
/// the last record can be checked for a quote left open at the end of the body, and so a
/// record growing past `max_row` bytes (an unterminated quote swallowing the rest of the
/// file) stops the import instead of filling memory.
struct LineTracker<R> {
    inner: R,
    offset: u64,
    newlines: Rc<RefCell<VecDeque<(u64, bool)>>>,
    tail: Rc<RefCell<Tail>>,
    max_row: usize,
}

/// Raw bytes of the body from the current record on (with the reader's look-ahead), and
/// whether the body has ended. `bytes[0]` is at body offset `base`; the current record
/// starts at `bytes[head]` (passed bytes are dropped in bulk, not per record).
#[derive(Default)]
struct Tail {
    base: u64,
    head: usize,
    bytes: Vec<u8>,
    eof: bool,
}

impl Tail {
    /// Body offset where the current record starts.
    fn start(&self) -> u64 {
        self.base + self.head as u64
    }

    /// Bytes of the current record and the look-ahead.
    fn pending(&self) -> usize {
        self.bytes.len() - self.head
    }

    /// The raw bytes between two body offsets (clamped to what is kept).
    fn slice(&self, from: u64, to: u64) -> &[u8] {
        let at = |o: u64| (o.saturating_sub(self.base) as usize).min(self.bytes.len());
        &self.bytes[at(from).max(self.head)..at(to).max(self.head)]
    }

    /// Moves the record start to `offset` (a record boundary the reader has passed).
    fn trim_to(&mut self, offset: u64) {
        self.head = (offset.saturating_sub(self.base) as usize)
            .min(self.bytes.len())
            .max(self.head);
        if self.head >= 1 << 16 && self.head * 2 >= self.bytes.len() {
            self.bytes.drain(..self.head);
            self.base += self.head as u64;
            self.head = 0;
        }
    }
}

impl<R: Read> Read for LineTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut q = self.newlines.borrow_mut();
        for (i, b) in buf[..n].iter().enumerate() {
            if matches!(b, b'\n' | b'\r') {
                q.push_back((self.offset + i as u64, *b == b'\n'));
            }
        }
        self.offset += n as u64;
        let mut tail = self.tail.borrow_mut();
        // The reader asks for more only once its buffer is used up, every record before the
        // current one returned (and trimmed): what is pending is the current record so far.
        if tail.pending() > self.max_row {
            return Err(std::io::Error::other(RowTooLong(self.max_row)));
        }
        tail.bytes.extend_from_slice(&buf[..n]);
        tail.eof |= n == 0 && !buf.is_empty();
        Ok(n)
    }
}

/// A record longer than the row limit.
#[derive(Debug, thiserror::Error)]
#[error("a row is longer than {0} bytes; is a quote left open? (the rest of the body is not read)")]
struct RowTooLong(usize);

/// Whether a record's raw bytes end inside a quoted cell (a quote never closed before the
/// end of the body), read the way the csv crate reads: a cell is quoted when it starts with
/// `"`, `""` inside it is a quote, and a quote elsewhere is text.
fn ends_in_open_quote(raw: &[u8]) -> bool {
    let mut i = 0;
    let mut at_cell_start = true;
    while i < raw.len() {
        let b = raw[i];
        if at_cell_start && b == b'"' {
            i += 1;
            loop {
                match raw.get(i) {
                    None => return true,
                    Some(b'"') if raw.get(i + 1) == Some(&b'"') => i += 2,
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            at_cell_start = false;
            continue;
        }
        at_cell_start = matches!(b, b',' | b'\n' | b'\r');
        i += 1;
    }
    false
}

/// Physical line numbers of increasing byte offsets.
struct LineCounter {
    newlines: Rc<RefCell<VecDeque<(u64, bool)>>>,
    passed: u64,
}

impl LineCounter {
    /// The 1-based line where a record the reader places at `offset` starts: line breaks
    /// at the offset itself belong to the record before (offsets must not decrease).
    fn line_of(&mut self, offset: u64) -> u64 {
        let mut q = self.newlines.borrow_mut();
        let mut start = offset;
        while let Some(&(at, is_lf)) = q.front() {
            if at <= start {
                if at == start {
                    start += 1;
                }
                q.pop_front();
                self.passed += is_lf as u64;
            } else {
                break;
            }
        }
        self.passed + 1
    }
}

/// Parses CSV rows (RFC 4180; the first record is the header). Columns: `id` (ignored),
/// identity columns (cells split on `;`), and traits (`traits.<path>` or a bare name).
pub fn parse_csv(
    body: impl Read,
    rules: &IdentityRules,
    max_row_bytes: usize,
    mut emit: impl FnMut(Parsed) -> bool,
) -> Result<(), RowError> {
    let newlines = Rc::new(RefCell::new(VecDeque::new()));
    let tail = Rc::new(RefCell::new(Tail::default()));
    let mut lines = LineCounter {
        newlines: newlines.clone(),
        passed: 0,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(LineTracker {
            inner: body,
            offset: 0,
            newlines,
            tail: tail.clone(),
            max_row: max_row_bytes,
        });
    let mut columns: Option<Vec<Column>> = None;
    let mut record = csv::StringRecord::new();
    loop {
        let read = reader.read_record(&mut record);
        let start = tail.borrow().start();
        let line = match &read {
            Ok(true) => record.position().map_or(0, |p| lines.line_of(p.byte())),
            // Where the record being read began.
            _ => lines.line_of(start),
        };
        match read {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let begin = record.position().map_or(start, |p| p.byte());
                let end = reader.position().byte();
                let mut t = tail.borrow_mut();
                let open = t.eof && ends_in_open_quote(t.slice(begin, end));
                t.trim_to(end);
                drop(t);
                if open {
                    let err = RowError {
                        line,
                        code: ErrorCode::InvalidField,
                        message: "a quoted cell is never closed: the row runs to the end of the \
                                  body"
                            .into(),
                    };
                    if columns.is_none() {
                        return Err(err);
                    }
                    let _ = emit(Err(err));
                    return Ok(());
                }
            }
            Err(e) => {
                let line = e.position().map_or(line, |p| lines.line_of(p.byte()));
                // A row past the limit is too large; a body that cannot be read (corrupt or
                // cut gzip) is a bad body, as at ingest; anything else is bad CSV.
                let (code, message) = match e.kind() {
                    csv::ErrorKind::Io(io) => {
                        match io.get_ref().and_then(|i| i.downcast_ref::<RowTooLong>()) {
                            Some(long) => (ErrorCode::TooLarge, long.to_string()),
                            None => (
                                ErrorCode::InvalidBody,
                                format!(
                                    "cannot read the body from here on: {io} (the rows before \
                                     are imported)"
                                ),
                            ),
                        }
                    }
                    _ => (ErrorCode::InvalidField, format!("unreadable CSV: {e}")),
                };
                let err = RowError {
                    line,
                    code,
                    message,
                };
                if columns.is_none() {
                    return Err(err);
                }
                if !emit(Err(err)) {
                    return Ok(());
                }
                // An I/O or UTF-8 error: the reader cannot go on after it.
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    return Ok(());
                }
                continue;
            }
        }
        let Some(cols) = &columns else {
            let mut cols = Vec::with_capacity(record.len());
            let mut names: Vec<(String, usize)> = Vec::with_capacity(record.len());
            for (i, h) in record.iter().enumerate() {
                let h = h.trim();
                if h.is_empty() {
                    return Err(RowError {
                        line,
                        code: ErrorCode::InvalidField,
                        message: format!("header column {} has no name", i + 1),
                    });
                }
                let field = if h.starts_with("traits.")
                    || h.starts_with("identity:")
                    || matches!(h, "id" | "user_id" | "email" | "phone" | "anonymous_id")
                {
                    Field::parse(h)
                } else {
                    Field::parse(&format!("traits.{h}"))
                };
                // `plan` and `traits.plan` name the same trait.
                if let Ok(f) = &field {
                    let name = f.name();
                    if let Some((_, first)) = names.iter().find(|(n, _)| *n == name) {
                        return Err(RowError {
                            line,
                            code: ErrorCode::InvalidField,
                            message: format!(
                                "header column {} {h:?} repeats column {first} ({name}): each \
                                 field may have one column",
                                i + 1
                            ),
                        });
                    }
                    names.push((name, i + 1));
                }
                cols.push(match field {
                    Ok(Field::Id) => Column::Ignored,
                    Ok(Field::Identity(ty)) => Column::Identity(ty),
                    Ok(Field::Trait(p)) => Column::Trait(p.segments().to_vec()),
                    Err(e) => {
                        return Err(RowError {
                            line,
                            code: ErrorCode::InvalidField,
                            message: format!("header column {}: {e}", i + 1),
                        });
                    }
                });
            }
            // `traits.a` and `traits.a.b` cannot both be set: one would overwrite the other.
            for (i, a) in cols.iter().enumerate() {
                for (j, b) in cols.iter().enumerate() {
                    if let (Column::Trait(pa), Column::Trait(pb)) = (a, b)
                        && pa.len() < pb.len()
                        && pb.starts_with(pa)
                    {
                        return Err(RowError {
                            line,
                            code: ErrorCode::InvalidField,
                            message: format!(
                                "header columns {} ({}) and {} ({}) overlap: a trait cannot be \
                                 both a value and an object",
                                i + 1,
                                record.get(i).unwrap_or("").trim(),
                                j + 1,
                                record.get(j).unwrap_or("").trim()
                            ),
                        });
                    }
                }
            }
            columns = Some(cols);
            continue;
        };
        let mut identities = Vec::new();
        let mut notes = IdentityNotes::default();
        let mut traits = Map::new();
        for (cell, col) in record.iter().zip(cols.iter()) {
            if cell.is_empty() {
                continue;
            }
            match col {
                Column::Ignored => {}
                Column::Identity(ty) => {
                    for part in cell.split(';') {
                        let part = part
                            .strip_prefix('\'')
                            .filter(|r| r.starts_with(['=', '+', '-', '@', '\t', '\r']))
                            .unwrap_or(part);
                        push_identity(&mut identities, &mut notes, rules, *ty, part);
                    }
                }
                Column::Trait(path) => set_path(&mut traits, path, csv_value(cell)),
            }
        }
        let row = if record.len() > cols.len() {
            Err(RowError {
                line,
                code: ErrorCode::InvalidField,
                message: format!(
                    "the row has {} cells, the header {} columns",
                    record.len(),
                    cols.len()
                ),
            })
        } else if identities.is_empty() {
            let empty: Vec<String> = cols
                .iter()
                .enumerate()
                .filter_map(|(i, c)| match c {
                    Column::Identity(ty) if record.get(i).is_none_or(|v| v.trim().is_empty()) => {
                        Some(ty.name().to_owned())
                    }
                    _ => None,
                })
                .collect();
            Err(no_identity(line, &notes, &empty))
        } else {
            Ok(ImportRow {
                line,
                identities,
                traits,
            })
        };
        if !emit(row) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn rules() -> IdentityRules {
        IdentityRules::new(&Settings::defaults().identity)
    }

    fn rows_csv(text: &str) -> Vec<Parsed> {
        let mut out = Vec::new();
        parse_csv(text.as_bytes(), &rules(), 1 << 20, |r| {
            out.push(r);
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn csv_rows_follow_the_import_rules() {
        let text = "id,user_id,email,identity:crm.id,traits.plan,traits.address.city,traits.address\\.city,vip,note\n\
                    01ABC,u1,Ana@X.io;ana2@x.io,c-1,pro,Paris,Lyon,true,'=SUM(1)\n\
                    ,,,,free,,,,\n\
                    ,u3,,,\"a, \"\"quoted\"\"\nline\",,,false,\n\
                    ,null,,,x,,,,\n";
        let rows = rows_csv(text);
        assert_eq!(rows.len(), 4, "{rows:?}");
        let r = rows[0].as_ref().unwrap();
        assert_eq!(r.line, 2);
        let ids: Vec<(String, String)> = r
            .identities
            .iter()
            .map(|i| (i.ty.name().to_string(), i.value.to_string()))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("user_id".into(), "u1".into()),
                ("email".into(), "ana@x.io".into()),
                ("email".into(), "ana2@x.io".into()),
                ("crm.id".into(), "c-1".into())
            ]
        );
        assert_eq!(
            Json::Object(r.traits.clone()),
            serde_json::json!({"plan": "pro", "address": {"city": "Paris"}, "address.city": "Lyon", "vip": true, "note": "=SUM(1)"})
        );
        assert_eq!(rows[1].as_ref().unwrap_err().code, ErrorCode::MissingId);
        assert_eq!(rows[1].as_ref().unwrap_err().line, 3);
        let q = rows[2].as_ref().unwrap();
        assert_eq!(q.line, 4);
        assert_eq!(q.traits["plan"], "a, \"quoted\"\nline");
        assert_eq!(q.traits["vip"], false);
        let blocked = rows[3].as_ref().unwrap_err();
        assert_eq!((blocked.line, blocked.code), (6, ErrorCode::BlockedId));
    }

    #[test]
    fn csv_lines_are_physical_with_crlf_and_quoted_line_breaks() {
        for eol in ["\n", "\r\n"] {
            let text = [
                "user_id,note",
                "u1,\"two",
                "lines\"",
                "",
                ",orphan",
                "u2,\"a\r\nb\"",
                ",x",
                "",
            ]
            .join(eol);
            let lines: Vec<u64> = rows_csv(&text)
                .iter()
                .map(|r| match r {
                    Ok(r) => r.line,
                    Err(e) => e.line,
                })
                .collect();
            assert_eq!(lines, vec![2, 5, 6, 8], "{eol:?}");
        }
    }

    #[test]
    fn a_bad_header_is_an_error_of_the_whole_import() {
        let e = parse_csv(
            "user_id,identity:Bad\nu1,x\n".as_bytes(),
            &rules(),
            1 << 20,
            |_| true,
        )
        .unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("identity:Bad"), "{e:?}");
    }

    #[test]
    fn jsonl_rows_take_the_export_shape() {
        let text = "{\"id\":\"x\",\"identities\":[{\"type\":\"user_id\",\"value\":\"u1\",\"first_seen\":\"2026-01-01T00:00:00.000Z\"}],\"traits\":{\"plan\":\"pro\",\"n\":5}}\n\
                    \n\
                    not json\n\
                    {\"traits\":{\"plan\":\"x\"}}\n\
                    {\"identities\":[{\"type\":\"email\",\"value\":\"A@B.io\"}],\"traits\":[1]}\n";
        let mut out = Vec::new();
        parse_jsonl(text.as_bytes(), &rules(), 1 << 20, 64, |r| {
            out.push(r);
            true
        })
        .unwrap();
        assert_eq!(out.len(), 4);
        let r = out[0].as_ref().unwrap();
        assert_eq!((r.line, r.traits["n"].clone()), (1, serde_json::json!(5)));
        assert_eq!(out[1].as_ref().unwrap_err().line, 3);
        assert_eq!(out[1].as_ref().unwrap_err().code, ErrorCode::InvalidJson);
        assert_eq!(out[2].as_ref().unwrap_err().code, ErrorCode::MissingId);
        assert_eq!(out[3].as_ref().unwrap_err().line, 5);
    }

    #[test]
    fn an_over_long_line_is_skipped_to_its_end_and_the_next_one_read() {
        let long = format!(
            "{{\"identities\":[{{\"type\":\"user_id\",\"value\":\"u1\"}}],\"traits\":{{\"t\":\"{}\"}}}}",
            "x".repeat(300)
        );
        let text = format!(
            "{long}\n{{\"identities\":[{{\"type\":\"user_id\",\"value\":\"u2\"}}]}}\n{long}"
        );
        let mut out = Vec::new();
        parse_jsonl(text.as_bytes(), &rules(), 100, 64, |r| {
            out.push(r);
            true
        })
        .unwrap();
        assert_eq!(out.len(), 3);
        for (i, line) in [(0, 1), (2, 3)] {
            let e = out[i].as_ref().unwrap_err();
            assert_eq!((e.line, e.code), (line, ErrorCode::TooLarge));
            assert!(
                e.message.contains(&format!("{} bytes", long.len())),
                "{e:?}"
            );
        }
        assert_eq!(out[1].as_ref().unwrap().line, 2);
    }

    #[test]
    fn a_quote_left_open_at_the_end_rejects_its_row_only() {
        for eol in ["\n", ""] {
            let text = format!("user_id,plan\nx1,ok\nx2,\"unterminated\nx3,lost{eol}");
            let rows = rows_csv(&text);
            assert_eq!(rows.len(), 2, "{rows:?}");
            assert_eq!(rows[0].as_ref().unwrap().line, 2);
            let e = rows[1].as_ref().unwrap_err();
            assert_eq!((e.line, e.code), (3, ErrorCode::InvalidField));
            assert!(e.message.contains("never closed"), "{e:?}");
        }
        // Closed quotes, doubled quotes and a quote inside an unquoted cell are fine.
        let rows = rows_csv("user_id,plan\nx1,\"a \"\"b\"\" c\"\nx2,ab\"c\nx3,\"multi\nline\"");
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.is_ok()), "{rows:?}");
        assert_eq!(rows[2].as_ref().unwrap().traits["plan"], "multi\nline");
    }

    #[test]
    fn a_row_longer_than_the_limit_stops_the_import_there() {
        let text = format!("user_id,plan\nx1,ok\nx2,\"{}", "y".repeat(5000));
        let mut out = Vec::new();
        let r = parse_csv(text.as_bytes(), &rules(), 1000, |r| {
            out.push(r);
            true
        });
        assert!(r.is_ok());
        assert_eq!(out.len(), 2, "{out:?}");
        let e = out[1].as_ref().unwrap_err();
        assert_eq!((e.line, e.code), (3, ErrorCode::TooLarge));
        assert!(e.message.contains("longer than 1000 bytes"), "{e:?}");
    }

    #[test]
    fn header_columns_need_names_and_may_not_repeat() {
        for (header, words) in [
            ("user_id,user_id", vec!["column 2", "repeats column 1"]),
            ("user_id,traits.a,a", vec!["column 3", "repeats column 2"]),
            ("user_id,,b", vec!["column 2", "no name"]),
            (
                "user_id,traits.a,traits.a.b",
                vec!["columns 2 (traits.a) and 3", "overlap"],
            ),
        ] {
            let e = parse_csv(
                format!("{header}\nu1,x,y\n").as_bytes(),
                &rules(),
                1 << 20,
                |_| true,
            )
            .unwrap_err();
            assert_eq!(e.line, 1);
            for w in words {
                assert!(e.message.contains(w), "{header}: {e:?}");
            }
        }
    }

    #[test]
    fn a_row_without_identity_says_what_it_had() {
        let rows = rows_csv("user_id,email,plan\n,,pro\n, ,x\n");
        let e = rows[0].as_ref().unwrap_err();
        assert_eq!(e.code, ErrorCode::MissingId);
        assert!(e.message.contains("user_id, email empty"), "{e:?}");
    }
}
