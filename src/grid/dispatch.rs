//! Trigger dispatch: sends the durable outbox's deliveries to their webhooks.
//!
//! One worker (a tokio task) per trigger owns that trigger's pending deliveries: a queue
//! per profile in change order, at most one delivery of a profile in flight (an exit never
//! overtakes its enter), up to `triggers.max_concurrency` profiles in flight at once, and
//! retries with exponential backoff and jitter through the timer service (so the manual
//! clock drives them in tests). A slow or dead endpoint only fills its own trigger's
//! queues: shards never wait for dispatch, and other triggers have their own workers.
//!
//! Deliveries come from the shards' outboxes once durable ([`DispatchEvent`]); when one
//! ends (delivered or failed) the worker records it in the history store and tells the
//! shard that queued it, which logs the end — so a crash re-sends (at least once, same
//! delivery id) but never forgets or invents a delivery.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};

use super::clock::Clock;
use super::timer::Timers;
use crate::config::TriggerSettings;
use crate::segment::set::TriggerDef;
use crate::store::deliveries::{DeliveryState, DeliveryStatus, HistoryStore};
use crate::store::log::OutboxEntry;

/// Durable deliveries handed over by a shard.
#[derive(Debug)]
pub struct DispatchEvent {
    /// The shard whose outbox holds them.
    pub shard: u16,
    /// New deliveries, or ones rewritten by an erasure (same id: the body is replaced).
    pub entries: Vec<OutboxEntry>,
}

/// Tells a shard that some of its queued deliveries ended (it logs that and forgets them).
pub type EndSender = Arc<dyn Fn(u16, Vec<String>) + Send + Sync>;

/// How one attempt went.
#[derive(Debug)]
enum Outcome {
    /// A 2xx answer.
    Delivered,
    /// A network error, 408, 429 or 5xx: try again (after at least this long, if the
    /// receiver said so with `Retry-After`).
    Retry(String, Option<Duration>),
    /// Another answer: give up now.
    Fatal(String),
}

/// A delivery a worker holds.
#[derive(Debug, Clone)]
struct Pending {
    entry: OutboxEntry,
    shard: u16,
    attempts: u32,
    next_at: i64,
    last_error: Option<String>,
}

enum WorkerMsg {
    Queued(u16, Vec<OutboxEntry>),
    Sent {
        profile: u128,
        delivery: String,
        outcome: Outcome,
    },
    RetryDue {
        profile: u128,
        done: Option<oneshot::Sender<()>>,
    },
    List {
        reply: oneshot::Sender<Vec<DeliveryState>>,
    },
    Stop,
}

/// What every worker shares.
pub struct DispatchContext {
    /// Outbound HTTP (pooled connections).
    pub client: reqwest::Client,
    /// Server time.
    pub clock: Arc<Clock>,
    /// Retries are deferred actions.
    pub timers: Arc<Timers>,
    /// Delivery history (delivered, failed, attempts so far).
    pub history: HistoryStore,
    /// Retry and concurrency settings.
    pub settings: TriggerSettings,
    /// Where ends go.
    pub end: EndSender,
}

/// The running dispatch: one worker per trigger.
pub struct Dispatcher {
    ctx: Arc<DispatchContext>,
    workers: DashMap<u32, mpsc::UnboundedSender<WorkerMsg>>,
}

impl Dispatcher {
    /// A dispatcher with no workers yet.
    pub fn new(ctx: DispatchContext) -> Dispatcher {
        Dispatcher {
            ctx: Arc::new(ctx),
            workers: DashMap::new(),
        }
    }

    /// Starts a worker for each trigger that has none.
    pub fn start_workers(&self, triggers: &[TriggerDef]) {
        for t in triggers {
            if !self.workers.contains_key(&t.idx) {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run_worker(
                    Arc::new(t.clone()),
                    self.ctx.clone(),
                    rx,
                    tx.clone(),
                ));
                self.workers.insert(t.idx, tx);
            }
        }
    }

    /// Stops the workers of triggers not in `triggers` (their queued deliveries go).
    pub fn retain_workers(&self, triggers: &[TriggerDef]) {
        self.workers.retain(|idx, w| {
            let keep = triggers.iter().any(|t| t.idx == *idx);
            if !keep {
                let _ = w.send(WorkerMsg::Stop);
            }
            keep
        });
    }

    /// The shared context (history store, settings).
    pub fn context(&self) -> &Arc<DispatchContext> {
        &self.ctx
    }

    /// Hands durable deliveries to their triggers' workers (unknown triggers' are dropped:
    /// the shards forget them at their next rules install).
    pub fn queue(&self, ev: DispatchEvent) {
        let mut by_trigger: HashMap<u32, Vec<OutboxEntry>> = HashMap::new();
        for e in ev.entries {
            by_trigger.entry(e.trigger).or_default().push(e);
        }
        for (t, entries) in by_trigger {
            if let Some(w) = self.workers.get(&t) {
                let _ = w.send(WorkerMsg::Queued(ev.shard, entries));
            }
        }
    }

    /// The deliveries of a trigger still waiting (queued, in flight or between retries).
    pub async fn pending(&self, trigger: u32) -> Vec<DeliveryState> {
        let Some(w) = self.workers.get(&trigger).map(|w| w.clone()) else {
            return Vec::new();
        };
        let (tx, rx) = oneshot::channel();
        if w.send(WorkerMsg::List { reply: tx }).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Deliveries waiting in every worker (the outbox depth).
    pub fn depth_gauge(depth: i64) {
        metrics::gauge!("user360_outbox_depth").increment(depth as f64);
    }
}

