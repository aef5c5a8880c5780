//! Segment rules as written: the JSON grammar of API.md section 3, validated into a typed
//! tree with errors that carry a JSON path into the rule and name the bad value.
//!
//! ```text
//! rule := {"all": [rule, ...]} | {"any": [rule, ...]} | {"not": rule}
//!       | {"trait": PATH, "op": OP, "value": V}
//!       | {"event": NAME, "where": [cond, ...], "count": CMP, "within": WINDOW, "per": PATH}
//!       | {"segment": SEGMENT_ID}
//!       | {"identity": TYPE, "op": "exists" | "not_exists"}
//! ```
//!
//! Parsing never recurses without bound (rules nest at most [`MAX_DEPTH`] levels) and never
//! panics, whatever JSON it is given. Whether a referenced segment exists, and whether
//! references form a cycle, is for the caller that knows the other segments.

use serde_json::Value;

use super::cond::{
    CondError, PropertyCondition, Window, child_key, parse_conditions, show, show_str,
};
use super::path::Path;
use crate::domain::identity::{IdType, valid_type_name};

/// Deepest nesting of `all` / `any` / `not` a rule may have.
pub const MAX_DEPTH: usize = 32;

/// Largest `count` threshold of a condition with a rolling window: the counter keeps that
/// many event times per profile, so the bound keeps memory bounded.
pub const MAX_WINDOW_COUNT: u64 = 10_000;

/// The count comparison of an event condition (`{"gte": 3}`; default `{"gte": 1}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CountCmp {
    /// At least N.
    Gte(u64),
    /// More than N.
    Gt(u64),
    /// Exactly N.
    Eq(u64),
    /// At most N.
    Lte(u64),
    /// Fewer than N.
    Lt(u64),
}

impl CountCmp {
    /// Whether `count` satisfies it.
    pub fn holds(self, count: u64) -> bool {
        match self {
            CountCmp::Gte(n) => count >= n,
            CountCmp::Gt(n) => count > n,
            CountCmp::Eq(n) => count == n,
            CountCmp::Lte(n) => count <= n,
            CountCmp::Lt(n) => count < n,
        }
    }

    /// How many newest events decide it: counts beyond this never change the answer.
    pub fn needs(self) -> u64 {
        match self {
            CountCmp::Gte(n) | CountCmp::Lt(n) => n,
            CountCmp::Gt(n) | CountCmp::Eq(n) | CountCmp::Lte(n) => n.saturating_add(1),
        }
    }

    /// The wire form, e.g. `{"gte": 3}`.
    pub fn to_json(self) -> Value {
        let (k, n) = match self {
            CountCmp::Gte(n) => ("gte", n),
            CountCmp::Gt(n) => ("gt", n),
            CountCmp::Eq(n) => ("eq", n),
            CountCmp::Lte(n) => ("lte", n),
            CountCmp::Lt(n) => ("lt", n),
        };
        serde_json::json!({ k: n })
    }
}

/// An event condition: how many matching events a profile has (in a window, per value).
#[derive(Debug, Clone, PartialEq)]
pub struct EventCond {
    /// Event name (`event` of the stored event: track names, `Page Viewed`, `user.updated`).
    pub name: String,
    /// Property conditions every counted event must meet.
    pub where_: Vec<PropertyCondition>,
    /// The `where` list as written (part of the counter's identity).
    pub where_json: Value,
    /// The count comparison.
    pub count: CountCmp,
    /// Only events inside this window count.
    pub within: Option<Window>,
    /// Count per distinct value of this property; holds when any one value satisfies.
    pub per: Option<Path>,
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Every sub-rule holds (an empty list holds for everyone).
    All(Vec<Rule>),
    /// At least one sub-rule holds (an empty list holds for no one).
    Any(Vec<Rule>),
    /// The sub-rule does not hold.
    Not(Box<Rule>),
    /// A trait comparison.
    Trait {
        /// Trait path (`address.city`).
        path: Path,
        /// The comparison.
        cmp: super::cond::Comparison,
    },
    /// An event count.
    Event(EventCond),
    /// Membership of another segment.
    Segment {
        /// Its id.
        id: String,
        /// Where the reference sits in the rule (for errors about it).
        path: String,
    },
    /// Whether the profile holds an identity of a type.
    Identity {
        /// The type.
        ty: IdType,
        /// `exists` (true) or `not_exists`.
        exists: bool,
    },
}

