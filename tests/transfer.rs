//! Export, import, mappings and erasure from the log, through the real server: profiles
//! and events streamed out and back in (row rules, line-numbered rejections, round trips
//! into a fresh server), event-based updates over HTTP and from the mappings file (in the
//! event's step, out-of-order events, feeding segments, across restarts), the CLI, and an
//! erased person leaving the log files at the next snapshot.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Opts, Server, gzip, identity_set, ids, names};
use serde_json::{Value, json};

/// GET with the admin token, as text.
async fn text(s: &Server, path: &str) -> (u16, String) {
    let r = s
        .http
        .get(format!("{}{path}", s.url))
        .bearer_auth(&s.admin_token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// The lines of a JSONL export.
async fn export_jsonl(s: &Server, path: &str) -> Vec<Value> {
    let (st, body) = text(s, path).await;
    assert_eq!(st, 200, "{path}: {body}");
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{path}: line {l:?}: {e}")))
        .collect()
}

/// The records of a CSV export (header first).
async fn export_csv(s: &Server, path: &str) -> Vec<Vec<String>> {
    let (st, body) = text(s, path).await;
    assert_eq!(st, 200, "{path}: {body}");
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(body.as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect()
}

/// POST /v1/import/profiles.
async fn import(s: &Server, format: &str, body: Vec<u8>, gzipped: bool) -> (u16, Value) {
    let mut req = s
        .http
        .post(format!("{}/v1/import/profiles?format={format}", s.url))
        .bearer_auth(&s.admin_token)
        .body(body);
    if gzipped {
        req = req.header("content-encoding", "gzip");
    }
    common::split(req.send().await.unwrap()).await
}

/// An import that must be accepted.
async fn import_ok(s: &Server, format: &str, body: &str) -> Value {
    let (st, v) = import(s, format, body.as_bytes().to_vec(), false).await;
    assert_eq!(st, 200, "{v}");
    v
}

/// `(line, code)` of an import answer's rejections.
fn rejected(v: &Value) -> Vec<(u64, String)> {
    v["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(
                !r["message"].as_str().unwrap_or("").is_empty(),
                "a rejection without a message: {r}"
            );
            (
                r["line"].as_u64().unwrap(),
                r["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn profile(s: &Server, key: &str) -> Value {
    let (st, p) = s.get(&format!("/v1/profiles/{key}")).await;
    assert_eq!(st, 200, "{key}: {p}");
    p
}

async fn ingest_ok(s: &Server, path: &str, body: Value) {
    let (st, v) = s.ingest(path, &body).await;
    assert_eq!(st, 200, "{body}: {v}");
    assert_eq!(v["rejected"], json!([]), "{body}: {v}");
}

/// Creates a segment and waits until its backfill is done.
async fn segment(s: &Server, body: Value) -> Value {
    let (st, v) = s.admin("POST", "/v1/segments", Some(&body)).await;
    assert_eq!(st, 201, "{body}: {v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = s.get(&format!("/v1/segments/{id}")).await;
        if v["status"] == "ready" {
            return v;
        }
        assert!(Instant::now() < deadline, "segment {id} never ready: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn member_ids(s: &Server, seg: &str) -> Vec<String> {
    let (st, v) = s
        .get(&format!("/v1/segments/{seg}/members?limit=1000"))
        .await;
    assert_eq!(st, 200, "{v}");
    let mut out: Vec<String> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

/// A profile's identities and traits keyed by its user id, for round-trip comparisons.
fn by_user(profiles: &[Value]) -> BTreeMap<String, (Vec<(String, String)>, Value)> {
    profiles
        .iter()
        .map(|p| {
            let set = identity_set(p);
            let user = set
                .iter()
                .find(|(t, _)| t == "user_id")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no user id: {p}"));
            (user, (set, p["traits"].clone()))
        })
        .collect()
}

/// A value as the CSV import reads it back: text, except booleans (null means absent).
fn as_csv_value(v: &Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::Bool(_) => Some(v.clone()),
        Value::String(s) => Some(Value::String(s.clone())),
        Value::Object(m) => Some(Value::Object(
            m.iter()
                .filter_map(|(k, v)| as_csv_value(v).map(|v| (k.clone(), v)))
                .collect(),
        )),
        other => Some(Value::String(other.to_string())),
    }
}

// -------------------------------------------------------------------------------------
// Import
// -------------------------------------------------------------------------------------

#[tokio::test]
async fn csv_import_follows_the_row_rules_and_numbers_the_lines_it_rejects() {
    let s = Server::start().await;
    let body = concat!(
        "id,user_id,email,identity:crm_id,traits.plan,vip,traits.address.city,score\r\n",
        "ignored,u1,U1@Example.com,C-1;C-2,pro,true,Paris,'-5\r\n",
        ",u2,,,\"free, trial\",false,\"two\r\nlines\",7\r\n",
        ",,,,orphan,,,\r\n",
        ",u3,,,'=SUM(A1),TRUE,,'plain\r\n",
        ",u4,,,a,b,c,d,too many\r\n",
        ",u1,,,,,,'@x\r\n",
    );
    let v = import_ok(&s, "csv", body).await;
    assert_eq!(v["imported"], 4, "{v}");
    assert_eq!(
        rejected(&v),
        vec![(5, "missing_id".into()), (7, "invalid_field".into())],
        "{v}"
    );
    let u1 = profile(&s, "user_id:u1").await;
    assert_eq!(
        identity_set(&u1),
        ids(&[
            ("user_id", "u1"),
            ("email", "u1@example.com"),
            ("crm_id", "C-1"),
            ("crm_id", "C-2")
        ])
    );
    // The empty plan cell of line 8 left the plan; its score cell replaced line 2's.
    assert_eq!(
        u1["traits"],
        json!({"plan": "pro", "vip": true, "address": {"city": "Paris"}, "score": "@x"})
    );
    assert_eq!(
        profile(&s, "user_id:u2").await["traits"],
        json!({"plan": "free, trial", "vip": false, "address": {"city": "two\r\nlines"}, "score": "7"})
    );
    // Only true/false are booleans; a quote not before a formula character stays.
    assert_eq!(
        profile(&s, "user_id:u3").await["traits"],
        json!({"plan": "=SUM(A1)", "vip": "TRUE", "score": "'plain"})
    );
    assert_eq!(s.get("/v1/profiles/user_id:u4").await.0, 404);
    assert_eq!(profile(&s, "crm_id:C-2").await["id"], u1["id"]);

    // The header is checked before any row: a bad column is an error of the whole import.
    let (st, v) = import(&s, "csv", b"user_id,traits.\nu9,x\n".to_vec(), false).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("column 2"), "{v}");
    assert_eq!(s.get("/v1/profiles/user_id:u9").await.0, 404);
    // A format is required and must be known; the answer names it.
    let (st, v) = import(&s, "xml", b"x".to_vec(), false).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("xml"), "{v}");
    let r = s
        .http
        .post(format!("{}/v1/import/profiles", s.url))
        .bearer_auth(&s.admin_token)
        .body("user_id\nu1\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Without the admin token nothing is imported.
    let r = s
        .http
        .post(format!("{}/v1/import/profiles?format=csv", s.url))
        .body("user_id\nnobody\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(s.get("/v1/profiles/user_id:nobody").await.0, 404);
}

#[tokio::test]
async fn jsonl_import_rejects_bad_lines_by_number_and_takes_gzip() {
    let s = Server::start().await;
    let lines = [
        r#"{"identities": [{"type": "user_id", "value": "j1"}, {"type": "email", "value": "j1@example.com"}], "traits": {"plan": "pro", "seats": 3, "tags": ["a", "b"]}}"#,
        r#"{"identities": [{"type": "user_id", "value": "j2"}], "traits": {"plan": "free"}"#,
        "",
        r#"["not", "an", "object"]"#,
        r#"{"identities": [], "traits": {"plan": "x"}}"#,
        r#"{"identities": [{"type": "Bad Type", "value": "v"}]}"#,
        r#"{"identities": [{"type": "user_id", "value": "j3"}], "traits": "flat"}"#,
        r#"{"id": "ignored", "created_at": "ignored", "identities": [{"type": "user_id", "value": 42}], "traits": {"n": null}}"#,
    ];
    let body = lines.join("\n") + "\n";
    let (st, v) = import(&s, "jsonl", gzip(body.as_bytes()), true).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["imported"], 2, "{v}");
    let codes = rejected(&v);
    let lines_rejected: Vec<u64> = codes.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines_rejected, vec![2, 4, 5, 6, 7], "{v}");
    assert_eq!(codes[0].1, "invalid_json");
    assert_eq!(codes[2].1, "missing_id");
    let j1 = profile(&s, "email:j1@example.com").await;
    assert_eq!(
        j1["traits"],
        json!({"plan": "pro", "seats": 3, "tags": ["a", "b"]})
    );
    // A numeric identity keeps its digits as text; a null trait sets nothing.
    assert_eq!(profile(&s, "user_id:42").await["traits"], json!({}));
    // A body that is not gzip although it says so is a client error, nothing imported.
    let (st, v) = import(&s, "jsonl", b"{\"identities\": []}".to_vec(), true).await;
    assert!((400..500).contains(&st), "{st} {v}");
}

#[tokio::test]
async fn imported_identities_link_and_merge_under_the_ingest_rules() {
    let s = Server::start().await;
    ingest_ok(
        &s,
        "/v1/track",
        json!({"anonymousId": "anon-1", "event": "Viewed", "properties": {"sku": "A"}}),
    )
    .await;
    ingest_ok(
        &s,
        "/v1/identify",
        json!({"userId": "known", "traits": {"email": "k@example.com", "plan": "free"}}),
    )
    .await;
    let anon = profile(&s, "anonymous_id:anon-1").await;
    let v = import_ok(
        &s,
        "csv",
        "user_id,anonymous_id,traits.plan\nimported,anon-1,pro\n,anon-2,x\n",
    )
    .await;
    assert_eq!(v["imported"], 2, "{v}");
    // The anonymous visitor gained the user id and kept its timeline.
    let p = profile(&s, "user_id:imported").await;
    assert_eq!(p["id"], anon["id"]);
    assert_eq!(p["traits"]["plan"], "pro");
    assert_eq!(
        names(&s.events("user_id:imported", "type=track").await),
        vec!["Viewed"]
    );
    // A row whose email belongs to a known user updates that user.
    let v = import_ok(&s, "csv", "email,plan\nk@example.com,pro\n").await;
    assert_eq!(v["imported"], 1, "{v}");
    assert_eq!(profile(&s, "user_id:known").await["traits"]["plan"], "pro");
    // A row joining an anonymous profile to a known user merges them like ingest does.
    let v = import_ok(&s, "csv", "user_id,anonymous_id\nknown,anon-2\n").await;
    assert_eq!(v["imported"], 1, "{v}");
    let merged = profile(&s, "anonymous_id:anon-2").await;
    assert_eq!(
        identity_set(&merged),
        ids(&[
            ("user_id", "known"),
            ("email", "k@example.com"),
            ("anonymous_id", "anon-2")
        ])
    );
    // The known user's plan was written after the anonymous one's: the newer write wins.
    assert_eq!(merged["traits"]["plan"], "pro", "{merged}");
    assert_eq!(s.all_profiles().await.len(), 2);
}

// -------------------------------------------------------------------------------------
// Round trips
// -------------------------------------------------------------------------------------

/// A user base with every kind of identity and value.
async fn seed(s: &Server) {
    let mut batch = Vec::new();
    for n in 0..300 {
        let plan = ["free", "pro", "team"][n % 3];
        let mut traits = json!({
            "email": format!("p{n}@example.com"),
            "plan": plan,
            "seats": n,
            "ratio": n as f64 / 8.0,
            "vip": n % 2 == 0,
            "address": {"city": format!("City {n}"), "zip": format!("{:05}", n)},
            "tags": ["a", format!("t{n}")],
            "note": format!("=HYPERLINK(\"x\", {n}), \"quoted\"\nnext line"),
            "dotted.key": "literal",
        });
        if n % 5 == 0 {
            traits["phone"] = json!(format!("+1555000{n:04}"));
        }
        batch.push(json!({
            "type": "identify", "userId": format!("user-{n}"), "anonymousId": format!("anon-{n}"),
            "traits": traits,
            "context": {"externalIds": [{"id": format!("crm-{n}"), "type": "crm_id"}]},
        }));
    }
    let (st, v) = s.ingest("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rejected"], json!([]), "{v}");
}

#[tokio::test]
async fn jsonl_export_imported_into_a_fresh_server_gives_the_same_people() {
    let a = Server::start().await;
    seed(&a).await;
    let exported = export_jsonl(&a, "/v1/export/profiles?format=jsonl").await;
    assert_eq!(exported.len(), 300);
    // Ascending id order, each line the profile as GET /v1/profiles/{key} returns it.
    let idlist: Vec<&str> = exported.iter().map(|p| p["id"].as_str().unwrap()).collect();
    let mut sorted = idlist.clone();
    sorted.sort();
    assert_eq!(idlist, sorted);
    let one = profile(&a, "user_id:user-7").await;
    let line = exported.iter().find(|p| p["id"] == one["id"]).unwrap();
    assert_eq!(line["identities"], one["identities"]);
    assert_eq!(line["traits"], one["traits"]);

    let b = Server::start().await;
    let body: String = exported.iter().map(|p| format!("{p}\n")).collect();
    let v = import_ok(&b, "jsonl", &body).await;
    assert_eq!(v["imported"], 300, "{v}");
    assert_eq!(v["rejected"], json!([]), "{v}");
    let again = export_jsonl(&b, "/v1/export/profiles?format=jsonl").await;
    assert_eq!(by_user(&again), by_user(&exported));
}

#[tokio::test]
async fn csv_export_imported_into_a_fresh_server_gives_the_same_values_as_text() {
    let a = Server::start().await;
    seed(&a).await;
    let records = export_csv(&a, "/v1/export/profiles?format=csv").await;
    assert_eq!(records.len(), 301);
    let header = &records[0];
    assert_eq!(
        header[..6],
        [
            "id",
            "user_id",
            "email",
            "phone",
            "anonymous_id",
            "identity:crm_id"
        ]
    );
    let traits: Vec<&String> = header[6..].iter().collect();
    let mut sorted = traits.clone();
    sorted.sort();
    assert_eq!(traits, sorted, "trait columns are sorted");
    assert!(
        header.contains(&"traits.dotted\\.key".to_owned()),
        "{header:?}"
    );
    assert!(
        header.contains(&"traits.address.city".to_owned()),
        "{header:?}"
    );
    // Formulas are neutralised, numbers written plain.
    let note = header.iter().position(|h| h == "traits.note").unwrap();
    let seats = header.iter().position(|h| h == "traits.seats").unwrap();
    assert!(
        records[1..]
            .iter()
            .all(|r| r[note].starts_with("'=HYPERLINK"))
    );
    assert!(records[1..].iter().any(|r| r[seats] == "7"));

    let c = Server::start().await;
    let (_, csv_text) = text(&a, "/v1/export/profiles?format=csv").await;
    let v = import_ok(&c, "csv", &csv_text).await;
    assert_eq!(v["imported"], 300, "{v}");
    assert_eq!(v["rejected"], json!([]), "{v}");
    let original = by_user(&export_jsonl(&a, "/v1/export/profiles?format=jsonl").await);
    let back = by_user(&export_jsonl(&c, "/v1/export/profiles?format=jsonl").await);
    assert_eq!(back.len(), 300);
    for (user, (set, traits)) in &original {
        let (set2, traits2) = &back[user];
        assert_eq!(set2, set, "{user}");
        assert_eq!(Some(traits2.clone()), as_csv_value(traits), "{user}");
    }
}

#[tokio::test]
async fn exports_take_fields_segments_and_event_filters() {
    let s = Server::start().await;
    seed(&s).await;
    ingest_ok(
        &s,
        "/v1/batch",
        json!({"batch": [
            {"type": "track", "userId": "user-1", "event": "Bought", "properties": {"sku": "=cmd", "price": -5},
             "timestamp": "2026-01-02T00:00:00Z"},
            {"type": "track", "userId": "user-4", "event": "Bought", "properties": {"sku": "B"},
             "timestamp": "2026-01-03T00:00:00Z"},
            {"type": "track", "userId": "user-5", "event": "Viewed", "timestamp": "2026-01-04T00:00:00Z"},
        ]}),
    )
    .await;
    segment(
        &s,
        json!({"id": "teams", "name": "Teams", "rule": {"trait": "plan", "op": "eq", "value": "team"}}),
    )
    .await;
    let rows = export_csv(
        &s,
        "/v1/export/profiles?format=csv&segment=teams&fields=user_id,traits.seats,identity:crm_id",
    )
    .await;
    assert_eq!(rows[0], vec!["user_id", "traits.seats", "identity:crm_id"]);
    assert_eq!(rows.len(), 101);
    assert!(rows[1..].iter().all(|r| {
        let n: usize = r[0].strip_prefix("user-").unwrap().parse().unwrap();
        n % 3 == 2 && r[1] == n.to_string() && r[2] == format!("crm-{n}")
    }));
    let lines = export_jsonl(
        &s,
        "/v1/export/profiles?format=jsonl&segment=teams&fields=user_id,traits.address.city",
    )
    .await;
    assert_eq!(lines.len(), 100);
    let (_, raw) = text(
        &s,
        "/v1/export/profiles?format=jsonl&segment=teams&fields=user_id,traits.address.city",
    )
    .await;
    let first = raw.lines().next().unwrap();
    assert!(
        first.starts_with("{\"user_id\":[") && first.contains("],\"traits.address.city\":\"City "),
        "exactly the fields, in order: {first}"
    );
    assert_eq!(lines[0].as_object().unwrap().len(), 2);
    assert!(lines[0]["user_id"].is_array(), "{}", lines[0]);
    // Bad parameters name themselves.
    for (path, word) in [
        ("/v1/export/profiles?format=xls", "xls"),
        ("/v1/export/profiles?fields=traits.", "fields"),
        (
            "/v1/export/profiles?format=jsonl&fields=id,email,id",
            "twice",
        ),
        ("/v1/export/profiles?format=csv&fields=id,,email", "empty"),
        ("/v1/export/profiles?segment=nope", "nope"),
        ("/v1/export/events?since=yesterday", "since"),
    ] {
        let (st, body) = text(&s, path).await;
        assert!((400..=404).contains(&st), "{path}: {st}");
        assert!(body.contains(word), "{path}: {body}");
    }
    // Events: profile by profile in ascending id order (across shards), filters, profile
    // ids, CSV with JSON text columns and the formula guard.
    let all = export_jsonl(&s, "/v1/export/events?format=jsonl").await;
    assert!(all.len() > 600, "{}", all.len());
    let order: Vec<&str> = all
        .iter()
        .map(|e| e["profile_id"].as_str().unwrap())
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
    let events = export_jsonl(&s, "/v1/export/events?format=jsonl&name=Bought").await;
    assert_eq!(events.len(), 2, "{events:?}");
    let user1 = profile(&s, "user_id:user-1").await;
    assert!(events.iter().any(|e| e["profile_id"] == user1["id"]));
    let events = export_jsonl(
        &s,
        "/v1/export/events?format=jsonl&type=track&since=2026-01-03T00:00:00Z",
    )
    .await;
    assert_eq!(events.len(), 2, "{events:?}");
    let rows = export_csv(&s, "/v1/export/events?format=csv&name=Bought").await;
    let props = rows[0].iter().position(|h| h == "properties").unwrap();
    let pid = rows[0].iter().position(|h| h == "profile_id").unwrap();
    let row1 = rows[1..].iter().find(|r| r[pid] == user1["id"]).unwrap();
    let parsed: Value = serde_json::from_str(&row1[props]).unwrap();
    assert_eq!(parsed, json!({"sku": "=cmd", "price": -5}));
    let none = export_jsonl(
        &s,
        "/v1/export/events?format=jsonl&segment=teams&name=Bought",
    )
    .await;
    assert!(none.is_empty(), "user-1 and user-4 are not teams: {none:?}");
    let teams = export_jsonl(
        &s,
        "/v1/export/events?format=jsonl&segment=teams&type=track",
    )
    .await;
    let user5 = profile(&s, "user_id:user-5").await;
    assert_eq!(teams.len(), 1, "{teams:?}");
    assert_eq!(teams[0]["profile_id"], user5["id"]);
}

/// Runs the `user360` CLI with `args` and then `path`.
fn user360(args: &[&str], path: impl AsRef<std::path::Path>) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_user360"))
        .args(args)
        .arg(path.as_ref())
        .output()
        .unwrap()
}

#[tokio::test]
async fn cli_export_and_import_move_profiles_between_servers() {
    let a = Server::start().await;
    seed(&a).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("people.jsonl");
    let out = user360(
        &[
            "export",
            "--server",
            &a.url,
            "--token",
            &a.admin_token,
            "-o",
        ],
        &file,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("exported 300 profiles"));
    let b = Server::start().await;
    let out = user360(
        &["import", "--server", &b.url, "--token", &b.admin_token],
        &file,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["imported"], 300, "{answer}");
    assert_eq!(
        by_user(&export_jsonl(&b, "/v1/export/profiles?format=jsonl").await),
        by_user(&export_jsonl(&a, "/v1/export/profiles?format=jsonl").await)
    );
    // A wrong token is a clear failure, not an empty file.
    let out = user360(
        &["export", "--server", &a.url, "--token", "wrong", "-o"],
        dir.path().join("x.csv"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    // The format follows the output file's extension: a .csv file gets CSV.
    let csv_file = dir.path().join("people.csv");
    let out = user360(
        &[
            "export",
            "--server",
            &a.url,
            "--token",
            &a.admin_token,
            "--fields",
            "user_id",
            "-o",
        ],
        &csv_file,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&csv_file).unwrap();
    assert!(text.starts_with("user_id\r\nuser-"), "{text:.80}");
    assert_eq!(text.lines().count(), 301);
    // The whole CSV: cells with line breaks do not count as rows.
    let out = user360(
        &[
            "export",
            "--server",
            &a.url,
            "--token",
            &a.admin_token,
            "-o",
        ],
        &csv_file,
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exported 300 profiles"), "{err}");
    assert!(std::fs::read_to_string(&csv_file).unwrap().lines().count() > 400);
    // An import with bad rows imports the others, lists the bad ones by line on stderr
    // and exits 3.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "user_id,plan\nc1,pro\n,orphan\nc2,team\n").unwrap();
    let out = user360(
        &["import", "--server", &b.url, "--token", &b.admin_token],
        &bad,
    );
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("imported 2 rows; 1 rejected") && err.contains("line 3: missing_id"),
        "{err}"
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["rejected"][0]["line"], 3);
}

// -------------------------------------------------------------------------------------
// Mappings
// -------------------------------------------------------------------------------------

#[tokio::test]
async fn mappings_apply_every_action_in_the_events_step() {
    let s = Server::start().await;
    // An event before the mapping exists changes nothing.
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "m1", "event": "Plan Changed", "properties": {"plan": "early"}}),
    )
    .await;
    let body = json!({
        "id": "plans",
        "event": "Plan Changed",
        "where": [{"property": "plan", "op": "exists"}],
        "actions": [
            {"set": "plan", "from": "properties.plan"},
            {"set": "plan_changed_at", "from": "timestamp"},
            {"set": "source", "value": "billing"},
            {"increment": "plan_changes", "by": 1},
            {"append": "plans_seen", "from": "properties.plan"},
            {"set": "seats", "from": "properties.seats"},
            {"unset": "trial"},
        ],
    });
    let (st, created) = s.admin("POST", "/v1/mappings", Some(&body)).await;
    assert_eq!(st, 201, "{created}");
    assert_eq!(created["id"], "plans");
    assert_eq!(created["actions"], body["actions"]);
    assert!(created["created_at"].is_string(), "{created}");
    let (_, got) = s.get("/v1/mappings/plans").await;
    assert_eq!(got, created);
    let (_, list) = s.get("/v1/mappings").await;
    assert_eq!(list["mappings"], json!([created]));
    assert_eq!(profile(&s, "user_id:m1").await["traits"], json!({}));

    ingest_ok(
        &s,
        "/v1/identify",
        json!({"userId": "m1", "traits": {"trial": true}, "timestamp": "2026-02-01T00:00:00Z"}),
    )
    .await;
    for (plan, ts) in [
        ("pro", "2026-03-01T00:00:00.000Z"),
        ("team", "2026-03-02T00:00:00.000Z"),
        ("pro", "2026-03-03T00:00:00.000Z"),
    ] {
        ingest_ok(
            &s,
            "/v1/track",
            json!({"userId": "m1", "event": "Plan Changed", "properties": {"plan": plan}, "timestamp": ts}),
        )
        .await;
    }
    // Conditions: no plan property, no update.
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "m1", "event": "Plan Changed", "properties": {"seats": 9}}),
    )
    .await;
    let p = profile(&s, "user_id:m1").await;
    assert_eq!(
        p["traits"],
        json!({"plan": "pro", "plan_changed_at": "2026-03-03T00:00:00.000Z", "source": "billing",
               "plan_changes": 3, "plans_seen": ["pro", "team"]}),
        "{p}"
    );
    // Each changing event fired user.updated with what changed.
    let updates = s
        .events("user_id:m1", "type=system&name=user.updated&limit=100")
        .await;
    assert_eq!(updates.len(), 4, "{updates:?}");
    let last = &updates[0]["properties"];
    assert!(last.to_string().contains("plan_changes"), "{last}");
    // The missing `properties.seats` was counted.
    assert_eq!(
        s.metric("user360_mapping_missing_paths_total").await,
        Some(3.0)
    );

    // After DELETE, events no longer update.
    assert_eq!(s.admin("DELETE", "/v1/mappings/plans", None).await.0, 204);
    assert_eq!(s.get("/v1/mappings/plans").await.0, 404);
    assert_eq!(s.admin("DELETE", "/v1/mappings/plans", None).await.0, 404);
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "m1", "event": "Plan Changed", "properties": {"plan": "free"}}),
    )
    .await;
    assert_eq!(profile(&s, "user_id:m1").await["traits"]["plan"], "pro");
}

