//! The trait-path catalog: every leaf trait path seen, for CSV export headers and rule
//! editors. Paths are written with `.` between nested keys and `\.` for a dot inside a key.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashSet;

use crate::domain::value::Value;

/// The set of leaf trait paths seen since start (recovery replays them back in).
pub struct Catalog {
    /// Escaped leaf paths.
    paths: DashSet<String>,
    /// This catalog's slot in every thread's [`KNOWN_LEAVES`].
    slot: usize,
}

impl Default for Catalog {
    fn default() -> Catalog {
        static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
        Catalog {
            paths: DashSet::new(),
            slot: NEXT_SLOT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

thread_local! {
    /// Per thread, per catalog (by slot): top-level leaf keys already in `paths`, so the
    /// shards, which note the paths of every trait change, skip the shared set (paths are
    /// never removed, so an entry never goes stale).
    static KNOWN_LEAVES: RefCell<Vec<HashSet<&'static str, foldhash::fast::RandomState>>> =
        const { RefCell::new(Vec::new()) };
}

/// Escapes one key for a path: `\` → `\\`, `.` → `\.`.
pub fn escape_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        if c == '.' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Catalog {
    /// Records the leaf paths of `value` under the top-level `key` (an interned trait
    /// name, hence `'static`).
    pub fn add(&self, key: &'static str, value: &Value) {
        // The common case, a known top-level leaf: no allocation, no shared lock.
        let leaf =
            !matches!(value, Value::Object(m) if !m.is_empty()) && !key.contains(['.', '\\']);
        if leaf {
            let known = |l: &mut Vec<HashSet<&'static str, _>>| {
                if l.len() <= self.slot {
                    l.resize_with(self.slot + 1, HashSet::default);
                }
                if l[self.slot].contains(key) {
                    return true;
                }
                if self.paths.contains(key) {
                    l[self.slot].insert(key);
                    return true;
                }
                false
            };
            if KNOWN_LEAVES.with(|l| known(&mut l.borrow_mut())) {
                return;
            }
        }
        let mut stack: Vec<(String, &Value)> = vec![(escape_key(key), value)];
        while let Some((path, v)) = stack.pop() {
            match v {
                Value::Object(members) if !members.is_empty() => {
                    for (k, child) in members.iter() {
                        stack.push((format!("{path}.{}", escape_key(k)), child));
                    }
                }
                _ => {
                    if !self.paths.contains(&path) {
                        self.paths.insert(path);
                    }
                }
            }
        }
    }

    /// All paths, sorted.
    pub fn sorted(&self) -> Vec<String> {
        let mut v: Vec<String> = self.paths.iter().map(|p| p.clone()).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_paths_escape_dots() {
        let c = Catalog::default();
        let v = Value::from_json(serde_json::json!({"city": "Paris", "geo": {"lat": 1}}));
        c.add("address", &v);
        c.add("address.city", &Value::Str("Lyon".into()));
        c.add("tags", &Value::from_json(serde_json::json!(["a"])));
        assert_eq!(
            c.sorted(),
            vec!["address.city", "address.geo.lat", "address\\.city", "tags"]
        );
    }
}
