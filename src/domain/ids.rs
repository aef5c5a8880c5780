//! Profile ids: fixed-width, time-ordered strings that carry their home shard.
//!
//! An id is a ULID whose 80 "random" bits start with the 16-bit shard number, so byte order
//! of the string is creation order, "the older profile" needs no lookup, and routing an id
//! to its shard needs no index.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// The identity of one profile for its whole life (until it is merged away or erased).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProfileId(pub u128);

impl ProfileId {
    /// Makes a new id created at `ms` on `shard`; `random` keeps ids of one millisecond apart.
    pub fn new(ms: i64, shard: u16, random: u64) -> ProfileId {
        let ms = ms.clamp(0, (1i64 << 48) - 1) as u64;
        let rand80 = ((shard as u128) << 64) | random as u128;
        ProfileId(Ulid::from_parts(ms, rand80).0)
    }

    /// The shard that hosts this profile.
    pub fn shard(self) -> u16 {
        ((self.0 >> 64) & 0xffff) as u16
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
    }
}