impl Rule {
    /// Validates rule JSON; `path` names where it sits in the request (`rule`).
    pub fn parse(v: &Value, path: &str) -> Result<Rule, CondError> {
        parse_rule(v, path, 0)
    }

    /// Every segment this rule refers to, directly.
    pub fn segment_refs(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.walk(&mut |r| {
            if let Rule::Segment { id, .. } = r {
                out.push(id.as_str());
            }
        });
        out
    }

    /// Calls `f` on this rule and every sub-rule.
    pub fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Rule)) {
        f(self);
        match self {
            Rule::All(rs) | Rule::Any(rs) => rs.iter().for_each(|r| r.walk(f)),
            Rule::Not(r) => r.walk(f),
            _ => {}
        }
    }
}

/// The keys that decide what kind of rule an object is.
const KINDS: &str = "all, any, not, trait, event, segment or identity";

fn parse_rule(v: &Value, path: &str, depth: usize) -> Result<Rule, CondError> {
    let Some(obj) = v.as_object() else {
        return Err(CondError::new(
            path,
            format!(
                "a rule must be an object with one of {KINDS}; got {}",
                show(v)
            ),
        ));
    };
    if depth >= MAX_DEPTH {
        return Err(CondError::new(
            path,
            format!("rules may nest at most {MAX_DEPTH} levels deep"),
        ));
    }
    let kinds: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|k| {
            matches!(
                *k,
                "all" | "any" | "not" | "trait" | "event" | "segment" | "identity"
            )
        })
        .collect();
    let kind = match kinds.as_slice() {
        [one] => *one,
        [] => {
            return Err(CondError::new(
                path,
                format!(
                    "a rule needs one of {KINDS}; got keys {}",
                    show(&Value::from(obj.keys().cloned().collect::<Vec<_>>()))
                ),
            ));
        }
        several => {
            return Err(CondError::new(
                path,
                format!(
                    "a rule has exactly one of {KINDS}; got {}",
                    several.join(" and ")
                ),
            ));
        }
    };
    let allowed: &[&str] = match kind {
        "all" | "any" | "not" | "segment" => &[],
        "trait" => &["op", "value"],
        "event" => &["where", "count", "within", "per"],
        _ => &["op"],
    };
    if let Some(extra) = obj
        .keys()
        .find(|k| k.as_str() != kind && !allowed.contains(&k.as_str()))
    {
        let expected = std::iter::once(kind)
            .chain(allowed.iter().copied())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(CondError::new(
            child_key(path, extra),
            format!(
                "unknown key {} in a {kind} rule; expected {expected}",
                show_str(extra)
            ),
        ));
    }
    let at = child_key(path, kind);
    let body = &obj[kind];
    match kind {
        "all" | "any" => {
            let Some(items) = body.as_array() else {
                return Err(CondError::new(
                    at,
                    format!("\"{kind}\" takes a list of rules; got {}", show(body)),
                ));
            };
            let rules = items
                .iter()
                .enumerate()
                .map(|(i, r)| parse_rule(r, &format!("{at}[{i}]"), depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if kind == "all" {
                Rule::All(rules)
            } else {
                Rule::Any(rules)
            })
        }
        "not" => Ok(Rule::Not(Box::new(parse_rule(body, &at, depth + 1)?))),
        "trait" => {
            let Some(s) = body.as_str() else {
                return Err(CondError::new(
                    at,
                    format!("\"trait\" must be a string path; got {}", show(body)),
                ));
            };
            let tpath = Path::parse(s).map_err(|m| CondError::new(&at, m))?;
            let cmp = super::cond::Comparison::parse(obj.get("op"), obj.get("value"), path)?;
            Ok(Rule::Trait { path: tpath, cmp })
        }
        "event" => parse_event(obj, path, &at).map(Rule::Event),
        "segment" => match body.as_str() {
            Some(id) if !id.is_empty() => Ok(Rule::Segment {
                id: id.to_owned(),
                path: at,
            }),
            _ => Err(CondError::new(
                at,
                format!("\"segment\" must be a segment id; got {}", show(body)),
            )),
        },
        _ => {
            let ty = match body.as_str() {
                Some(t) if valid_type_name(t) => IdType::named(t),
                _ => {
                    return Err(CondError::new(
                        at,
                        format!(
                            "\"identity\" must be an identity type (user_id, anonymous_id, email, phone or [a-z0-9_.]{{1,64}}); got {}",
                            show(body)
                        ),
                    ));
                }
            };
            let op_path = child_key(path, "op");
            let exists = match obj.get("op") {
                Some(Value::String(op)) if op == "exists" => true,
                Some(Value::String(op)) if op == "not_exists" => false,
                Some(other) => {
                    return Err(CondError::new(
                        op_path,
                        format!(
                            "an identity rule's \"op\" is \"exists\" or \"not_exists\"; got {}",
                            show(other)
                        ),
                    ));
                }
                None => {
                    return Err(CondError::new(
                        op_path,
                        "missing \"op\"; expected \"exists\" or \"not_exists\"",
                    ));
                }
            };
            Ok(Rule::Identity { ty, exists })
        }
    }
}

