//! Profiles and events over HTTP: lookups by any key, trait rules, PATCH, erasure,
//! standard events, timelines, the global query and paging.

mod common;

use common::{Server, identity_set, ids, names};
use serde_json::{Value, json};

#[tokio::test]
async fn profile_found_by_every_key_with_normalisation() {
    let s = Server::start().await;
    let (st, _) = s
        .ingest(
            "/v1/identify",
            &json!({"userId": "u-42", "anonymousId": "a-1", "traits": {"email": " Ana@Example.com ", "phone": "+1 (555) 010-2030"},
                    "context": {"externalIds": [{"id": "C-9", "type": "crm_id"}]}}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, p) = s.get("/v1/profiles/user_id:u-42").await;
    assert_eq!(st, 200, "{p}");
    let id = p["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 26);
    assert_eq!(
        identity_set(&p),
        ids(&[
            ("user_id", "u-42"),
            ("anonymous_id", "a-1"),
            ("email", "ana@example.com"),
            ("phone", "+15550102030"),
            ("crm_id", "C-9")
        ])
    );
    for key in [
        "email:Ana%40Example.COM".to_owned(),
        "phone:%2B15550102030".to_owned(),
        "anonymous_id:a-1".to_owned(),
        "crm_id:C-9".to_owned(),
        format!("id:{id}"),
    ] {
        let (st, q) = s.get(&format!("/v1/profiles/{key}")).await;
        assert_eq!((st, q["id"].as_str()), (200, Some(id.as_str())), "{key}");
    }
    for key in [
        "user_id:nobody",
        "id:01ABCDEFGHJKMNPQRSTVWXYZ00",
        "email:",
        "crm_id:c-9",
    ] {
        let (st, v) = s.get(&format!("/v1/profiles/{key}")).await;
        assert_eq!((st, v["code"].as_str()), (404, Some("not_found")), "{key}");
    }
    let (st, v) = s.get("/v1/profiles/no-colon").await;
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_field")));
    for field in ["created_at", "updated_at", "first_seen", "last_seen"] {
        assert!(p[field].as_str().unwrap().ends_with('Z'), "{field}");
    }
    assert_eq!(p["segments"], json!([]));
    assert_eq!(p["merged_from"], json!([]));
}

#[tokio::test]
async fn late_events_never_overwrite_newer_traits_and_null_unsets() {
    let s = Server::start().await;
    let send = |ts: &str, traits: Value, mid: &str| json!({"userId": "u1", "traits": traits, "timestamp": ts, "messageId": mid});
    s.ingest(
        "/v1/identify",
        &send(
            "2026-01-10T00:00:00Z",
            json!({"plan": "pro", "seats": 5}),
            "a",
        ),
    )
    .await;
    s.ingest(
        "/v1/identify",
        &send(
            "2026-01-05T00:00:00Z",
            json!({"plan": "free", "color": "red"}),
            "b",
        ),
    )
    .await;
    let (_, p) = s.get("/v1/profiles/user_id:u1").await;
    assert_eq!(
        p["traits"],
        json!({"plan": "pro", "seats": 5, "color": "red"})
    );
    s.ingest(
        "/v1/identify",
        &send("2026-01-11T00:00:00Z", json!({"seats": null}), "c"),
    )
    .await;
    // An older set after the unset stays ignored (the unset is remembered).
    s.ingest(
        "/v1/identify",
        &send("2026-01-09T00:00:00Z", json!({"seats": 9}), "d"),
    )
    .await;
    let (_, p) = s.get("/v1/profiles/user_id:u1").await;
    assert_eq!(p["traits"], json!({"plan": "pro", "color": "red"}));
    assert_eq!(p["first_seen"], "2026-01-05T00:00:00.000Z");
    assert_eq!(p["last_seen"], "2026-01-11T00:00:00.000Z");
    // Standard events: one user.created, and user.updated with changes for real changes only.
    let sys = s.events("user_id:u1", "type=system&limit=1000").await;
    let created = sys.iter().filter(|e| e["event"] == "user.created").count();
    let updates: Vec<&Value> = sys
        .iter()
        .filter(|e| e["event"] == "user.updated")
        .collect();
    assert_eq!(created, 1);
    assert_eq!(updates.len(), 3, "{sys:?}");
    assert!(
        updates
            .iter()
            .any(|u| u["properties"]["changes"]["seats"] == json!({"from": 5, "to": null}))
    );
    // identify with traits null or without traits changes nothing.
    s.ingest("/v1/identify", &json!({"userId": "u1", "traits": null}))
        .await;
    s.ingest("/v1/identify", &json!({"userId": "u1"})).await;
    assert_eq!(s.events("user_id:u1", "name=user.updated").await.len(), 3);
}

#[tokio::test]
async fn identify_reads_context_traits_overlaid_by_traits() {
    let s = Server::start().await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "u1", "context": {"traits": {"plan": "free", "email": "c@x.com", "name": "C"}}, "traits": {"plan": "pro"}}),
    )
    .await;
    let (_, p) = s.get("/v1/profiles/user_id:u1").await;
    assert_eq!(
        p["traits"],
        json!({"plan": "pro", "email": "c@x.com", "name": "C"})
    );
    assert_eq!(s.get("/v1/profiles/email:c%40x.com").await.0, 200);
    // context.traits of a track call give identities but never traits.
    s.ingest("/v1/track", &json!({"userId": "u1", "event": "E", "context": {"traits": {"email": "d@x.com", "plan": "x"}}})).await;
    let (_, p) = s.get("/v1/profiles/email:d%40x.com").await;
    assert_eq!(p["traits"]["plan"], "pro");
}

