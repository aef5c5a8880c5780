//! Identity model test: several clients send random identify / alias / track messages at
//! once over a small pool of identities (so links, merges and limit refusals collide),
//! against a real server with four shards (so merges cross shards). Afterwards the server's
//! profiles — identities, traits and event sets — must equal a sequential reference model
//! applied to the accepted messages in the order the server accepted them (their `seq`).
//!
//! Traits are made order-independent by giving every identify a distinct `timestamp`
//! (2 s apart, in random order): newest-wins then depends only on which profile a message
//! ends on, which is what the model decides. Nothing else is relaxed.
//!
//! Reproduce with `IDMODEL_SEED=<n> [IDMODEL_CLIENTS=<k>] [IDMODEL_OPS=<per client>]
//! cargo test --release --test identity_model`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use common::{Opts, Rng, Server, identity_set};
use serde_json::{Map, Value, json};
use user360::segment::timefmt::format_ms;

/// (type, value) of an identity, as the API shows it.
type Ident = (String, String);

const USERS: &[&str] = &["u1", "u2", "u3", "u4", "u5"];
const ANONS: &[&str] = &[
    "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", "a10", "a11", "a12",
];
const EMAILS: &[&str] = &["e1@x.io", "e2@x.io", "e3@x.io", "e4@x.io"];
const PLANS: &[&str] = &["free", "pro", "team"];

fn ident(ty: &str, v: &str) -> Ident {
    (ty.to_owned(), v.to_owned())
}

/// One message a client sends.
#[derive(Debug, Clone)]
struct Msg {
    id: String,
    body: Value,
    path: &'static str,
}

impl Msg {
    fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap()
    }
    fn str_field(&self, f: &str) -> Option<&str> {
        self.body[f].as_str()
    }
    /// Identities in message order (`userId`, `anonymousId`, `traits.email`), as ingest
    /// extracts them.
    fn identities(&self) -> Vec<Ident> {
        let mut out = Vec::new();
        if let Some(u) = self.str_field("userId") {
            out.push(ident("user_id", u));
        }
        if let Some(a) = self.str_field("anonymousId") {
            out.push(ident("anonymous_id", a));
        }
        if let Some(e) = self.body["traits"]["email"].as_str() {
            out.push(ident("email", e));
        }
        out
    }
}

fn pick<'a>(rng: &mut Rng, from: &[&'a str]) -> &'a str {
    from[rng.below(from.len() as u64) as usize]
}

/// A random message; `slot` makes its id and (for identify) its timestamp unique.
fn random_msg(rng: &mut Rng, client: usize, n: usize, ts_ms: i64) -> Msg {
    let id = format!("c{client}-m{n}");
    let roll = rng.below(100);
    let (path, mut body) = if roll < 45 {
        let mut b = json!({"type": "identify"});
        let user = rng.below(2) == 0;
        if user {
            b["userId"] = json!(pick(rng, USERS));
        }
        if !user || rng.below(10) < 7 {
            b["anonymousId"] = json!(pick(rng, ANONS));
        }
        let mut traits = Map::new();
        if rng.below(10) < 3 {
            traits.insert("email".into(), json!(pick(rng, EMAILS)));
        }
        if rng.below(10) < 8 {
            let plan = if rng.below(7) == 0 {
                Value::Null
            } else {
                json!(pick(rng, PLANS))
            };
            traits.insert("plan".into(), plan);
        }
        if rng.below(2) == 0 {
            traits.insert("n".into(), json!(rng.below(1000)));
        }
        b["traits"] = Value::Object(traits);
        b["timestamp"] = json!(format_ms(ts_ms));
        ("/v1/identify", b)
    } else if roll < 80 {
        let mut b = json!({"type": "track", "event": "Clicked"});
        match rng.below(3) {
            0 => b["userId"] = json!(pick(rng, USERS)),
            1 => b["anonymousId"] = json!(pick(rng, ANONS)),
            _ => {
                b["userId"] = json!(pick(rng, USERS));
                b["anonymousId"] = json!(pick(rng, ANONS));
            }
        }
        ("/v1/track", b)
    } else {
        let user_id = if rng.below(5) == 0 {
            pick(rng, ANONS)
        } else {
            pick(rng, USERS)
        };
        let previous_id = if rng.below(5) == 0 {
            pick(rng, USERS)
        } else {
            pick(rng, ANONS)
        };
        (
            "/v1/alias",
            json!({"type": "alias", "userId": user_id, "previousId": previous_id}),
        )
    };
    body["messageId"] = json!(id);
    Msg { id, body, path }
}

