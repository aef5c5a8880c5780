//! Ingestion over HTTP against the real server: the Segment endpoints, auth, bodies,
//! limits and the bad-input table of the core issue. Each bad input must leave the server
//! up and change nothing.

mod common;

use common::{Server, gzip, names};
use serde_json::{Value, json};

async fn track_count(s: &Server, user: &str) -> usize {
    let (st, v) = s
        .get(&format!("/v1/profiles/user_id:{user}/events?type=track"))
        .await;
    if st == 404 {
        return 0;
    }
    v["events"].as_array().unwrap().len()
}

#[tokio::test]
async fn all_endpoints_accept_and_store_their_calls() {
    let s = Server::start().await;
    let calls = [
        (
            "/v1/identify",
            json!({"userId": "u1", "traits": {"plan": "pro"}}),
        ),
        (
            "/v1/track",
            json!({"userId": "u1", "event": "Clicked", "properties": {"a": 1}}),
        ),
        (
            "/v1/page",
            json!({"userId": "u1", "name": "Pricing", "category": "Docs", "properties": {"url": "/p"}}),
        ),
        ("/v1/screen", json!({"userId": "u1", "name": "Home"})),
        (
            "/v1/group",
            json!({"userId": "u1", "groupId": "g1", "traits": {"name": "Acme"}}),
        ),
        ("/v1/alias", json!({"userId": "u1", "previousId": "anon-9"})),
    ];
    for (path, body) in &calls {
        let (st, v) = s.ingest(path, body).await;
        assert_eq!(st, 200, "{path}: {v}");
        assert_eq!(
            v,
            json!({"success": true, "accepted": 1, "duplicates": 0, "rejected": []}),
            "{path}"
        );
    }
    let (st, v) = s
        .ingest(
            "/v1/import",
            &json!({"batch": [{"type": "track", "userId": "u1", "event": "Imported"}]}),
        )
        .await;
    assert_eq!((st, v["accepted"].clone()), (200, json!(1)));
    let page = s.events("user_id:u1", "type=page").await;
    assert_eq!(page[0]["event"], "Page Viewed");
    assert_eq!(
        page[0]["properties"],
        json!({"url": "/p", "name": "Pricing", "category": "Docs"})
    );
    assert_eq!(
        s.events("user_id:u1", "type=screen").await[0]["event"],
        "Screen Viewed"
    );
    let group = s.events("user_id:u1", "type=group").await;
    assert_eq!(group[0]["group_id"], "g1");
    assert_eq!(group[0]["traits"], json!({"name": "Acme"}));
    // group traits describe the group, not the person.
    let (_, p) = s.get("/v1/profiles/user_id:u1").await;
    assert_eq!(p["traits"], json!({"plan": "pro"}));
    // alias linked the previous id as an anonymous id of the same profile.
    let (st, a) = s.get("/v1/profiles/anonymous_id:anon-9").await;
    assert_eq!((st, &a["id"]), (200, &p["id"]));
    assert_eq!(
        names(&s.events("user_id:u1", "type=track").await),
        vec!["Imported", "Clicked"]
    );
}