#[tokio::test]
async fn mapping_sets_follow_event_time_and_increments_count_every_event() {
    let s = Server::start().await;
    let (st, v) = s
        .admin(
            "POST",
            "/v1/mappings",
            Some(&json!({"event": "Visited", "actions": [
                {"set": "last_page", "from": "properties.page"},
                {"increment": "visits", "by": 1},
                {"increment": "spend", "from": "properties.x", "by": 0.5},
            ]})),
        )
        .await;
    // `from` is not part of `increment`: the error names the action.
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("actions[2]"), "{v}");
    let (st, v) = s
        .admin(
            "POST",
            "/v1/mappings",
            Some(&json!({"event": "Visited", "actions": [
                {"set": "last_page", "from": "properties.page"},
                {"increment": "visits", "by": 1},
                {"increment": "spend", "by": 0.5},
            ]})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert!(v["id"].as_str().is_some_and(|id| !id.is_empty()), "{v}");
    // Delivered out of order: the newest event's page wins; every visit counts.
    for (page, ts) in [
        ("/c", "2026-05-03T00:00:00Z"),
        ("/a", "2026-05-01T00:00:00Z"),
        ("/b", "2026-05-02T00:00:00Z"),
    ] {
        ingest_ok(
            &s,
            "/v1/track",
            json!({"userId": "o1", "event": "Visited", "properties": {"page": page}, "timestamp": ts}),
        )
        .await;
    }
    let p = profile(&s, "user_id:o1").await;
    assert_eq!(
        p["traits"],
        json!({"last_page": "/c", "visits": 3, "spend": 1.5}),
        "{p}"
    );
    // The two late sets show as ignored by design, not as failures.
    let id = v["id"].as_str().unwrap();
    let (_, stats) = s.get(&format!("/v1/mappings/{id}/stats")).await;
    assert_eq!(
        (
            &stats["applied"],
            &stats["ignored_late_sets"],
            &stats["skipped_updates"]
        ),
        (&json!(3), &json!(2), &json!(0)),
        "{stats}"
    );
    // An increment of a trait that is not a number leaves it (counted), the rest applies.
    ingest_ok(
        &s,
        "/v1/identify",
        json!({"userId": "o2", "traits": {"visits": "many"}}),
    )
    .await;
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "o2", "event": "Visited", "properties": {"page": "/x"}}),
    )
    .await;
    let p = profile(&s, "user_id:o2").await;
    assert_eq!(p["traits"]["visits"], "many");
    assert_eq!(p["traits"]["last_page"], "/x");
    // Mappings never run on standard events, and bad bodies name the field.
    for (body, word) in [
        (
            json!({"event": "user.updated", "actions": [{"unset": "x"}]}),
            "event",
        ),
        (json!({"event": "E", "actions": []}), "actions"),
        (
            json!({"event": "E", "actions": [{"explode": "x"}]}),
            "actions[0]",
        ),
        (
            json!({"event": "E", "actions": [{"set": "", "value": 1}]}),
            "actions[0]",
        ),
        (
            json!({"event": "E", "where": [{"property": "p", "op": "bogus"}], "actions": [{"unset": "x"}]}),
            "where",
        ),
    ] {
        let (st, v) = s.admin("POST", "/v1/mappings", Some(&body)).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert!(v.to_string().contains(word), "{body}: {v}");
    }
}

