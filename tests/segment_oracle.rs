//! Oracle test for segments: after every step of a random sequence of events, trait
//! changes (identify and PATCH), merges (alias, identify), erasures and clock moves, the
//! incrementally kept membership of every segment (`GET /v1/segments/{id}/members`) must
//! equal a from-scratch evaluation of its rule over every profile
//! (`POST /v1/profiles/query`, which recounts event conditions from the retained
//! timelines instead of reading the counters).
//!
//! Reproduce with `ORACLE_SEED=<n> [ORACLE_OPS=<k>] cargo test --release --test segment_oracle`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Opts, Rng, Server};
use serde_json::{Value, json};
use user360::segment::timefmt::{format_ms, parse_rfc3339_ms};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const USERS: u64 = 8;
const ANONS: u64 = 6;

fn segments() -> Vec<(&'static str, Value)> {
    vec![
        ("pro", json!({"trait": "plan", "op": "eq", "value": "pro"})),
        (
            "rich-abroad",
            json!({"all": [{"trait": "score", "op": "gte", "value": 50},
                           {"not": {"trait": "country", "op": "eq", "value": "IN"}}]}),
        ),
        (
            "viewer",
            json!({"event": "Viewed", "count": {"gte": 2}, "within": {"days": 2}}),
        ),
        (
            "same-sku",
            json!({"event": "Viewed", "count": {"gte": 2}, "within": {"days": 3}, "per": "sku"}),
        ),
        (
            "no-purchase",
            json!({"all": [{"identity": "user_id", "op": "exists"},
                           {"event": "Bought", "count": {"eq": 0}, "within": {"days": 1}}]}),
        ),
        (
            "recent-visit",
            json!({"trait": "visited_at", "op": "within_last", "value": {"days": 2}}),
        ),
        (
            "pro-viewer",
            json!({"all": [{"segment": "pro"}, {"segment": "viewer"}]}),
        ),
        (
            "went-free",
            json!({"event": "user.updated", "where": [{"property": "changes.plan.to", "op": "eq", "value": "free"}]}),
        ),
        (
            "reachable",
            json!({"any": [{"identity": "email", "op": "exists"}, {"trait": "vip", "op": "eq", "value": true}]}),
        ),
        // These two share the counter of "viewer" (same events), which keeps 4 times.
        (
            "heavy-viewer",
            json!({"event": "Viewed", "count": {"gte": 4}, "within": {"days": 2}}),
        ),
        (
            "no-view",
            json!({"event": "Viewed", "count": {"lt": 1}, "within": {"days": 2}}),
        ),
        (
            "light-viewer",
            json!({"event": "Viewed", "where": [{"property": "sku", "op": "in", "value": ["a", "b"]}], "count": {"lt": 3}}),
        ),
    ]
}

async fn now(s: &Server) -> i64 {
    let (_, v) = s.get("/v1/admin/clock").await;
    parse_rfc3339_ms(v["now"].as_str().unwrap(), false).unwrap()
}

async fn members(s: &Server, seg: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let (st, v) = s
            .get(&format!(
                "/v1/segments/{seg}/members?limit=1000&cursor={cursor}"
            ))
            .await;
        assert_eq!(st, 200, "{v}");
        for m in v["members"].as_array().unwrap() {
            out.insert(m["id"].as_str().unwrap().to_owned());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => return out,
        }
    }
}