#[tokio::test]
async fn patch_traits_creates_links_and_answers_the_profile() {
    let s = Server::start().await;
    let (st, p) = s
        .admin(
            "PATCH",
            "/v1/profiles/user_id:crm-1/traits",
            Some(&json!({"plan": "pro", "email": "Pat@X.com"})),
        )
        .await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(p["traits"], json!({"plan": "pro", "email": "Pat@X.com"}));
    assert_eq!(
        identity_set(&p),
        ids(&[("user_id", "crm-1"), ("email", "pat@x.com")])
    );
    // PATCH wins over an older message time: it uses max(now, key time).
    s.ingest("/v1/identify", &json!({"userId": "crm-1", "traits": {"plan": "free"}, "timestamp": "2090-01-01T00:00:00Z"})).await;
    let (st, p) = s
        .admin(
            "PATCH",
            "/v1/profiles/email:pat%40x.com/traits",
            Some(&json!({"plan": null, "seats": 3})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(p["traits"], json!({"email": "Pat@X.com", "seats": 3}));
    // Bad bodies and unknown ids.
    let (st, v) = s
        .admin(
            "PATCH",
            "/v1/profiles/user_id:crm-1/traits",
            Some(&json!([1])),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_field")));
    let (st, _) = s
        .admin(
            "PATCH",
            "/v1/profiles/id:01ABCDEFGHJKMNPQRSTVWXYZ00/traits",
            Some(&json!({"a": 1})),
        )
        .await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn too_many_traits_is_rejected_not_truncated() {
    let s = Server::start_with(common::Opts {
        env: vec![("USER360_INGEST__MAX_TRAIT_KEYS".into(), "3".into())],
        ..Default::default()
    })
    .await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "u1", "traits": {"a": 1, "b": 2}}),
    )
    .await;
    let (st, v) = s
        .ingest(
            "/v1/identify",
            &json!({"userId": "u1", "traits": {"c": 3, "d": 4}}),
        )
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("too_many_traits")),
        "{v}"
    );
    let b = json!({"batch": [{"type": "identify", "userId": "u1", "traits": {"e": 5, "f": 6}}, {"type": "identify", "userId": "u1", "traits": {"c": 3}}]});
    let (_, v) = s.ingest("/v1/batch", &b).await;
    assert_eq!(v["accepted"], 1);
    assert_eq!(v["rejected"][0]["code"], "too_many_traits");
    let (_, p) = s.get("/v1/profiles/user_id:u1").await;
    assert_eq!(p["traits"], json!({"a": 1, "b": 2, "c": 3}));
    // A rejected message that would have created a profile leaves none behind.
    let (st, _) = s
        .ingest(
            "/v1/identify",
            &json!({"userId": "u2", "traits": {"a": 1, "b": 2, "c": 3, "d": 4}}),
        )
        .await;
    assert_eq!(st, 400);
    assert_eq!(s.get("/v1/profiles/user_id:u2").await.0, 404);
}

