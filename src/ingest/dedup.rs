//! messageId deduplication: 64-bit hashes of accepted ids, kept for the window or up to
//! `max_ids`, whichever is fewer.
//!
//! An id is reserved atomically when a request takes it and released if that request does
//! not persist it, so among concurrent copies exactly one is accepted. Striped locks keep
//! contention low; expiry is lazy against the server clock (so the manual test clock
//! expires ids too). Held in memory for now; durable dedup comes with the durability work.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;

const STRIPES: usize = 64;

#[derive(Default)]
struct Stripe {
    /// hash → time it was accepted.
    accepted: HashMap<u64, i64>,
    /// Acceptance order, for expiry and the count bound.
    order: VecDeque<(i64, u64)>,
}

/// The set of recently accepted messageIds.
pub struct Dedup {
    /// Independent lock stripes (by hash).
    stripes: Vec<Mutex<Stripe>>,
    /// How long an id is remembered.
    window_ms: i64,
    /// Most ids per stripe.
    max_per_stripe: usize,
}

/// The hash a messageId is remembered by.
pub fn hash_id(message_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(message_id.as_bytes())
}

impl Dedup {
    /// An empty set.
    pub fn new(window_ms: i64, max_ids: usize) -> Dedup {
        Dedup {
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(Stripe::default()))
                .collect(),
            window_ms,
            max_per_stripe: (max_ids / STRIPES).max(1),
        }
    }

    fn stripe(&self, hash: u64) -> &Mutex<Stripe> {
        &self.stripes[(hash >> 58) as usize % STRIPES]
    }

    /// Takes `hash` for a request: false when it was accepted (or is being) already.
    pub fn reserve(&self, hash: u64, now: i64) -> bool {
        let mut s = self.stripe(hash).lock();
        let horizon = now - self.window_ms;
        while let Some(&(t, h)) = s.order.front() {
            if t > horizon && s.accepted.len() < self.max_per_stripe {
                break;
            }
            s.order.pop_front();
            if s.accepted.get(&h) == Some(&t) {
                s.accepted.remove(&h);
            }
        }
        match s.accepted.get(&hash) {
            Some(&t) if t > horizon => false,
            _ => {
                s.accepted.insert(hash, now);
                s.order.push_back((now, hash));
                true
            }
        }
    }

    /// Puts back an id accepted at `at` (recovery from a snapshot or the log).
    pub fn restore(&self, hash: u64, at: i64) {
        let mut s = self.stripe(hash).lock();
        if s.accepted.get(&hash).is_none_or(|t| *t < at) {
            s.accepted.insert(hash, at);
            s.order.push_back((at, hash));
        }
    }

    /// Every remembered id still inside the window at `now` (for snapshots).
    pub fn export(&self, now: i64) -> Vec<(u64, i64)> {
        let horizon = now - self.window_ms;
        let mut out = Vec::new();
        for stripe in &self.stripes {
            let s = stripe.lock();
            out.extend(
                s.accepted
                    .iter()
                    .filter(|(_, t)| **t > horizon)
                    .map(|(h, t)| (*h, *t)),
            );
        }
        out
    }

    /// Gives back an id whose request was not persisted.
    pub fn release(&self, hash: u64) {
        self.stripe(hash).lock().accepted.remove(&hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_release_and_expiry() {
        let d = Dedup::new(1000, 1_000_000);
        let h = hash_id("m1");
        assert!(d.reserve(h, 0));
        assert!(!d.reserve(h, 10));
        d.release(h);
        assert!(d.reserve(h, 20));
        assert!(!d.reserve(h, 1019));
        assert!(d.reserve(h, 1021), "forgotten after the window");
    }

    #[test]
    fn count_bound_forgets_oldest() {
        let d = Dedup::new(1_000_000, STRIPES); // one id per stripe
        let ids: Vec<u64> = (0..10_000).map(|i| hash_id(&format!("m{i}"))).collect();
        for h in &ids {
            assert!(d.reserve(*h, 1));
        }
        let remembered: usize = d.stripes.iter().map(|s| s.lock().accepted.len()).sum();
        assert!(remembered <= STRIPES + 1);
    }
}
