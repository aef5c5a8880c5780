//! Profile ids: fixed-width, time-ordered strings that carry their home shard.
//!
//! An id is a ULID: 48 bits of creation time (ms), then 80 bits laid out so that byte
//! order of the string is creation order even within one millisecond and across shards:
//! a marker bit, a 47-bit process-wide creation counter, the 16-bit shard number and 16
//! random bits. "The older profile" is the smaller id, and routing an id to its shard
//! needs no index. (Ids made before the counter existed have no marker and carry the shard
//! in the top 16 of the 80 bits; [`ProfileId::shard`] reads both.)

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// The identity of one profile for its whole life (until it is merged away or erased).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProfileId(pub u128);

/// Orders ids made in the same millisecond by creation.
static CREATED: AtomicU64 = AtomicU64::new(0);

/// Set in ids of the current layout.
const MARKER: u128 = 1 << 79;

impl ProfileId {
    /// Makes a new id created at `ms` on `shard`; `random` keeps ids of different
    /// processes apart.
    pub fn new(ms: i64, shard: u16, random: u64) -> ProfileId {
        let ms = ms.clamp(0, (1i64 << 48) - 1) as u64;
        let n = CREATED.fetch_add(1, Ordering::Relaxed) & ((1 << 47) - 1);
        let rand80 =
            MARKER | ((n as u128) << 32) | ((shard as u128) << 16) | (random as u128 & 0xffff);
        ProfileId(Ulid::from_parts(ms, rand80).0)
    }

    /// The shard that hosts this profile.
    pub fn shard(self) -> u16 {
        if self.0 & MARKER != 0 {
            ((self.0 >> 16) & 0xffff) as u16
        } else {
            ((self.0 >> 64) & 0xffff) as u16
        }
    }

    /// Creation time in ms since the epoch (the id's time part).
    pub fn created_ms(self) -> i64 {
        (self.0 >> 80) as i64
    }

    /// The lowest possible id, for "list from the start".
    pub const MIN: ProfileId = ProfileId(0);
}

impl fmt::Display for ProfileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; ulid::ULID_LEN];
        f.write_str(Ulid(self.0).array_to_str(&mut buf))
    }
}

impl fmt::Debug for ProfileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for ProfileId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != ulid::ULID_LEN {
            return Err(());
        }
        // Only the canonical (upper-case) spelling, so string order stays id order.
        if s.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(());
        }
        Ulid::from_string(s).map(|u| ProfileId(u.0)).map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_carries_shard_and_time_and_sorts_by_time() {
        let a = ProfileId::new(1_700_000_000_000, 3, 99);
        let b = ProfileId::new(1_700_000_000_001, 0, 1);
        assert_eq!(a.shard(), 3);
        assert_eq!(a.created_ms(), 1_700_000_000_000);
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
        assert_eq!(a.to_string().len(), 26);
        assert_eq!(a.to_string().parse::<ProfileId>().unwrap(), a);
        assert!("nope".parse::<ProfileId>().is_err());
        // Within one millisecond, across shards, ids sort by creation.
        let first = ProfileId::new(1_700_000_000_000, 9, u64::MAX);
        let second = ProfileId::new(1_700_000_000_000, 0, 0);
        assert!(first < second);
        assert_eq!((first.shard(), second.shard()), (9, 0));
        // Ids of the first layout (shard in the top 16 of the 80 bits) still route.
        let old = ProfileId(Ulid::from_parts(1_700_000_000_000, (5u128 << 64) | 77).0);
        assert_eq!(old.shard(), 5);
    }
}