#[tokio::test]
async fn delete_erases_from_every_read_and_logs_user_deleted() {
    let s = Server::start().await;
    s.ingest("/v1/track", &json!({"userId": "gone", "anonymousId": "a-gone", "event": "Bye", "timestamp": "2099-01-01T00:00:00Z"})).await;
    s.ingest("/v1/track", &json!({"userId": "stays", "event": "Hi"}))
        .await;
    let (_, p) = s.get("/v1/profiles/user_id:gone").await;
    let id = p["id"].as_str().unwrap().to_owned();
    // The far-future event is found by a query whose window covers it...
    let wide = "/v1/events?name=Bye&since=2000-01-01T00:00:00Z&until=2100-01-01T00:00:00Z";
    let (_, before) = s.get(wide).await;
    assert_eq!(before["events"].as_array().unwrap().len(), 1, "{before}");
    let (st, _) = s
        .admin("DELETE", "/v1/profiles/anonymous_id:a-gone", None)
        .await;
    assert_eq!(st, 204);
    for key in ["user_id:gone", "anonymous_id:a-gone", &format!("id:{id}")] {
        assert_eq!(s.get(&format!("/v1/profiles/{key}")).await.0, 404, "{key}");
    }
    assert_eq!(
        s.admin("DELETE", "/v1/profiles/user_id:gone", None).await.0,
        404
    );
    // ...and by none after the erasure, nor by an event export.
    let (_, all) = s.get(wide).await;
    assert_eq!(all["events"], json!([]));
    let r = s
        .http
        .get(format!("{}/v1/export/events?format=jsonl", s.url))
        .bearer_auth(&s.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let export = r.text().await.unwrap();
    assert!(export.contains("\"Hi\""), "{export}");
    assert!(
        !export.contains("\"Bye\"") && !export.contains("a-gone"),
        "{export}"
    );
    assert_eq!(s.all_profiles().await.len(), 1);
    let (_, sys) = s.get("/v1/events?type=system&name=user.deleted").await;
    let deleted = sys["events"].as_array().unwrap();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0]["properties"], json!({"profile_id": id}));
    // A later message with the same ids creates a new person.
    s.ingest("/v1/track", &json!({"userId": "gone", "event": "Back"}))
        .await;
    let (st, p2) = s.get("/v1/profiles/user_id:gone").await;
    assert_eq!(st, 200);
    assert_ne!(p2["id"].as_str().unwrap(), id);
    assert_eq!(
        names(&s.events("user_id:gone", "type=track").await),
        vec!["Back"]
    );
}