fn parse_event(
    obj: &serde_json::Map<String, Value>,
    path: &str,
    at: &str,
) -> Result<EventCond, CondError> {
    let name = match obj["event"].as_str() {
        Some(n) if !n.trim().is_empty() => n.to_owned(),
        _ => {
            return Err(CondError::new(
                at,
                format!(
                    "\"event\" must be a non-empty event name; got {}",
                    show(&obj["event"])
                ),
            ));
        }
    };
    if name.starts_with("segment.") {
        return Err(CondError::new(
            at,
            format!(
                "segment rules cannot count {} events (segment.* events follow from segments); user.* events are allowed",
                show_str(&name)
            ),
        ));
    }
    let where_json = obj
        .get("where")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    let where_ = parse_conditions(&where_json, &child_key(path, "where"))?;
    let count_path = child_key(path, "count");
    let count = match obj.get("count") {
        None => CountCmp::Gte(1),
        Some(c) => parse_count(c, &count_path)?,
    };
    let within = match obj.get("within") {
        None => None,
        Some(w) => Some(Window::parse(w, &child_key(path, "within"))?),
    };
    let per = match obj.get("per") {
        None => None,
        Some(Value::String(s)) => {
            let per_path = child_key(path, "per");
            let p = Path::parse(s).map_err(|m| CondError::new(&per_path, m))?;
            if !matches!(count, CountCmp::Gt(_) | CountCmp::Gte(_)) {
                return Err(CondError::new(
                    per_path,
                    format!(
                        "\"per\" needs a \"count\" of gt or gte (the condition holds when one value reaches it); got count {}",
                        count.to_json()
                    ),
                ));
            }
            Some(p)
        }
        Some(other) => {
            return Err(CondError::new(
                child_key(path, "per"),
                format!(
                    "\"per\" must be a string property path; got {}",
                    show(other)
                ),
            ));
        }
    };
    if matches!(within, Some(Window::Duration { .. })) && count.needs() > MAX_WINDOW_COUNT {
        return Err(CondError::new(
            count_path,
            format!(
                "a count over a rolling window may be at most {MAX_WINDOW_COUNT}; got {}",
                count.to_json()
            ),
        ));
    }
    Ok(EventCond {
        name,
        where_,
        where_json,
        count,
        within,
        per,
    })
}

