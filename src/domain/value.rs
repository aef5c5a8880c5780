//! Compact trait values and interned trait keys.
//!
//! A profile keeps its traits as [`Value`]s (24 bytes each, no per-key `String` at the top
//! level) keyed by [`Sym`]s from one process-wide [`Interner`], so a million profiles with
//! the same twenty trait names hold those names once.

use std::sync::OnceLock;

use bincode::{Decode, Encode};
use dashmap::DashMap;
use parking_lot::RwLock;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

/// A JSON value in the smallest form that keeps it exact (numbers keep their JSON kind).
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum Value {
    /// JSON null.
    Null,
    /// true / false.
    Bool(bool),
    /// A negative integer.
    Int(i64),
    /// A non-negative integer.
    UInt(u64),
    /// A number with a fraction or exponent.
    Float(f64),
    /// Text.
    Str(Box<str>),
    /// A list.
    Array(Box<[Value]>),
    /// An object; keys sorted, so lookups are a binary search.
    Object(Box<[(Box<str>, Value)]>),
}

impl Value {
    /// Converts a parsed JSON value, taking ownership so strings are moved, not copied.
    pub fn from_json(v: serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    Value::UInt(u)
                } else if let Some(i) = n.as_i64() {
                    Value::Int(i)
                } else {
                    Value::Float(n.as_f64().unwrap_or(0.0))
                }
            }
            serde_json::Value::String(s) => Value::Str(s.into_boxed_str()),
            serde_json::Value::Array(a) => {
                Value::Array(a.into_iter().map(Value::from_json).collect())
            }
            serde_json::Value::Object(m) => {
                // serde_json's map (without preserve_order) iterates in key order already.
                Value::Object(
                    m.into_iter()
                        .map(|(k, v)| (k.into_boxed_str(), Value::from_json(v)))
                        .collect(),
                )
            }
        }
    }

    /// Converts back to a JSON value (for answers that build JSON trees).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => (*i).into(),
            Value::UInt(u) => (*u).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => serde_json::Value::String(s.to_string()),
            Value::Array(a) => serde_json::Value::Array(a.iter().map(Value::to_json).collect()),
            Value::Object(o) => serde_json::Value::Object(
                o.iter()
                    .map(|(k, v)| (k.to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// Member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(o) => o
                .binary_search_by(|(k, _)| k.as_ref().cmp(key))
                .ok()
                .map(|i| &o[i].1),
            _ => None,
        }
    }

    /// Length of this value written as compact JSON (for the per-profile trait budget).
    pub fn json_len(&self) -> usize {
        struct Counter(usize);
        impl std::io::Write for Counter {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut c = Counter(0);
        let _ = serde_json::to_writer(&mut c, self);
        c.0
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::Float(f) => s.serialize_f64(*f),
            Value::Str(t) => s.serialize_str(t),
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a.iter() {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Value::Object(o) => {
                let mut map = s.serialize_map(Some(o.len()))?;
                for (k, v) in o.iter() {
                    map.serialize_entry(k.as_ref(), v)?;
                }
                map.end()
            }
        }
    }
}

/// An interned name: a small number that stands for a string for the life of the process.
pub type Sym = u32;

/// A process-wide table of names; never persisted (symbols differ between runs).
/// Names live for the process (they are leaked once each), so [`Interner::name`] hands
/// out `&'static str` from a per-thread copy of the table: the shards look names up for
/// every trait change, and a shared lock there made the shard threads contend.
pub struct Interner {
    /// name → symbol, for interning without a global lock.
    by_name: DashMap<&'static str, Sym>,
    /// symbol → name; appended under a write lock only when a new name appears.
    names: RwLock<Vec<&'static str>>,
    /// This interner's slot in every thread's cache.
    slot: usize,
}

/// One thread's copy of what one interner holds (names never change once made, so a
/// copy never goes stale; it only lags, and a miss falls back to the shared table).
#[derive(Default)]
struct LocalNames {
    /// Names by symbol, a prefix of the shared list.
    by_sym: Vec<&'static str>,
    /// Symbols by name, for the names this thread has interned.
    by_name: std::collections::HashMap<&'static str, Sym, foldhash::fast::RandomState>,
}

thread_local! {
    /// Per thread, per interner (by slot).
    static NAME_CACHE: std::cell::RefCell<Vec<LocalNames>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's copy of the interner in `slot`.
fn with_local<T>(slot: usize, f: impl FnOnce(&mut LocalNames) -> T) -> T {
    NAME_CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.len() <= slot {
            cache.resize_with(slot + 1, LocalNames::default);
        }
        f(&mut cache[slot])
    })
}

