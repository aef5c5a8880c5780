//! Profile merges over HTTP: a message carrying identities of two profiles merges them into
//! the older one, across shards, atomically for readers and writers, and durably.

mod common;

use common::{Opts, Server, identity_set, ids, names};
use serde_json::{Value, json};

fn four_shards() -> Opts {
    Opts {
        env: vec![("USER360_SHARDS".into(), "4".into())],
        ..Default::default()
    }
}

async fn id_of(s: &Server, key: &str) -> String {
    let (st, p) = s.get(&format!("/v1/profiles/{key}")).await;
    assert_eq!(st, 200, "{key}: {p}");
    p["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn identify_merges_two_profiles_into_the_older_across_restarts() {
    let mut s = Server::start_with(four_shards()).await;
    // Several pairs, so at least some land on different shards.
    for n in 0..8 {
        s.ingest("/v1/track", &json!({"anonymousId": format!("anon-{n}"), "event": "Browsed", "timestamp": "2026-01-01T00:00:00Z", "messageId": format!("b-{n}")})).await;
        s.ingest("/v1/identify", &json!({"anonymousId": format!("anon-{n}"), "traits": {"plan": "trial", "color": "red"}, "timestamp": "2026-01-01T00:00:01Z"})).await;
        s.ingest("/v1/identify", &json!({"userId": format!("user-{n}"), "traits": {"plan": "pro", "email": format!("u{n}@x.com")}, "timestamp": "2026-01-02T00:00:00Z"})).await;
        s.ingest(
            "/v1/track",
            &json!({"userId": format!("user-{n}"), "event": "Paid", "messageId": format!("p-{n}")}),
        )
        .await;
    }
    let older: Vec<String> = futures_ids(&s, "anonymous_id:anon-").await;
    let newer: Vec<String> = futures_ids(&s, "user_id:user-").await;
    for n in 0..8 {
        let (st, v) = s
            .ingest(
                "/v1/identify",
                &json!({"anonymousId": format!("anon-{n}"), "userId": format!("user-{n}")}),
            )
            .await;
        assert_eq!((st, v["accepted"].clone()), (200, json!(1)));
    }
    check(&s, &older, &newer).await;
    // New events for either key land on the survivor.
    s.ingest("/v1/track", &json!({"userId": "user-3", "event": "After"}))
        .await;
    assert_eq!(s.events("anonymous_id:anon-3", "type=track").await.len(), 3);
    let tmp = s.keep_dir();
    s.kill9();
    let mut s2 = Server::start_in(&s.data_dir, four_shards()).await;
    check(&s2, &older, &newer).await;
    s2.admin("POST", "/v1/admin/snapshots", None).await;
    s2.terminate();
    let s3 = Server::start_in(&s.data_dir, four_shards()).await;
    check(&s3, &older, &newer).await;
    assert_eq!(s3.events("user_id:user-3", "type=track").await.len(), 3);
    drop(tmp);
}

async fn check(s: &Server, older: &[String], newer: &[String]) {
    assert_eq!(
        s.all_profiles().await.len(),
        8,
        "every pair became one profile"
    );
    for n in 0..8 {
        // The older survives; created in the same millisecond, the smaller id (ids are
        // time-ordered, so that is the older one whenever the times differ).
        let (survivor, absorbed) = if older[n] < newer[n] {
            (&older[n], &newer[n])
        } else {
            (&newer[n], &older[n])
        };
        let (_, p) = s.get(&format!("/v1/profiles/user_id:user-{n}")).await;
        assert_eq!(p["id"], json!(survivor), "the older profile survives");
        assert_eq!(
            identity_set(&p),
            ids(&[
                ("anonymous_id", &format!("anon-{n}")),
                ("user_id", &format!("user-{n}")),
                ("email", &format!("u{n}@x.com"))
            ])
        );
        assert_eq!(
            p["traits"],
            json!({"plan": "pro", "color": "red", "email": format!("u{n}@x.com")}),
            "newest-wins by trait time"
        );
        assert_eq!(p["merged_from"], json!([absorbed]));
        let (st, q) = s.get(&format!("/v1/profiles/id:{absorbed}")).await;
        assert_eq!(
            (st, &q["id"]),
            (200, &p["id"]),
            "the absorbed id resolves to the survivor"
        );
        let tracks: Vec<String> = names(
            &s.events(&format!("anonymous_id:anon-{n}"), "type=track")
                .await,
        )
        .into_iter()
        .filter(|e| e != "After")
        .collect();
        assert_eq!(tracks, vec!["Paid", "Browsed"]);
        let merged = s
            .events(&format!("user_id:user-{n}"), "name=user.merged")
            .await;
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0]["properties"]["merged_from"], json!([absorbed]));
        let (_, m) = s
            .get(&format!("/v1/profiles/user_id:user-{n}/merges"))
            .await;
        assert_eq!(m["merges"].as_array().unwrap().len(), 1, "{m}");
        assert_eq!(m["merges"][0]["absorbed"], json!(absorbed));
    }
}