#[tokio::test]
async fn auth_write_key_header_or_body_and_admin_token() {
    let s = Server::start().await;
    let url = format!("{}/v1/track", s.url);
    let msg = json!({"userId": "u1", "event": "E"});
    // No key at all.
    let r = s.http.post(&url).json(&msg).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");
    // Wrong Basic key.
    let r = s
        .http
        .post(&url)
        .basic_auth("nope", Some(""))
        .json(&msg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // writeKey in the body, no header.
    let mut with_key = msg.clone();
    with_key["writeKey"] = json!(s.write_key);
    with_key["messageId"] = json!("body-key-1");
    let r = s.http.post(&url).json(&with_key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A wrong header wins over a right body key.
    let r = s
        .http
        .post(&url)
        .basic_auth("nope", Some(""))
        .json(&with_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Batch writeKey at the top level.
    let r = s
        .http
        .post(format!("{}/v1/batch", s.url))
        .json(&json!({"writeKey": s.write_key, "batch": [{"type": "track", "userId": "u1", "event": "B"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Admin endpoints: a write key is not the admin token.
    let r = s
        .http
        .get(format!("{}/v1/profiles/user_id:u1", s.url))
        .bearer_auth(&s.write_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .http
        .get(format!("{}/v1/profiles/user_id:u1", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(track_count(&s, "u1").await, 2);
    // healthz/readyz/metrics need no key.
    for p in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            s.http
                .get(format!("{}{p}", s.url))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{p}"
        );
    }
}

#[tokio::test]
async fn bad_bodies_get_clear_errors_and_change_nothing() {
    let s = Server::start().await;
    /// (endpoint, body, extra headers, expected status, expected code)
    type Case = (
        &'static str,
        Vec<u8>,
        Vec<(&'static str, &'static str)>,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "/v1/track",
            b"not json".to_vec(),
            vec![],
            400,
            "invalid_json",
        ),
        ("/v1/track", b"[1,2]".to_vec(), vec![], 400, "invalid_field"),
        (
            "/v1/batch",
            b"{\"batch\": 5}".to_vec(),
            vec![],
            400,
            "invalid_field",
        ),
        (
            "/v1/batch",
            b"{\"sentAt\": \"x\"}".to_vec(),
            vec![],
            400,
            "invalid_field",
        ),
        (
            "/v1/track",
            br#"{"userId":"u1"}"#.to_vec(),
            vec![],
            400,
            "invalid_field",
        ),
        (
            "/v1/track",
            br#"{"event":"E"}"#.to_vec(),
            vec![],
            400,
            "missing_id",
        ),
        (
            "/v1/alias",
            br#"{"userId":"u1"}"#.to_vec(),
            vec![],
            400,
            "missing_id",
        ),
        (
            "/v1/identify",
            br#"{"userId":"u1","traits":"gold"}"#.to_vec(),
            vec![],
            400,
            "invalid_field",
        ),
        (
            "/v1/group",
            br#"{"userId":"u1"}"#.to_vec(),
            vec![],
            400,
            "invalid_field",
        ),
        (
            "/v1/track",
            br#"{"userId":true,"event":"E"}"#.to_vec(),
            vec![],
            400,
            "invalid_field",
        ),
        (
            "/v1/track",
            br#"{"userId":"u1","event":"E","properties":{"n":"\udc00"}}"#.to_vec(),
            vec![],
            400,
            "invalid_json",
        ),
        (
            "/v1/track",
            br#"{"userId":"u1","event":"E"}"#.to_vec(),
            vec![("content-encoding", "br")],
            415,
            "unsupported_encoding",
        ),
        (
            "/v1/track",
            gzip(br#"{"userId":"u1","event":"E"}"#),
            vec![],
            400,
            "invalid_json",
        ),
        (
            "/v1/track",
            gzip(br#"{"userId":"u1","event":"E"}"#)[..10].to_vec(),
            vec![("content-encoding", "gzip")],
            400,
            "invalid_body",
        ),
        (
            "/v1/track",
            br#"{"userId":"null","event":"E"}"#.to_vec(),
            vec![],
            400,
            "blocked_id",
        ),
    ];
    for (path, body, headers, status, code) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        let (st, v) = s.ingest_raw(path, body, &headers).await;
        assert_eq!(st, status, "{path} {shown}: {v}");
        assert_eq!(v["code"], code, "{path} {shown}: {v}");
        assert!(v["message"].as_str().unwrap().len() > 10, "{v}");
        assert!(
            v.get("path").is_some(),
            "error bodies always carry path: {v}"
        );
    }
    let (st, _) = s.get("/healthz").await;
    assert_eq!(st, 200);
    assert_eq!(s.all_profiles().await.len(), 0, "nothing was stored");
}

#[tokio::test]
async fn deep_nesting_is_rejected_without_crashing() {
    let s = Server::start().await;
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let body = format!(r#"{{"userId":"u1","event":"Deep","properties":{{"x":{deep}}}}}"#);
    let (st, v) = s.ingest_raw("/v1/track", body.into_bytes(), &[]).await;
    assert_eq!((st, v["code"].as_str()), (400, Some("too_deep")), "{v}");
    // Exactly 64 levels pass (message = level 1), 65 do not.
    let nest = |levels: usize| format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
    let ok = format!(
        r#"{{"userId":"u1","event":"D64","properties":{{"x":{}}}}}"#,
        nest(62)
    );
    assert_eq!(s.ingest_raw("/v1/track", ok.into_bytes(), &[]).await.0, 200);
    let bad = format!(
        r#"{{"userId":"u1","event":"D65","properties":{{"x":{}}}}}"#,
        nest(63)
    );
    assert_eq!(
        s.ingest_raw("/v1/track", bad.into_bytes(), &[]).await.0,
        400
    );
    // In a batch only that element is rejected.
    let batch = format!(
        r#"{{"batch":[{{"type":"track","userId":"u1","event":"Before"}},{{"type":"track","userId":"u1","event":"Deep","properties":{{"x":{deep}}}}},{{"type":"track","userId":"u1","event":"After"}}]}}"#
    );
    let (st, v) = s.ingest_raw("/v1/batch", batch.into_bytes(), &[]).await;
    assert_eq!(st, 200);
    assert_eq!(v["accepted"], 2);
    assert_eq!(v["rejected"][0]["index"], 1);
    assert_eq!(v["rejected"][0]["code"], "too_deep");
    assert_eq!(
        names(&s.events("user_id:u1", "type=track").await),
        vec!["After", "Before", "D64"]
    );
}

#[tokio::test]
async fn size_limits_per_message_body_and_batch_count() {
    let s = Server::start().await;
    // Body over 4 MiB, plain and after gunzip.
    let big = format!(
        r#"{{"batch":[{{"type":"track","userId":"u1","event":"E","properties":{{"p":"{}"}}}}]}}"#,
        "x".repeat(4 * 1024 * 1024)
    );
    let (st, v) = s
        .ingest_raw("/v1/batch", big.clone().into_bytes(), &[])
        .await;
    assert_eq!((st, v["code"].as_str()), (413, Some("too_large")), "{v}");
    let (st, v) = s
        .ingest_raw(
            "/v1/batch",
            gzip(big.as_bytes()),
            &[("content-encoding", "gzip")],
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (413, Some("too_large")), "{v}");
    // 2,501 messages: the last is rejected with too_many_messages, the rest accepted.
    let batch: Vec<Value> = (0..2501)
        .map(|i| json!({"type": "track", "userId": "many", "event": "N", "messageId": format!("n-{i}")}))
        .collect();
    let (st, v) = s.ingest("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!(st, 200);
    assert_eq!(v["accepted"], 2500);
    assert_eq!(
        v["rejected"],
        json!([{"index": 2500, "code": "too_many_messages", "message": v["rejected"][0]["message"]}])
    );
    // An empty batch is fine.
    let (st, v) = s.ingest("/v1/batch", &json!({"batch": []})).await;
    assert_eq!(
        (st, v),
        (
            200,
            json!({"success": true, "accepted": 0, "duplicates": 0, "rejected": []})
        )
    );
}

#[tokio::test]
async fn gzip_with_any_content_type_and_unknown_fields_kept_exact() {
    let s = Server::start().await;
    let body = json!({"batch": [{"type": "track", "userId": "u1", "event": "Z", "properties": {"nul": "a\u{0000}b"}, "extraField": {"x": 1}}], "sentAt": "2026-01-01T00:00:00Z"});
    let (st, v) = s
        .ingest_raw(
            "/v1/batch",
            gzip(body.to_string().as_bytes()),
            &[
                ("content-encoding", "gzip"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
        )
        .await;
    assert_eq!((st, v["accepted"].clone()), (200, json!(1)), "{v}");
    let ev = s.events("user_id:u1", "type=track").await;
    assert_eq!(ev[0]["properties"]["nul"], "a\u{0000}b");
}

#[tokio::test]
async fn dedup_by_message_id_within_and_across_requests() {
    let s = Server::start().await;
    let m = json!({"userId": "u1", "event": "Once", "messageId": "m-1"});
    assert_eq!(s.ingest("/v1/track", &m).await.1["accepted"], 1);
    let (st, v) = s.ingest("/v1/track", &m).await;
    assert_eq!(
        (st, v),
        (
            200,
            json!({"success": true, "accepted": 0, "duplicates": 1, "rejected": []})
        )
    );
    let b = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "Twice", "messageId": "m-2"},
        {"type": "track", "userId": "u1", "event": "Twice", "messageId": "m-2"},
        {"type": "track", "userId": "u1", "event": "Once", "messageId": "m-1"}
    ]});
    let (_, v) = s.ingest("/v1/batch", &b).await;
    assert_eq!(
        (v["accepted"].clone(), v["duplicates"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(track_count(&s, "u1").await, 2);
    // Concurrent copies: exactly one is accepted.
    let mut handles = Vec::new();
    for _ in 0..16 {
        let http = s.http.clone();
        let url = format!("{}/v1/track", s.url);
        let key = s.write_key.clone();
        handles.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .basic_auth(key, Some(""))
                .json(&json!({"userId": "u1", "event": "Race", "messageId": "m-race"}))
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()["accepted"]
                .as_u64()
                .unwrap()
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    assert_eq!(total, 1);
    assert_eq!(track_count(&s, "u1").await, 3);
}

#[tokio::test]
async fn dedup_window_expires_with_the_clock() {
    let s = Server::manual().await;
    let m = json!({"userId": "u1", "event": "Again", "messageId": "m-exp"});
    assert_eq!(s.ingest("/v1/track", &m).await.1["accepted"], 1);
    s.advance(23 * 3_600_000).await;
    assert_eq!(s.ingest("/v1/track", &m).await.1["duplicates"], 1);
    s.advance(2 * 3_600_000).await;
    assert_eq!(s.ingest("/v1/track", &m).await.1["accepted"], 1);
}

#[tokio::test]
async fn timestamps_bad_values_are_ignored_not_rejected() {
    let s = Server::manual().await;
    let (_, clock) = s.get("/v1/admin/clock").await;
    let now = clock["now"].as_str().unwrap().to_owned();
    for (i, ts) in [
        json!("yesterday"),
        json!("1999-12-31T23:59:59Z"),
        json!("2026-01-01T00:00:00"),
        json!(12345),
    ]
    .iter()
    .enumerate()
    {
        let (st, v) = s.ingest("/v1/track", &json!({"userId": "u1", "event": "T", "timestamp": ts, "messageId": format!("t{i}")})).await;
        assert_eq!(st, 200, "{ts}: {v}");
    }
    for e in s.events("user_id:u1", "type=track").await {
        assert_eq!(
            e["timestamp"], now,
            "a bad timestamp falls back to received_at"
        );
        assert_eq!(e["received_at"], now);
    }
    let (_, m) = split_metrics(&s).await;
    assert!(m.contains("user360_invalid_timestamps_total 4"), "{m}");
}

async fn split_metrics(s: &Server) -> (u16, String) {
    let r = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn ids_as_numbers_unicode_and_unknown_fields_round_trip() {
    let s = Server::start().await;
    let raw = r#"{"userId": 42, "event": "Num", "properties": {"emoji": "🍕", "k": "\u00e9"}, "unknown": [1]}"#;
    assert_eq!(
        s.ingest_raw("/v1/track", raw.as_bytes().to_vec(), &[])
            .await
            .0,
        200
    );
    let ev = s.events("user_id:42", "type=track").await;
    assert_eq!(ev[0]["user_id"], "42");
    assert_eq!(ev[0]["properties"], json!({"emoji": "🍕", "k": "é"}));
}

#[tokio::test]
async fn overloaded_shards_answer_429_with_retry_after() {
    let s = Server::start_with(common::Opts {
        env: vec![("USER360_INGEST__SHARD_QUEUE_MESSAGES".into(), "1".into())],
        ..Default::default()
    })
    .await;
    // A batch larger than the whole queue cannot be admitted... unless the queue is empty:
    // admission lets one request through an empty queue, so fire many at once.
    let mut handles = Vec::new();
    for i in 0..40 {
        let http = s.http.clone();
        let url = format!("{}/v1/batch", s.url);
        let key = s.write_key.clone();
        handles.push(tokio::spawn(async move {
            let batch: Vec<Value> = (0..200)
                .map(|j| json!({"type": "track", "userId": format!("u{j}"), "event": "Load", "messageId": format!("o-{i}-{j}")}))
                .collect();
            let r = http.post(url).basic_auth(key, Some("")).json(&json!({"batch": batch})).send().await.unwrap();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), retry)
        }));
    }
    let mut saw_429 = false;
    for h in handles {
        let (st, retry) = h.await.unwrap();
        assert!(st == 200 || st == 429, "{st}");
        if st == 429 {
            saw_429 = true;
            assert_eq!(retry.as_deref(), Some("1"));
        }
    }
    assert!(saw_429, "a full shard queue must push back");
}
