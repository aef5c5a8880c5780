//! Non-recursive, single-pass scanner for untrusted JSON ingest bodies.
//!
//! Bodies of up to 4 MiB arrive from the network before serde_json ever sees
//! them. This module looks at them as raw bytes, without recursion (an
//! explicit `Vec` stack replaces the call stack, so a 100,000-deep `[[[[...`
//! cannot overflow anything) and in linear time, to:
//!
//! * split a batch object and its `batch` array into byte spans
//!   ([`split_object`], [`split_array`]) so that one bad element rejects only
//!   that element, and
//! * check one message ([`check_value`]) for well-formed structure, nesting
//!   depth and lone UTF-16 surrogate escapes, reporting the JSON path of the
//!   problem.

use std::fmt::{self, Write as _};
use std::ops::Range;

/// What went wrong while scanning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanErrorKind {
    /// Not well-formed JSON structure; the String is a short lowercase description.
    Syntax(String),
    /// Nesting deeper than the limit given.
    TooDeep {
        /// The maximum depth that was allowed.
        limit: usize,
    },
    /// A `\uXXXX` escape for an unpaired UTF-16 surrogate.
    LoneSurrogate {
        /// The escape text exactly as written in the input, e.g. `\ud83d`.
        escape: String,
    },
}

/// A scan failure located precisely enough to reject just the offending part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanError {
    /// What went wrong.
    pub kind: ScanErrorKind,
    /// JSON path of where it happened, relative to the scanned value ("" for the root).
    pub path: String,
    /// Byte offset in the input where the problem was detected.
    pub offset: usize,
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.path.is_empty() {
            "top level"
        } else {
            self.path.as_str()
        };
        match &self.kind {
            ScanErrorKind::Syntax(msg) => {
                write!(f, "invalid json at {at} (byte {}): {msg}", self.offset)
            }
            ScanErrorKind::TooDeep { limit } => {
                write!(f, "json nested deeper than {limit} levels at {at}")
            }
            ScanErrorKind::LoneSurrogate { escape } => {
                write!(f, "lone utf-16 surrogate {escape} at {at}")
            }
        }
    }
}

impl std::error::Error for ScanError {}

/// Checks one complete JSON value: well-formed structure, nesting depth, no lone surrogates.
///
/// Depth: the outermost object/array is level 1, each nested object or array
/// one more; scalars add nothing. With `max_depth` = 64 a value with 64 levels
/// passes and 65 fails with `TooDeep { limit: 64 }`. Stops at the first
/// problem. Leading/trailing whitespace is allowed; anything else after the
/// value is a syntax error.
pub fn check_value(input: &[u8], max_depth: usize) -> Result<(), ScanError> {
    let fail = |frames: &[Frame], (kind, offset): Fault| ScanError {
        kind,
        path: build_path(input, frames),
        offset,
    };
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = skip_ws(input, 0);
    if i == input.len() {
        return Err(fail(&[], syntax("empty input", i)));
    }
    'value: loop {
        // Parse one value starting at `i` (whitespace already skipped).
        let Some(&b) = input.get(i) else {
            return Err(fail(&stack, syntax("unexpected end of input", i)));
        };
        match b {
            b'{' | b'[' => {
                if stack.len() >= max_depth {
                    return Err(fail(
                        &stack,
                        (ScanErrorKind::TooDeep { limit: max_depth }, i),
                    ));
                }
                let close = if b == b'{' { b'}' } else { b']' };
                i = skip_ws(input, i + 1);
                if input.get(i) == Some(&close) {
                    // Empty container: a complete value, handled below.
                    i += 1;
                } else if b == b'[' {
                    stack.push(Frame::Array { index: 0 });
                    continue 'value;
                } else {
                    let key_start = i;
                    i = read_key(input, i, &stack)?;
                    stack.push(Frame::Object { key_start });
                    continue 'value;
                }
            }
            b'"' => {
                i = scan_string(input, i, &mut Sink::Check).map_err(|f| fail(&stack, f))?;
            }
            b't' => i = literal(input, i, b"true").map_err(|f| fail(&stack, f))?,
            b'f' => i = literal(input, i, b"false").map_err(|f| fail(&stack, f))?,
            b'n' => i = literal(input, i, b"null").map_err(|f| fail(&stack, f))?,
            b'-' | b'0'..=b'9' => i = scan_number(input, i).map_err(|f| fail(&stack, f))?,
            _ => return Err(fail(&stack, syntax("expected a value", i))),
        }
        // A value just ended: close containers or move on to the next element.
        loop {
            i = skip_ws(input, i);
            let Some(&frame) = stack.last() else {
                if i == input.len() {
                    return Ok(());
                }
                return Err(fail(&[], syntax("trailing characters after value", i)));
            };
            let top = stack.len() - 1;
            match (frame, input.get(i)) {
                (Frame::Array { index }, Some(b',')) => {
                    stack[top] = Frame::Array { index: index + 1 };
                    i = skip_ws(input, i + 1);
                    continue 'value;
                }
                (Frame::Object { .. }, Some(b',')) => {
                    let key_start = skip_ws(input, i + 1);
                    i = read_key(input, key_start, &stack[..top])?;
                    stack[top] = Frame::Object { key_start };
                    continue 'value;
                }
                (Frame::Array { .. }, Some(b']')) | (Frame::Object { .. }, Some(b'}')) => {
                    stack.pop();
                    i += 1;
                }
                (Frame::Array { .. }, _) => {
                    return Err(fail(&stack[..top], syntax("expected ',' or ']'", i)));
                }
                (Frame::Object { .. }, _) => {
                    return Err(fail(&stack[..top], syntax("expected ',' or '}'", i)));
                }
            }
        }
    }
}

