//! The one clock all server time comes from.
//!
//! `system` reads the wall clock; `manual` (tests) stands still until
//! `POST /v1/admin/clock` moves it through the [`super::timer::Timers`] service.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Server time source, shared by every component.
#[derive(Debug)]
pub struct Clock {
    /// True for the manual test clock.
    manual: bool,
    /// The manual clock's time (unused by the system clock).
    now: AtomicI64,
}

/// Wall-clock time in ms since the epoch.
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Clock {
    /// The wall clock.
    pub fn system() -> Clock {
        Clock {
            manual: false,
            now: AtomicI64::new(0),
        }
    }

    /// A manual clock starting at wall time.
    pub fn manual() -> Clock {
        Clock {
            manual: true,
            now: AtomicI64::new(wall_ms()),
        }
    }

    /// Current server time in ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        if self.manual {
            self.now.load(Ordering::Acquire)
        } else {
            wall_ms()
        }
    }

    /// True for the manual test clock.
    pub fn is_manual(&self) -> bool {
        self.manual
    }

    /// Moves the manual clock to `ms` (never backwards). Only the timer service calls it.
    pub(crate) fn set_manual(&self, ms: i64) {
        debug_assert!(self.manual);
        self.now.fetch_max(ms, Ordering::AcqRel);
    }
}
