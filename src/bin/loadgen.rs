//! `loadgen`: a realistic ingest workload over HTTP, measured against a baseline in the
//! same run.
//!
//! A Zipf-distributed user population, a mix of identify / track / page messages of
//! 0.5–1 KB, N keep-alive connections, batches or single messages, for a fixed time. It
//! prints events/s, request latency percentiles (HDR histogram) and errors by status.
//! `--baseline` first runs the same workload against an in-process no-op server that only
//! parses the JSON (the HTTP + JSON ceiling of this machine) and reports the ratio.
//!
//! ```sh
//! cargo run --release --bin loadgen -- --url http://127.0.0.1:8080 --write-key KEY --baseline
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use rand::Rng;
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};
use serde_json::{Value, json};

/// Load generator for User360's ingest API.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Write key (HTTP Basic username).
    #[arg(long, env = "U360_WRITE_KEY", default_value = "")]
    write_key: String,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds to run (at most).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Stop after sending this many events (0: only the time limit applies).
    #[arg(long, default_value_t = 0)]
    events: u64,
    /// Messages per request (1 sends to /v1/track etc., more to /v1/batch).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Size of the user population (Zipf-distributed activity).
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Share of messages that are identify calls of an anonymous user turning known.
    #[arg(long, default_value_t = 0.05)]
    transitions: f64,
    /// Share of messages (identify / track) that carry a brand-new `anonymousId` beside
    /// their `userId`, so the registry links a new identity to a known profile.
    #[arg(long, default_value_t = 0.0)]
    links: f64,
    /// Instead of the ingest mix: make this many segment entries per second for
    /// `--seconds` (identify calls of new users, `--batch` per request), with a segment
    /// and a trigger to the `--receiver` created through the admin API
    /// (`--admin-token`); reports ingest latency and send-to-webhook latency.
    #[arg(long, default_value_t = 0)]
    entries: u64,
    /// Admin token (for `--entries`).
    #[arg(long, env = "U360_ADMIN_TOKEN", default_value = "")]
    admin_token: String,
    /// Instead of a timed run: create this many distinct profiles (identify with ten
    /// traits, batches of `--batch`) as fast as the server takes them, then stop.
    #[arg(long, default_value_t = 0)]
    seed_profiles: u64,
    /// First measure an in-process no-op server that only parses JSON.
    #[arg(long)]
    baseline: bool,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// CI smoke: fail (exit 1) unless every request succeeded and events arrived.
    #[arg(long)]
    smoke: bool,
    /// Also run a loopback webhook receiver on this port (0: any) and report the latency
    /// from sending a message to receiving the delivery it caused. Point a trigger at
    /// `http://127.0.0.1:PORT/hook`; identify messages carry `traits.lg_sent_us`.
    #[arg(long)]
    receiver: Option<u16>,
}

/// What one run measured.
struct Report {
    events: u64,
    seconds: f64,
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl Report {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }

    fn print(&self, label: &str) {
        let q = |p: f64| self.latency.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "{label}: {:.0} events/s ({} events in {:.1} s); request latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2}; errors {:?}",
            self.rate(),
            self.events,
            self.seconds,
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            self.errors
        );
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What the webhook receiver saw: deliveries and send-to-delivery latency.
struct Received {
    url: String,
    deliveries: AtomicU64,
    latency: parking_lot::Mutex<Histogram<u64>>,
}

/// A loopback webhook receiver: answers 200 to `POST /hook` and, for deliveries whose
/// profile traits carry `lg_sent_us`, records the latency from the load generator's send.
async fn receiver(port: u16) -> anyhow::Result<(String, Arc<Received>)> {
    use axum::routing::post;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Received {
        url: format!("http://{addr}/hook"),
        deliveries: AtomicU64::new(0),
        latency: parking_lot::Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?),
    });
    let state = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let now = now_us();
                state.deliveries.fetch_add(1, Ordering::Relaxed);
                if let Ok(v) = serde_json::from_slice::<Value>(&body)
                    && let Some(sent) = v["profile"]["traits"]["lg_sent_us"].as_u64()
                {
                    state
                        .latency
                        .lock()
                        .saturating_record(now.saturating_sub(sent).max(1));
                }
                "ok"
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/hook"), seen))
}