async fn futures_ids(s: &Server, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for n in 0..8 {
        out.push(id_of(s, &format!("{prefix}{n}")).await);
    }
    out
}

#[tokio::test]
async fn a_merge_while_8_clients_send_events_for_both_sides_loses_nothing() {
    let s = Server::start_with(four_shards()).await;
    s.ingest(
        "/v1/track",
        &json!({"anonymousId": "dev-1", "event": "Start", "messageId": "start-a"}),
    )
    .await;
    s.ingest(
        "/v1/track",
        &json!({"userId": "crm-1", "event": "Start", "messageId": "start-b"}),
    )
    .await;
    let mut tasks = Vec::new();
    for c in 0..8 {
        let http = s.http.clone();
        let url = s.url.clone();
        let key = s.write_key.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = 0;
            for i in 0..60 {
                let body: Value = if (c + i) % 2 == 0 {
                    json!({"anonymousId": "dev-1", "event": "Side A", "messageId": format!("a-{c}-{i}")})
                } else {
                    json!({"userId": "crm-1", "event": "Side B", "messageId": format!("b-{c}-{i}")})
                };
                let r = http.post(format!("{url}/v1/track")).basic_auth(&key, Some("")).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                acked += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let (st, _) = s
        .ingest(
            "/v1/alias",
            &json!({"previousId": "dev-1", "userId": "crm-1"}),
        )
        .await;
    assert_eq!(st, 200);
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let a = id_of(&s, "anonymous_id:dev-1").await;
    let b = id_of(&s, "user_id:crm-1").await;
    assert_eq!(a, b, "one profile after the alias");
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let (_, v) = s
            .get(&format!(
                "/v1/profiles/user_id:crm-1/events?type=track&limit=1000&cursor={cursor}"
            ))
            .await;
        for e in v["events"].as_array().unwrap() {
            assert!(
                seen.insert(e["message_id"].as_str().unwrap().to_owned()),
                "applied twice: {}",
                e["message_id"]
            );
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    assert_eq!(
        seen.len(),
        total + 2,
        "every acknowledged event is on the merged profile"
    );
    assert_eq!(s.all_profiles().await.len(), 1);
}

#[tokio::test]
async fn limits_stop_merges_of_two_known_users() {
    let s = Server::start().await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "u-a", "anonymousId": "shared"}),
    )
    .await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "u-b", "traits": {"email": "b@x.com"}}),
    )
    .await;
    // email b@x.com is u-b's; anonymous "shared" is u-a's: joining would give two user_ids.
    s.ingest(
        "/v1/identify",
        &json!({"anonymousId": "shared", "traits": {"email": "b@x.com"}}),
    )
    .await;
    assert_eq!(s.all_profiles().await.len(), 2);
    let a = id_of(&s, "user_id:u-a").await;
    let b = id_of(&s, "user_id:u-b").await;
    assert_ne!(a, b);
    assert_eq!(id_of(&s, "anonymous_id:shared").await, a);
    assert_eq!(id_of(&s, "email:b%40x.com").await, b);
}

