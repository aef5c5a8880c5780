//! Model test: random sequences of identify / track / PATCH / DELETE / graceful restart /
//! kill -9 restart (/ snapshot when the server has them) against the real binary, checked
//! after every step against a simple in-memory model of users → traits, track names and
//! identities.
//!
//! Reproduce with `MODEL_SEED=<n> [MODEL_OPS=<k>] cargo test --release --test model`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Instant;

use common::{Opts, Rng, Server, identity_set};
use serde_json::{Map, Value, json};
use user360::segment::timefmt::format_ms;

/// Users the ops pick from (few, so ops collide on the same profiles).
const USERS: u64 = 6;
/// Trait keys the ops pick from (besides `email`).
const KEYS: &[&str] = &["plan", "age", "tags", "addr", "vip", "score"];

/// Late identifies carry a timestamp two days back at one of this many 10 s slots: far
/// older than anything sent without a timestamp or PATCHed (so ignored for those keys),
/// and never within `same_time_ms` (1 s) of each other unless equal (then arrival wins).
const LATE_SLOTS: u64 = 40;
/// A key's time when it was set by a message without timestamp or by PATCH (≈ now).
const NOW: i64 = i64::MAX;

#[derive(Debug, Clone)]
enum Op {
    Identify {
        u: u64,
        anon: bool,
        traits: Map<String, Value>,
        context_traits: Option<Map<String, Value>>,
        /// A `timestamp` two days back, at slot × 10 s (None: no timestamp, i.e. now).
        late: Option<u64>,
    },
    Track {
        u: u64,
        anon: bool,
        event: String,
    },
    Patch {
        u: u64,
        traits: Map<String, Value>,
    },
    Delete {
        u: u64,
    },
    Restart,
    Kill9,
    Snapshot,
}

impl Op {
    fn user(&self) -> Option<u64> {
        match self {
            Op::Identify { u, .. }
            | Op::Track { u, .. }
            | Op::Patch { u, .. }
            | Op::Delete { u } => Some(*u),
            _ => None,
        }
    }
}

fn user_id(u: u64) -> String {
    format!("mu{u}")
}

fn anon_id(u: u64) -> String {
    format!("ma{u}")
}

fn random_value(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => json!(rng.below(1000)),
        1 => json!(format!("s{}", rng.below(100))),
        2 => json!(rng.below(2) == 0),
        3 => json!({"city": format!("c{}", rng.below(5)), "zip": rng.below(100)}),
        4 => json!([rng.below(10), rng.below(10)]),
        _ => json!(-(rng.below(50) as i64)),
    }
}

/// Some traits: random keys set to values or to null (unset); `email` now and then.
fn random_traits(rng: &mut Rng, u: u64) -> Map<String, Value> {
    let mut m = Map::new();
    for _ in 0..1 + rng.below(3) {
        let k = KEYS[rng.below(KEYS.len() as u64) as usize];
        let v = if rng.below(4) == 0 {
            Value::Null
        } else {
            random_value(rng)
        };
        m.insert(k.to_owned(), v);
    }
    if rng.below(6) == 0 {
        // At most 3 distinct emails per user (the limit is 5); never shared between users.
        m.insert(
            "email".into(),
            json!(format!("u{u}.{}@example.com", rng.below(3))),
        );
    }
    m
}

fn random_op(rng: &mut Rng, snapshots: bool) -> Op {
    let u = rng.below(USERS);
    match rng.below(100) {
        0..=29 => {
            let anon = rng.below(3) == 0;
            let mut traits = random_traits(rng, u);
            let mut context_traits = (rng.below(5) == 0).then(|| random_traits(rng, u));
            let late = (rng.below(3) == 0).then(|| rng.below(LATE_SLOTS));
            if late.is_some() {
                // Keep identities out of late messages: only trait times are under test.
                traits.remove("email");
                if let Some(c) = &mut context_traits {
                    c.remove("email");
                }
            }
            Op::Identify {
                u,
                anon,
                traits,
                context_traits,
                late,
            }
        }
        30..=54 => Op::Track {
            u,
            anon: rng.below(3) == 0,
            event: format!("E{}", rng.below(5)),
        },
        55..=74 => Op::Patch {
            u,
            traits: random_traits(rng, u),
        },
        75..=86 => Op::Delete { u },
        87..=91 => Op::Restart,
        92..=96 => Op::Kill9,
        _ if snapshots => Op::Snapshot,
        _ => Op::Track {
            u,
            anon: false,
            event: "Filler".into(),
        },
    }
}

