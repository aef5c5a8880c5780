//! Identities: types, normalisation, blocked values, priority and limits.
//!
//! Owns the rules that decide which `(type, value)` pairs a message carries and which of
//! them is dropped first when a limit would be broken. The registry (in `grid`) applies
//! these rules to its index; this module never looks at the index itself.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::value::Interner;
use crate::config::{IdentityLimit, IdentitySettings};

/// The type of an identity (`user_id`, `email`, a custom type ...), as an interned number.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdType(pub u32);

impl IdType {
    /// `userId` of a message.
    pub const USER_ID: IdType = IdType(0);
    /// `anonymousId` of a message.
    pub const ANONYMOUS_ID: IdType = IdType(1);
    /// `traits.email`, normalised.
    pub const EMAIL: IdType = IdType(2);
    /// `traits.phone`, normalised.
    pub const PHONE: IdType = IdType(3);

    /// The type named `name` (created on first use; callers validate the name first).
    pub fn named(name: &str) -> IdType {
        IdType(type_names().intern(name))
    }

    /// The type named `name` if any identity of it was ever seen.
    pub fn lookup(name: &str) -> Option<IdType> {
        type_names().lookup(name).map(IdType)
    }

    /// The type's name.
    pub fn name(self) -> &'static str {
        type_names().name(self.0)
    }

    /// The name of a built-in type without touching the interner (hot path).
    pub fn builtin_name(self) -> Option<&'static str> {
        match self {
            IdType::USER_ID => Some("user_id"),
            IdType::ANONYMOUS_ID => Some("anonymous_id"),
            IdType::EMAIL => Some("email"),
            IdType::PHONE => Some("phone"),
            _ => None,
        }
    }
}

impl fmt::Debug for IdType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn type_names() -> &'static Interner {
    static NAMES: OnceLock<Interner> = OnceLock::new();
    NAMES.get_or_init(|| {
        let i = Interner::new();
        for n in ["user_id", "anonymous_id", "email", "phone"] {
            i.intern(n);
        }
        i
    })
}

/// One identity of a profile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What kind of id it is.
    pub ty: IdType,
    /// The normalised value.
    pub value: Box<str>,
}

impl Identity {
    /// A 128-bit fingerprint of `(type, value)`: the identity index stores these instead of
    /// strings, which keeps the index near 40 bytes per identity. Stable across processes
    /// (suppressed identities are persisted by fingerprint).
    pub fn hash(&self) -> u128 {
        match self.ty.builtin_name() {
            Some(name) => identity_hash(name, &self.value),
            None => identity_hash(self.ty.name(), &self.value),
        }
    }
}

/// The index fingerprint of a type name and a normalised value (no allocation).
pub fn identity_hash(ty: &str, value: &str) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(ty.as_bytes());
    h.update(&[0]);
    h.update(value.as_bytes());
    h.digest128()
}

/// A profile key of the API: `id:<profile id>` or `{type}:{value}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileKey {
    /// `id:<internal profile id>`.
    Id(super::ids::ProfileId),
    /// An identity (value normalised as at ingest).
    Identity(Identity),
    /// A well-formed key that cannot name any profile (blank value, malformed id).
    Nothing,
}

impl ProfileKey {
    /// The key as a message shows it (`user_id:"u-42"`).
    pub fn describe(&self) -> String {
        match self {
            ProfileKey::Id(id) => format!("id:{id}"),
            ProfileKey::Identity(i) => format!("{}:{:?}", i.ty.name(), &*i.value),
            ProfileKey::Nothing => "given: its value is blank or malformed for its type".into(),
        }
    }

    /// Parses a (URL-decoded) key, split at the first `:`.
    pub fn parse(key: &str) -> Result<ProfileKey, crate::error::Problem> {
        let Some((ty, value)) = key.split_once(':') else {
            return Err(crate::error::Problem::at(
                crate::error::ErrorCode::InvalidField,
                "key",
                format!(
                    "profile key {key:?} must be type:value, like user_id:u-42 or email:ana@example.com"
                ),
            ));
        };
        if ty == "id" {
            return Ok(value
                .parse()
                .map(ProfileKey::Id)
                .unwrap_or(ProfileKey::Nothing));
        }
        if !valid_type_name(ty) {
            return Err(crate::error::Problem::at(
                crate::error::ErrorCode::InvalidField,
                "key",
                format!(
                    "identity type {ty:?} in profile key {key:?} must match [a-z0-9_.]{{1,64}}"
                ),
            ));
        }
        let ty = IdType::named(ty);
        Ok(match normalize(ty, value) {
            Some(v) => ProfileKey::Identity(Identity {
                ty,
                value: v.into_boxed_str(),
            }),
            None => ProfileKey::Nothing,
        })
    }
}