#[tokio::test]
async fn a_mapping_feeds_segments_and_replays_the_same_after_restart() {
    let mut s = Server::start().await;
    segment(
        &s,
        json!({"id": "pros", "name": "Pros", "rule": {"trait": "plan", "op": "eq", "value": "pro"}}),
    )
    .await;
    let (st, v) = s
        .admin(
            "POST",
            "/v1/mappings",
            Some(&json!({"id": "plan", "event": "Plan Changed", "actions": [
                {"set": "plan", "from": "properties.plan"},
                {"append": "history", "from": "properties.plan"},
            ]})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    for (u, plan) in [("r1", "pro"), ("r2", "free"), ("r3", "pro")] {
        ingest_ok(
            &s,
            "/v1/track",
            json!({"userId": u, "event": "Plan Changed", "properties": {"plan": plan}}),
        )
        .await;
    }
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "r3", "event": "Plan Changed", "properties": {"plan": ["free", "pro"]}}),
    )
    .await;
    let r1 = profile(&s, "user_id:r1").await;
    let r3 = profile(&s, "user_id:r3").await;
    let mut expected = vec![r1["id"].as_str().unwrap().to_owned()];
    expected.sort();
    assert_eq!(
        member_ids(&s, "pros").await,
        expected,
        "r3's plan is now a list"
    );
    assert_eq!(r3["traits"]["history"], json!(["pro", "free"]));
    let entered = s.events("user_id:r1", "name=segment.entered").await;
    assert_eq!(entered.len(), 1, "{entered:?}");
    // The mapping goes; after a restart the log replays what was applied while it was in
    // force, and later events are not mapped.
    assert_eq!(s.admin("DELETE", "/v1/mappings/plan", None).await.0, 204);
    let before = export_jsonl(&s, "/v1/export/profiles?format=jsonl").await;
    let dir = s.keep_dir();
    s.terminate();
    let s = Server::start_in(&s.data_dir.clone(), Opts::default()).await;
    let after = export_jsonl(&s, "/v1/export/profiles?format=jsonl").await;
    assert_eq!(by_user(&after), by_user(&before));
    assert_eq!(s.get("/v1/mappings").await.1["mappings"], json!([]));
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "r2", "event": "Plan Changed", "properties": {"plan": "pro"}}),
    )
    .await;
    assert_eq!(profile(&s, "user_id:r2").await["traits"]["plan"], "free");
    assert_eq!(member_ids(&s, "pros").await, expected);
    drop(dir);
}