#[derive(Default, Debug, Clone)]
struct UserModel {
    traits: BTreeMap<String, Value>,
    tracks: Vec<String>,
    identifies: usize,
    /// Each key's time (also for unset keys): a late slot's time, or NOW.
    key_times: BTreeMap<String, i64>,
    ids: BTreeSet<(String, String)>,
}

impl UserModel {
    fn new(u: u64) -> UserModel {
        let mut m = UserModel::default();
        m.ids.insert(("user_id".into(), user_id(u)));
        m
    }
    /// Sets / unsets at `time`; a set or unset older than the key's time is ignored.
    fn apply_traits(&mut self, t: &Map<String, Value>, time: i64) {
        for (k, v) in t {
            let applies = match self.key_times.get(k) {
                None => true,
                Some(&cur) => time == NOW || (cur != NOW && time >= cur),
            };
            if !applies {
                continue;
            }
            self.key_times.insert(k.clone(), time);
            if v.is_null() {
                self.traits.remove(k);
            } else {
                self.traits.insert(k.clone(), v.clone());
            }
        }
    }
    fn add_email(&mut self, t: &Map<String, Value>) {
        if let Some(e) = t.get("email").and_then(Value::as_str) {
            self.ids.insert(("email".into(), e.to_owned()));
        }
    }
}

struct Run {
    seed: u64,
    s: Server,
    _tmp: Option<tempfile::TempDir>,
    model: BTreeMap<u64, UserModel>,
    log: Vec<String>,
    next_msg: u64,
    /// Time of late slot 0 (ms): two days before the run, on a whole second.
    late_base: i64,
}

impl Run {
    fn fail(&self, what: String) -> ! {
        let mut ops = String::new();
        for (i, o) in self.log.iter().enumerate() {
            let _ = writeln!(ops, "  {i:3}: {o}");
        }
        panic!(
            "model test failed, seed {} (rerun: MODEL_SEED={} MODEL_OPS={} cargo test --release --test model)\n{what}\nops so far:\n{ops}",
            self.seed,
            self.seed,
            self.log.len()
        );
    }

    async fn restart(&mut self, graceful: bool) {
        let dir = self.s.data_dir.clone();
        if graceful {
            let st = self.s.terminate();
            if !st.success() {
                self.fail(format!("SIGTERM exit status {st:?}"));
            }
        } else {
            self.s.kill9();
        }
        self.s = Server::start_in(&dir, Opts::default()).await;
    }