impl Interner {
    /// An empty table.
    pub fn new() -> Interner {
        static NEXT_SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        Interner {
            by_name: DashMap::new(),
            names: RwLock::new(Vec::new()),
            slot: NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The symbol of `name`, creating it on first use (no shared lock once this thread
    /// has seen it: every trait of every message is interned).
    pub fn intern(&self, name: &str) -> Sym {
        if let Some(s) = with_local(self.slot, |l| l.by_name.get(name).copied()) {
            return s;
        }
        let sym = self.intern_shared(name);
        let leaked = self.name(sym);
        with_local(self.slot, |l| l.by_name.insert(leaked, sym));
        sym
    }

    /// [`Interner::intern`] through the shared table.
    fn intern_shared(&self, name: &str) -> Sym {
        if let Some(s) = self.by_name.get(name) {
            return *s;
        }
        let mut names = self.names.write();
        // Re-check under the write lock: another thread may have added it meanwhile.
        if let Some(s) = self.by_name.get(name) {
            return *s;
        }
        let leaked: &'static str = Box::leak(name.into());
        let sym = names.len() as Sym;
        names.push(leaked);
        self.by_name.insert(leaked, sym);
        sym
    }

    /// The symbol of `name` if it was ever interned.
    pub fn lookup(&self, name: &str) -> Option<Sym> {
        if let Some(s) = with_local(self.slot, |l| l.by_name.get(name).copied()) {
            return Some(s);
        }
        self.by_name.get(name).map(|s| *s)
    }

    /// The name of a symbol made by this interner (no lock once this thread has seen it).
    pub fn name(&self, sym: Sym) -> &'static str {
        with_local(self.slot, |local| {
            if let Some(n) = local.by_sym.get(sym as usize) {
                return *n;
            }
            let names = self.names.read();
            let seen = local.by_sym.len();
            local.by_sym.extend_from_slice(&names[seen..]);
            local.by_sym[sym as usize]
        })
    }
}

impl Default for Interner {
    fn default() -> Self {
        Interner::new()
    }
}

/// The interner for top-level trait keys.
pub fn trait_keys() -> &'static Interner {
    static KEYS: OnceLock<Interner> = OnceLock::new();
    KEYS.get_or_init(Interner::new)
}

/// Members of a compact object, as the rule evaluator walks them.
pub struct CompactMembers<'a>(std::slice::Iter<'a, (Box<str>, Value)>);

impl<'a> Iterator for CompactMembers<'a> {
    type Item = (&'a str, &'a Value);
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k.as_ref(), v))
    }
}

impl crate::segment::value_view::JsonView for Value {
    type Members<'a> = CompactMembers<'a>;

    fn view(&self) -> crate::segment::value_view::View<'_, Self> {
        use crate::segment::value_view::View;
        match self {
            Value::Null => View::Null,
            Value::Bool(b) => View::Bool(*b),
            Value::Int(i) => View::Number(*i as f64),
            Value::UInt(u) => View::Number(*u as f64),
            Value::Float(f) => View::Number(*f),
            Value::Str(s) => View::Str(s),
            Value::Array(a) => View::Array(a),
            Value::Object(_) => View::Object(self),
        }
    }

    fn get(&self, key: &str) -> Option<&Self> {
        Value::get(self, key)
    }

    fn object_len(&self) -> usize {
        match self {
            Value::Object(o) => o.len(),
            _ => 0,
        }
    }

    fn members(&self) -> Self::Members<'_> {
        match self {
            Value::Object(o) => CompactMembers(o.iter()),
            _ => CompactMembers([].iter()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_round_trips_json_exactly() {
        let src = r#"{"a":[1,-2,3.5,"x\u0000y",true,null],"b":{"c":18446744073709551615}}"#;
        let v = Value::from_json(serde_json::from_str(src).unwrap());
        assert_eq!(serde_json::to_string(&v).unwrap(), src);
        assert_eq!(v.json_len(), src.len());
        assert_eq!(v.get("b").unwrap().get("c"), Some(&Value::UInt(u64::MAX)));
        assert_eq!(std::mem::size_of::<Value>(), 24);
    }

    #[test]
    fn interner_is_stable() {
        let i = Interner::new();
        let a = i.intern("plan");
        assert_eq!(i.intern("plan"), a);
        assert_ne!(i.intern("email"), a);
        assert_eq!(i.name(a), "plan");
        assert_eq!(i.lookup("nope"), None);
    }
}
