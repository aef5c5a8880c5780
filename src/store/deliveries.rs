//! Delivery history: the state of each webhook delivery that ended (delivered or failed,
//! with its attempts and last error) or is between retries, in the data dir's sled
//! database, for `GET /v1/triggers/{id}/deliveries` and for re-queuing failed ones.
//!
//! The outbox itself (what must still be sent) lives in the shard logs and snapshots; this
//! store only remembers outcomes, written as they happen and flushed by sled in the
//! background (a crash may forget a recent outcome: the delivery then shows as pending
//! and is sent again, which at-least-once allows).

use serde::{Deserialize, Serialize};

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting, in flight, or between retries.
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Gave up (attempts used up, or an answer that is not worth retrying).
    Failed,
}

impl DeliveryStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }
}

/// One delivery's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Delivery id.
    pub id: String,
    /// The trigger's internal index.
    pub trigger: u32,
    /// The profile it is about.
    pub profile: u128,
    /// `segment.entered` (true) or `segment.exited`.
    pub entered: bool,
    /// Change sequence.
    pub seq: u64,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the next attempt is due (pending, between retries).
    pub next_attempt_at: Option<i64>,
    /// When the change happened.
    pub created_at: i64,
    /// When it was delivered.
    pub delivered_at: Option<i64>,
    /// When it ended (delivered or failed).
    pub ended_at: Option<i64>,
    /// The shard whose outbox held it.
    pub shard: u16,
    /// The payload (kept for failed deliveries, so they can be re-queued).
    pub body: Option<String>,
}

/// Why the history store failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// sled failed.
    #[error("delivery history: {0}")]
    Store(#[from] sled::Error),
}

/// Handle on the history tree.
#[derive(Clone)]
pub struct HistoryStore {
    tree: sled::Tree,
}

fn key(trigger: u32, delivery: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + delivery.len());
    k.extend_from_slice(&trigger.to_be_bytes());
    k.extend_from_slice(delivery.as_bytes());
    k
}

impl HistoryStore {
    /// Opens (creating) the `deliveries` tree.
    pub fn open(db: &sled::Db) -> Result<HistoryStore, HistoryError> {
        Ok(HistoryStore {
            tree: db.open_tree("deliveries")?,
        })
    }

    /// Records a delivery's state (replacing an earlier one). Errors are logged: the
    /// history is informative, the outbox in the logs is what counts.
    pub fn put(&self, s: &DeliveryState) {
        let v = serde_json::to_vec(s).expect("delivery state serialises");
        if let Err(e) = self.tree.insert(key(s.trigger, &s.id), v) {
            tracing::error!(error = %e, delivery = %s.id, "cannot record a delivery's state");
        }
    }

    /// Rewrites the kept payloads of a profile's deliveries with `rewrite` (an erasure
    /// takes the traits out of failed ones, which keep theirs for re-queuing); answers how
    /// many changed.
    pub fn rewrite_bodies(&self, profile: u128, rewrite: impl Fn(&str) -> Option<String>) -> usize {
        let mut changed = 0;
        for (k, v) in self.tree.iter().filter_map(|kv| kv.ok()) {
            let Ok(mut s) = serde_json::from_slice::<DeliveryState>(&v) else {
                continue;
            };
            if s.profile != profile {
                continue;
            }
            let Some(body) = s.body.as_deref().and_then(&rewrite) else {
                continue;
            };
            s.body = Some(body);
            let v = serde_json::to_vec(&s).expect("delivery state serialises");
            match self.tree.insert(k, v) {
                Ok(_) => changed += 1,
                Err(e) => {
                    tracing::error!(error = %e, delivery = %s.id, "cannot rewrite a delivery's payload")
                }
            }
        }
        changed
    }

    /// A delivery's recorded state.
    pub fn get(&self, trigger: u32, delivery: &str) -> Option<DeliveryState> {
        let v = self.tree.get(key(trigger, delivery)).ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// Every recorded state of a trigger.
    pub fn of_trigger(&self, trigger: u32) -> Vec<DeliveryState> {
        self.tree
            .scan_prefix(trigger.to_be_bytes())
            .filter_map(|kv| kv.ok())
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// Forgets deliveries that ended before `before` (ms), and everything of triggers not
    /// in `triggers`; answers how many were removed.
    pub fn prune(&self, before: i64, triggers: &[u32]) -> usize {
        let mut removed = 0;
        for (k, v) in self.tree.iter().filter_map(|kv| kv.ok()) {
            let trigger = k
                .get(..4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default()));
            let old = serde_json::from_slice::<DeliveryState>(&v)
                .map(|s| s.ended_at.is_some_and(|t| t < before))
                .unwrap_or(true);
            if old || trigger.is_none_or(|t| !triggers.contains(&t)) {
                let _ = self.tree.remove(&k);
                removed += 1;
            }
        }
        removed
    }
}