async fn from_scratch(s: &Server, rule: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut cursor = Value::Null;
    loop {
        let (st, v) = s
            .admin(
                "POST",
                "/v1/profiles/query",
                Some(&json!({"rule": rule, "limit": 1000, "cursor": cursor})),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        assert!(v.get("partial").is_none(), "{v}");
        for p in v["profiles"].as_array().unwrap() {
            out.insert(p["id"].as_str().unwrap().to_owned());
        }
        cursor = v["next_cursor"].clone();
        if cursor.is_null() {
            return out;
        }
    }
}

async fn ingest(s: &Server, path: &str, body: Value) {
    let (st, v) = s.ingest(path, &body).await;
    assert_eq!(st, 200, "{path} {body}: {v}");
}

async fn step(s: &Server, rng: &mut Rng, log: &mut Vec<String>) {
    let t = now(s).await;
    let user = format!("u{}", rng.below(USERS));
    let anon = format!("a{}", rng.below(ANONS));
    let roll = rng.below(100);
    let desc;
    if roll < 25 {
        let mut traits = serde_json::Map::new();
        if rng.below(2) == 0 {
            let plan = ["free", "pro", "team"][rng.below(3) as usize];
            traits.insert("plan".into(), json!(plan));
        }
        if rng.below(2) == 0 {
            traits.insert("score".into(), json!(rng.below(100)));
        }
        if rng.below(3) == 0 {
            traits.insert("country".into(), json!(["IN", "US"][rng.below(2) as usize]));
        }
        if rng.below(4) == 0 {
            traits.insert(
                "vip".into(),
                if rng.below(3) == 0 {
                    Value::Null
                } else {
                    json!(rng.below(2) == 0)
                },
            );
        }
        if rng.below(4) == 0 {
            let ago = rng.below(3 * DAY as u64) as i64;
            traits.insert("visited_at".into(), json!(format_ms(t - ago)));
        }
        if rng.below(6) == 0 {
            traits.insert("email".into(), json!(format!("{user}@x.io")));
        }
        let mut body = json!({"userId": user, "traits": traits});
        if rng.below(4) == 0 {
            body["anonymousId"] = json!(anon);
        }
        desc = format!("identify {body}");
        ingest(s, "/v1/identify", body).await;
    } else if roll < 65 {
        let event = if rng.below(4) == 0 {
            "Bought"
        } else {
            "Viewed"
        };
        let sku = ["a", "b", "c"][rng.below(3) as usize];
        let ago = rng.below(3 * DAY as u64) as i64;
        let mut body =
            json!({"event": event, "properties": {"sku": sku}, "timestamp": format_ms(t - ago)});
        if rng.below(4) == 0 {
            body["anonymousId"] = json!(anon);
        } else {
            body["userId"] = json!(user);
        }
        desc = format!("track {body}");
        ingest(s, "/v1/track", body).await;
    } else if roll < 72 {
        let body = json!({"userId": user, "previousId": anon});
        desc = format!("alias {body}");
        ingest(s, "/v1/alias", body).await;
    } else if roll < 80 {
        let plan = ["free", "pro"][rng.below(2) as usize];
        let body = json!({"plan": plan, "score": rng.below(100)});
        desc = format!("patch {user} {body}");
        let (st, v) = s
            .admin(
                "PATCH",
                &format!("/v1/profiles/user_id:{user}/traits"),
                Some(&body),
            )
            .await;
        assert_eq!(st, 200, "{v}");
    } else if roll < 84 {
        desc = format!("delete {user}");
        let (st, v) = s
            .admin("DELETE", &format!("/v1/profiles/user_id:{user}"), None)
            .await;
        assert!(st == 204 || st == 404, "{v}");
    } else if roll < 87 {
        desc = "snapshot".to_owned();
        let (st, v) = s.admin("POST", "/v1/admin/snapshots", None).await;
        assert_eq!(st, 201, "{v}");
    } else {
        let by = (1 + rng.below(40)) as i64 * HOUR;
        desc = format!("advance {} h", by / HOUR);
        s.advance(by).await;
    }
    log.push(desc);
}

fn opts() -> Opts {
    Opts {
        manual_clock: true,
        env: vec![("USER360_SHARDS".into(), "2".into())],
    }
}

async fn run_seed(seed: u64, ops: usize) {
    let t0 = Instant::now();
    let mut s = Server::start_with(opts()).await;
    let _tmp = s.keep_dir();
    let dir = s.data_dir.clone();
    let mut restarts = 0;
    let mut rng = Rng::new(seed);
    let segs = segments();
    let mut log = Vec::new();
    // Some data before the segments exist (backfill), the rest after (incremental).
    for _ in 0..ops / 4 {
        step(&s, &mut rng, &mut log).await;
    }
    for (id, rule) in &segs {
        let (st, v) = s
            .admin(
                "POST",
                "/v1/segments",
                Some(&json!({"id": id, "name": id, "rule": rule})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    for (id, _) in &segs {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = s.get(&format!("/v1/segments/{id}")).await;
            if v["status"] == "ready" {
                break;
            }
            assert!(Instant::now() < deadline, "{id} never ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for i in ops / 4..ops {
        if i > ops / 4 {
            // Now and then a restart (kill -9 or graceful): memberships, counters and
            // window re-checks come back from the snapshot and the log. The manual clock
            // restarts at wall time, which is behind it: move it back ahead.
            if rng.below(25) == 0 {
                let ahead = now(&s).await;
                if rng.below(2) == 0 {
                    s.kill9();
                    log.push("kill -9 and restart".into());
                } else {
                    assert_eq!(s.terminate().code(), Some(0));
                    log.push("graceful restart".into());
                }
                s = Server::start_in(&dir, opts()).await;
                let behind = ahead - now(&s).await;
                if behind > 0 {
                    s.advance(behind).await;
                }
                restarts += 1;
            } else {
                step(&s, &mut rng, &mut log).await;
            }
        }
        for (id, rule) in &segs {
            let kept = members(&s, id).await;
            let scratch = from_scratch(&s, rule).await;
            if kept != scratch {
                let tail: Vec<&String> = log.iter().rev().take(12).collect();
                panic!(
                    "seed {seed} after step {i}: segment {id}: kept {kept:?} but from scratch {scratch:?}\nlast steps (newest first): {tail:#?}"
                );
            }
        }
    }
    eprintln!(
        "segment oracle seed {seed}: {ops} steps, {restarts} restarts, {:.1?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn incremental_membership_equals_a_from_scratch_evaluation() {
    let ops = std::env::var("ORACLE_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(80);
    let seeds: Vec<u64> = match std::env::var("ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => (1..=6).collect(),
    };
    for seed in seeds {
        run_seed(seed, ops).await;
    }
}