#[tokio::test]
async fn the_mappings_file_is_loaded_at_start_and_wins_over_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("mappings.toml");
    std::fs::write(
        &file,
        r#"
[[mappings]]
id = "signup"
event = "Signed Up"
where = [{ property = "referrer", op = "exists" }]
actions = [
  { set = "referrer", from = "properties.referrer" },
  { set = "signed_up", value = true },
]
"#,
    )
    .unwrap();
    let env = vec![(
        "USER360_MAPPINGS_FILE".to_owned(),
        file.display().to_string(),
    )];
    let mut s = Server::start_in(
        &tmp.path().join("data"),
        Opts {
            env: env.clone(),
            ..Opts::default()
        },
    )
    .await;
    let (_, list) = s.get("/v1/mappings").await;
    assert_eq!(list["mappings"].as_array().unwrap().len(), 1, "{list}");
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "f1", "event": "Signed Up", "properties": {"referrer": "ads"}}),
    )
    .await;
    assert_eq!(
        profile(&s, "user_id:f1").await["traits"],
        json!({"referrer": "ads", "signed_up": true})
    );
    // An API edit of the same id lasts until the next start, when the file's version wins.
    assert_eq!(
        s.admin(
            "POST",
            "/v1/mappings",
            Some(&json!({"id": "signup", "event": "E", "actions": [{"unset": "x"}]}))
        )
        .await
        .0,
        409
    );
    assert_eq!(s.admin("DELETE", "/v1/mappings/signup", None).await.0, 204);
    let (st, v) = s
        .admin(
            "POST",
            "/v1/mappings",
            Some(&json!({"id": "signup", "event": "Signed Up", "actions": [{"set": "signed_up", "value": false}]})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "f1", "event": "Signed Up", "properties": {"referrer": "ads"}}),
    )
    .await;
    assert_eq!(
        profile(&s, "user_id:f1").await["traits"]["signed_up"],
        false
    );
    s.terminate();
    let s = Server::start_in(
        &tmp.path().join("data"),
        Opts {
            env: env.clone(),
            ..Opts::default()
        },
    )
    .await;
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "f2", "event": "Signed Up", "properties": {"referrer": "mail"}}),
    )
    .await;
    assert_eq!(
        profile(&s, "user_id:f2").await["traits"],
        json!({"referrer": "mail", "signed_up": true})
    );
    drop(s);
    // A broken file stops the start with a message naming the mapping.
    std::fs::write(
        &file,
        "[[mappings]]\nid = \"bad\"\nevent = \"E\"\nactions = [{ explode = \"x\" }]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_user360"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data"))
        .env("USER360_MAPPINGS_FILE", &file)
        .env("USER360_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mappings file")
            && err.contains("mapping \"bad\"")
            && err.contains("actions[0]")
            && !err.contains("data dir"),
        "{err}"
    );
    // It stops before listening: nothing claims to serve.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn mappings_refuse_what_would_silently_do_nothing_and_report_what_they_skip() {
    let s = Server::start().await;
    // Refused at creation, each naming the place and the value.
    let big = "v".repeat(300_000);
    let many: Vec<Value> = (0..300)
        .map(|i| json!({"unset": format!("t{i}")}))
        .collect();
    for (actions, path, word) in [
        (json!([{"increment": "n"}]), "actions[0].by", "by"),
        (
            json!([{"set": "plan", "from": "propertes.plan"}]),
            "actions[0].from",
            "propertes.plan",
        ),
        (
            json!([{"set": "essay", "value": big}]),
            "actions[0].value",
            "essay",
        ),
        (json!(many), "actions", "300"),
    ] {
        let (st, v) = s
            .admin(
                "POST",
                "/v1/mappings",
                Some(&json!({"event": "E", "actions": actions})),
            )
            .await;
        assert_eq!(
            (st, &v["code"], &v["path"]),
            (400, &json!("invalid_rule"), &json!(path)),
            "{v}"
        );
        assert!(v["message"].as_str().unwrap().contains(word), "{v}");
    }
    // Two mappings of one event changing the same trait: one user.updated, one entry per
    // trait, from the value before the event to the value after it.
    for body in [
        json!({"id": "one", "event": "Dup", "actions": [{"increment": "n", "by": 1}, {"set": "plan", "from": "properties.plan"}, {"append": "tags", "from": "properties.tag"}]}),
        json!({"id": "two", "event": "Dup", "actions": [{"increment": "n", "by": 2}, {"set": "plan", "value": "fixed"}, {"increment": "tags", "by": 1}, {"set": "w", "from": "properties.nothing"}]}),
    ] {
        let (st, v) = s.admin("POST", "/v1/mappings", Some(&body)).await;
        assert_eq!(st, 201, "{v}");
    }
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "d1", "event": "Dup", "properties": {"plan": "pro", "tag": "a"}}),
    )
    .await;
    let p = profile(&s, "user_id:d1").await;
    assert_eq!(
        p["traits"],
        json!({"n": 3, "plan": "fixed", "tags": ["a"]}),
        "{p}"
    );
    let (_, raw) = text(
        &s,
        "/v1/profiles/user_id:d1/events?type=system&name=user.updated",
    )
    .await;
    assert_eq!(raw.matches("\"n\":{").count(), 1, "{raw}");
    assert_eq!(raw.matches("\"plan\":{").count(), 1, "{raw}");
    let updates = s
        .events("user_id:d1", "type=system&name=user.updated")
        .await;
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!(
        updates[0]["properties"]["changes"],
        json!({"n": {"from": null, "to": 3}, "plan": {"from": null, "to": "fixed"},
               "tags": {"from": null, "to": ["a"]}})
    );
    // What each mapping did: "two" could not increment a list, and found no
    // properties.nothing.
    let (st, one) = s.get("/v1/mappings/one/stats").await;
    assert_eq!(st, 200, "{one}");
    assert_eq!(
        (&one["applied"], &one["skipped_updates"]),
        (&json!(1), &json!(0)),
        "{one}"
    );
    assert!(one["last_skipped"].is_null());
    let (_, two) = s.get("/v1/mappings/two/stats").await;
    assert_eq!(
        (
            &two["applied"],
            &two["missing_paths"],
            &two["skipped_updates"]
        ),
        (&json!(1), &json!(1), &json!(1)),
        "{two}"
    );
    assert_eq!(two["last_skipped"]["trait"], "tags");
    assert_eq!(two["last_skipped"]["profile_id"], p["id"]);
    let reason = two["last_skipped"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("tags") && reason.contains("[\"a\"]"),
        "{reason}"
    );
    assert_eq!(s.get("/v1/mappings/nope/stats").await.0, 404);
}