/// True for a custom type name the API accepts (`[a-z0-9_.]{1,64}`, not `id`).
pub fn valid_type_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "id"
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

/// Normalises a raw value for its type; None when nothing usable is left (blank).
pub fn normalize(ty: IdType, raw: &str) -> Option<String> {
    let v = match ty {
        IdType::EMAIL => raw.trim().to_lowercase(),
        IdType::PHONE => {
            let t = raw.trim();
            let mut out = String::with_capacity(t.len());
            if t.starts_with('+') {
                out.push('+');
            }
            out.extend(t.chars().filter(|c| c.is_ascii_digit()));
            if out == "+" {
                return None;
            }
            out
        }
        _ => {
            if raw.trim().is_empty() {
                return None;
            }
            raw.to_owned()
        }
    };
    if v.trim().is_empty() { None } else { Some(v) }
}

/// Values that real SDK bugs send as ids; never identities, for any type.
const BUILTIN_BLOCKED: &[&str] = &[
    "",
    "null",
    "undefined",
    "none",
    "nan",
    "0",
    "-1",
    "anonymous",
    "[object object]",
    "nil",
];

/// The identity rules in force: priority, limits and blocked values.
#[derive(Debug, Clone)]
pub struct IdentityRules {
    /// Configured limits by type name (`default` for unlisted custom types).
    limits: BTreeMap<String, IdentityLimit>,
    /// Configured priority, highest first.
    priority: Vec<String>,
    /// Extra blocked values per type, lowercased.
    blocked: BTreeMap<String, Vec<String>>,
}

