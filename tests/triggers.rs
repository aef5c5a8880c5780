//! Triggers and streams over HTTP against the real server and a local webhook receiver:
//! signed deliveries, retries with backoff driven by the manual clock, order per profile,
//! exits for every way out, restarts with pending deliveries, a dead endpoint that ends in
//! `failed` without slowing ingest, re-queuing, `send_existing`, and the SSE stream.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::hook::{Hit, Hook};
use common::{Opts, Server};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

async fn ok(s: &Server, path: &str, body: Value) {
    let (st, v) = s.ingest(path, &body).await;
    assert_eq!(st, 200, "{path} {body}: {v}");
}

async fn segment(s: &Server, body: Value) {
    let (st, v) = s.admin("POST", "/v1/segments", Some(&body)).await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = s.get(&format!("/v1/segments/{id}")).await;
        if v["status"] == "ready" {
            return;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn trigger(s: &Server, body: Value) -> Value {
    let (st, v) = s.admin("POST", "/v1/triggers", Some(&body)).await;
    assert_eq!(st, 201, "{body}: {v}");
    v
}

/// Checks `X-User360-Signature` the way a receiver would.
fn verify(hit: &Hit, secret: &str) {
    let ts = hit.header("x-user360-timestamp");
    assert!(ts.parse::<i64>().is_ok(), "timestamp header: {ts:?}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.{}", hit.body).as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hit.header("x-user360-signature"),
        format!("sha256={want}"),
        "{hit:?}"
    );
    assert_eq!(
        hit.header("x-user360-delivery"),
        hit.json()["id"].as_str().unwrap()
    );
}

async fn deliveries(s: &Server, trigger: &str, status: &str) -> Vec<Value> {
    let (st, v) = s
        .get(&format!(
            "/v1/triggers/{trigger}/deliveries?status={status}"
        ))
        .await;
    assert_eq!(st, 200, "{v}");
    v["deliveries"].as_array().unwrap().clone()
}

/// Waits until the trigger's pending delivery of this type has made `n` attempts (the
/// outcome handled, so its retry timer is set before the test moves the clock).
async fn wait_attempts(s: &Server, trigger: &str, kind: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = deliveries(s, trigger, "").await;
        if d.iter()
            .any(|d| d["type"] == kind && d["attempts"].as_i64() >= Some(n))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{kind} never made {n} attempts: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_status(s: &Server, trigger: &str, status: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = deliveries(s, trigger, status).await;
        if d.len() >= n {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "{n} {status} deliveries of {trigger}: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn flaky_receiver_gets_signed_retries_in_order_and_one_success_each() {
    let s = Server::manual().await;
    // Every delivery fails twice (503, then a network-ish 500), then is accepted.
    let hook = Hook::start(Arc::new(
        |_, n| if n <= 2 { (503, None) } else { (200, None) },
    ))
    .await;
    segment(
        &s,
        json!({"id": "pro", "name": "Pro", "rule": {"trait": "plan", "op": "eq", "value": "pro"}}),
    )
    .await;
    let t = trigger(
        &s,
        json!({"id": "crm", "segment": "pro", "on": ["enter", "exit"], "url": hook.url,
                               "secret": "s3cret", "headers": {"X-Team": "growth"}}),
    )
    .await;
    assert!(t.get("secret").is_none(), "the secret is never shown: {t}");
    assert_eq!(t["on"], json!(["enter", "exit"]));
    // Enter, then exit right away: the exit waits for the enter.
    ok(
        &s,
        "/v1/identify",
        json!({"userId": "ana", "traits": {"plan": "pro", "city": "Pune"}}),
    )
    .await;
    ok(
        &s,
        "/v1/identify",
        json!({"userId": "ana", "traits": {"plan": "free"}}),
    )
    .await;
    let hits = hook.wait_for(1).await;
    assert_eq!(hits[0].json()["type"], "segment.entered");
    assert_eq!(hits[0].json()["attempt"], 1);
    wait_attempts(&s, "crm", "segment.entered", 1).await;
    // The exit waits while the enter waits for its retry (1 s, then about 2 s).
    assert_eq!(hook.hits().len(), 1);
    s.advance(1300).await;
    hook.wait_for(2).await;
    s.advance(2600).await;
    hook.wait_for(3).await;
    // The enter is delivered; now the exit goes, and fails twice too.
    hook.wait_for(4).await;
    wait_attempts(&s, "crm", "segment.exited", 1).await;
    s.advance(1300).await;
    s.advance(2600).await;
    let hits = hook.expect(6, Duration::from_millis(300)).await;
    let seq: Vec<(String, i64, u16)> = hits
        .iter()
        .map(|h| {
            let b = h.json();
            (
                b["type"].as_str().unwrap().to_owned(),
                b["attempt"].as_i64().unwrap(),
                h.status,
            )
        })
        .collect();
    assert_eq!(
        seq,
        vec![
            ("segment.entered".into(), 1, 503),
            ("segment.entered".into(), 2, 503),
            ("segment.entered".into(), 3, 200),
            ("segment.exited".into(), 1, 503),
            ("segment.exited".into(), 2, 503),
            ("segment.exited".into(), 3, 200),
        ]
    );
    for h in &hits {
        verify(h, "s3cret");
        assert_eq!(h.header("x-team"), "growth");
        assert_eq!(h.header("content-type"), "application/json");
    }
    // One id per change, the same on every attempt; the payload as API.md writes it.
    assert_eq!(hits[0].json()["id"], hits[2].json()["id"]);
    assert_ne!(hits[0].json()["id"], hits[3].json()["id"]);
    let enter = hits[0].json();
    assert_eq!(enter["reason"], "rule");
    assert_eq!(enter["segment"], json!({"id": "pro", "name": "Pro"}));
    assert_eq!(
        enter["profile"]["traits"]["plan"], "pro",
        "as right after the change: {enter}"
    );
    assert_eq!(enter["profile"]["identities"][0]["value"], "ana");
    assert!(enter["occurred_at"].is_string());
    let exit = hits[3].json();
    assert_eq!(exit["profile"]["traits"]["plan"], "free");
    let delivered = wait_status(&s, "crm", "delivered", 2).await;
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    for d in &delivered {
        assert_eq!(d["attempts"], 3, "{d}");
        assert_eq!(d["trigger"], "crm");
        assert!(d["delivered_at"].is_string(), "{d}");
    }
    assert!(deliveries(&s, "crm", "pending").await.is_empty());
}

#[tokio::test]
async fn exits_fire_for_every_way_out() {
    let s = Server::start_with(Opts {
        manual_clock: true,
        env: vec![("USER360_SHARDS".into(), "2".into())],
    })
    .await;
    let hook = Hook::ok().await;
    segment(
        &s,
        json!({"id": "buyers", "name": "Bought in the last day",
        "rule": {"event": "Order Completed", "within": {"days": 1}}}),
    )
    .await;
    trigger(
        &s,
        json!({"id": "t", "segment": "buyers", "on": ["enter", "exit"], "url": hook.url}),
    )
    .await;
    // rule: enters by an order, then (window) leaves a day later.
    ok(
        &s,
        "/v1/track",
        json!({"userId": "w", "event": "Order Completed"}),
    )
    .await;
    s.advance(86_400_000 + 10).await;
    // deleted: an erased member leaves, showing only its id and identities.
    ok(
        &s,
        "/v1/identify",
        json!({"userId": "d", "traits": {"secret_trait": "x"}}),
    )
    .await;
    ok(
        &s,
        "/v1/track",
        json!({"userId": "d", "event": "Order Completed"}),
    )
    .await;
    let hits = hook.wait_for(3).await;
    let d_id = hits[2].json()["profile"]["id"].as_str().unwrap().to_owned();
    let (st, _) = s.admin("DELETE", "/v1/profiles/user_id:d", None).await;
    assert_eq!(st, 204);
    // merged: an anonymous member merged into a known profile leaves with merged_into.
    ok(
        &s,
        "/v1/identify",
        json!({"userId": "m", "traits": {"plan": "pro"}}),
    )
    .await;
    ok(
        &s,
        "/v1/track",
        json!({"anonymousId": "anon-m", "event": "Order Completed"}),
    )
    .await;
    ok(
        &s,
        "/v1/alias",
        json!({"userId": "m", "previousId": "anon-m"}),
    )
    .await;
    // segment_changed: a PUT that no longer matches the survivor.
    let (st, v) = s
        .admin(
            "PUT",
            "/v1/segments/buyers",
            Some(
                &json!({"name": "Nobody", "rule": {"trait": "plan", "op": "eq", "value": "none"}}),
            ),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut hits;
    loop {
        hits = hook.hits();
        let changed = hits.iter().any(|h| h.json()["reason"] == "segment_changed");
        if changed || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got: Vec<(String, String)> = hits
        .iter()
        .map(|h| {
            let b = h.json();
            (
                b["type"].as_str().unwrap().to_owned(),
                b["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("segment.exited", "window"),
        ("segment.exited", "deleted"),
        ("segment.exited", "merged"),
        ("segment.exited", "segment_changed"),
    ] {
        assert!(
            got.iter().any(|(t, r)| t == want.0 && r == want.1),
            "no {want:?} in {got:?}"
        );
    }
    let deleted = hits
        .iter()
        .map(Hit::json)
        .find(|b| b["reason"] == "deleted")
        .unwrap();
    assert_eq!(deleted["profile"]["id"], d_id.as_str());
    assert!(deleted["profile"].get("traits").is_none(), "{deleted}");
    assert_eq!(
        deleted["profile"]["identities"][0]["value"], "d",
        "{deleted}"
    );
    let merged = hits
        .iter()
        .map(Hit::json)
        .find(|b| b["reason"] == "merged")
        .unwrap();
    let (_, survivor) = s.get("/v1/profiles/user_id:m").await;
    assert_eq!(merged["merged_into"], survivor["id"], "{merged}");
    assert!(merged["profile"].get("identities").is_none(), "{merged}");
}

#[tokio::test]
async fn pending_deliveries_are_sent_after_a_restart() {
    let mut s = Server::start().await;
    let _tmp = s.keep_dir();
    // A port nobody listens on yet.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    segment(
        &s,
        json!({"id": "all", "name": "All known", "rule": {"identity": "user_id", "op": "exists"}}),
    )
    .await;
    trigger(&s, json!({"id": "t", "segment": "all", "on": ["enter"], "url": format!("http://127.0.0.1:{port}/hook")})).await;
    for i in 0..5 {
        ok(&s, "/v1/identify", json!({"userId": format!("r{i}")})).await;
    }
    let pending = wait_status(&s, "t", "pending", 5).await;
    assert_eq!(pending.len(), 5);
    s.kill9();
    let hook = Hook::start_on(port, Arc::new(|_, _| (200, None))).await;
    let s = Server::start_in(&s.data_dir.clone(), Opts::default()).await;
    let hits = hook.wait_for(5).await;
    let mut users: Vec<String> = hits
        .iter()
        .map(|h| {
            h.json()["profile"]["identities"][0]["value"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    users.sort();
    users.dedup();
    assert_eq!(users, vec!["r0", "r1", "r2", "r3", "r4"]);
    let delivered = wait_status(&s, "t", "delivered", 5).await;
    assert_eq!(delivered.len(), 5);
    // The ends are logged: another restart sends nothing again.
    drop(s);
    let before = hook.hits().len();
    let _s = Server::start_in(&_tmp.as_ref().unwrap().path().join("data"), Opts::default()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        hook.hits().len() <= before + 5,
        "at most the unlogged tail again"
    );
}

#[tokio::test]
async fn a_dead_endpoint_ends_failed_without_slowing_ingest_and_can_be_requeued() {
    let s = Server::start_with(Opts {
        env: vec![
            ("USER360_TRIGGERS__MAX_ATTEMPTS".into(), "3".into()),
            ("USER360_TRIGGERS__FIRST_RETRY_MS".into(), "20".into()),
            ("USER360_TRIGGERS__TIMEOUT_MS".into(), "100".into()),
        ],
        ..Default::default()
    })
    .await;
    // Dead: accepts connections but never answers (each attempt times out).
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    let _hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = dead.accept().await {
            conns.push(c);
        }
    });
    let good = Hook::ok().await;
    segment(
        &s,
        json!({"id": "all", "name": "All", "rule": {"identity": "user_id", "op": "exists"}}),
    )
    .await;
    trigger(&s, json!({"id": "dead", "segment": "all", "on": ["enter"], "url": format!("http://127.0.0.1:{dead_port}/hook")})).await;
    trigger(
        &s,
        json!({"id": "good", "segment": "all", "on": ["enter"], "url": good.url}),
    )
    .await;
    // Ingest stays fast while the dead endpoint eats its attempts.
    let t0 = Instant::now();
    for i in 0..100 {
        ok(&s, "/v1/identify", json!({"userId": format!("x{i}")})).await;
    }
    let ingest = t0.elapsed();
    assert!(ingest < Duration::from_secs(5), "ingest took {ingest:?}");
    // The other trigger is not held back.
    good.wait_for(100).await;
    let failed = wait_status(&s, "dead", "failed", 100).await;
    for d in &failed {
        assert_eq!(d["attempts"], 3, "{d}");
        assert!(
            d["last_error"].as_str().unwrap().contains("timed out"),
            "{d}"
        );
    }
    // Re-queue one at a receiver that is alive now... the trigger's url is fixed, so the
    // retry fails again and comes back failed with one more attempt.
    let id = failed[0]["id"].as_str().unwrap();
    let (st, v) = s
        .admin(
            "POST",
            &format!("/v1/triggers/dead/deliveries/{id}/retry"),
            None,
        )
        .await;
    assert_eq!(st, 202, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = deliveries(&s, "dead", "failed").await;
        if all
            .iter()
            .any(|d| d["id"] == id && d["attempts"].as_i64() >= Some(4))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "re-queued delivery never failed again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only failed ones can be re-queued.
    let delivered = deliveries(&s, "good", "delivered").await;
    let (st, v) = s
        .admin(
            "POST",
            &format!(
                "/v1/triggers/good/deliveries/{}/retry",
                delivered[0]["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(st, 409, "{v}");
}

#[tokio::test]
async fn send_existing_queues_current_members_and_new_triggers_send_only_later_changes() {
    let s = Server::start().await;
    segment(
        &s,
        json!({"id": "vip", "name": "VIP", "rule": {"trait": "vip", "op": "eq", "value": true}}),
    )
    .await;
    for u in ["a", "b", "c"] {
        ok(
            &s,
            "/v1/identify",
            json!({"userId": u, "traits": {"vip": true}}),
        )
        .await;
    }
    let all = Hook::ok().await;
    let later = Hook::ok().await;
    trigger(&s, json!({"id": "backfill", "segment": "vip", "on": ["enter"], "url": all.url, "send_existing": true})).await;
    trigger(
        &s,
        json!({"id": "new-only", "segment": "vip", "on": ["enter"], "url": later.url}),
    )
    .await;
    let hits = all.expect(3, Duration::from_millis(300)).await;
    assert!(hits.iter().all(|h| h.json()["type"] == "segment.entered"));
    assert!(later.hits().is_empty());
    ok(
        &s,
        "/v1/identify",
        json!({"userId": "d", "traits": {"vip": true}}),
    )
    .await;
    later.expect(1, Duration::from_millis(300)).await;
    all.expect(4, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn trigger_definitions_are_validated_and_guard_their_segment() {
    let s = Server::start().await;
    segment(
        &s,
        json!({"id": "seg", "name": "S", "rule": {"trait": "x", "op": "exists"}}),
    )
    .await;
    for (body, status, path) in [
        (
            json!({"segment": "nope", "on": ["enter"], "url": "http://127.0.0.1:1/h"}),
            400,
            "segment",
        ),
        (
            json!({"segment": "seg", "on": [], "url": "http://127.0.0.1:1/h"}),
            400,
            "on",
        ),
        (
            json!({"segment": "seg", "on": ["enter", "leave"], "url": "http://127.0.0.1:1/h"}),
            400,
            "on[1]",
        ),
        (
            json!({"segment": "seg", "on": ["enter"], "url": "ftp://x/h"}),
            400,
            "url",
        ),
        (json!({"segment": "seg", "on": ["enter"]}), 400, "url"),
        (
            json!({"segment": "seg", "on": ["enter"], "url": "http://127.0.0.1:1/h", "colour": 1}),
            400,
            "colour",
        ),
        (
            json!({"segment": "seg", "on": ["enter"], "url": "http://127.0.0.1:1/h", "headers": {"X-A": 1}}),
            400,
            "headers[\"X-A\"]",
        ),
        (
            json!({"segment": "seg", "on": ["enter"], "url": "http://127.0.0.1:1/h", "headers": {"X-User360-Signature": "x"}}),
            400,
            "headers[\"X-User360-Signature\"]",
        ),
    ] {
        let (st, v) = s.admin("POST", "/v1/triggers", Some(&body)).await;
        assert_eq!(
            (st, v["path"].as_str()),
            (status, Some(path)),
            "{body}: {v}"
        );
        assert_eq!(v["code"], "invalid_rule", "{v}");
    }
    trigger(
        &s,
        json!({"id": "t1", "segment": "seg", "on": ["exit"], "url": "http://127.0.0.1:1/h"}),
    )
    .await;
    let (st, v) = s
        .admin("POST", "/v1/triggers", Some(&json!({"id": "t1", "segment": "seg", "on": ["exit"], "url": "http://127.0.0.1:1/h"})))
        .await;
    assert_eq!(st, 409, "{v}");
    let (st, v) = s.admin("DELETE", "/v1/segments/seg", None).await;
    assert_eq!(st, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("t1"), "{v}");
    let (_, v) = s.get("/v1/triggers").await;
    assert_eq!(v["triggers"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["triggers"][0]["on"], json!(["exit"]));
    let (st, _) = s.get("/v1/triggers/t1").await;
    assert_eq!(st, 200);
    let (st, _) = s.admin("DELETE", "/v1/triggers/t1", None).await;
    assert_eq!(st, 204);
    let (st, _) = s.get("/v1/triggers/t1").await;
    assert_eq!(st, 404);
    let (st, _) = s.get("/v1/triggers/t1/deliveries").await;
    assert_eq!(st, 404);
    let (st, _) = s.admin("DELETE", "/v1/segments/seg", None).await;
    assert_eq!(st, 204);
}

/// Reads SSE events (`event`, `id`, `data`) from a streaming response until `n` arrived.
async fn sse_events(resp: reqwest::Response, n: usize) -> Vec<(String, String, Value)> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("stream events in time")
            .expect("stream open")
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut ev, mut id, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    ev = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if !ev.is_empty() {
                out.push((ev, id, serde_json::from_str(&data).unwrap_or(Value::Null)));
            }
        }
    }
    out
}

#[tokio::test]
async fn the_stream_shows_entries_and_exits_as_they_happen_and_resumes() {
    let s = Server::start().await;
    segment(
        &s,
        json!({"id": "pro", "name": "Pro", "rule": {"trait": "plan", "op": "eq", "value": "pro"}}),
    )
    .await;
    let open = |last: Option<String>| {
        let mut req = s
            .http
            .get(format!("{}/v1/segments/pro/stream", s.url))
            .bearer_auth(&s.admin_token);
        if let Some(l) = last {
            req = req.header("last-event-id", l);
        }
        req.send()
    };
    let resp = open(None).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    ok(
        &s,
        "/v1/identify",
        json!({"userId": "s1", "traits": {"plan": "pro"}}),
    )
    .await;
    ok(
        &s,
        "/v1/identify",
        json!({"userId": "s1", "traits": {"plan": "free"}}),
    )
    .await;
    ok(
        &s,
        "/v1/identify",
        json!({"userId": "s2", "traits": {"plan": "pro"}}),
    )
    .await;
    let ev = sse_events(resp, 3).await;
    let kinds: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(kinds, vec!["entered", "exited", "entered"]);
    assert_eq!(ev[0].2["reason"], "rule");
    assert!(ev[0].2["profile_id"].is_string() && ev[0].2["occurred_at"].is_string());
    // Resuming after the first change replays the two after it.
    let resumed = sse_events(open(Some(ev[0].1.clone())).await.unwrap(), 2).await;
    assert_eq!(
        resumed.iter().map(|e| e.1.clone()).collect::<Vec<_>>(),
        vec![ev[1].1.clone(), ev[2].1.clone()]
    );
    // An id the buffer no longer has (or never had) starts with a reset.
    let reset = sse_events(open(Some("1".into())).await.unwrap(), 1).await;
    assert_eq!(reset[0].0, "reset");
    let (st, _) = s.get("/v1/segments/none/stream").await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn an_erased_members_queued_deliveries_go_out_without_its_traits() {
    let s = Server::start_with(Opts {
        env: vec![
            ("USER360_TRIGGERS__FIRST_RETRY_MS".into(), "50".into()),
            ("USER360_TRIGGERS__MAX_RETRY_MS".into(), "200".into()),
        ],
        ..Default::default()
    })
    .await;
    // The receiver is down (503) until the person has been erased.
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let d = down.clone();
    let hook = Hook::start(Arc::new(move |_, _| {
        if d.load(std::sync::atomic::Ordering::SeqCst) {
            (503, None)
        } else {
            (200, None)
        }
    }))
    .await;
    // Another receiver refuses the first attempt outright (400: failed at once, its
    // payload kept for re-queuing) and takes the next.
    let strict = Hook::start(Arc::new(
        |_, n| if n == 1 { (400, None) } else { (200, None) },
    ))
    .await;
    segment(
        &s,
        json!({"id": "all", "name": "All", "rule": {"identity": "user_id", "op": "exists"}}),
    )
    .await;
    trigger(
        &s,
        json!({"id": "crm", "segment": "all", "on": ["enter", "exit"], "url": hook.url}),
    )
    .await;
    trigger(
        &s,
        json!({"id": "strict", "segment": "all", "on": ["enter"], "url": strict.url}),
    )
    .await;
    ok(
        &s,
        "/v1/identify",
        json!({"userId": "secret", "traits": {"diary": "SECRET-DIARY", "plan": "pro"}}),
    )
    .await;
    let failed = wait_status(&s, "strict", "failed", 1).await;
    assert!(strict.hits()[0].body.contains("SECRET-DIARY"));
    ok(
        &s,
        "/v1/identify",
        json!({"userId": "kept", "traits": {"diary": "KEPT-DIARY"}}),
    )
    .await;
    // Queued with the traits: the failed attempts carried them.
    let first = hook.wait_for(2).await;
    assert!(first.iter().any(|h| h.body.contains("SECRET-DIARY")));
    let (_, p) = s.get("/v1/profiles/user_id:secret").await;
    let pid = p["id"].as_str().unwrap().to_owned();
    assert_eq!(
        s.admin("DELETE", "/v1/profiles/user_id:secret", None)
            .await
            .0,
        204
    );
    let (_, listed) = s.get("/v1/triggers/crm/deliveries").await;
    assert!(!listed.to_string().contains("SECRET"), "{listed}");
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    // Delivered: the erased person's entry (now without traits), then its exit; the other
    // person's entry whole.
    wait_status(&s, "crm", "delivered", 3).await;
    let sent: Vec<Value> = hook
        .hits()
        .iter()
        .filter(|h| h.status == 200)
        .map(Hit::json)
        .collect();
    let of = |id: &str| -> Vec<&Value> {
        sent.iter()
            .filter(|b| b["profile"]["id"] == id)
            .collect::<Vec<_>>()
    };
    let erased = of(&pid);
    assert_eq!(
        erased.iter().map(|b| b["type"].clone()).collect::<Vec<_>>(),
        vec![json!("segment.entered"), json!("segment.exited")],
        "{sent:?}"
    );
    for b in &erased {
        assert!(b["profile"].get("traits").is_none(), "{b}");
        assert!(!b.to_string().contains("SECRET"), "{b}");
    }
    assert_eq!(erased[1]["reason"], "deleted");
    let (_, kept) = s.get("/v1/profiles/user_id:kept").await;
    let kept = of(kept["id"].as_str().unwrap());
    assert_eq!(kept[0]["profile"]["traits"]["diary"], "KEPT-DIARY");
    // The failed delivery, re-queued after the erasure, goes out without the traits.
    let id = failed[0]["id"].as_str().unwrap();
    let (st, v) = s
        .admin(
            "POST",
            &format!("/v1/triggers/strict/deliveries/{id}/retry"),
            None,
        )
        .await;
    assert_eq!(st, 202, "{v}");
    let again = strict.wait_for(3).await;
    let resent: Vec<&Hit> = again.iter().filter(|h| h.json()["id"] == id).collect();
    assert_eq!(resent.len(), 2, "{again:?}");
    assert_eq!(resent[1].status, 200);
    assert_eq!(resent[1].json()["profile"]["id"], pid.as_str());
    assert!(!resent[1].body.contains("SECRET"), "{}", resent[1].body);
}

#[tokio::test]
async fn erasing_right_after_deliveries_never_sends_them_again() {
    // The erasure rewrites the person's queued deliveries; one that has just been
    // delivered (its end not yet logged by the shard) must not go out a second time.
    let s = Server::start().await;
    let hook = Hook::ok().await;
    segment(
        &s,
        json!({"id": "pro", "name": "Pro", "rule": {"trait": "plan", "op": "eq", "value": "pro"}}),
    )
    .await;
    trigger(
        &s,
        json!({"id": "sync", "segment": "pro", "on": ["enter", "exit"], "url": hook.url}),
    )
    .await;
    const PEOPLE: usize = 20;
    for plan in ["pro", "free", "pro"] {
        let batch: Vec<Value> = (0..PEOPLE)
            .map(|i| json!({"type": "identify", "userId": format!("p{i}"), "traits": {"plan": plan}}))
            .collect();
        ok(&s, "/v1/batch", json!({"batch": batch})).await;
    }
    hook.wait_for(3 * PEOPLE).await;
    let deletes: Vec<_> = (0..PEOPLE)
        .map(|i| {
            let (http, url, token) = (
                s.http.clone(),
                format!("{}/v1/profiles/user_id:p{i}", s.url),
                s.admin_token.clone(),
            );
            tokio::spawn(async move {
                http.delete(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for d in deletes {
        assert_eq!(d.await.unwrap(), 204);
    }
    // Each person: entered, exited, entered, then the erasure's exit; nothing twice.
    let hits = hook.expect(4 * PEOPLE, Duration::from_millis(1500)).await;
    let mut ids: Vec<String> = hits
        .iter()
        .map(|h| h.json()["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4 * PEOPLE);
    let exits = hits
        .iter()
        .filter(|h| h.json()["reason"] == "deleted")
        .count();
    assert_eq!(exits, PEOPLE);
}