// -------------------------------------------------------------------------------------
// Erasure
// -------------------------------------------------------------------------------------

/// Whether any file under `dir` contains `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn an_erased_person_leaves_the_log_at_the_next_snapshot() {
    let mut s = Server::start().await;
    segment(
        &s,
        json!({"id": "buyers", "name": "Buyers", "rule": {"event": "Bought", "count": {"gte": 1}}}),
    )
    .await;
    // The person: an anonymous visit merged into a known user, traits, events, a membership.
    ingest_ok(
        &s,
        "/v1/track",
        json!({"anonymousId": "anon-gone", "event": "Bought",
        "properties": {"note": "SECRET-ANON-PROPERTY"}}),
    )
    .await;
    ingest_ok(&s, "/v1/identify", json!({"userId": "gone", "traits": {"email": "gone@example.com", "diary": "SECRET-TRAIT-TEXT"}})).await;
    ingest_ok(
        &s,
        "/v1/alias",
        json!({"userId": "gone", "previousId": "anon-gone"}),
    )
    .await;
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "gone", "event": "Bought", "properties": {"note": "SECRET-EVENT-TEXT"}}),
    )
    .await;
    // Someone who stays.
    ingest_ok(
        &s,
        "/v1/identify",
        json!({"userId": "stays", "traits": {"diary": "KEPT-TRAIT-TEXT"}}),
    )
    .await;
    ingest_ok(
        &s,
        "/v1/track",
        json!({"userId": "stays", "event": "Bought", "properties": {"note": "KEPT-EVENT-TEXT"}}),
    )
    .await;
    let gone = profile(&s, "user_id:gone").await;
    assert_eq!(identity_set(&gone).len(), 3, "{gone}");
    assert_eq!(member_ids(&s, "buyers").await.len(), 2);
    let logs = s.data_dir.clone();
    assert!(
        !files_containing(&logs, b"SECRET-TRAIT-TEXT").is_empty(),
        "the log holds it before"
    );

    assert_eq!(
        s.admin("DELETE", "/v1/profiles/user_id:gone", None).await.0,
        204
    );
    // Gone from every read and export at once.
    for path in [
        "/v1/export/profiles?format=jsonl",
        "/v1/export/profiles?format=csv",
        "/v1/export/events?format=jsonl",
        "/v1/events?limit=1000",
        "/v1/segments/buyers/members",
    ] {
        let (st, body) = text(&s, path).await;
        assert_eq!(st, 200, "{path}");
        assert!(
            !body.contains("SECRET") && !body.contains("gone@"),
            "{path}: {body}"
        );
        assert!(
            path.contains("members") || body.contains("KEPT"),
            "{path}: {body}"
        );
    }
    // After a snapshot, no file of the data dir holds the person's text, and the backup
    // file does not either; the other person's is still there.
    let (st, snap) = s.admin("POST", "/v1/admin/snapshots", None).await;
    assert_eq!(st, 201, "{snap}");
    for secret in [
        "SECRET-TRAIT-TEXT",
        "SECRET-EVENT-TEXT",
        "SECRET-ANON-PROPERTY",
        "gone@example.com",
    ] {
        assert_eq!(
            files_containing(&logs, secret.as_bytes()),
            Vec::<std::path::PathBuf>::new(),
            "{secret}"
        );
    }
    assert!(!files_containing(&logs, b"KEPT-EVENT-TEXT").is_empty());
    let r = s
        .http
        .get(format!(
            "{}/v1/admin/snapshots/{}",
            s.url,
            snap["id"].to_string().trim_matches('"')
        ))
        .bearer_auth(&s.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let backup = r.bytes().await.unwrap();
    assert!(!backup.windows(6).any(|w| w == b"SECRET"));
    assert!(backup.windows(15).any(|w| w == b"KEPT-EVENT-TEXT"));
    // A restart replays the scrubbed log: the other person whole, the erased one absent,
    // user.deleted still listed.
    let dir = s.keep_dir();
    s.terminate();
    let s = Server::start_in(&logs, Opts::default()).await;
    assert_eq!(s.get("/v1/profiles/user_id:gone").await.0, 404);
    assert_eq!(s.get("/v1/profiles/anonymous_id:anon-gone").await.0, 404);
    let stays = profile(&s, "user_id:stays").await;
    assert_eq!(stays["traits"]["diary"], "KEPT-TRAIT-TEXT");
    assert_eq!(
        names(&s.events("user_id:stays", "type=track").await),
        vec!["Bought"]
    );
    assert_eq!(
        member_ids(&s, "buyers").await,
        vec![stays["id"].as_str().unwrap().to_owned()]
    );
    let (_, sys) = s.get("/v1/events?type=system&name=user.deleted").await;
    assert_eq!(sys["events"].as_array().unwrap().len(), 1, "{sys}");
    drop(dir);
}