impl IdentityRules {
    /// Builds the rules from settings.
    pub fn new(s: &IdentitySettings) -> IdentityRules {
        IdentityRules {
            limits: s.limits.clone(),
            priority: s.priority.clone(),
            blocked: s
                .blocked
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.iter().map(|x| x.trim().to_lowercase()).collect(),
                    )
                })
                .collect(),
        }
    }

    /// True when `value` (already normalised) must never become an identity of `ty`.
    pub fn is_blocked(&self, ty: IdType, value: &str) -> bool {
        let lower = value.trim().to_lowercase();
        if BUILTIN_BLOCKED.contains(&lower.as_str()) {
            return true;
        }
        // All-zero ids: "0000", "00000000-0000-0000-0000-000000000000".
        if lower.contains('0') && lower.chars().all(|c| c == '0' || c == '-') {
            return true;
        }
        let name = ty.name();
        self.blocked
            .get(name)
            .is_some_and(|list| list.contains(&lower))
    }

    /// The limit for a type; None means unlimited.
    pub fn limit(&self, ty: IdType) -> Option<IdentityLimit> {
        let name = ty.name();
        if let Some(l) = self.limits.get(name) {
            return Some(*l);
        }
        match ty {
            IdType::ANONYMOUS_ID => None,
            IdType::USER_ID => Some(IdentityLimit {
                max: 1,
                per_ms: None,
            }),
            IdType::EMAIL | IdType::PHONE => Some(IdentityLimit {
                max: 5,
                per_ms: None,
            }),
            _ => Some(
                self.limits
                    .get("default")
                    .copied()
                    .unwrap_or(IdentityLimit {
                        max: 5,
                        per_ms: None,
                    }),
            ),
        }
    }

    /// Orders two types by priority: `Less` means `a` is kept before `b`.
    pub fn compare_priority(&self, a: IdType, b: IdType) -> Ordering {
        self.rank(a).cmp(&self.rank(b))
    }

    /// Sort key: listed types by position; unlisted custom types alphabetically just before
    /// `anonymous_id` (or last when `anonymous_id` is not listed).
    fn rank(&self, ty: IdType) -> (usize, u8, &'static str) {
        let name = ty.name();
        if let Some(pos) = self.priority.iter().position(|p| **p == *name) {
            // Listed types rank after unlisted custom types placed at the same position.
            return (pos, 1, name);
        }
        let anon_pos = self
            .priority
            .iter()
            .position(|p| p == "anonymous_id")
            .unwrap_or(self.priority.len());
        if ty == IdType::ANONYMOUS_ID {
            return (anon_pos, 1, name);
        }
        (anon_pos, 0, name)
    }

    /// Index of the identity a message drops first when a limit would be broken: the
    /// lowest-priority type; within one type, the later value in the message.
    pub fn lowest_priority(&self, ids: &[Identity]) -> Option<usize> {
        let mut worst: Option<usize> = None;
        for (i, id) in ids.iter().enumerate() {
            match worst {
                None => worst = Some(i),
                Some(w) => {
                    if self.compare_priority(id.ty, ids[w].ty) != Ordering::Less {
                        worst = Some(i);
                    }
                }
            }
        }
        worst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn rules() -> IdentityRules {
        IdentityRules::new(&Settings::defaults().identity)
    }

    #[test]
    fn normalisation() {
        assert_eq!(
            normalize(IdType::EMAIL, " Ana@Example.COM ").as_deref(),
            Some("ana@example.com")
        );
        assert_eq!(
            normalize(IdType::PHONE, "+1 (555) 010-2030").as_deref(),
            Some("+15550102030")
        );
        assert_eq!(normalize(IdType::USER_ID, "   "), None);
        assert_eq!(normalize(IdType::USER_ID, " u1").as_deref(), Some(" u1"));
    }

    #[test]
    fn fingerprint_is_the_one_shot_hash_of_type_nul_value() {
        let one_shot = xxhash_rust::xxh3::xxh3_128(b"email\0ana@x.com");
        assert_eq!(identity_hash("email", "ana@x.com"), one_shot);
        let id = Identity {
            ty: IdType::EMAIL,
            value: "ana@x.com".into(),
        };
        assert_eq!(id.hash(), one_shot);
        let custom = Identity {
            ty: IdType::named("crm"),
            value: "1".into(),
        };
        assert_eq!(custom.hash(), xxhash_rust::xxh3::xxh3_128(b"crm\x001"));
    }

    #[test]
    fn blocked_values() {
        let r = rules();
        for v in [
            "null",
            "UNDEFINED",
            "None",
            "NaN",
            "0",
            "-1",
            "Anonymous",
            "[object Object]",
            "00000000-0000-0000-0000-000000000000",
        ] {
            assert!(r.is_blocked(IdType::USER_ID, v), "{v}");
        }
        assert!(!r.is_blocked(IdType::USER_ID, "10"));
        assert!(!r.is_blocked(IdType::USER_ID, "user-1"));
    }

    #[test]
    fn priority_and_drop_order() {
        let r = rules();
        let shoe = IdType::named("shoe_size");
        let crm = IdType::named("crm");
        assert_eq!(
            r.compare_priority(IdType::USER_ID, IdType::EMAIL),
            Ordering::Less
        );
        assert_eq!(r.compare_priority(IdType::PHONE, crm), Ordering::Less);
        assert_eq!(r.compare_priority(crm, shoe), Ordering::Less);
        assert_eq!(
            r.compare_priority(shoe, IdType::ANONYMOUS_ID),
            Ordering::Less
        );
        let ids = vec![
            Identity {
                ty: IdType::USER_ID,
                value: "u".into(),
            },
            Identity {
                ty: IdType::ANONYMOUS_ID,
                value: "a".into(),
            },
            Identity {
                ty: IdType::EMAIL,
                value: "e1".into(),
            },
            Identity {
                ty: IdType::EMAIL,
                value: "e2".into(),
            },
        ];
        assert_eq!(r.lowest_priority(&ids), Some(1));
        assert_eq!(r.lowest_priority(&ids[2..]), Some(1));
        assert_eq!(r.limit(IdType::ANONYMOUS_ID), None);
        assert_eq!(r.limit(IdType::USER_ID).unwrap().max, 1);
        assert_eq!(r.limit(crm).unwrap().max, 5);
    }
}