#[tokio::test]
async fn timeline_filters_order_and_stable_paging() {
    let s = Server::start().await;
    let mut batch = Vec::new();
    for i in 0..25 {
        let name = if i % 2 == 0 { "Even" } else { "Odd" };
        batch.push(json!({"type": "track", "userId": "u1", "event": name, "properties": {"i": i},
                          "timestamp": format!("2026-03-01T00:00:{:02}Z", i), "messageId": format!("t-{i}")}));
    }
    // Two events at the same timestamp: arrival order breaks the tie.
    batch.push(json!({"type": "page", "userId": "u1", "name": "Tie", "timestamp": "2026-03-01T00:00:24Z", "messageId": "tie"}));
    s.ingest("/v1/batch", &json!({"batch": batch})).await;
    let all = s.events("user_id:u1", "type=track&limit=1000").await;
    assert_eq!(all.len(), 25);
    let order: Vec<i64> = all
        .iter()
        .map(|e| e["properties"]["i"].as_i64().unwrap())
        .collect();
    assert_eq!(order, (0..25).rev().collect::<Vec<_>>());
    let evens = s.events("user_id:u1", "name=Even").await;
    assert_eq!(evens.len(), 13);
    let window = s
        .events(
            "user_id:u1",
            "type=track&since=2026-03-01T00:00:05Z&until=2026-03-01T00:00:10Z",
        )
        .await;
    assert_eq!(window.len(), 5);
    let newest = s
        .events("user_id:u1", "limit=2&until=2026-03-01T00:00:25Z")
        .await;
    assert_eq!(newest[0]["event"], "Page Viewed");
    assert_eq!(newest[0]["properties"]["name"], "Tie");
    assert_eq!(newest[1]["message_id"], "t-24");
    // Paging: walk with limit 4 while more events arrive; each old event appears once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    let mut extra = 0;
    loop {
        let (st, v) = s
            .get(&format!(
                "/v1/profiles/user_id:u1/events?type=track&limit=4&cursor={cursor}"
            ))
            .await;
        assert_eq!(st, 200);
        for e in v["events"].as_array().unwrap() {
            seen.push(e["message_id"].as_str().unwrap().to_owned());
        }
        if extra < 3 {
            s.ingest("/v1/track", &json!({"userId": "u1", "event": "Late", "timestamp": "2026-03-02T00:00:00Z", "messageId": format!("late-{extra}")})).await;
            extra += 1;
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..25).rev().map(|i| format!("t-{i}")).collect();
    expected.sort();
    let mut got: Vec<String> = seen
        .iter()
        .filter(|m| m.starts_with("t-"))
        .cloned()
        .collect();
    got.sort();
    assert_eq!(got, expected);
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("since=yesterday", "since"),
        ("type=click", "type"),
        ("cursor=zz", "cursor"),
    ] {
        let (st, v) = s.get(&format!("/v1/profiles/user_id:u1/events?{q}")).await;
        assert_eq!((st, v["path"].as_str()), (400, Some(field)), "{q}: {v}");
    }
}