    async fn apply(&mut self, op: &Op) {
        self.log.push(format!("{op:?}"));
        match op {
            Op::Identify {
                u,
                anon,
                traits,
                context_traits,
                late,
            } => {
                self.next_msg += 1;
                let mut body = json!({"userId": user_id(*u), "traits": traits, "messageId": format!("mm{}-{}", self.seed, self.next_msg)});
                let time = match late {
                    Some(slot) => {
                        let t = self.late_base + (*slot as i64) * 10_000;
                        body["timestamp"] = json!(format_ms(t));
                        t
                    }
                    None => NOW,
                };
                if *anon {
                    body["anonymousId"] = json!(anon_id(*u));
                }
                if let Some(c) = context_traits {
                    body["context"] = json!({ "traits": c });
                }
                let (st, v) = self.s.ingest("/v1/identify", &body).await;
                if st != 200 || v["accepted"] != 1 {
                    self.fail(format!("POST /v1/identify {body} answered {st} {v}"));
                }
                let m = self.model.entry(*u).or_insert_with(|| UserModel::new(*u));
                if *anon {
                    m.ids.insert(("anonymous_id".into(), anon_id(*u)));
                }
                let mut all = context_traits.clone().unwrap_or_default();
                if let Some(c) = context_traits {
                    m.add_email(c);
                }
                m.add_email(traits);
                for (k, v) in traits {
                    all.insert(k.clone(), v.clone());
                }
                m.apply_traits(&all, time);
                m.identifies += 1;
            }
            Op::Track { u, anon, event } => {
                self.next_msg += 1;
                let mut body = json!({"userId": user_id(*u), "event": event, "messageId": format!("mm{}-{}", self.seed, self.next_msg)});
                if *anon {
                    body["anonymousId"] = json!(anon_id(*u));
                }
                let (st, v) = self.s.ingest("/v1/track", &body).await;
                if st != 200 || v["accepted"] != 1 {
                    self.fail(format!("POST /v1/track {body} answered {st} {v}"));
                }
                let m = self.model.entry(*u).or_insert_with(|| UserModel::new(*u));
                if *anon {
                    m.ids.insert(("anonymous_id".into(), anon_id(*u)));
                }
                m.tracks.push(event.clone());
            }
            Op::Patch { u, traits } => {
                let path = format!("/v1/profiles/user_id:{}/traits", user_id(*u));
                let body = Value::Object(traits.clone());
                let (st, v) = self.s.admin("PATCH", &path, Some(&body)).await;
                let m = self.model.entry(*u).or_insert_with(|| UserModel::new(*u));
                m.apply_traits(traits, NOW);
                m.add_email(traits);
                let want = json!(m.traits);
                if st != 200 || v["traits"] != want {
                    self.fail(format!(
                        "PATCH {path} {body} answered {st} {v}\nexpected 200 with traits {want}"
                    ));
                }
            }
            Op::Delete { u } => {
                let path = format!("/v1/profiles/user_id:{}", user_id(*u));
                let (st, v) = self.s.admin("DELETE", &path, None).await;
                let want = if self.model.remove(u).is_some() {
                    204
                } else {
                    404
                };
                if st != want {
                    self.fail(format!("DELETE {path} answered {st} {v}, expected {want}"));
                }
            }
            Op::Restart => self.restart(true).await,
            Op::Kill9 => self.restart(false).await,
            Op::Snapshot => {
                let (st, v) = self.s.admin("POST", "/v1/admin/snapshots", None).await;
                if st != 201 {
                    self.fail(format!("POST /v1/admin/snapshots answered {st} {v}"));
                }
            }
        }
    }

    /// GET `key` must be 404, or 200 with the profile `id`.
    async fn check_key(&self, key: &str, id: Option<&Value>) {
        let (st, p) = self.s.get(&format!("/v1/profiles/{key}")).await;
        match id {
            None if st != 404 => self.fail(format!(
                "GET /v1/profiles/{key}: expected 404 (no live profile holds it), got {st} {p}"
            )),
            Some(id) if st != 200 || &p["id"] != id => self.fail(format!(
                "GET /v1/profiles/{key}: expected 200 with profile {id}, got {st} {p}"
            )),
            _ => {}
        }
    }