/// Batches the ends of deliveries per shard (for up to 5 ms or 512 ids), so a busy trigger
/// costs its shards one log record per batch, not one per delivery.
pub fn end_batcher(shards: Vec<actix::Addr<super::shard::Shard>>) -> EndSender {
    let (tx, mut rx) = mpsc::unbounded_channel::<(u16, Vec<String>)>();
    tokio::spawn(async move {
        while let Some((shard, ids)) = rx.recv().await {
            let mut by_shard: HashMap<u16, Vec<String>> = HashMap::new();
            by_shard.entry(shard).or_default().extend(ids);
            let deadline = tokio::time::Instant::now() + Duration::from_millis(5);
            while by_shard.values().map(Vec::len).sum::<usize>() < 512 {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some((s, ids))) => by_shard.entry(s).or_default().extend(ids),
                    _ => break,
                }
            }
            for (s, deliveries) in by_shard {
                if let Some(addr) = shards.get(s as usize) {
                    addr.do_send(super::shard::outbox::EndDeliveries { deliveries });
                }
            }
        }
    });
    Arc::new(move |shard, ids| {
        let _ = tx.send((shard, ids));
    })
}

/// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in bytes {
        use std::fmt::Write as _;
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The body sent for attempt `attempt` (the stored body plus its `"attempt"` member).
fn body_for(entry: &OutboxEntry, attempt: u32) -> String {
    let mut b = String::with_capacity(entry.body.len() + 16);
    b.push_str(&entry.body);
    b.push_str(&format!(",\"attempt\":{attempt}}}"));
    b
}

/// Wait before attempt `attempts + 1`: `first × 2^(attempts − 1)`, capped, with ±20 %
/// jitter so retries of many deliveries spread out; never shorter than a `Retry-After`.
fn backoff(s: &TriggerSettings, attempts: u32, retry_after: Option<Duration>) -> i64 {
    let base = (s.first_retry_ms as f64) * 2f64.powi(attempts.saturating_sub(1).min(40) as i32);
    let capped = base.min(s.max_retry_ms as f64);
    let jitter = 0.8 + rand::random::<f64>() * 0.4;
    let ms = (capped * jitter) as i64;
    let asked = retry_after.map(|d| d.as_millis() as i64).unwrap_or(0);
    ms.max(asked).max(1)
}

/// Sends one attempt.
async fn attempt(ctx: &DispatchContext, t: &TriggerDef, entry: &OutboxEntry, n: u32) -> Outcome {
    let body = body_for(entry, n);
    let ts = ctx.clock.now_ms().div_euclid(1000);
    let mut req = ctx
        .client
        .post(&t.url)
        .timeout(Duration::from_millis(ctx.settings.timeout_ms));
    for (k, v) in &t.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    req = req
        .header("content-type", "application/json")
        .header("x-user360-delivery", entry.delivery.as_str())
        .header("x-user360-timestamp", ts.to_string());
    if let Some(secret) = &t.secret {
        req = req.header(
            "x-user360-signature",
            signature(secret, ts, body.as_bytes()),
        );
    }
    match req.body(body).send().await {
        Ok(resp) => {
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Read (and bound) the answer so the connection can be reused.
            let _ = tokio::time::timeout(Duration::from_secs(1), resp.bytes()).await;
            let code = status.as_u16();
            if status.is_success() {
                Outcome::Delivered
            } else if code == 408 || code == 429 || status.is_server_error() {
                Outcome::Retry(format!("HTTP {code}"), retry_after)
            } else {
                Outcome::Fatal(format!("HTTP {code}"))
            }
        }
        Err(e) => {
            let what = if e.is_timeout() {
                format!("timed out after {} ms", ctx.settings.timeout_ms)
            } else if e.is_connect() {
                format!("cannot connect: {e}")
            } else {
                format!("request failed: {e}")
            };
            Outcome::Retry(what, None)
        }
    }
}