fn message(rng: &mut impl Rng, zipf: &Zipf<f64>, args: &Args, n: u64) -> Value {
    let mut m = base_message(rng, zipf, args.transitions, n);
    if args.links > 0.0 && m["userId"].is_string() && rng.random::<f64>() < args.links {
        // A device never seen before: one new identity linked to a known user.
        m["anonymousId"] = json!(format!("dev-{n}-{:016x}", rng.random::<u64>()));
    }
    m
}

fn base_message(rng: &mut impl Rng, zipf: &Zipf<f64>, transitions: f64, n: u64) -> Value {
    let user = zipf.sample(rng) as u64;
    let uid = format!("user-{user:08}");
    let anon = format!("anon-{user:08}");
    let mid = format!("lg-{n}-{}", rng.random::<u64>());
    let roll: f64 = rng.random();
    let pad = "lorem ipsum dolor sit amet ".repeat(rng.random_range(4..16));
    let plan = ["free", "pro", "enterprise"][user as usize % 3];
    let event = ["Product Viewed", "Order Completed", "Export Used"][user as usize % 3];
    if roll < transitions {
        json!({"type": "identify", "anonymousId": anon, "userId": uid, "messageId": mid,
               "traits": {"email": format!("{uid}@example.com"), "plan": plan,
                          "name": format!("User {user}"), "logins": rng.random_range(0..100), "bio": pad,
                          "lg_sent_us": now_us()},
               "context": {"library": {"name": "loadgen", "version": "1"}, "ip": "203.0.113.7"}})
    } else if roll < 0.8 {
        json!({"type": "track", "userId": uid, "event": event,
               "messageId": mid, "properties": {"product_id": format!("P-{}", rng.random_range(0..500)), "price": 19.99,
               "quantity": rng.random_range(1..5), "note": pad},
               "context": {"library": {"name": "loadgen", "version": "1"}, "userAgent": "Mozilla/5.0 (X11; Linux x86_64)"}})
    } else {
        json!({"type": "page", "anonymousId": anon, "name": "Pricing", "category": "Docs", "messageId": mid,
               "properties": {"url": "https://example.com/pricing", "referrer": "https://example.com/", "note": pad}})
    }
}

/// Segment entries at a fixed rate: each identify creates a new profile that enters the
/// `lg-entries` segment, whose trigger posts to the receiver.
async fn entries(args: &Args, seen: Arc<Received>) -> anyhow::Result<()> {
    let url = args.url.trim_end_matches('/').to_owned();
    let hook_url = seen.url.clone();
    let client = reqwest::Client::new();
    let admin = |path: &str, body: Value| {
        client
            .post(format!("{url}{path}"))
            .bearer_auth(&args.admin_token)
            .json(&body)
            .send()
    };
    let r = admin(
        "/v1/segments",
        json!({"id": "lg-entries", "name": "loadgen entries", "rule": {"trait": "lg_sent_us", "op": "exists"}}),
    )
    .await?;
    anyhow::ensure!(
        r.status().is_success() || r.status() == 409,
        "create segment: {}",
        r.text().await?
    );
    let r = admin(
        "/v1/triggers",
        json!({"id": "lg-hook", "segment": "lg-entries", "on": ["enter"], "url": hook_url}),
    )
    .await?;
    anyhow::ensure!(
        r.status().is_success() || r.status() == 409,
        "create trigger: {}",
        r.text().await?
    );
    // `--batch` entries per request, as many requests per second as the rate needs.
    let per_tick = (args.batch as u64).clamp(1, args.entries);
    let every_us = (per_tick * 1_000_000 / args.entries).max(100);
    let ticks = args.seconds * 1_000_000 / every_us;
    let mut ingest = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut tick = tokio::time::interval(Duration::from_micros(every_us));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let run = ulid::Ulid::new().to_string();
    let mut sent = 0u64;
    let mut inflight = Vec::new();
    for t in 0..ticks {
        tick.tick().await;
        let batch: Vec<Value> = (0..per_tick)
            .map(|i| {
                json!({"type": "identify", "userId": format!("lg-{run}-{t}-{i}"),
                       "traits": {"lg_sent_us": now_us(), "plan": "pro"}})
            })
            .collect();
        sent += per_tick;
        let (client, url, key) = (client.clone(), url.clone(), args.write_key.clone());
        inflight.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = client
                .post(format!("{url}/v1/batch"))
                .basic_auth(&key, Some(""))
                .json(&json!({"batch": batch}))
                .send()
                .await;
            (r.map(|r| r.status().as_u16()).unwrap_or(0), t0.elapsed())
        }));
    }
    let mut errors = 0;
    for h in inflight {
        let (status, took) = h.await?;
        if status != 200 {
            errors += 1;
        }
        ingest.saturating_record(took.as_micros() as u64);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.deliveries.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    let h = seen.latency.lock();
    println!(
        "entries: {sent} sent at {} /s, {} delivered, {errors} failed requests",
        args.entries,
        seen.deliveries.load(Ordering::Relaxed)
    );
    println!(
        "ingest request latency ms (baseline): p50 {:.2} p99 {:.2}",
        q(&ingest, 0.5),
        q(&ingest, 0.99)
    );
    println!(
        "send-to-webhook latency ms: p50 {:.2} p99 {:.2} p99.9 {:.2}",
        q(&h, 0.5),
        q(&h, 0.99),
        q(&h, 0.999)
    );
    Ok(())
}