#[tokio::test]
async fn windowed_limits_count_only_identities_first_seen_within_the_window() {
    let s = Server::start_with(Opts {
        manual_clock: true,
        env: vec![(
            "USER360_IDENTITY__LIMITS".into(),
            "{email={max=2,per=\"7d\"}}".into(),
        )],
    })
    .await;
    for (i, e) in ["a@x.com", "b@x.com", "c@x.com"].iter().enumerate() {
        s.ingest(
            "/v1/identify",
            &json!({"userId": "w", "traits": {"email": e}, "messageId": format!("w{i}")}),
        )
        .await;
    }
    let (_, p) = s.get("/v1/profiles/user_id:w").await;
    let emails = |p: &Value| {
        identity_set(p)
            .into_iter()
            .filter(|(t, _)| t == "email")
            .count()
    };
    assert_eq!(emails(&p), 2, "the third email within 7 days is not linked");
    s.advance(8 * 86_400_000).await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "w", "traits": {"email": "d@x.com"}, "messageId": "w4"}),
    )
    .await;
    let (_, p) = s.get("/v1/profiles/user_id:w").await;
    assert_eq!(
        emails(&p),
        3,
        "older identities no longer count against the window"
    );
    let (_, m) = common::split(
        s.http
            .get(format!("{}/metrics", s.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(
        m.as_str()
            .unwrap()
            .contains("user360_identities_dropped_total 1")
    );
}

#[tokio::test]
async fn patch_with_an_email_held_elsewhere_merges_under_the_same_rules() {
    let s = Server::start_with(four_shards()).await;
    s.ingest("/v1/track", &json!({"anonymousId": "a1", "event": "Seen"}))
        .await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "u2", "traits": {"email": "e2@x.com", "plan": "pro"}}),
    )
    .await;
    let p1 = id_of(&s, "anonymous_id:a1").await;
    let (st, p) = s
        .admin(
            "PATCH",
            "/v1/profiles/anonymous_id:a1/traits",
            Some(&json!({"email": "E2@x.com"})),
        )
        .await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(s.all_profiles().await.len(), 1);
    assert_eq!(
        identity_set(&p),
        ids(&[
            ("anonymous_id", "a1"),
            ("user_id", "u2"),
            ("email", "e2@x.com")
        ])
    );
    assert_eq!(id_of(&s, "user_id:u2").await, p["id"].as_str().unwrap());
    assert!(p["id"].as_str().unwrap() == p1 || p["merged_from"].as_array().unwrap().len() == 1);
    assert_eq!(p["traits"]["plan"], "pro");
    // Two known users: the key's profile is patched, the email is not linked.
    s.ingest(
        "/v1/identify",
        &json!({"userId": "u3", "anonymousId": "a3"}),
    )
    .await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "u4", "traits": {"email": "e4@x.com"}}),
    )
    .await;
    let (st, p3) = s
        .admin(
            "PATCH",
            "/v1/profiles/anonymous_id:a3/traits",
            Some(&json!({"email": "e4@x.com"})),
        )
        .await;
    assert_eq!(st, 200, "{p3}");
    assert_eq!(p3["id"].as_str().unwrap(), id_of(&s, "user_id:u3").await);
    assert_eq!(p3["traits"]["email"], "e4@x.com");
    assert_eq!(
        identity_set(&p3),
        ids(&[("anonymous_id", "a3"), ("user_id", "u3")])
    );
    assert_eq!(
        id_of(&s, "email:e4%40x.com").await,
        id_of(&s, "user_id:u4").await
    );
}

#[tokio::test]
async fn refused_links_are_listed_with_the_merges_and_survive_restarts() {
    let mut s = Server::start().await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "ava", "anonymousId": "kiosk"}),
    )
    .await;
    s.ingest(
        "/v1/identify",
        &json!({"userId": "ben", "anonymousId": "kiosk", "messageId": "m-ben"}),
    )
    .await;
    s.ingest("/v1/identify", &json!({"userId": "cy"})).await;
    s.ingest(
        "/v1/alias",
        &json!({"userId": "cy", "previousId": "ava", "messageId": "m-alias"}),
    )
    .await;
    let (_, ben) = s.get("/v1/profiles/user_id:ben/merges").await;
    let notes = ben["merges"].as_array().unwrap();
    assert_eq!(notes.len(), 1, "{ben}");
    assert_eq!(notes[0]["type"], "refused");
    assert_eq!(notes[0]["message_id"], "m-ben");
    assert_eq!(
        notes[0]["identities"],
        json!([{"type": "anonymous_id", "value": "kiosk"}])
    );
    let (_, cy) = s.get("/v1/profiles/user_id:cy/merges").await;
    assert_eq!(cy["merges"][0]["message_id"], "m-alias", "{cy}");
    let tmp = s.keep_dir();
    s.kill9();
    let s2 = Server::start_in(&s.data_dir, Opts::default()).await;
    let (_, ben2) = s2.get("/v1/profiles/user_id:ben/merges").await;
    assert_eq!(ben2, ben);
    drop(tmp);
}