/// One trigger's worker.
async fn run_worker(
    t: Arc<TriggerDef>,
    ctx: Arc<DispatchContext>,
    mut rx: mpsc::UnboundedReceiver<WorkerMsg>,
    me: mpsc::UnboundedSender<WorkerMsg>,
) {
    let max = ctx.settings.max_concurrency.max(1);
    let mut queues: HashMap<u128, VecDeque<Pending>> = HashMap::new();
    let mut busy: HashSet<u128> = HashSet::new();
    let mut waiting: HashSet<u128> = HashSet::new();
    let mut ready: VecDeque<u128> = VecDeque::new();
    let mut in_flight = 0usize;
    // Manual clock: a retry's timer returns once its attempt is done.
    let mut retry_done: HashMap<u128, oneshot::Sender<()>> = HashMap::new();

    while let Some(msg) = rx.recv().await {
        match msg {
            WorkerMsg::Queued(shard, entries) => {
                for e in entries {
                    let q = queues.entry(e.profile).or_default();
                    if let Some(p) = q.iter_mut().find(|p| p.entry.delivery == e.delivery) {
                        p.entry = e; // rewritten (an erasure stripped its traits)
                        continue;
                    }
                    let profile = e.profile;
                    // Earlier attempts (before a restart) count.
                    let prior = ctx.history.get(t.idx, &e.delivery);
                    // Already ended, its end not yet logged by the shard: an erasure's
                    // rewrite that crossed the end, or a restart after the end was
                    // recorded here but before the shard logged it. Never sent again.
                    if prior
                        .as_ref()
                        .is_some_and(|p| p.status != DeliveryStatus::Pending)
                    {
                        (ctx.end)(shard, vec![e.delivery]);
                        continue;
                    }
                    let pending = Pending {
                        attempts: prior.as_ref().map_or(0, |p| p.attempts),
                        last_error: prior.and_then(|p| p.last_error),
                        next_at: 0,
                        shard,
                        entry: e,
                    };
                    let at = q.partition_point(|p| p.entry.seq < pending.entry.seq);
                    q.insert(at, pending);
                    Dispatcher::depth_gauge(1);
                    if !busy.contains(&profile)
                        && !waiting.contains(&profile)
                        && !ready.contains(&profile)
                    {
                        ready.push_back(profile);
                    }
                }
            }
            WorkerMsg::Sent {
                profile,
                delivery,
                outcome,
            } => {
                in_flight -= 1;
                busy.remove(&profile);
                let now = ctx.clock.now_ms();
                let Some(q) = queues.get_mut(&profile) else {
                    continue;
                };
                let Some(head) = q.front_mut().filter(|p| p.entry.delivery == delivery) else {
                    continue;
                };
                head.attempts += 1;
                let ended = match outcome {
                    Outcome::Delivered => {
                        metrics::counter!("user360_deliveries_total", "outcome" => "delivered")
                            .increment(1);
                        metrics::histogram!("user360_delivery_latency_seconds")
                            .record((now - head.entry.at_ms).max(0) as f64 / 1000.0);
                        Some((DeliveryStatus::Delivered, None))
                    }
                    Outcome::Fatal(err) => Some((DeliveryStatus::Failed, Some(err))),
                    Outcome::Retry(err, _) if head.attempts >= ctx.settings.max_attempts => {
                        Some((DeliveryStatus::Failed, Some(err)))
                    }
                    Outcome::Retry(err, after) => {
                        metrics::counter!("user360_delivery_retries_total").increment(1);
                        let wait = backoff(&ctx.settings, head.attempts, after);
                        head.next_at = now + wait;
                        head.last_error = Some(err);
                        ctx.history
                            .put(&state_of(&t, head, DeliveryStatus::Pending, None));
                        waiting.insert(profile);
                        let me = me.clone();
                        let manual = ctx.clock.is_manual();
                        ctx.timers.schedule(
                            head.next_at,
                            Box::new(move |_| {
                                Box::pin(async move {
                                    if manual {
                                        let (tx, rx) = oneshot::channel();
                                        let _ = me.send(WorkerMsg::RetryDue {
                                            profile,
                                            done: Some(tx),
                                        });
                                        let _ = rx.await;
                                    } else {
                                        let _ = me.send(WorkerMsg::RetryDue {
                                            profile,
                                            done: None,
                                        });
                                    }
                                })
                            }),
                        );
                        None
                    }
                };
                if let Some((status, err)) = ended {
                    let mut p = q.pop_front().expect("head");
                    if status == DeliveryStatus::Failed {
                        metrics::counter!("user360_deliveries_total", "outcome" => "failed")
                            .increment(1);
                        tracing::warn!(trigger = %t.id, delivery = %p.entry.delivery, attempts = p.attempts, error = ?err, "delivery failed");
                    }
                    p.last_error = err.or(p.last_error);
                    ctx.history.put(&state_of(&t, &p, status, Some(now)));
                    (ctx.end)(p.shard, vec![p.entry.delivery.clone()]);
                    Dispatcher::depth_gauge(-1);
                    if q.is_empty() {
                        queues.remove(&profile);
                    } else {
                        ready.push_back(profile);
                    }
                }
                if let Some(done) = retry_done.remove(&profile) {
                    let _ = done.send(());
                }
            }
            WorkerMsg::RetryDue { profile, done } => {
                waiting.remove(&profile);
                if queues.contains_key(&profile) && !busy.contains(&profile) {
                    ready.push_back(profile);
                    if let Some(d) = done {
                        retry_done.insert(profile, d);
                    }
                } else if let Some(d) = done {
                    let _ = d.send(());
                }
            }
            WorkerMsg::Stop => {
                let left: usize = queues.values().map(VecDeque::len).sum();
                Dispatcher::depth_gauge(-(left as i64));
                for (_, d) in retry_done.drain() {
                    let _ = d.send(());
                }
                return;
            }
            WorkerMsg::List { reply } => {
                let list = queues
                    .values()
                    .flatten()
                    .map(|p| state_of(&t, p, DeliveryStatus::Pending, None))
                    .collect();
                let _ = reply.send(list);
            }
        }
        // Send what may be sent: one per profile, up to the concurrency cap.
        while in_flight < max {
            let Some(profile) = ready.pop_front() else {
                break;
            };
            if busy.contains(&profile) || waiting.contains(&profile) {
                continue;
            }
            let Some(head) = queues.get(&profile).and_then(|q| q.front()) else {
                continue;
            };
            busy.insert(profile);
            in_flight += 1;
            let (ctx2, t2, entry, n, me2) = (
                ctx.clone(),
                t.clone(),
                head.entry.clone(),
                head.attempts + 1,
                me.clone(),
            );
            tokio::spawn(async move {
                let outcome = attempt(&ctx2, &t2, &entry, n).await;
                let _ = me2.send(WorkerMsg::Sent {
                    profile: entry.profile,
                    delivery: entry.delivery,
                    outcome,
                });
            });
        }
    }
}