/// The server's resident memory, from `/metrics`.
async fn rss(s: &Server) -> f64 {
    s.metric(RSS)
        .await
        .expect("user360_process_rss_bytes in /metrics")
}

const RSS: &str = "user360_process_rss_bytes";

#[tokio::test]
async fn an_export_of_100000_profiles_streams_and_parses_back() {
    const N: usize = 100_000;
    let s = Server::start().await;
    // Seeded through /v1/batch, four requests at a time.
    let mut pending = Vec::new();
    for chunk in (0..N).collect::<Vec<_>>().chunks(2_500) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|&n| {
                let plan = ["free", "pro"][n % 2];
                json!({"type": "identify", "userId": format!("bulk-{n}"), "traits": {
                    "email": format!("b{n}@example.com"), "n": n, "plan": plan,
                    "name": format!("Doe, \"J{n}\""), "cmd": if n.is_multiple_of(1000) { "=1+1" } else { "x" },
                }})
            })
            .collect();
        let http = s.http.clone();
        let url = format!("{}/v1/batch", s.url);
        let key = s.write_key.clone();
        pending.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .basic_auth(key, Some(""))
                .json(&json!({"batch": batch}))
                .send()
                .await
                .unwrap();
            common::split(r).await
        }));
        if pending.len() == 4 {
            for p in pending.drain(..) {
                let (st, v) = p.await.unwrap();
                assert_eq!((st, &v["rejected"]), (200, &json!([])), "{v}");
            }
        }
    }
    for p in pending.drain(..) {
        let (st, v) = p.await.unwrap();
        assert_eq!((st, &v["rejected"]), (200, &json!([])), "{v}");
    }

    // JSONL, read slowly: with the client paused after the first megabyte the server holds
    // a bounded window of the export, not the ~45 MB it renders in all.
    // (Freed memory goes back to the OS a second after it is freed.)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = rss(&s).await;
    let mut r = s
        .http
        .get(format!("{}/v1/export/profiles?format=jsonl", s.url))
        .bearer_auth(&s.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut body = Vec::new();
    while body.len() < 1 << 20 {
        body.extend_from_slice(&r.chunk().await.unwrap().expect("more than 1 MB"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss(&s).await;
    while let Some(c) = r.chunk().await.unwrap() {
        body.extend_from_slice(&c);
    }
    let total = body.len() as f64;
    assert!(total > 30e6, "{total} bytes");
    assert!(
        during - before < total / 3.0,
        "resident memory grew {} bytes while a {total}-byte export was paused",
        during - before
    );
    let text = String::from_utf8(body).unwrap();
    let mut count = 0;
    let mut last = String::new();
    for l in text.lines() {
        let p: Value = serde_json::from_str(l).unwrap();
        let pid = p["id"].as_str().unwrap().to_owned();
        assert!(pid > last, "ascending ids");
        let user = p["identities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["type"] == "user_id")
            .unwrap()["value"]
            .as_str()
            .unwrap()
            .to_owned();
        let k: u64 = user.strip_prefix("bulk-").unwrap().parse().unwrap();
        assert_eq!(p["traits"]["n"], k);
        last = pid;
        count += 1;
    }
    assert_eq!(count, N);

    // CSV: every profile once, ascending ids, values and the formula guard.
    let rows = export_csv(&s, "/v1/export/profiles?format=csv").await;
    assert_eq!(rows.len(), N + 1);
    let col = |name: &str| rows[0].iter().position(|h| h == name).unwrap();
    let (id, user, n, name, cmd) = (
        col("id"),
        col("user_id"),
        col("traits.n"),
        col("traits.name"),
        col("traits.cmd"),
    );
    let mut seen = vec![false; N];
    for pair in rows[1..].windows(2) {
        assert!(pair[0][id] < pair[1][id], "ascending ids");
    }
    for r in &rows[1..] {
        let k: usize = r[user].strip_prefix("bulk-").unwrap().parse().unwrap();
        assert!(!seen[k], "bulk-{k} twice");
        seen[k] = true;
        assert_eq!(r[n], k.to_string());
        assert_eq!(r[name], format!("Doe, \"J{k}\""));
        let want = if k.is_multiple_of(1000) { "'=1+1" } else { "x" };
        assert_eq!(r[cmd], want);
    }
    assert!(seen.iter().all(|&b| b));
}

#[tokio::test]
async fn a_large_import_is_held_back_not_buffered() {
    // 600,000 rows (~37 MB of CSV, far less gzipped) that all set the same value
    // on one profile: the profile does not grow, so resident memory shows whether the
    // server holds the body or its parsed rows instead of reading as it applies.
    const ROWS: usize = 600_000;
    let s = Server::start().await;
    let body_of = |rows: usize| {
        let mut text = String::from("user_id,plan,padding\n");
        for _ in 0..rows {
            text.push_str("same-user,pro,a row long enough to weigh something in memory\n");
        }
        text
    };
    let csv_text = body_of(ROWS);
    let raw = csv_text.len() as f64;
    let body = gzip(csv_text.as_bytes());
    drop(csv_text);
    // A first, smaller import of the same rows brings the import's working set (reader,
    // row batches, log buffers) in; the large one must stay within it.
    let warm = body_of(ROWS / 8);
    let (st, v) = import(&s, "csv", gzip(warm.as_bytes()), true).await;
    assert_eq!(st, 200, "{v}");
    let before = rss(&s).await;
    let peak = std::sync::Arc::new(std::sync::Mutex::new(before));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        let (http, url) = (s.http.clone(), s.url.clone());
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let v = common::metric_at(&http, &url, RSS).await.expect(RSS);
                {
                    let mut p = peak.lock().unwrap();
                    *p = p.max(v);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let (st, v) = import(&s, "csv", body, true).await;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.await.unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["imported"], ROWS, "{v}");
    assert_eq!(v["rejected"], json!([]));
    let grew = *peak.lock().unwrap() - before;
    assert!(
        grew < raw / 4.0,
        "resident memory grew {grew} bytes during the import of a {raw}-byte body"
    );
    let p = profile(&s, "user_id:same-user").await;
    assert_eq!(p["traits"]["plan"], "pro");
    assert_eq!(s.all_profiles().await.len(), 1);
}

#[tokio::test]
async fn a_profile_with_traits_near_the_limit_round_trips_through_jsonl() {
    let a = Server::start().await;
    let big = "b".repeat(200_000);
    let (st, v) = a
        .admin(
            "PATCH",
            "/v1/profiles/user_id:big/traits",
            Some(&json!({"essay": big, "plan": "pro"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, body) = text(&a, "/v1/export/profiles?format=jsonl").await;
    assert!(body.len() > 200_000);
    let b = Server::start().await;
    let v = import_ok(&b, "jsonl", &body).await;
    assert_eq!(
        (&v["imported"], &v["rejected"]),
        (&json!(1), &json!([])),
        "{v}"
    );
    let p = profile(&b, "user_id:big").await;
    assert_eq!(p["traits"]["essay"].as_str().map(str::len), Some(200_000));
    assert_eq!(p["traits"]["plan"], "pro");
}

#[tokio::test]
async fn csv_import_refuses_ambiguous_headers_and_open_quotes_and_lists_rejections_in_line_order() {
    let s = Server::start().await;
    for (header, word) in [
        ("user_id,user_id", "repeats"),
        ("user_id,plan,traits.plan", "repeats"),
        ("user_id,,plan", "no name"),
    ] {
        let (st, v) = import(&s, "csv", format!("{header}\nu1,a,b\n").into_bytes(), false).await;
        assert_eq!(st, 400, "{header}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains(word),
            "{header}: {v}"
        );
    }
    assert_eq!(s.all_profiles().await.len(), 0, "nothing applied");
    // Bad rows found by the parser and by the shards come back in line order; a quote left
    // open at the end costs only its row.
    ingest_ok(&s, "/v1/identify", json!({"userId": "sup"})).await;
    assert_eq!(
        s.admin("DELETE", "/v1/profiles/user_id:sup?suppress=true", None)
            .await
            .0,
        204
    );
    let body = "user_id,email,plan\n\
                a1,,pro\n\
                sup,,x\n\
                ,,orphan\n\
                a2,,team\n\
                a3,,\"never closed\n";
    let (st, v) = import(&s, "csv", body.as_bytes().to_vec(), false).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["imported"], 2, "{v}");
    assert_eq!(
        rejected(&v),
        vec![
            (3, "suppressed".into()),
            (4, "missing_id".into()),
            (6, "invalid_field".into())
        ],
        "{v}"
    );
    let msg = v["rejected"][1]["message"].as_str().unwrap();
    assert!(msg.contains("user_id, email empty"), "{msg}");
    assert!(
        v["rejected"][2]["message"]
            .as_str()
            .unwrap()
            .contains("never closed"),
        "{v}"
    );
    assert_eq!(profile(&s, "user_id:a2").await["traits"]["plan"], "team");
    assert_eq!(s.get("/v1/profiles/user_id:a3").await.0, 404);
}

/// `{"k": {"k": ... "leaf" ...}}` nested `levels` objects deep.
fn nested(levels: usize) -> Value {
    let mut v = json!("leaf");
    for _ in 0..levels {
        v = json!({ "k": v });
    }
    v
}

#[tokio::test]
async fn imports_keep_ids_as_written_merge_csv_leaves_and_round_trip_deep_traits() {
    let a = Server::start().await;
    // PATCH: a blocked value is no key; a blank one names no profile, and says so.
    let (st, v) = a
        .admin(
            "PATCH",
            "/v1/profiles/user_id:null/traits",
            Some(&json!({"a": 1})),
        )
        .await;
    assert_eq!(
        (st, &v["code"], &v["path"]),
        (400, &json!("blocked_id"), &json!("key")),
        "{v}"
    );
    let (st, v) = a
        .admin(
            "PATCH",
            "/v1/profiles/email:%20/traits",
            Some(&json!({"a": 1})),
        )
        .await;
    assert_eq!(st, 404, "{v}");
    assert!(v["message"].as_str().unwrap().contains("blank"), "{v}");
    assert_eq!(a.all_profiles().await.len(), 0);

    // JSONL: numeric ids as written, a BOM before line 1, a null identity value skipped.
    let body = "\u{feff}{\"identities\":[{\"type\":\"user_id\",\"value\":12345678901234567890123}],\"traits\":{\"n\":1}}\n\
                {\"identities\":[{\"type\":\"user_id\",\"value\":1.50},{\"type\":\"email\",\"value\":null}]}\n";
    let v = import_ok(&a, "jsonl", body).await;
    assert_eq!(
        (&v["imported"], &v["rejected"]),
        (&json!(2), &json!([])),
        "{v}"
    );
    assert_eq!(
        profile(&a, "user_id:12345678901234567890123").await["traits"]["n"],
        1
    );
    assert_eq!(a.get("/v1/profiles/user_id:1.50").await.0, 200);

    // A trait nested as deep as a PATCH allows exports and imports back.
    let mut body = serde_json::Map::new();
    body.insert("deep".into(), nested(62));
    let (st, v) = a
        .admin(
            "PATCH",
            "/v1/profiles/user_id:deep/traits",
            Some(&Value::Object(body)),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, exported) = text(&a, "/v1/export/profiles?format=jsonl").await;
    let b = Server::start().await;
    let v = import_ok(&b, "jsonl", &exported).await;
    assert_eq!(
        (&v["imported"], &v["rejected"]),
        (&json!(3), &json!([])),
        "{v}"
    );
    assert_eq!(
        profile(&b, "user_id:deep").await["traits"]["deep"],
        nested(62)
    );
    // ...and a mapping value deeper than a trait may be is refused.
    let (st, v) = b
        .admin(
            "POST",
            "/v1/mappings",
            Some(&json!({"event": "E", "actions": [{"set": "x", "value": nested(80)}]})),
        )
        .await;
    assert_eq!(
        (st, &v["code"], &v["path"]),
        (400, &json!("too_deep"), &json!("actions[0].value")),
        "{v}"
    );

    // CSV cells are leaves: an empty one leaves its leaf, a set one changes only its leaf.
    let (st, _) = b
        .admin(
            "PATCH",
            "/v1/profiles/user_id:addr-1/traits",
            Some(&json!({"addr": {"city": "Paris", "zip": "75001", "geo": {"lat": 1}}, "plan": "pro"})),
        )
        .await;
    assert_eq!(st, 200);
    let v = import_ok(
        &b,
        "csv",
        "user_id,traits.addr.city,traits.addr.zip,traits.addr.geo.lon,traits.plan\naddr-1,Lyon,,2,\n",
    )
    .await;
    assert_eq!(v["imported"], 1, "{v}");
    assert_eq!(
        profile(&b, "user_id:addr-1").await["traits"],
        json!({"addr": {"city": "Lyon", "zip": "75001", "geo": {"lat": 1, "lon": "2"}}, "plan": "pro"})
    );

    // A gzip body cut short: the rows before it are in, the rest is reported as a bad body.
    let mut rows = String::from("user_id,plan\n");
    for i in 0..20_000 {
        rows.push_str(&format!("cut-{i},p{}\n", i % 7));
    }
    let gz = gzip(rows.as_bytes());
    let (st, v) = import(&b, "csv", gz[..gz.len() * 6 / 10].to_vec(), true).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["imported"].as_u64().unwrap() > 1000, "{v}");
    let last = v["rejected"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["code"], "invalid_body", "{v}");
    let (st, v) = import(&b, "jsonl", b"\x1f\x8b\x08garbage".to_vec(), true).await;
    assert_eq!((st, &v["code"]), (400, &json!("invalid_body")), "{v}");
}

#[tokio::test]
async fn links_refused_for_an_import_row_are_listed_in_the_merges_and_survive_a_restart() {
    let mut s = Server::start().await;
    for (u, e) in [("lim-a", "a@lim.com"), ("lim-b", "b@lim.com")] {
        ingest_ok(
            &s,
            "/v1/identify",
            json!({"userId": u, "traits": {"email": e}}),
        )
        .await;
    }
    // The row would join two known users: the email link is refused, the row applied.
    let v = import_ok(&s, "csv", "user_id,email,plan\nlim-a,b@lim.com,pro\n").await;
    assert_eq!(
        (&v["imported"], &v["rejected"]),
        (&json!(1), &json!([])),
        "{v}"
    );
    let check = |merges: Value| {
        let list = merges["merges"].as_array().unwrap().clone();
        let refused: Vec<&Value> = list.iter().filter(|m| m["type"] == "refused").collect();
        assert_eq!(refused.len(), 1, "{merges}");
        assert_eq!(refused[0]["cause"], "import:line 2");
        assert_eq!(
            refused[0]["identities"],
            json!([{"type": "email", "value": "b@lim.com"}])
        );
    };
    check(s.get("/v1/profiles/user_id:lim-a/merges").await.1);
    assert_eq!(profile(&s, "user_id:lim-a").await["traits"]["plan"], "pro");
    assert_eq!(
        profile(&s, "email:b@lim.com").await["id"],
        profile(&s, "user_id:lim-b").await["id"]
    );
    let dir = s.keep_dir();
    s.kill9();
    let s = Server::start_in(&s.data_dir, Opts::default()).await;
    check(s.get("/v1/profiles/user_id:lim-a/merges").await.1);
    drop(dir);
}

#[tokio::test]
async fn an_erased_persons_trait_names_leave_the_csv_header() {
    let s = Server::start().await;
    for (key, traits) in [
        (
            "user_id:gone",
            json!({"ssn_for_bob": "123", "addr": {"bob_street": "x"}, "plan": "a"}),
        ),
        (
            "user_id:kept",
            json!({"plan": "b", "addr": {"city": "Paris"}}),
        ),
    ] {
        let (st, v) = s
            .admin(
                "PATCH",
                &format!("/v1/profiles/{key}/traits"),
                Some(&traits),
            )
            .await;
        assert_eq!(st, 200, "{v}");
    }
    let header = |csv: &str| csv.lines().next().unwrap_or("").to_owned();
    let (_, before) = text(&s, "/v1/export/profiles?format=csv").await;
    assert!(header(&before).contains("traits.ssn_for_bob"), "{before}");
    assert_eq!(
        s.admin("DELETE", "/v1/profiles/user_id:gone", None).await.0,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, after) = text(&s, "/v1/export/profiles?format=csv").await;
        let h = header(&after);
        if !h.contains("bob") {
            assert!(
                h.contains("traits.addr.city") && h.contains("traits.plan"),
                "{h}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "still in the header: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A trait name that comes back is listed again.
    let (st, _) = s
        .admin(
            "PATCH",
            "/v1/profiles/user_id:kept/traits",
            Some(&json!({"ssn_for_bob": "n/a"})),
        )
        .await;
    assert_eq!(st, 200);
    let (_, again) = text(&s, "/v1/export/profiles?format=csv").await;
    assert!(header(&again).contains("traits.ssn_for_bob"), "{again}");
}
