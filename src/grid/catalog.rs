//! The trait-path catalog: every leaf trait path seen, for CSV export headers and rule
//! editors. Paths are written with `.` between nested keys and `\.` for a dot inside a key.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use dashmap::DashSet;

use crate::domain::value::Value;

/// The set of leaf trait paths the profiles hold: every path seen since start (recovery
/// replays them back in), less those only erased profiles held (a rebuild after an
/// erasure: [`Catalog::begin_rebuild`], a scan of the shards, [`Catalog::finish_rebuild`]).
pub struct Catalog {
    /// Escaped leaf paths.
    paths: DashSet<String>,
    /// This catalog's slot in every thread's [`KNOWN_LEAVES`].
    slot: usize,
    /// Bumped when paths may have been removed: the per-thread caches start again.
    generation: AtomicU64,
    /// A rebuild is scanning the shards: every path added meanwhile is also kept in
    /// `added`, so the rebuild cannot drop it.
    rebuilding: AtomicBool,
    added: DashSet<String>,
}

impl Default for Catalog {
    fn default() -> Catalog {
        static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
        Catalog {
            paths: DashSet::new(),
            slot: NEXT_SLOT.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            rebuilding: AtomicBool::new(false),
            added: DashSet::new(),
        }
    }
}

/// One catalog's cache in one thread: its generation and the keys known then.
type KnownLeaves = (u64, HashSet<&'static str, foldhash::fast::RandomState>);

thread_local! {
    /// Per thread, per catalog (by slot): top-level leaf keys already in `paths`, so the
    /// shards, which note the paths of every trait change, skip the shared set. Dropped
    /// when the catalog's generation moves on (a rebuild may remove paths).
    static KNOWN_LEAVES: RefCell<Vec<KnownLeaves>> = const { RefCell::new(Vec::new()) };
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
        let rebuilding = self.rebuilding.load(Ordering::SeqCst);
        if leaf && !rebuilding {
            let generation = self.generation.load(Ordering::SeqCst);
            let known = |l: &mut Vec<KnownLeaves>| {
                if l.len() <= self.slot {
                    l.resize_with(self.slot + 1, Default::default);
                }
                let cache = &mut l[self.slot];
                if cache.0 != generation {
                    *cache = (generation, HashSet::default());
                }
                if cache.1.contains(key) {
                    return true;
                }
                if self.paths.contains(key) {
                    cache.1.insert(key);
                    return true;
                }
                false
            };
            if KNOWN_LEAVES.with(|l| known(&mut l.borrow_mut())) {
                return;
            }
        }
        for_each_leaf(key, value, |path| {
            if rebuilding {
                self.added.insert(path.clone());
            }
            if !self.paths.contains(&path) {
                self.paths.insert(path);
            }
        });
    }

    /// Starts a rebuild: from now until [`Catalog::finish_rebuild`], added paths are kept
    /// whatever the scan finds. Call before asking the shards for their paths.
    pub fn begin_rebuild(&self) {
        self.added.clear();
        self.rebuilding.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends a rebuild: keeps the paths the shards hold (`held`) and those added since it
    /// began; answers how many were removed.
    pub fn finish_rebuild(&self, held: &HashSet<String>) -> usize {
        let before = self.paths.len();
        self.paths
            .retain(|p| held.contains(p) || self.added.contains(p));
        self.rebuilding.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.added.clear();
        before.saturating_sub(self.paths.len())
    }

    /// All paths, sorted.
    pub fn sorted(&self) -> Vec<String> {
        let mut v: Vec<String> = self.paths.iter().map(|p| p.clone()).collect();
        v.sort();
        v
    }
}

/// Adds the escaped leaf paths of a trait to `out` (a scan's view of one profile). Known
/// top-level leaves cost a lookup, not an allocation.
pub fn leaf_paths(key: &str, value: &Value, out: &mut HashSet<String>) {
    if !matches!(value, Value::Object(m) if !m.is_empty()) && !key.contains(['.', '\\']) {
        if !out.contains(key) {
            out.insert(key.to_owned());
        }
        return;
    }
    for_each_leaf(key, value, |path| {
        out.insert(path);
    });
}

/// Calls `f` with the escaped path of every leaf of the trait `key` holding `value`.
fn for_each_leaf(key: &str, value: &Value, mut f: impl FnMut(String)) {
    let mut stack: Vec<(String, &Value)> = vec![(escape_key(key), value)];
    while let Some((path, v)) = stack.pop() {
        match v {
            Value::Object(members) if !members.is_empty() => {
                for (k, child) in members.iter() {
                    stack.push((format!("{path}.{}", escape_key(k)), child));
                }
            }
            _ => f(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebuild_drops_what_no_profile_holds_and_keeps_what_came_meanwhile() {
        let c = Catalog::default();
        c.add("plan", &Value::Str("pro".into()));
        c.add("secret", &Value::Str("x".into()));
        c.add("plan", &Value::Str("pro".into())); // cached as known in this thread
        c.begin_rebuild();
        c.add("late", &Value::Str("y".into())); // added while the shards are scanned
        let held: HashSet<String> = ["plan".to_owned()].into();
        assert_eq!(c.finish_rebuild(&held), 1);
        assert_eq!(c.sorted(), vec!["late", "plan"]);
        // The thread's cache started again: a removed path comes back when added.
        c.add("secret", &Value::Str("again".into()));
        assert_eq!(c.sorted(), vec!["late", "plan", "secret"]);
    }

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