// ---------------------------------------------------------------------------------------
// The sequential reference model
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
struct MProfile {
    ids: BTreeSet<Ident>,
    /// Message ids of the events on this profile.
    events: BTreeSet<String>,
    /// Identify messages on it: (timestamp, traits).
    identifies: Vec<(i64, Map<String, Value>)>,
}

impl MProfile {
    /// Traits: per key, the newest identify's value (null unsets).
    fn traits(&self) -> Map<String, Value> {
        let mut newest: BTreeMap<String, (i64, Value)> = BTreeMap::new();
        for (ts, traits) in &self.identifies {
            for (k, v) in traits {
                if newest.get(k).is_none_or(|(t, _)| ts > t) {
                    newest.insert(k.clone(), (*ts, v.clone()));
                }
            }
        }
        newest
            .into_iter()
            .filter(|(_, (_, v))| !v.is_null())
            .map(|(k, (_, v))| (k, v))
            .collect()
    }
}

#[derive(Default)]
struct Model {
    profiles: Vec<Option<MProfile>>,
    index: HashMap<Ident, usize>,
}

fn limit(ty: &str) -> Option<usize> {
    match ty {
        "user_id" => Some(1),
        "email" | "phone" => Some(5),
        "anonymous_id" => None,
        _ => Some(5),
    }
}

fn rank(ty: &str) -> u8 {
    match ty {
        "user_id" => 0,
        "email" => 1,
        "phone" => 2,
        "anonymous_id" => 4,
        _ => 3,
    }
}

/// The identity the limit rule drops first: lowest priority, the later within a type.
fn lowest_priority(ids: &[Ident]) -> usize {
    let mut worst = 0;
    for (i, id) in ids.iter().enumerate() {
        if rank(&id.0) >= rank(&ids[worst].0) {
            worst = i;
        }
    }
    worst
}

/// Whether `held` plus `extra` breaks a limit, checking the types of `extra` (and with
/// `all_types`, of `held` too).
fn breaks(held: &[Ident], extra: &[Ident], all_types: bool) -> bool {
    let mut types: BTreeSet<&str> = extra.iter().map(|i| i.0.as_str()).collect();
    if all_types {
        types.extend(held.iter().map(|i| i.0.as_str()));
    }
    types.into_iter().any(|ty| {
        limit(ty).is_some_and(|max| {
            held.iter().filter(|i| i.0 == ty).count() + extra.iter().filter(|i| i.0 == ty).count()
                > max
        })
    })
}

impl Model {
    fn held(&self, ps: &[usize]) -> Vec<Ident> {
        ps.iter()
            .flat_map(|p| self.profiles[*p].as_ref().unwrap().ids.iter().cloned())
            .collect()
    }

    fn create(&mut self, ids: &[Ident]) -> usize {
        let p = self.profiles.len();
        self.profiles.push(Some(MProfile::default()));
        self.link(p, ids);
        p
    }

    fn link(&mut self, p: usize, ids: &[Ident]) {
        for id in ids {
            self.index.insert(id.clone(), p);
            self.profiles[p].as_mut().unwrap().ids.insert(id.clone());
        }
    }

    /// Merges `others` into `into` (which one survives is not observable here).
    fn merge(&mut self, into: usize, others: &[usize]) {
        for &o in others {
            let absorbed = self.profiles[o].take().unwrap();
            for id in &absorbed.ids {
                self.index.insert(id.clone(), into);
            }
            let p = self.profiles[into].as_mut().unwrap();
            p.ids.extend(absorbed.ids);
            p.events.extend(absorbed.events);
            p.identifies.extend(absorbed.identifies);
        }
    }