#[tokio::test]
async fn global_events_query_with_where_conditions() {
    let s = Server::manual().await;
    let mut batch = Vec::new();
    for i in 0..30 {
        batch.push(json!({"type": "track", "userId": format!("u{}", i % 5), "event": "Order", "properties": {"total": i, "currency": if i % 3 == 0 {"EUR"} else {"USD"}}, "messageId": format!("o-{i}")}));
    }
    batch.push(json!({"type": "track", "userId": "old", "event": "Order", "properties": {"total": 100}, "timestamp": "2020-01-01T00:00:00Z"}));
    s.ingest("/v1/batch", &json!({"batch": batch})).await;
    let w = urlencode(&json!([{"property": "total", "op": "gte", "value": 20}, {"property": "currency", "op": "eq", "value": "USD"}]).to_string());
    let (st, v) = s
        .get(&format!("/v1/events?name=Order&where={w}&limit=1000"))
        .await;
    assert_eq!(st, 200, "{v}");
    let got = v["events"].as_array().unwrap();
    // 20..29 with currency USD: 20,22,23,25,26,28,29 (21,24,27 are EUR). The 2020 order is
    // outside the default 7-day window.
    assert_eq!(got.len(), 7);
    assert!(
        got.iter()
            .all(|e| e["profile_id"].as_str().unwrap().len() == 26)
    );
    // Paging through where-filtered results.
    let (_, p1) = s
        .get(&format!("/v1/events?name=Order&where={w}&limit=4"))
        .await;
    assert_eq!(p1["events"].as_array().unwrap().len(), 4);
    let c = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = s
        .get(&format!(
            "/v1/events?name=Order&where={w}&limit=4&cursor={c}"
        ))
        .await;
    assert_eq!(p2["events"].as_array().unwrap().len(), 3);
    assert_eq!(p2["next_cursor"], Value::Null);
    let (_, old) = s
        .get("/v1/events?name=Order&since=2019-01-01T00:00:00Z&limit=1000")
        .await;
    assert_eq!(old["events"].as_array().unwrap().len(), 31);
    let bad = urlencode(&json!([{"property": "total", "op": "equals", "value": 1}]).to_string());
    let (st, v) = s.get(&format!("/v1/events?where={bad}")).await;
    assert_eq!(
        (st, v["code"].as_str(), v["path"].as_str()),
        (400, Some("invalid_rule"), Some("where[0].op")),
        "{v}"
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn profiles_listing_pages_by_ascending_id() {
    let s = Server::start().await;
    let batch: Vec<Value> = (0..57)
        .map(|i| json!({"type": "identify", "userId": format!("p{i}")}))
        .collect();
    s.ingest("/v1/batch", &json!({"batch": batch})).await;
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let (_, v) = s
            .get(&format!("/v1/profiles?limit=10&cursor={cursor}"))
            .await;
        for p in v["profiles"].as_array().unwrap() {
            all.push(p["id"].as_str().unwrap().to_owned());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    assert_eq!(all.len(), 57);
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(all, sorted);
}

#[tokio::test]
async fn retention_drops_old_events_as_the_clock_moves() {
    let s = Server::start_with(common::Opts {
        manual_clock: true,
        env: vec![
            ("USER360_EVENTS__RETENTION_DAYS".into(), "2".into()),
            ("USER360_EVENTS__MAX_PER_PROFILE".into(), "5".into()),
        ],
    })
    .await;
    for i in 0..8 {
        s.ingest(
            "/v1/track",
            &json!({"userId": "u1", "event": format!("E{i}")}),
        )
        .await;
    }
    assert_eq!(
        s.events("user_id:u1", "type=track").await.len(),
        5,
        "max_per_profile keeps the newest"
    );
    s.advance(3 * 86_400_000).await;
    assert_eq!(
        s.events("user_id:u1", "type=track").await.len(),
        0,
        "retention by received_at"
    );
    assert_eq!(
        s.get("/v1/profiles/user_id:u1").await.0,
        200,
        "the profile itself stays"
    );
}

#[tokio::test]
async fn delete_with_suppress_refuses_later_messages_across_restarts() {
    let mut s = Server::start().await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "erased", "anonymousId": "a-er", "traits": {"email": "er@x.com"}}),
    )
    .await;
    s.ingest("/v1/identify", &json!({"userId": "plain"})).await;
    assert_eq!(
        s.admin("DELETE", "/v1/profiles/user_id:erased?suppress=true", None)
            .await
            .0,
        204
    );
    assert_eq!(
        s.admin("DELETE", "/v1/profiles/user_id:plain?suppress=maybe", None)
            .await
            .0,
        400
    );
    assert_eq!(
        s.admin("DELETE", "/v1/profiles/user_id:plain", None)
            .await
            .0,
        204
    );
    // A queued resend carrying any of the erased identities: 200, rejected as suppressed.
    for msg in [
        json!({"userId": "erased", "event": "Resent"}),
        json!({"anonymousId": "a-er", "event": "Resent"}),
        json!({"userId": "someone-new", "event": "Resent", "context": {"traits": {"email": "ER@x.com"}}}),
    ] {
        let (st, v) = s.ingest("/v1/track", &msg).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["accepted"], 0);
        assert_eq!(v["rejected"][0]["code"], "suppressed", "{v}");
    }
    let (_, v) = s
        .ingest(
            "/v1/alias",
            &json!({"userId": "x-new", "previousId": "a-er"}),
        )
        .await;
    assert_eq!(v["rejected"][0]["code"], "suppressed");
    // Nor does a PATCH bring them back: by their key, or by their email given to someone.
    for (key, body, path) in [
        ("user_id:erased", json!({"a": 1}), "key"),
        ("anonymous_id:a-er", json!({"a": 1}), "key"),
        ("user_id:fresh", json!({"email": "Er@X.com"}), "email"),
    ] {
        let (st, v) = s
            .admin("PATCH", &format!("/v1/profiles/{key}/traits"), Some(&body))
            .await;
        assert_eq!(
            (st, &v["code"], &v["path"]),
            (400, &json!("suppressed"), &json!(path)),
            "{key}: {v}"
        );
        assert!(
            v["message"].as_str().unwrap().contains("suppression"),
            "{v}"
        );
    }
    assert_eq!(s.get("/v1/profiles/user_id:fresh").await.0, 404);
    assert_eq!(s.get("/v1/profiles/email:er@x.com").await.0, 404);
    // Without suppress, the person can come back.
    assert_eq!(
        s.ingest("/v1/track", &json!({"userId": "plain", "event": "Back"}))
            .await
            .1["accepted"],
        1
    );
    assert_eq!(s.get("/v1/profiles/user_id:erased").await.0, 404);
    // Suppression survives a restart through the log and through a snapshot.
    let tmp = s.keep_dir();
    s.kill9();
    let mut s2 = Server::start_in(&s.data_dir, common::Opts::default()).await;
    assert_eq!(
        s2.ingest("/v1/track", &json!({"userId": "erased", "event": "R"}))
            .await
            .1["rejected"][0]["code"],
        "suppressed"
    );
    s2.terminate();
    let s3 = Server::start_in(&s.data_dir, common::Opts::default()).await;
    assert_eq!(
        s3.ingest("/v1/track", &json!({"userId": "erased", "event": "R"}))
            .await
            .1["rejected"][0]["code"],
        "suppressed"
    );
    drop(tmp);
}