/// The delivery object of a pending or ended delivery.
fn state_of(
    t: &TriggerDef,
    p: &Pending,
    status: DeliveryStatus,
    ended_at: Option<i64>,
) -> DeliveryState {
    DeliveryState {
        id: p.entry.delivery.clone(),
        trigger: t.idx,
        profile: p.entry.profile,
        entered: p.entry.entered,
        seq: p.entry.seq,
        status,
        attempts: p.attempts,
        last_error: p.last_error.clone(),
        next_attempt_at: (status == DeliveryStatus::Pending && p.next_at > 0).then_some(p.next_at),
        created_at: p.entry.at_ms,
        delivered_at: (status == DeliveryStatus::Delivered)
            .then_some(ended_at)
            .flatten(),
        ended_at,
        shard: p.shard,
        body: (status == DeliveryStatus::Failed).then(|| p.entry.body.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 key and data, joined the way deliveries are signed.
        let sig = signature("Jefe", 1_700_000_000, b"what do ya want for nothing?");
        assert!(sig.starts_with("sha256="));
        assert_eq!(sig.len(), 7 + 64);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1700000000.what do ya want for nothing?");
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sig, format!("sha256={want}"));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_honours_retry_after() {
        let s = TriggerSettings {
            max_attempts: 15,
            history_days: 7,
            timeout_ms: 1000,
            max_concurrency: 4,
            first_retry_ms: 1000,
            max_retry_ms: 300_000,
        };
        for (attempts, base) in [(1u32, 1000f64), (2, 2000.0), (3, 4000.0), (12, 300_000.0)] {
            let w = backoff(&s, attempts, None) as f64;
            assert!(w >= base * 0.8 && w <= base * 1.2, "{attempts}: {w}");
        }
        assert!(backoff(&s, 1, Some(Duration::from_secs(30))) >= 30_000);
    }
}