fn parse_count(v: &Value, path: &str) -> Result<CountCmp, CondError> {
    const FORMS: &str = r#"{"gte": N}, {"gt": N}, {"eq": N}, {"lte": N} or {"lt": N}"#;
    let Some((k, n)) = v
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.iter().next())
    else {
        return Err(CondError::new(
            path,
            format!("\"count\" must be exactly one of {FORMS}; got {}", show(v)),
        ));
    };
    let at = child_key(path, k);
    let make: fn(u64) -> CountCmp = match k.as_str() {
        "gte" => CountCmp::Gte,
        "gt" => CountCmp::Gt,
        "eq" => CountCmp::Eq,
        "lte" => CountCmp::Lte,
        "lt" => CountCmp::Lt,
        _ => {
            return Err(CondError::new(
                at,
                format!(
                    "unknown count comparison {}; expected gte, gt, eq, lte or lt",
                    show_str(k)
                ),
            ));
        }
    };
    let n = n.as_u64().ok_or_else(|| {
        CondError::new(
            &at,
            format!("a count must be a non-negative integer; got {}", show(n)),
        )
    })?;
    Ok(make(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(v: Value) -> Rule {
        Rule::parse(&v, "rule").unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    fn err(v: Value) -> CondError {
        Rule::parse(&v, "rule").expect_err(&v.to_string())
    }

    fn assert_err(v: Value, path: &str, fragments: &[&str]) {
        let e = err(v.clone());
        assert_eq!(e.path, path, "{v}: {e}");
        for f in fragments {
            assert!(e.message.contains(f), "{v}: {e:?} lacks {f:?}");
        }
        assert!(!e.message.ends_with('.'), "{e:?}");
    }

    #[test]
    fn every_kind_parses() {
        let r = ok(json!({"all": [
            {"trait": "plan", "op": "eq", "value": "pro"},
            {"any": [{"trait": "address.city", "op": "in", "value": ["Pune", "Delhi"]},
                     {"not": {"trait": "age", "op": "lt", "value": 18}}]},
            {"event": "Product Viewed", "where": [{"property": "sku", "op": "exists"}],
             "count": {"gte": 3}, "within": {"days": 7}, "per": "sku"},
            {"segment": "vip"},
            {"identity": "email", "op": "exists"},
            {"identity": "crm.id", "op": "not_exists"}
        ]}));
        assert_eq!(r.segment_refs(), vec!["vip"]);
        match ok(json!({"event": "Export Used"})) {
            Rule::Event(e) => {
                assert_eq!(e.count, CountCmp::Gte(1));
                assert_eq!(e.within, None);
                assert!(e.where_.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ok(json!({"all": []})), Rule::All(vec![]));
        assert_eq!(ok(json!({"any": []})), Rule::Any(vec![]));
        // Every operator on a trait.
        for (op, value) in [
            ("eq", json!(1)),
            ("neq", json!("a")),
            ("gt", json!(1)),
            ("gte", json!(1)),
            ("lt", json!("b")),
            ("lte", json!(2.5)),
            ("between", json!([1, 5])),
            ("in", json!(["a", 1])),
            ("not_in", json!([true])),
            ("contains", json!("x")),
            ("not_contains", json!(3)),
            ("starts_with", json!("a")),
            ("ends_with", json!("z")),
            ("before", json!("2026-01-01")),
            ("after", json!("2026-01-01T00:00:00Z")),
            ("within_last", json!({"days": 30})),
            ("not_within_last", json!({"hours": 2})),
        ] {
            ok(json!({"trait": "t", "op": op, "value": value}));
        }
        ok(json!({"trait": "t", "op": "exists"}));
        ok(json!({"trait": "t", "op": "not_exists"}));
        for c in ["gte", "gt", "eq", "lte", "lt"] {
            ok(json!({"event": "e", "count": {c: 0}}));
        }
        for w in [
            json!({"days": 1}),
            json!({"hours": 1}),
            json!({"minutes": 1}),
            json!({"since": "2026-01-01"}),
        ] {
            ok(json!({"event": "e", "within": w}));
        }
    }

    #[test]
    fn errors_point_into_the_rule_and_name_the_value() {
        assert_err(json!([1]), "rule", &["object", "[1]"]);
        assert_err(json!({}), "rule", &["needs one of"]);
        assert_err(
            json!({"all": [], "any": []}),
            "rule",
            &["exactly one", "all and any"],
        );
        assert_err(json!({"all": {"x": 1}}), "rule.all", &["list", "{\"x\":1}"]);
        assert_err(
            json!({"all": [{"trait": "a", "op": "eq", "value": 1}, {"trait": "b", "op": "equals", "value": 1}]}),
            "rule.all[1].op",
            &["unknown operator", "\"equals\""],
        );
        assert_err(
            json!({"any": [{"not": {"trait": "", "op": "exists"}}]}),
            "rule.any[0].not.trait",
            &["invalid path"],
        );
        assert_err(
            json!({"trait": "a", "op": "eq", "value": 1, "valu": 2}),
            "rule.valu",
            &["unknown key", "\"valu\""],
        );
        assert_err(
            json!({"trait": "a", "op": "gt", "value": [1]}),
            "rule.value",
            &["[1]"],
        );
        assert_err(
            json!({"trait": "a", "op": "exists", "value": 1}),
            "rule.value",
            &["takes no"],
        );
        assert_err(json!({"trait": 5, "op": "exists"}), "rule.trait", &["5"]);
        assert_err(json!({"event": ""}), "rule.event", &["non-empty"]);
        assert_err(
            json!({"event": "segment.entered"}),
            "rule.event",
            &["segment.entered"],
        );
        assert_err(
            json!({"event": "e", "count": {"gte": -1}}),
            "rule.count.gte",
            &["-1"],
        );
        assert_err(
            json!({"event": "e", "count": {"atleast": 1}}),
            "rule.count.atleast",
            &["\"atleast\""],
        );
        assert_err(
            json!({"event": "e", "count": {"gte": 1, "lt": 3}}),
            "rule.count",
            &["exactly one"],
        );
        assert_err(
            json!({"event": "e", "within": {"weeks": 1}}),
            "rule.within.weeks",
            &["\"weeks\""],
        );
        assert_err(
            json!({"event": "e", "where": [{"property": "p", "op": "eq"}]}),
            "rule.where[0].value",
            &["needs a"],
        );
        assert_err(
            json!({"event": "e", "count": {"lt": 3}, "per": "sku"}),
            "rule.per",
            &["gt or gte", "{\"lt\":3}"],
        );
        assert_err(
            json!({"event": "e", "count": {"gte": 20000}, "within": {"days": 1}}),
            "rule.count",
            &["at most", "20000"],
        );
        assert_err(json!({"segment": 3}), "rule.segment", &["3"]);
        assert_err(
            json!({"identity": "Bad Type", "op": "exists"}),
            "rule.identity",
            &["\"Bad Type\""],
        );
        assert_err(
            json!({"identity": "email", "op": "eq"}),
            "rule.op",
            &["\"eq\""],
        );
        assert_err(json!({"identity": "email"}), "rule.op", &["missing"]);
        assert_err(
            json!({"event": "e", "wher": []}),
            "rule.wher",
            &["unknown key"],
        );
    }

    #[test]
    fn depth_is_bounded() {
        let mut v = json!({"trait": "a", "op": "exists"});
        for _ in 0..100 {
            v = json!({ "not": v });
        }
        let e = err(v);
        assert!(e.message.contains("nest"), "{e:?}");
    }

    #[test]
    fn count_semantics() {
        assert!(CountCmp::Gte(3).holds(3) && !CountCmp::Gte(3).holds(2));
        assert!(CountCmp::Gt(3).holds(4) && !CountCmp::Gt(3).holds(3));
        assert!(CountCmp::Eq(0).holds(0) && !CountCmp::Eq(0).holds(1));
        assert!(CountCmp::Lte(2).holds(2) && !CountCmp::Lte(2).holds(3));
        assert!(CountCmp::Lt(1).holds(0) && !CountCmp::Lt(1).holds(1));
        assert_eq!(CountCmp::Gte(3).needs(), 3);
        assert_eq!(CountCmp::Eq(3).needs(), 4);
    }

    /// Random JSON never panics the validator (a fuzz-style test with a fixed seed).
    #[test]
    fn random_json_never_panics() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        const KEYS: &[&str] = &[
            "all", "any", "not", "trait", "event", "segment", "identity", "op", "value", "where",
            "count", "within", "per", "property", "gte", "gt", "eq", "lt", "lte", "days", "hours",
            "minutes", "since", "x",
        ];
        const OPS: &[&str] = &[
            "eq",
            "neq",
            "gt",
            "gte",
            "lt",
            "lte",
            "between",
            "in",
            "not_in",
            "contains",
            "not_contains",
            "starts_with",
            "ends_with",
            "exists",
            "not_exists",
            "before",
            "after",
            "within_last",
            "not_within_last",
            "bogus",
        ];
        fn random_json(next: &mut impl FnMut() -> u64, depth: u32) -> Value {
            let pick = |next: &mut dyn FnMut() -> u64, xs: &[&str]| {
                xs[(next() % xs.len() as u64) as usize].to_owned()
            };
            match next() % if depth > 5 { 6 } else { 9 } {
                0 => Value::Null,
                1 => Value::Bool(next().is_multiple_of(2)),
                2 => json!((next() % 2000) as i64 - 1000),
                3 => json!(f64::from_bits(next()).clamp(-1e300, 1e300)),
                4 => Value::String(pick(next, OPS)),
                5 => Value::String(
                    ["2026-01-01", "a.b", "", "\\", "x\\.y"][(next() % 5) as usize].into(),
                ),
                6 => Value::Array(
                    (0..next() % 4)
                        .map(|_| random_json(next, depth + 1))
                        .collect(),
                ),
                _ => Value::Object(
                    (0..next() % 5)
                        .map(|_| (pick(next, KEYS), random_json(next, depth + 1)))
                        .collect(),
                ),
            }
        }
        for _ in 0..20_000 {
            let v = random_json(&mut next, 0);
            let _ = Rule::parse(&v, "rule");
        }
    }
}