#[tokio::test]
async fn wrong_methods_and_unlabelled_gzip_get_json_errors() {
    let s = Server::start().await;
    let (st, v) = s
        .admin("PATCH", "/v1/profiles/user_id:u1", Some(&json!({"a": 1})))
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{v}"
    );
    let (st, v) = s
        .ingest_raw(
            "/v1/track",
            common::gzip(br#"{"userId":"u","event":"E"}"#),
            &[],
        )
        .await;
    assert_eq!(st, 400);
    assert!(
        v["message"].as_str().unwrap().contains("Content-Encoding"),
        "{v}"
    );
    assert_eq!(v["path"], Value::Null);
}

#[tokio::test]
async fn paths_and_queries_that_are_not_utf8_get_json_errors_naming_them() {
    let s = Server::start().await;
    for (method, path, named) in [
        ("DELETE", "/v1/profiles/user_id:%FF", "path"),
        ("GET", "/v1/profiles/user_id:%C3%28", "path"),
        ("GET", "/v1/mappings/%FF", "path"),
        ("GET", "/v1/segments/%FF/members", "path"),
        (
            "GET",
            "/v1/export/profiles?format=csv&fields=traits.%FF",
            "fields",
        ),
        ("GET", "/v1/events?name=%FF", "name"),
        ("GET", "/v1/profiles?limit=%FF", "limit"),
    ] {
        let (st, v) = s.admin(method, path, None).await;
        assert_eq!(st, 400, "{method} {path}: {v}");
        assert_eq!(v["code"], "invalid_field", "{path}: {v}");
        assert_eq!(v["path"], named, "{path}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("UTF-8"),
            "{path}: {v}"
        );
    }
}
