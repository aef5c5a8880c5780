//! The timer service: every deferred action (window expiry, retries, retention, dedup
//! expiry, snapshots) is scheduled here, against the [`Clock`], never with `tokio::time`
//! directly, so tests can move time and wait for what it releases.
//!
//! With the system clock a driver task sleeps until the next due timer. With the manual
//! clock [`Timers::advance`] moves time and runs every timer due by then, in due order,
//! each seeing its own due instant, and returns once all of them (and timers they scheduled
//! within the same span) have finished.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::clock::{Clock, wall_ms};

/// A deferred action: gets its due instant, returns a future that completes when its
/// effects are visible.
pub type TimerFn = Box<dyn FnOnce(i64) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Identifies a scheduled timer (for cancelling).
pub type TimerId = u64;

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<(i64, TimerId)>>,
    actions: HashMap<TimerId, TimerFn>,
    next_id: TimerId,
}

/// The timer service.
pub struct Timers {
    /// The clock timers are due against.
    clock: Arc<Clock>,
    /// Pending timers.
    queue: Mutex<Queue>,
    /// Wakes the system-clock driver when an earlier timer arrives.
    wake: Notify,
    /// Serialises manual advances.
    advancing: tokio::sync::Mutex<()>,
}

impl Timers {
    /// A service over `clock`.
    pub fn new(clock: Arc<Clock>) -> Arc<Timers> {
        Arc::new(Timers {
            clock,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            advancing: tokio::sync::Mutex::new(()),
        })
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// Runs `action` at server time `due` (at once if already past).
    pub fn schedule(&self, due: i64, action: TimerFn) -> TimerId {
        let mut q = self.queue.lock();
        let id = q.next_id;
        q.next_id += 1;
        q.heap.push(Reverse((due, id)));
        q.actions.insert(id, action);
        drop(q);
        self.wake.notify_one();
        id
    }

    /// Cancels a timer that has not run yet.
    pub fn cancel(&self, id: TimerId) {
        self.queue.lock().actions.remove(&id);
    }

    fn pop_due(&self, upto: i64) -> Option<(i64, TimerFn)> {
        let mut q = self.queue.lock();
        while let Some(&Reverse((due, id))) = q.heap.peek() {
            if due > upto {
                return None;
            }
            q.heap.pop();
            if let Some(f) = q.actions.remove(&id) {
                return Some((due, f));
            }
        }
        None
    }

    fn next_due(&self) -> Option<i64> {
        self.queue.lock().heap.peek().map(|Reverse((d, _))| *d)
    }

    /// Manual clock: moves time forward by `ms` and runs everything due; returns the new time.
    pub async fn advance(&self, ms: i64) -> i64 {
        let _guard = self.advancing.lock().await;
        let target = self.clock.now_ms().saturating_add(ms.max(0));
        while let Some((due, f)) = self.pop_due(target) {
            // Time passes through each due instant in order, so an action sees its own time.
            self.clock.set_manual(due.max(self.clock.now_ms()));
            f(due).await;
        }
        self.clock.set_manual(target);
        target
    }

    /// System clock: runs timers as they come due until `shutdown` resolves.
    pub async fn drive(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let now = wall_ms();
            while let Some((due, f)) = self.pop_due(now) {
                f(due).await;
            }
            let sleep_ms = self
                .next_due()
                .map(|d| (d - wall_ms()).clamp(1, 60_000))
                .unwrap_or(60_000);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(sleep_ms as u64)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    #[tokio::test]
    async fn manual_advance_runs_due_timers_in_order_with_their_instants() {
        let clock = Arc::new(Clock::manual());
        let start = clock.now_ms();
        let timers = Timers::new(clock.clone());
        let seen = Arc::new(Mutex::new(Vec::new()));
        for offset in [300, 100, 200, 10_000] {
            let seen = seen.clone();
            let c = clock.clone();
            timers.schedule(
                start + offset,
                Box::new(move |due| {
                    Box::pin(async move {
                        seen.lock().push((due - start, c.now_ms() - start));
                    })
                }),
            );
        }
        let cancelled = Arc::new(AtomicI64::new(0));
        let c2 = cancelled.clone();
        let id = timers.schedule(
            start + 150,
            Box::new(move |_| {
                Box::pin(async move {
                    c2.store(1, Ordering::SeqCst);
                })
            }),
        );
        timers.cancel(id);
        let now = timers.advance(1000).await;
        assert_eq!(now, start + 1000);
        assert_eq!(*seen.lock(), vec![(100, 100), (200, 200), (300, 300)]);
        assert_eq!(cancelled.load(Ordering::SeqCst), 0);
        timers.advance(9000).await;
        assert_eq!(seen.lock().len(), 4);
    }
}