/// The identify message that creates seeded profile `i` (ten traits).
fn seed_message(i: u64) -> Value {
    let plans = ["free", "pro", "team"];
    let countries = ["IN", "US", "DE", "BR"];
    json!({"type": "identify", "userId": format!("seed-{i:08}"), "messageId": format!("seed-{i}"),
           "traits": {"plan": plans[(i % 3) as usize], "country": countries[(i % 4) as usize],
                      "seats": i % 50, "age": 18 + i % 60, "score": (i % 1000) as f64 / 10.0,
                      "vip": i.is_multiple_of(10), "name": format!("User {i}"), "city": "Pune",
                      "signup": "2026-01-15T10:00:00Z", "tags": ["beta"]}})
}

/// Creates `args.seed_profiles` distinct profiles over `args.connections` connections.
async fn seed(args: &Args, url: &str, key: &str) -> anyhow::Result<Report> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (client, next, url, key) =
            (client.clone(), next.clone(), url.to_owned(), key.to_owned());
        let (total, batch) = (args.seed_profiles, args.batch.max(1) as u64);
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= total {
                    break;
                }
                let msgs: Vec<Value> = (from..(from + batch).min(total))
                    .map(seed_message)
                    .collect();
                let body = serde_json::to_vec(&json!({"batch": msgs})).expect("json");
                let t = Instant::now();
                loop {
                    match client
                        .post(format!("{url}/v1/batch"))
                        .basic_auth(&key, Some(""))
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                            break;
                        }
                        Ok(r) => {
                            *errors.entry(r.status().as_u16().to_string()).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(_) => {
                            *errors.entry("network".to_owned()).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                hist.saturating_record(t.elapsed().as_micros() as u64);
            }
            (hist, errors)
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = BTreeMap::new();
    for t in tasks {
        let (h, e) = t.await?;
        latency.add(h)?;
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    Ok(Report {
        events: args.seed_profiles,
        seconds: started.elapsed().as_secs_f64(),
        latency,
        errors,
    })
}

async fn run(args: &Args, url: &str, key: &str) -> anyhow::Result<Report> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let events = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let client = client.clone();
        let args = args.clone();
        let url = url.to_owned();
        let key = key.to_owned();
        let events = events.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ (c as u64) << 32);
            let zipf = Zipf::new(args.users as f64, 1.1).expect("valid zipf");
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            while Instant::now() < deadline {
                let n = counter.fetch_add(args.batch as u64, Ordering::Relaxed);
                if args.events > 0 && n >= args.events {
                    break;
                }
                let (path, body) = if args.batch <= 1 {
                    let m = message(&mut rng, &zipf, &args, n);
                    (format!("/v1/{}", m["type"].as_str().unwrap_or("track")), m)
                } else {
                    let batch: Vec<Value> = (0..args.batch)
                        .map(|i| message(&mut rng, &zipf, &args, n + i as u64))
                        .collect();
                    ("/v1/batch".to_owned(), json!({"batch": batch}))
                };
                let bytes = serde_json::to_vec(&body).expect("json");
                let t = Instant::now();
                let r = client
                    .post(format!("{url}{path}"))
                    .basic_auth(&key, Some(""))
                    .header("content-type", "application/json")
                    .body(bytes)
                    .send()
                    .await;
                match r {
                    Ok(resp) if resp.status() == 200 => {
                        let _ = resp.bytes().await;
                        hist.saturating_record(t.elapsed().as_micros() as u64);
                        events.fetch_add(args.batch.max(1) as u64, Ordering::Relaxed);
                    }
                    Ok(resp) => {
                        *errors
                            .entry(resp.status().as_u16().to_string())
                            .or_default() += 1;
                        if resp.status() == 429 || resp.status() == 503 {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    Err(e) => {
                        *errors
                            .entry(if e.is_connect() { "connect" } else { "network" }.to_owned())
                            .or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (hist, errors)
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = BTreeMap::new();
    for t in tasks {
        let (h, e) = t.await?;
        latency.add(h)?;
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    Ok(Report {
        events: events.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        latency,
        errors,
    })
}

/// The no-op server: parses each body as JSON and answers like User360 would.
async fn baseline_server() -> anyhow::Result<String> {
    use axum::routing::post;
    async fn noop(body: axum::body::Bytes) -> axum::Json<Value> {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let n = v["batch"].as_array().map(|b| b.len()).unwrap_or(1);
        axum::Json(json!({"success": true, "accepted": n, "duplicates": 0, "rejected": []}))
    }
    let app = axum::Router::new()
        .route("/v1/{kind}", post(noop))
        .layer(axum::extract::DefaultBodyLimit::disable());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    user360::init_tls();
    println!(
        "loadgen: {} connections, {} s, {} messages per request, {} users (zipf 1.1), {:.0}% anonymous-to-known, {:.0}% new identity links",
        args.connections,
        args.seconds,
        args.batch,
        args.users,
        args.transitions * 100.0,
        args.links * 100.0
    );
    let hook = match args.receiver {
        Some(port) => {
            let (url, seen) = receiver(port).await?;
            println!("webhook receiver listening at {url}");
            Some(seen)
        }
        None => None,
    };
    if args.entries > 0 {
        let Some(seen) = hook.clone() else {
            anyhow::bail!("--entries needs --receiver PORT");
        };
        return entries(&args, seen).await;
    }
    if args.seed_profiles > 0 {
        let r = seed(&args, args.url.trim_end_matches('/'), &args.write_key).await?;
        r.print("seeded profiles");
        return Ok(());
    }
    let base = if args.baseline {
        let url = baseline_server().await?;
        let r = run(&args, &url, "baseline").await?;
        r.print("baseline (no-op parse-and-discard server)");
        Some(r)
    } else {
        None
    };
    let r = run(&args, args.url.trim_end_matches('/'), &args.write_key)
        .await
        .context("load run failed")?;
    r.print("user360");
    if let Some(b) = base {
        println!("ratio user360 / baseline: {:.2}", r.rate() / b.rate());
    }
    if let Some(seen) = hook {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let h = seen.latency.lock();
        let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "webhook: {} deliveries; send-to-delivery ms p50 {:.2} p99 {:.2} ({} timed)",
            seen.deliveries.load(Ordering::Relaxed),
            q(0.5),
            q(0.99),
            h.len()
        );
    }
    if args.smoke {
        let failed = r.errors.values().sum::<u64>();
        println!(
            "loadgen-smoke: {} passed, {} failed",
            u64::from(r.events > 0),
            failed + u64::from(r.events == 0)
        );
        if failed > 0 || r.events == 0 {
            anyhow::bail!(
                "load smoke failed: {} events, errors {:?}",
                r.events,
                r.errors
            );
        }
    }
    Ok(())
}