    /// The profile a message goes to (identify / track), linking and merging as the
    /// registry does; None when no identity is usable.
    fn resolve(&mut self, mut ids: Vec<Ident>) -> Option<usize> {
        loop {
            if ids.is_empty() {
                return None;
            }
            let found: Vec<Option<usize>> =
                ids.iter().map(|i| self.index.get(i).copied()).collect();
            let mut distinct: Vec<usize> = found.iter().flatten().copied().collect();
            distinct.sort_unstable();
            distinct.dedup();
            let unheld: Vec<Ident> = ids
                .iter()
                .zip(&found)
                .filter(|(_, f)| f.is_none())
                .map(|(i, _)| i.clone())
                .collect();
            let all_types = distinct.len() > 1;
            if breaks(&self.held(&distinct), &unheld, all_types) {
                ids.remove(lowest_priority(&ids));
                continue;
            }
            let p = match distinct.first() {
                None => return Some(self.create(&ids)),
                Some(&p) => p,
            };
            self.merge(p, &distinct[1..]);
            self.link(p, &unheld);
            return Some(p);
        }
    }

    fn find(&self, v: &str, unheld_ty: &str) -> (Ident, Option<usize>) {
        for ty in ["user_id", "anonymous_id"] {
            let id = ident(ty, v);
            if let Some(p) = self.index.get(&id) {
                return (id, Some(*p));
            }
        }
        (ident(unheld_ty, v), None)
    }

    fn resolve_alias(&mut self, user_id: &str, previous_id: &str) -> Option<usize> {
        let (uid, uo) = self.find(user_id, "user_id");
        let (prev, po) = self.find(previous_id, "anonymous_id");
        match (uo, po) {
            (Some(a), Some(b)) if a == b || user_id == previous_id => Some(a),
            (Some(a), Some(b)) => {
                if !breaks(&self.held(&[a, b]), &[], true) {
                    self.merge(a, &[b]);
                }
                Some(a)
            }
            (Some(p), None) | (None, Some(p)) => {
                let missing = if uo.is_none() { uid } else { prev };
                if !breaks(&self.held(&[p]), std::slice::from_ref(&missing), false) {
                    self.link(p, &[missing]);
                }
                Some(p)
            }
            (None, None) if user_id == previous_id => Some(self.create(&[uid])),
            (None, None) => Some(self.create(&[uid, prev])),
        }
    }

    fn apply(&mut self, m: &Msg) -> Option<usize> {
        let p = if m.kind() == "alias" {
            self.resolve_alias(m.str_field("userId")?, m.str_field("previousId")?)
        } else {
            self.resolve(m.identities())
        }?;
        let prof = self.profiles[p].as_mut().unwrap();
        prof.events.insert(m.id.clone());
        if m.kind() == "identify" {
            let ts = user360::segment::timefmt::parse_rfc3339_ms(
                m.body["timestamp"].as_str().unwrap(),
                true,
            )
            .unwrap();
            prof.identifies
                .push((ts, m.body["traits"].as_object().unwrap().clone()));
        }
        Some(p)
    }
}

/// What a profile comes to, comparable between server and model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Outcome {
    ids: Vec<Ident>,
    traits: String,
    events: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