/// Splits a JSON object into its members: (decoded key, byte span of the value within `input`).
///
/// The input is the whole object, surrounded by optional whitespace. Values
/// are not validated beyond what is needed to find their ends (strings and
/// brackets, any depth, iteratively), so a lone surrogate or a 10,000-deep
/// value inside a member does not fail the split. Errors: `Syntax` if the
/// input is not an object or is structurally broken; `LoneSurrogate` if a key
/// holds one.
pub fn split_object(input: &[u8]) -> Result<Vec<(String, Range<usize>)>, ScanError> {
    let mut members = Vec::new();
    let mut i = skip_ws(input, 0);
    if input.get(i) != Some(&b'{') {
        return Err(at_root(syntax("expected a json object", i)));
    }
    i = skip_ws(input, i + 1);
    if input.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if input.get(i) != Some(&b'"') {
                return Err(at_root(syntax("expected a string key", i)));
            }
            let key_start = i;
            let mut key = String::new();
            i = scan_string(input, i, &mut Sink::Decode(&mut key))
                .map_err(|f| key_error(input, String::new(), key_start, f))?;
            i = skip_ws(input, i);
            if input.get(i) != Some(&b':') {
                return Err(at_root(syntax("expected ':' after key", i)));
            }
            let value_start = skip_ws(input, i + 1);
            i = skip_value(input, value_start).map_err(|(kind, offset)| ScanError {
                kind,
                path: key.clone(),
                offset,
            })?;
            members.push((key, value_start..i));
            i = skip_ws(input, i);
            match input.get(i) {
                Some(b',') => i = skip_ws(input, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return Err(at_root(syntax("expected ',' or '}'", i))),
            }
        }
    }
    expect_end(input, i)?;
    Ok(members)
}

/// Splits a JSON array into the whitespace-trimmed byte spans of its elements.
///
/// The input is the whole array, surrounded by optional whitespace; `[]`
/// gives an empty Vec. Elements get the same leniency as values in
/// [`split_object`].
pub fn split_array(input: &[u8]) -> Result<Vec<Range<usize>>, ScanError> {
    let mut elements = Vec::new();
    let mut i = skip_ws(input, 0);
    if input.get(i) != Some(&b'[') {
        return Err(at_root(syntax("expected a json array", i)));
    }
    i = skip_ws(input, i + 1);
    if input.get(i) == Some(&b']') {
        i += 1;
    } else {
        loop {
            let start = i;
            i = skip_value(input, start).map_err(|(kind, offset)| ScanError {
                kind,
                path: format!("[{}]", elements.len()),
                offset,
            })?;
            elements.push(start..i);
            i = skip_ws(input, i);
            match input.get(i) {
                Some(b',') => i = skip_ws(input, i + 1),
                Some(b']') => {
                    i += 1;
                    break;
                }
                _ => return Err(at_root(syntax("expected ',' or ']'", i))),
            }
        }
    }
    expect_end(input, i)?;
    Ok(elements)
}

/// A problem found by a low-level helper, before its JSON path is known.
type Fault = (ScanErrorKind, usize);

/// One open container on [`check_value`]'s explicit stack.
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// Inside an array, at element `index`.
    Array { index: usize },
    /// Inside an object, at the member whose key's opening quote is at `key_start`.
    Object { key_start: usize },
}

/// What [`scan_string`] does with the string's content besides validating it.
enum Sink<'a> {
    /// Validate only.
    Check,
    /// Validate and append the decoded text.
    Decode(&'a mut String),
    /// Append the decoded text, replacing lone surrogates with U+FFFD instead of failing.
    Lossy(&'a mut String),
}

impl Sink<'_> {
    fn push(&mut self, c: char) {
        if let Sink::Decode(s) | Sink::Lossy(s) = self {
            s.push(c);
        }
    }

    fn push_str(&mut self, text: &str) {
        if let Sink::Decode(s) | Sink::Lossy(s) = self {
            s.push_str(text);
        }
    }
}

fn syntax(msg: &str, offset: usize) -> Fault {
    (ScanErrorKind::Syntax(msg.to_owned()), offset)
}