    async fn check_user(&self, u: u64) {
        let key = format!("user_id:{}", user_id(u));
        let (st, p) = self.s.get(&format!("/v1/profiles/{key}")).await;
        let m = self.model.get(&u);
        // The other keys this user may have: they resolve to the profile iff it holds them.
        let id = (st == 200).then(|| p["id"].clone());
        let held =
            |t: &str, v: &str| m.is_some_and(|m| m.ids.contains(&(t.to_owned(), v.to_owned())));
        let anon = anon_id(u);
        self.check_key(
            &format!("anonymous_id:{anon}"),
            id.as_ref().filter(|_| held("anonymous_id", &anon)),
        )
        .await;
        for j in 0..3 {
            let e = format!("u{u}.{j}@example.com");
            self.check_key(
                &format!("email:{}", e.replace('@', "%40")),
                id.as_ref().filter(|_| held("email", &e)),
            )
            .await;
        }
        let Some(m) = m else {
            if st != 404 {
                self.fail(format!(
                    "GET /v1/profiles/{key}: expected 404 (deleted or never created), got {st} {p}"
                ));
            }
            return;
        };
        if st != 200 {
            self.fail(format!(
                "GET /v1/profiles/{key}: expected 200 with {m:?}, got {st} {p}"
            ));
        }
        let want = json!(m.traits);
        if p["traits"] != want {
            self.fail(format!(
                "GET /v1/profiles/{key}: traits {}\nexpected {want}",
                p["traits"]
            ));
        }
        let want_ids: Vec<(String, String)> = m.ids.iter().cloned().collect();
        if identity_set(&p) != want_ids {
            self.fail(format!(
                "GET /v1/profiles/{key}: identities {:?}\nexpected {want_ids:?}",
                identity_set(&p)
            ));
        }
        let mut got: Vec<String> = Vec::new();
        let mut cursor = String::new();
        loop {
            let (se, ev) = self
                .s
                .get(&format!(
                    "/v1/profiles/{key}/events?type=track&limit=1000&cursor={cursor}"
                ))
                .await;
            if se != 200 {
                self.fail(format!("events of {key}: {se} {ev}"));
            }
            got.extend(
                ev["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["event"].as_str().unwrap_or("").to_owned()),
            );
            match ev["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => break,
            }
        }
        got.reverse();
        if got != m.tracks {
            self.fail(format!(
                "track events of {key} (oldest first): {got:?}\nexpected {:?}",
                m.tracks
            ));
        }
        let (si, ev) = self
            .s
            .get(&format!(
                "/v1/profiles/{key}/events?type=identify&limit=1000"
            ))
            .await;
        let n = ev["events"].as_array().map_or(0, Vec::len);
        if si != 200 || n != m.identifies {
            self.fail(format!(
                "identify events of {key}: {si}, {n} events, expected {}: {ev}",
                m.identifies
            ));
        }
    }

    async fn check_all(&self) {
        for u in 0..USERS {
            self.check_user(u).await;
        }
        let n = self.s.all_profiles().await.len();
        if n != self.model.len() {
            self.fail(format!(
                "GET /v1/profiles lists {n} profiles, expected {} (users {:?})",
                self.model.len(),
                self.model.keys().collect::<Vec<_>>()
            ));
        }
    }
}

async fn run_seed(seed: u64, ops: usize) {
    let t0 = Instant::now();
    let mut s = Server::start().await;
    let tmp = s.keep_dir();
    // Snapshots only when the server has them (the probe itself may take one).
    let (st, _) = s.admin("POST", "/v1/admin/snapshots", None).await;
    let snapshots = st == 201;
    assert!(
        st == 201 || st == 404,
        "POST /v1/admin/snapshots answered {st}"
    );
    let mut r = Run {
        seed,
        s,
        _tmp: tmp,
        model: BTreeMap::new(),
        log: Vec::new(),
        next_msg: 0,
        late_base: {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            now / 1000 * 1000 - 2 * 86_400_000
        },
    };
    let mut rng = Rng::new(seed);
    let mut check_rng = Rng::new(seed ^ 0xC4EC);
    let (mut restarts, mut kills, mut snaps) = (0, 0, 0);
    for i in 0..ops {
        let op = random_op(&mut rng, snapshots);
        r.apply(&op).await;
        match op {
            Op::Restart => restarts += 1,
            Op::Kill9 => kills += 1,
            Op::Snapshot => snaps += 1,
            _ => {}
        }
        // Check the touched user after most ops (some ops follow each other back to back).
        match op.user() {
            Some(u) if check_rng.below(4) != 0 => r.check_user(u).await,
            Some(_) => {}
            None => r.check_all().await,
        }
        if i % 10 == 9 {
            r.check_all().await;
        }
    }
    r.check_all().await;
    eprintln!(
        "model seed {seed}: {ops} ops, {restarts} graceful restarts, {kills} kill -9 restarts, {}, {:.1?}",
        if snapshots {
            format!("{snaps} snapshots")
        } else {
            "no snapshots (404)".to_owned()
        },
        t0.elapsed()
    );
}

fn seeds() -> Vec<u64> {
    match std::env::var("MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => (1..=16).collect(),
    }
}

fn ops() -> usize {
    std::env::var("MODEL_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

#[tokio::test]
async fn random_ops_match_the_model() {
    for seed in seeds() {
        run_seed(seed, ops()).await;
    }
}