async fn run_seed(seed: u64, clients: usize, per_client: usize) {
    let s = Server::start_with(Opts {
        env: vec![("USER360_SHARDS".into(), "4".into())],
        ..Default::default()
    })
    .await;
    let mut rng = Rng::new(seed);
    let total = clients * per_client;
    // Distinct identify times, 2 s apart (well beyond same_time_ms), in random order.
    let mut slots: Vec<i64> = (0..total as i64).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let base = now / 1000 * 1000 - 2 * 86_400_000;
    let plans: Vec<Vec<Msg>> = (0..clients)
        .map(|c| {
            (0..per_client)
                .map(|n| random_msg(&mut rng, c, n, base + slots[c * per_client + n] * 2000))
                .collect()
        })
        .collect();
    let by_id: HashMap<String, Msg> = plans
        .iter()
        .flatten()
        .map(|m| (m.id.clone(), m.clone()))
        .collect();

    // Every client sends its messages one after the other; the clients run at once.
    let mut tasks = Vec::new();
    for msgs in plans {
        let http = s.http.clone();
        let url = s.url.clone();
        let key = s.write_key.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for m in msgs {
                let r = http
                    .post(format!("{url}{}", m.path))
                    .basic_auth(&key, Some(""))
                    .json(&m.body)
                    .send()
                    .await
                    .unwrap();
                let st = r.status().as_u16();
                let body = r.text().await.unwrap();
                assert_eq!(st, 200, "{} {}: {st} {body}", m.path, m.body);
                accepted.push(m.id);
            }
            accepted
        }));
    }
    let mut accepted = BTreeSet::new();
    for t in tasks {
        accepted.extend(t.await.unwrap());
    }

    // The server's profiles, and the seq of every accepted message.
    let profiles = s.all_profiles().await;
    let mut seqs: BTreeMap<u64, String> = BTreeMap::new();
    let mut server: Vec<Outcome> = Vec::new();
    let mut holder: HashMap<String, String> = HashMap::new();
    let merges: usize = profiles
        .iter()
        .map(|p| p["merged_from"].as_array().map_or(0, Vec::len))
        .sum();
    for p in &profiles {
        let pid = p["id"].as_str().unwrap();
        let events = s.events(&format!("id:{pid}"), "limit=1000").await;
        let mut mids = Vec::new();
        for e in events.iter().filter(|e| e["type"] != "system") {
            let mid = e["message_id"].as_str().unwrap().to_owned();
            assert!(
                holder.insert(mid.clone(), pid.to_owned()).is_none(),
                "seed {seed}: message {mid} is on two profiles"
            );
            seqs.insert(e["seq"].as_u64().unwrap(), mid.clone());
            mids.push(mid);
        }
        mids.sort();
        server.push(Outcome {
            ids: identity_set(p),
            traits: p["traits"].to_string(),
            events: mids,
        });
    }
    let on_server: BTreeSet<String> = seqs.values().cloned().collect();
    assert_eq!(
        on_server, accepted,
        "seed {seed}: the events on the server are not the accepted messages"
    );

    // The model, applied in the server's accept order.
    let mut model = Model::default();
    for mid in seqs.values() {
        let m = &by_id[mid];
        assert!(
            model.apply(m).is_some(),
            "seed {seed}: the model finds no usable identity for accepted {}",
            m.body
        );
    }
    let mut expected: Vec<Outcome> = model
        .profiles
        .iter()
        .flatten()
        .map(|p| Outcome {
            ids: p.ids.iter().cloned().collect(),
            traits: Value::Object(p.traits()).to_string(),
            events: p.events.iter().cloned().collect(),
        })
        .collect();
    expected.sort();
    server.sort();
    if expected != server {
        let mut report = format!(
            "seed {seed}: server and model disagree ({} vs {} profiles)\n",
            server.len(),
            expected.len()
        );
        for o in &server {
            if !expected.contains(o) {
                let _ = writeln!(report, "  server only: {o:?}");
            }
        }
        for o in &expected {
            if !server.contains(o) {
                let _ = writeln!(report, "  model only:  {o:?}");
            }
        }
        let _ = writeln!(report, "  accept order:");
        for (seq, mid) in &seqs {
            let _ = writeln!(report, "    {seq:>5} {}", by_id[mid].body);
        }
        panic!("{report}");
    }

    // Every identity resolves to the profile holding it.
    for o in &server {
        for (ty, v) in &o.ids {
            let (st, p) = s
                .get(&format!("/v1/profiles/{ty}:{}", v.replace('@', "%40")))
                .await;
            assert_eq!(st, 200, "seed {seed}: {ty}:{v}: {p}");
            assert_eq!(identity_set(&p), o.ids, "seed {seed}: {ty}:{v}");
        }
    }
    eprintln!(
        "identity model seed {seed}: {} messages from {clients} clients, {} profiles, {merges} merges",
        accepted.len(),
        server.len()
    );
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identify_alias_track_match_a_sequential_model() {
    let clients = env_num("IDMODEL_CLIENTS").unwrap_or(6) as usize;
    let per_client = env_num("IDMODEL_OPS").unwrap_or(40) as usize;
    let seeds: Vec<u64> = match env_num("IDMODEL_SEED") {
        Some(s) => vec![s],
        None => (1..=12).collect(),
    };
    for seed in seeds {
        run_seed(seed, clients, per_client).await;
    }
}