fn at_root((kind, offset): Fault) -> ScanError {
    ScanError {
        kind,
        path: String::new(),
        offset,
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_ws(input: &[u8], mut i: usize) -> usize {
    while input.get(i).is_some_and(|&b| is_ws(b)) {
        i += 1;
    }
    i
}

fn expect_end(input: &[u8], i: usize) -> Result<(), ScanError> {
    let i = skip_ws(input, i);
    if i == input.len() {
        Ok(())
    } else {
        Err(at_root(syntax("trailing characters after value", i)))
    }
}

/// Appends `.key` (or just `key` at the root) to a JSON path.
fn push_member(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

/// Decodes a key for use in a path, as far as it can be decoded, with U+FFFD for lone surrogates.
fn decode_key_lossy(input: &[u8], key_start: usize) -> String {
    let mut key = String::new();
    // A failure just ends the key early; whatever was decoded so far is kept.
    let _ = scan_string(input, key_start, &mut Sink::Lossy(&mut key));
    key
}

/// Renders the JSON path of the innermost frame of `frames`.
fn build_path(input: &[u8], frames: &[Frame]) -> String {
    let mut path = String::new();
    for frame in frames {
        match *frame {
            Frame::Array { index } => {
                let _ = write!(path, "[{index}]");
            }
            Frame::Object { key_start } => {
                push_member(&mut path, &decode_key_lossy(input, key_start));
            }
        }
    }
    path
}

/// Turns a fault found inside an object key into an error; a lone surrogate names the key.
fn key_error(input: &[u8], mut path: String, key_start: usize, (kind, offset): Fault) -> ScanError {
    if matches!(kind, ScanErrorKind::LoneSurrogate { .. }) {
        push_member(&mut path, &decode_key_lossy(input, key_start));
    }
    ScanError { kind, path, offset }
}

/// Reads a strictly checked key at `i` and its colon; returns where the member's value starts.
fn read_key(input: &[u8], i: usize, parent: &[Frame]) -> Result<usize, ScanError> {
    let parent_error = |(kind, offset): Fault| ScanError {
        kind,
        path: build_path(input, parent),
        offset,
    };
    if input.get(i) != Some(&b'"') {
        return Err(parent_error(syntax("expected a string key", i)));
    }
    let end = scan_string(input, i, &mut Sink::Check)
        .map_err(|f| key_error(input, build_path(input, parent), i, f))?;
    let colon = skip_ws(input, end);
    if input.get(colon) != Some(&b':') {
        return Err(parent_error(syntax("expected ':' after key", colon)));
    }
    Ok(skip_ws(input, colon + 1))
}

fn literal(input: &[u8], i: usize, word: &[u8]) -> Result<usize, Fault> {
    if input[i..].starts_with(word) {
        Ok(i + word.len())
    } else {
        Err(syntax("invalid literal", i))
    }
}

fn skip_digits(input: &[u8], mut i: usize) -> usize {
    while input.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
}

/// Scans a number per the JSON grammar; returns the index just past it.
fn scan_number(input: &[u8], mut i: usize) -> Result<usize, Fault> {
    if input.get(i) == Some(&b'-') {
        i += 1;
    }
    match input.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = skip_digits(input, i),
        _ => return Err(syntax("invalid number", i)),
    }
    if input.get(i) == Some(&b'.') {
        let end = skip_digits(input, i + 1);
        if end == i + 1 {
            return Err(syntax("invalid number", end));
        }
        i = end;
    }
    if let Some(b'e' | b'E') = input.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = input.get(i) {
            i += 1;
        }
        let end = skip_digits(input, i);
        if end == i {
            return Err(syntax("invalid number", end));
        }
        i = end;
    }
    Ok(i)
}

/// Strictly scans the string whose opening quote is at `start`; returns the index past its closing quote.
fn scan_string(input: &[u8], start: usize, sink: &mut Sink<'_>) -> Result<usize, Fault> {
    let mut i = start + 1;
    loop {
        let Some(&b) = input.get(i) else {
            return Err(syntax("unterminated string", i));
        };
        match b {
            b'"' => return Ok(i + 1),
            b'\\' => i = scan_escape(input, i, sink)?,
            0x00..=0x1f => return Err(syntax("control character in string", i)),
            0x20..=0x7f => {
                sink.push(char::from(b));
                i += 1;
            }
            _ => {
                let width = match b {
                    0xc2..=0xdf => 2,
                    0xe0..=0xef => 3,
                    0xf0..=0xf4 => 4,
                    _ => return Err(syntax("invalid utf-8", i)),
                };
                let text = input
                    .get(i..i + width)
                    .and_then(|bytes| std::str::from_utf8(bytes).ok())
                    .ok_or_else(|| syntax("invalid utf-8", i))?;
                sink.push_str(text);
                i += width;
            }
        }
    }
}

/// Scans the escape whose backslash is at `i`; returns the index past it.
fn scan_escape(input: &[u8], i: usize, sink: &mut Sink<'_>) -> Result<usize, Fault> {
    let Some(&e) = input.get(i + 1) else {
        return Err(syntax("unterminated string", i + 1));
    };
    let c = match e {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => return scan_unicode_escape(input, i, sink),
        _ => return Err(syntax("invalid escape", i)),
    };
    sink.push(c);
    Ok(i + 2)
}

/// Scans a `\uXXXX` escape (and its low-surrogate partner, if any) whose backslash is at `i`.
fn scan_unicode_escape(input: &[u8], i: usize, sink: &mut Sink<'_>) -> Result<usize, Fault> {
    let unit = hex4(input, i + 2).ok_or_else(|| syntax("invalid \\u escape", i))?;
    let (code, next) = match unit {
        0xd800..=0xdbff => match unicode_escape_at(input, i + 6) {
            Some(low @ 0xdc00..=0xdfff) => {
                (0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00), i + 12)
            }
            _ => return lone_surrogate(input, i, sink),
        },
        0xdc00..=0xdfff => return lone_surrogate(input, i, sink),
        _ => (unit, i + 6),
    };
    sink.push(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
    Ok(next)
}

/// The code unit of a well-formed `\uXXXX` escape at `at`, if there is one.
fn unicode_escape_at(input: &[u8], at: usize) -> Option<u32> {
    if input.get(at..at + 2)? == b"\\u" {
        hex4(input, at + 2)
    } else {
        None
    }
}

fn hex4(input: &[u8], at: usize) -> Option<u32> {
    let digits = input.get(at..at + 4)?;
    digits.iter().try_fold(0u32, |acc, &d| {
        Some((acc << 4) | char::from(d).to_digit(16)?)
    })
}

fn lone_surrogate(input: &[u8], i: usize, sink: &mut Sink<'_>) -> Result<usize, Fault> {
    if let Sink::Lossy(s) = sink {
        s.push(char::REPLACEMENT_CHARACTER);
        return Ok(i + 6);
    }
    let escape = String::from_utf8_lossy(&input[i..i + 6]).into_owned();
    Err((ScanErrorKind::LoneSurrogate { escape }, i))
}

/// Leniently skips the string whose opening quote is at `start`; only finds its end.
fn skip_string(input: &[u8], start: usize) -> Result<usize, Fault> {
    let mut i = start + 1;
    while let Some(&b) = input.get(i) {
        match b {
            b'"' => return Ok(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Err(syntax("unterminated string", input.len()))
}

fn is_delimiter(b: u8) -> bool {
    is_ws(b) || matches!(b, b',' | b':' | b'[' | b']' | b'{' | b'}' | b'"')
}

/// Leniently skips the value starting at `start`; returns the index just past it.
fn skip_value(input: &[u8], start: usize) -> Result<usize, Fault> {
    match input.get(start) {
        Some(b'"') => skip_string(input, start),
        Some(b'{' | b'[') => skip_container(input, start),
        Some(&b) if !is_delimiter(b) => {
            let mut i = start;
            while input.get(i).is_some_and(|&b| !is_delimiter(b)) {
                i += 1;
            }
            Ok(i)
        }
        _ => Err(syntax("expected a value", start)),
    }
}

/// Skips a container by matching brackets with an explicit stack, skipping strings inside.
fn skip_container(input: &[u8], start: usize) -> Result<usize, Fault> {
    let mut closers: Vec<u8> = Vec::new();
    let mut i = start;
    while let Some(&b) = input.get(i) {
        match b {
            b'"' => {
                i = skip_string(input, i)?;
                continue;
            }
            b'{' => closers.push(b'}'),
            b'[' => closers.push(b']'),
            b'}' | b']' => {
                if closers.pop() != Some(b) {
                    return Err(syntax("mismatched bracket", i));
                }
                if closers.is_empty() {
                    return Ok(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err(syntax("unterminated container", input.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str) -> Result<(), ScanError> {
        check_value(s.as_bytes(), 64)
    }

    fn kind_of(r: Result<(), ScanError>) -> ScanErrorKind {
        r.expect_err("expected an error").kind
    }

    fn is_syntax(r: Result<(), ScanError>) -> bool {
        matches!(kind_of(r), ScanErrorKind::Syntax(_))
    }

    fn nested_arrays(n: usize) -> String {
        "[".repeat(n) + &"]".repeat(n)
    }

    fn nested_objects(n: usize) -> String {
        "{\"a\":".repeat(n - 1) + "{}" + &"}".repeat(n - 1)
    }

    fn slice<'a>(input: &'a str, span: &Range<usize>) -> &'a str {
        &input[span.clone()]
    }

    #[test]
    fn simple_values_pass() {
        for s in [
            "1",
            "-0",
            "-1.5e3",
            "2E+10",
            "0.25",
            "\"x\"",
            "\"\"",
            "true",
            "false",
            "null",
            "{}",
            "[]",
            " \n\t\r{ } \n",
            "[1, \"two\", {\"three\": [3.0, null, true]}, []]",
            "{\"a\":[1,2,{\"b\":null}],\"c\":{\"d\":\"é🍔\\n\\\"\\\\\\/\\b\\f\\r\\t\\u00E9\"}}",
        ] {
            assert_eq!(check(s), Ok(()), "{s}");
        }
    }

    #[test]
    fn depth_limit_is_exact() {
        assert_eq!(check(&nested_arrays(64)), Ok(()));
        assert_eq!(check(&nested_objects(64)), Ok(()));
        let err = check(&nested_arrays(65)).unwrap_err();
        assert_eq!(err.kind, ScanErrorKind::TooDeep { limit: 64 });
        assert_eq!(err.offset, 64);
        assert_eq!(err.path, "[0]".repeat(64));
        let err = check(&nested_objects(65)).unwrap_err();
        assert_eq!(err.kind, ScanErrorKind::TooDeep { limit: 64 });
        assert!(err.path.starts_with("a.a.a"));
        // Scalars do not count as a level; empty containers do.
        assert_eq!(check_value(b"1", 0), Ok(()));
        assert_eq!(
            kind_of(check_value(b"[]", 0)),
            ScanErrorKind::TooDeep { limit: 0 }
        );
        assert_eq!(check_value(b"[1,[2],{\"x\":[]}]", 3), Ok(()));
        let err = check_value(b"[1,[2],{\"x\":[]}]", 2).unwrap_err();
        assert_eq!(err.kind, ScanErrorKind::TooDeep { limit: 2 });
        assert_eq!((err.path.as_str(), err.offset), ("[2].x", 12));
    }

    #[test]
    fn very_deep_nesting_does_not_overflow() {
        let deep = nested_arrays(100_000);
        assert_eq!(kind_of(check(&deep)), ScanErrorKind::TooDeep { limit: 64 });
        // With no effective limit the explicit stack copes too.
        assert_eq!(check_value(deep.as_bytes(), usize::MAX), Ok(()));
        let unclosed = "[".repeat(100_000);
        assert!(is_syntax(check_value(unclosed.as_bytes(), usize::MAX)));
        assert!(split_array(unclosed.as_bytes()).is_err());
    }

    #[test]
    fn deep_batch_element_only_fails_that_element() {
        let deep = nested_arrays(100_000);
        let body = format!(
            "{{\"batch\":[{{\"type\":\"track\"}}, {deep} ,{{\"x\":\"\\ud83d\"}}],\"writeKey\":\"k\"}}"
        );
        let members = split_object(body.as_bytes()).unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].0, "batch");
        assert_eq!(members[1].0, "writeKey");
        assert_eq!(slice(&body, &members[1].1), "\"k\"");
        let batch = &body.as_bytes()[members[0].1.clone()];
        let elements = split_array(batch).unwrap();
        assert_eq!(elements.len(), 3);
        assert_eq!(check_value(&batch[elements[0].clone()], 64), Ok(()));
        assert_eq!(&batch[elements[1].clone()], deep.as_bytes());
        assert_eq!(
            kind_of(check_value(&batch[elements[1].clone()], 64)),
            ScanErrorKind::TooDeep { limit: 64 }
        );
        let err = check_value(&batch[elements[2].clone()], 64).unwrap_err();
        assert_eq!(err.path, "x");
        assert!(matches!(err.kind, ScanErrorKind::LoneSurrogate { .. }));
    }

    #[test]
    fn lone_high_surrogate_reports_path() {
        let s = r#"{"userId":"u","properties":{"note":"half \ud83d only"}}"#;
        let err = check(s).unwrap_err();
        assert_eq!(
            err.kind,
            ScanErrorKind::LoneSurrogate {
                escape: r"\ud83d".into()
            }
        );
        assert_eq!(err.path, "properties.note");
        assert_eq!(err.offset, s.find('\\').unwrap());
        assert_eq!(
            err.to_string(),
            r"lone utf-16 surrogate \ud83d at properties.note"
        );
        // High surrogate at the end of the string, before a non-low escape, or before a high one.
        for (s, escape) in [
            (r#"["a","\ud83d"]"#, r"\ud83d"),
            (r#"["\uD83D\u0041"]"#, r"\uD83D"),
            (r#"["\ud83d\n"]"#, r"\ud83d"),
            (r#"["\udbff\udbff\udc00"]"#, r"\udbff"),
            (r#"["\ud83d\ude"]"#, r"\ud83d"),
        ] {
            let err = check(s).unwrap_err();
            assert_eq!(
                err.kind,
                ScanErrorKind::LoneSurrogate {
                    escape: escape.into()
                },
                "{s}"
            );
        }
        let err = check(r#"[1,{"a":[0,"\ud800"]}]"#).unwrap_err();
        assert_eq!(err.path, "[1].a[1]");
    }

    #[test]
    fn valid_surrogate_pair_passes() {
        assert_eq!(check(r#""\ud83c\udf54""#), Ok(()));
        assert_eq!(check(r#"{"\uD83C\uDF54":"\udbff\udfff"}"#), Ok(()));
        let members = split_object(br#"{"k\ud83c\udf54":1}"#).unwrap();
        assert_eq!(members[0].0, "k🍔");
    }

    #[test]
    fn lone_low_surrogate_fails() {
        let err = check(r#"{"a":"x\udc00"}"#).unwrap_err();
        assert_eq!(
            err.kind,
            ScanErrorKind::LoneSurrogate {
                escape: r"\udc00".into()
            }
        );
        assert_eq!(err.path, "a");
        assert_eq!(err.offset, 7);
        assert!(matches!(
            kind_of(check(r#""\ud83c\udf54\udf54""#)),
            ScanErrorKind::LoneSurrogate { .. }
        ));
    }

    #[test]
    fn surrogate_in_key() {
        let err = check(r#"{"a":{"ok":1,"x\ud83dy":2}}"#).unwrap_err();
        assert_eq!(
            err.kind,
            ScanErrorKind::LoneSurrogate {
                escape: r"\ud83d".into()
            }
        );
        assert_eq!(err.path, "a.x\u{FFFD}y");
        let err = check(r#"[0,{"\udc00":1}]"#).unwrap_err();
        assert_eq!(err.path, "[1].\u{FFFD}");

        let err = split_object(br#"{"batch":[],"k\udc00\n":1}"#).unwrap_err();
        assert_eq!(
            err.kind,
            ScanErrorKind::LoneSurrogate {
                escape: r"\udc00".into()
            }
        );
        assert_eq!(err.path, "k\u{FFFD}\n");
        assert_eq!(err.offset, 14);
    }

    #[test]
    fn lenient_split_ignores_problems_inside_values() {
        let body = r#"{"a":"\ud83d","b":[[[1 2}]]],"c":tru}"#;
        // `[[[1 2}]]]` has mismatched brackets, so that one is still a split error.
        assert!(split_object(body.as_bytes()).is_err());
        let body = r#"{"a":"\ud83d\q","b":[[[1 2 "\x01"]]],"c":tru}"#;
        let members = split_object(body.as_bytes()).unwrap();
        let got: Vec<(&str, &str)> = members
            .iter()
            .map(|(k, span)| (k.as_str(), slice(body, span)))
            .collect();
        assert_eq!(
            got,
            [
                ("a", r#""\ud83d\q""#),
                ("b", r#"[[[1 2 "\x01"]]]"#),
                ("c", "tru")
            ]
        );
    }

    #[test]
    fn nul_escape_ok_raw_control_char_rejected() {
        assert_eq!(check(r#"{"a":"x\u0000y"}"#), Ok(()));
        let err = check("{\"a\":\"x\0y\"}").unwrap_err();
        assert!(matches!(err.kind, ScanErrorKind::Syntax(_)));
        assert_eq!(err.path, "a");
        assert_eq!(err.offset, 7);
        assert!(is_syntax(check("\"tab\there\"")));
        assert!(is_syntax(check("\"line\nbreak\"")));
        assert_eq!(check("\"del\u{7f}\""), Ok(()));
        // A raw control character in a key is rejected when splitting too.
        assert!(split_object(b"{\"a\x1f\":1}").is_err());
    }

    #[test]
    fn invalid_utf8_and_escapes() {
        for bytes in [
            &b"\"\xff\""[..],
            b"\"\xc3\"",
            b"\"\xc0\x80\"",
            b"\"\xed\xa0\x80\"",
            b"\"\xf4\x90\x80\x80\"",
            b"\"\xe2\x82\"",
            b"[1,\xc3\xa9]",
        ] {
            let err = check_value(bytes, 64).unwrap_err();
            assert!(matches!(err.kind, ScanErrorKind::Syntax(_)), "{bytes:?}");
        }
        assert_eq!(
            kind_of(check_value(b"\"\xff\"", 64)),
            ScanErrorKind::Syntax("invalid utf-8".into())
        );
        assert_eq!(check_value("\"é€🍔\"".as_bytes(), 64), Ok(()));
        for s in [
            r#""\x""#,
            r#""\u12""#,
            r#""\u12g4""#,
            r#""\U0041""#,
            r#""\"#,
        ] {
            assert!(is_syntax(check(s)), "{s}");
        }
        assert_eq!(check(r#""\uaBcD""#), Ok(()));
    }

    #[test]
    fn strings_with_structure_chars_do_not_confuse_splitter() {
        let body = r#"{ "batch" : [ {"a":"x],}{[\"\\"} , {"b":"]\"[","c":["}"]} ] , "sentAt":"2024-01-01T00:00:00.000Z", "we\"ird,key}":"v" }"#;
        let members = split_object(body.as_bytes()).unwrap();
        let keys: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["batch", "sentAt", "we\"ird,key}"]);
        let batch = slice(body, &members[0].1);
        assert_eq!(batch, r#"[ {"a":"x],}{[\"\\"} , {"b":"]\"[","c":["}"]} ]"#);
        let elements = split_array(batch.as_bytes()).unwrap();
        let got: Vec<&str> = elements.iter().map(|s| slice(batch, s)).collect();
        assert_eq!(got, [r#"{"a":"x],}{[\"\\"}"#, r#"{"b":"]\"[","c":["}"]}"#]);
        for e in got {
            assert_eq!(check(e), Ok(()));
        }
        assert_eq!(slice(body, &members[2].1), "\"v\"");
    }

    #[test]
    fn split_typical_batch() {
        let body = r#"{"batch":[{"type":"track","event":"Signed Up","userId":"u1","properties":{"plan":"pro"}},{"type":"identify","userId":"u2","traits":{"email":"a@b.c"}}],"sentAt":"2024-05-01T12:00:00Z","context":{"library":{"name":"analytics-node"}},"writeKey":"k"}"#;
        let members = split_object(body.as_bytes()).unwrap();
        let got: Vec<(&str, &str)> = members
            .iter()
            .map(|(k, span)| (k.as_str(), slice(body, span)))
            .collect();
        let first =
            r#"{"type":"track","event":"Signed Up","userId":"u1","properties":{"plan":"pro"}}"#;
        let second = r#"{"type":"identify","userId":"u2","traits":{"email":"a@b.c"}}"#;
        assert_eq!(
            got,
            [
                ("batch", format!("[{first},{second}]").as_str()),
                ("sentAt", "\"2024-05-01T12:00:00Z\""),
                ("context", r#"{"library":{"name":"analytics-node"}}"#),
                ("writeKey", "\"k\""),
            ]
        );
        let batch_span = members[0].1.clone();
        let batch = &body[batch_span.clone()];
        let elements = split_array(batch.as_bytes()).unwrap();
        assert_eq!(elements.len(), 2);
        assert_eq!(slice(batch, &elements[0]), first);
        assert_eq!(slice(batch, &elements[1]), second);
        // Spans are relative to the slice given; shifting maps them back into the body.
        let absolute = elements[1].start + batch_span.start..elements[1].end + batch_span.start;
        assert_eq!(slice(body, &absolute), second);
        assert_eq!(check_value(body.as_bytes(), 64), Ok(()));
    }

    #[test]
    fn split_array_spans_are_trimmed() {
        let input = " \n[ 1 ,\t\"a b\" ,{\"x\": [ ] } ,-2.5e3,null\r\n]\n ";
        let spans = split_array(input.as_bytes()).unwrap();
        let got: Vec<&str> = spans.iter().map(|s| slice(input, s)).collect();
        assert_eq!(got, ["1", "\"a b\"", "{\"x\": [ ] }", "-2.5e3", "null"]);
    }

    #[test]
    fn empty_containers() {
        assert_eq!(split_array(b"[]").unwrap(), Vec::<Range<usize>>::new());
        assert_eq!(
            split_array(b" [ \n ] ").unwrap(),
            Vec::<Range<usize>>::new()
        );
        assert!(split_object(b"{}").unwrap().is_empty());
        assert!(split_object(b" { } ").unwrap().is_empty());
        assert_eq!(check("[ ]"), Ok(()));
        assert_eq!(check("{ }"), Ok(()));
    }

    #[test]
    fn syntax_errors() {
        for s in [
            "",
            "   ",
            "\"unterminated",
            "{\"a\":\"unterminated}",
            "{\"a\":1,}",
            "[1,]",
            "[1 2]",
            "{\"a\" 1}",
            "{\"a\":}",
            "{a:1}",
            "{\"a\":1 \"b\":2}",
            "[}",
            "{]",
            "[1]]",
            "[[1]",
            "{} x",
            "1 2",
            "[1] [2]",
            "tru",
            "nul",
            "truex",
            "abc",
            "[undefined]",
            "01",
            "-",
            "1.",
            ".5",
            "+1",
            "1e",
            "1e+",
            "NaN",
            ",",
            "]",
        ] {
            let err = check(s).unwrap_err();
            assert!(matches!(err.kind, ScanErrorKind::Syntax(_)), "{s}: {err}");
        }
        let err = check("[1 2]").unwrap_err();
        assert_eq!((err.path.as_str(), err.offset), ("", 3));
        let err = check("{\"a\":[{\"b\":1,}]}").unwrap_err();
        assert_eq!((err.path.as_str(), err.offset), ("a[0]", 13));
        let err = check("{} x").unwrap_err();
        assert_eq!(err.offset, 3);

        for s in [
            "",
            "[]",
            "\"x\"",
            "{",
            "{\"a\":1,}",
            "{\"a\":}",
            "{\"a\" 1}",
            "{\"a\":1 \"b\":2}",
            "{\"a\":\"unterminated}",
            "{\"a\":[1}",
            "{\"a\":{}} x",
            "{\"a\":1}}",
            "{1:2}",
        ] {
            let err = split_object(s.as_bytes()).unwrap_err();
            assert!(matches!(err.kind, ScanErrorKind::Syntax(_)), "{s}: {err}");
        }
        let err = split_object(b"{\"batch\":[1,\"oops]}").unwrap_err();
        assert_eq!(err.path, "batch");

        for s in [
            "", "{}", "[", "[1,]", "[1 2]", "[,1]", "[\"a]", "[[1]", "[1]]", "[] x", "[{]}",
        ] {
            let err = split_array(s.as_bytes()).unwrap_err();
            assert!(matches!(err.kind, ScanErrorKind::Syntax(_)), "{s}: {err}");
        }
        let err = split_array(b"[1, {\"a\":[}]").unwrap_err();
        assert_eq!(err.path, "[1]");
    }

    #[test]
    fn display_messages() {
        assert_eq!(
            check_value(b"[[[]]]", 2).unwrap_err().to_string(),
            "json nested deeper than 2 levels at [0][0]"
        );
        assert_eq!(
            check("[1 2]").unwrap_err().to_string(),
            "invalid json at top level (byte 3): expected ',' or ']'"
        );
        let err: Box<dyn std::error::Error> = Box::new(check("x").unwrap_err());
        assert!(err.to_string().contains("expected a value"));
    }

    /// Small deterministic xorshift64* generator for the property test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    const WS: &[&str] = &["", "", "", " ", "\n", "\t", "\r\n "];
    const NUMBERS: &[&str] = &[
        "0",
        "-0",
        "7",
        "-12",
        "42",
        "3.25",
        "-0.5e2",
        "1E+3",
        "6e-1",
        "12345678901234567890",
    ];
    const STRING_PIECES: &[&str] = &[
        "a",
        "hello",
        " ",
        "é",
        "🍔",
        "]",
        ",",
        "{",
        ":",
        "\\n",
        "\\\"",
        "\\\\",
        "\\/",
        "\\u00e9",
        "\\u0000",
        "\\ud83c\\udf54",
        "\\uDBFF\\uDFFF",
        "\\ud83d",
        "\\udc00",
    ];

    fn gen_string(rng: &mut Rng, allow_lone: bool, out: &mut Vec<u8>) {
        out.push(b'"');
        for _ in 0..rng.below(4) {
            // Lone surrogates are rare (and absent from deep documents) so most documents stay valid.
            let piece = rng.pick(STRING_PIECES);
            let lone = piece.starts_with("\\ud83d") || piece.starts_with("\\udc00");
            if lone && (!allow_lone || rng.below(4) != 0) {
                continue;
            }
            out.extend_from_slice(piece.as_bytes());
        }
        out.push(b'"');
    }

    /// Generates a random JSON value; recursion is fine here because depth stays below 100.
    fn gen_value(rng: &mut Rng, depth: usize, max_depth: usize, out: &mut Vec<u8>) {
        let ws = |rng: &mut Rng, out: &mut Vec<u8>| out.extend_from_slice(rng.pick(WS).as_bytes());
        // With a large `max_depth` the document grows one long chain down to that depth.
        let chain = max_depth > 10;
        let container =
            depth < max_depth && (chain || rng.below(if depth < 3 { 2 } else { 5 }) != 0);
        if !container {
            match rng.below(4) {
                0 => gen_string(rng, max_depth <= 10, out),
                1 => out.extend_from_slice(rng.pick(NUMBERS).as_bytes()),
                2 => out.extend_from_slice(rng.pick(&["true", "false", "null"]).as_bytes()),
                _ => out.extend_from_slice(if rng.below(2) == 0 { b"[]" } else { b"{}" }),
            }
            return;
        }
        // Shallow containers are wide; deeper ones mostly have one child so size stays small.
        let count = if depth < 3 {
            rng.below(4) + usize::from(chain)
        } else if chain {
            1
        } else {
            1 + usize::from(rng.below(8) == 0)
        };
        let object = rng.below(2) == 0;
        out.push(if object { b'{' } else { b'[' });
        for n in 0..count {
            if n > 0 {
                out.push(b',');
            }
            ws(rng, out);
            if object {
                gen_string(rng, max_depth <= 10, out);
                ws(rng, out);
                out.push(b':');
                ws(rng, out);
            }
            gen_value(rng, depth + 1, max_depth, out);
            ws(rng, out);
        }
        out.push(if object { b'}' } else { b']' });
    }

    const MUTATION_BYTES: &[u8] = b"\"\\{}[],: a0-.eu\x00\xff\xc3\xa9\x7f";

    #[test]
    fn agrees_with_serde_json_on_random_documents() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut valid, mut invalid) = (0, 0);
        for round in 0..600 {
            let max_depth = if round % 10 == 0 {
                rng.below(95) + 1
            } else {
                rng.below(6)
            };
            let mut doc = Vec::new();
            gen_value(&mut rng, 0, max_depth, &mut doc);
            if rng.below(2) == 0 && !doc.is_empty() {
                let at = rng.below(doc.len() + 1);
                let byte = *rng.pick(MUTATION_BYTES);
                match rng.below(3) {
                    0 if at < doc.len() => {
                        doc.remove(at);
                    }
                    1 if at < doc.len() => doc[at] = byte,
                    _ => doc.insert(at, byte),
                }
            }
            let ours = check_value(&doc, 1000);
            let theirs = serde_json::from_slice::<serde_json::Value>(&doc);
            assert_eq!(
                ours.is_ok(),
                theirs.is_ok(),
                "disagreement on {:?}: ours {ours:?}, serde_json {theirs:?}",
                String::from_utf8_lossy(&doc)
            );
            if ours.is_ok() {
                valid += 1;
                // Valid documents always split the same way serde_json sees them.
                if doc.trim_ascii_start().starts_with(b"[") {
                    let spans = split_array(&doc).unwrap();
                    let serde_json::Value::Array(items) = theirs.unwrap() else {
                        panic!("expected an array");
                    };
                    assert_eq!(spans.len(), items.len());
                    for (span, item) in spans.iter().zip(&items) {
                        let parsed: serde_json::Value = serde_json::from_slice(&doc[span.clone()])
                            .expect("element span parses");
                        assert_eq!(&parsed, item);
                    }
                } else if doc.trim_ascii_start().starts_with(b"{") {
                    let members = split_object(&doc).unwrap();
                    let serde_json::Value::Object(map) = theirs.unwrap() else {
                        panic!("expected an object");
                    };
                    // Duplicate keys: serde_json keeps the last one, and so does this map.
                    let last: std::collections::HashMap<&str, &Range<usize>> =
                        members.iter().map(|(k, s)| (k.as_str(), s)).collect();
                    assert_eq!(last.len(), map.len());
                    for (key, span) in last {
                        let parsed: serde_json::Value =
                            serde_json::from_slice(&doc[span.clone()]).expect("member span parses");
                        assert_eq!(Some(&parsed), map.get(key));
                    }
                }
            } else {
                invalid += 1;
            }
        }
        assert!(
            valid > 150 && invalid > 150,
            "valid {valid}, invalid {invalid}"
        );
    }
}
