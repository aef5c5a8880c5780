//! The trait-path catalog: every leaf trait path seen, for CSV export headers and rule
//! editors. Paths are written with `.` between nested keys and `\.` for a dot inside a key.

use dashmap::DashSet;

use crate::domain::value::Value;

/// The set of leaf trait paths seen since start (recovery replays them back in).
#[derive(Default)]
pub struct Catalog {
    /// Escaped leaf paths.
    paths: DashSet<String>,
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
    /// Records the leaf paths of `value` under the top-level `key`.
    pub fn add(&self, key: &str, value: &Value) {
        // The common case, a known top-level leaf: no allocation.
        if !matches!(value, Value::Object(m) if !m.is_empty())
            && !key.contains(['.', '\\'])
            && self.paths.contains(key)
        {
            return;
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
