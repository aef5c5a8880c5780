//! Compiled rules: a validated [`Rule`] compiles once into a tree the evaluator walks
//! without allocating, plus its dependency set — the top-level trait keys, event counters,
//! identity types and segments it reads — so a change reaches only the rules that read it.
//!
//! The evaluator reads a profile through [`Subject`], so this module never sees profiles.

use std::sync::Arc;

use super::cond::{CondError, Operand};
use super::counter::{Counter, CounterSpec};
use super::path::Path;
use super::rule::{CountCmp, Rule};
use super::value_view::lookup;
use crate::domain::identity::IdType;
use crate::domain::value::{Sym, Value, trait_keys};

/// A segment's number inside the running server (stable across restarts).
pub type SegIdx = u32;

/// A counter spec's number (stable across restarts; logged with counter changes).
pub type SpecId = u32;

/// What a rule can read of a profile.
pub trait Subject {
    /// A top-level trait's value.
    fn trait_value(&self, key: Sym) -> Option<&Value>;
    /// Whether an identity of the type is held.
    fn has_identity(&self, ty: IdType) -> bool;
    /// The profile's counter for a spec (None: nothing counted).
    fn counter(&self, spec: SpecId) -> Option<&Counter>;
    /// Whether the profile is a member of a segment.
    fn member_of(&self, seg: SegIdx) -> bool;
}

/// A node of a compiled rule.
#[derive(Debug)]
pub enum Node {
    /// Every child holds.
    All(Box<[Node]>),
    /// Some child holds.
    Any(Box<[Node]>),
    /// The child does not hold.
    Not(Box<Node>),
    /// A trait comparison: top-level key, then the rest of the path inside its value.
    Trait {
        /// Top-level key.
        key: Sym,
        /// Path inside the value (None: the value itself).
        rest: Option<Path>,
        /// The comparison.
        cmp: super::cond::Comparison,
    },
    /// An event count.
    Event {
        /// The counter it reads.
        spec: SpecId,
        /// What that counter counts.
        def: Arc<CounterSpec>,
        /// The count comparison.
        cmp: CountCmp,
    },
    /// Membership of another segment.
    Segment(SegIdx),
    /// An identity type held or not.
    Identity {
        /// The type.
        ty: IdType,
        /// `exists` or `not_exists`.
        exists: bool,
    },
}

/// What a rule reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Deps {
    /// Top-level trait keys.
    pub traits: Vec<Sym>,
    /// Counters.
    pub specs: Vec<SpecId>,
    /// Segments referred to.
    pub segments: Vec<SegIdx>,
    /// Identity types.
    pub identities: Vec<IdType>,
    /// Whether the answer can change by time alone (rolling windows, `within_last`).
    pub timed: bool,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Compiled {
    /// The tree.
    pub root: Node,
    /// What it reads.
    pub deps: Deps,
}

/// What compiling needs from the set of segments: segment ids and counter specs.
pub trait Resolver {
    /// The index of a segment id (None: no such segment).
    fn segment(&mut self, id: &str) -> Option<SegIdx>;
    /// The id of a counter spec (the same spec twice gives the same id).
    fn spec(&mut self, spec: CounterSpec) -> (SpecId, Arc<CounterSpec>);
}

/// Compiles a validated rule.
pub fn compile(rule: &Rule, r: &mut impl Resolver) -> Result<Compiled, CondError> {
    let mut deps = Deps::default();
    let root = node(rule, r, &mut deps)?;
    for v in [&mut deps.traits, &mut deps.specs, &mut deps.segments] {
        v.sort_unstable();
        v.dedup();
    }
    deps.identities.sort_unstable();
    deps.identities.dedup();
    Ok(Compiled { root, deps })
}

fn node(rule: &Rule, r: &mut impl Resolver, deps: &mut Deps) -> Result<Node, CondError> {
    Ok(match rule {
        Rule::All(rs) => Node::All(
            rs.iter()
                .map(|x| node(x, r, deps))
                .collect::<Result<_, _>>()?,
        ),
        Rule::Any(rs) => Node::Any(
            rs.iter()
                .map(|x| node(x, r, deps))
                .collect::<Result<_, _>>()?,
        ),
        Rule::Not(x) => Node::Not(Box::new(node(x, r, deps)?)),
        Rule::Trait { path, cmp } => {
            let segs = path.segments();
            let key = trait_keys().intern(&segs[0]);
            deps.traits.push(key);
            if matches!(cmp.operand, Operand::Window(_)) {
                deps.timed = true;
            }
            let rest = (segs.len() > 1).then(|| {
                let tail: Vec<String> = segs[1..].to_vec();
                Path::from_segments(tail)
            });
            Node::Trait {
                key,
                rest,
                cmp: cmp.clone(),
            }
        }
        Rule::Event(e) => {
            let (spec, def) = r.spec(CounterSpec::for_condition(e));
            deps.specs.push(spec);
            if def.rolling_ms().is_some() {
                deps.timed = true;
            }
            Node::Event {
                spec,
                def,
                cmp: e.count,
            }
        }
        Rule::Segment { id, path } => {
            let Some(idx) = r.segment(id) else {
                return Err(CondError::new(
                    path,
                    format!(
                        "no segment has the id {}",
                        serde_json::Value::from(id.as_str())
                    ),
                ));
            };
            deps.segments.push(idx);
            Node::Segment(idx)
        }
        Rule::Identity { ty, exists } => {
            deps.identities.push(*ty);
            Node::Identity {
                ty: *ty,
                exists: *exists,
            }
        }
    })
}

impl Node {
    /// Whether the rule holds for `s` at server time `now`.
    pub fn eval<S: Subject>(&self, s: &S, now: i64) -> bool {
        match self {
            Node::All(xs) => xs.iter().all(|x| x.eval(s, now)),
            Node::Any(xs) => xs.iter().any(|x| x.eval(s, now)),
            Node::Not(x) => !x.eval(s, now),
            Node::Trait { key, rest, cmp } => {
                let top = s.trait_value(*key);
                let target = match rest {
                    None => top,
                    Some(p) => top.and_then(|v| lookup(v, p)),
                };
                cmp.matches(target, now)
            }
            Node::Event { spec, def, cmp } => match s.counter(*spec) {
                Some(c) => c.holds(def, *cmp, now),
                None => cmp.holds(0),
            },
            Node::Segment(idx) => s.member_of(*idx),
            Node::Identity { ty, exists } => s.has_identity(*ty) == *exists,
        }
    }

    /// The next instant after `now` at which the answer may change by time alone.
    pub fn next_change<S: Subject>(&self, s: &S, now: i64) -> Option<i64> {
        match self {
            Node::All(xs) | Node::Any(xs) => xs.iter().filter_map(|x| x.next_change(s, now)).min(),
            Node::Not(x) => x.next_change(s, now),
            Node::Trait { key, rest, cmp } => {
                if !matches!(cmp.operand, Operand::Window(_)) {
                    return None;
                }
                let top = s.trait_value(*key);
                let target = match rest {
                    None => top,
                    Some(p) => top.and_then(|v| lookup(v, p)),
                };
                cmp.next_change(target, now)
            }
            Node::Event { spec, def, cmp } => s.counter(*spec)?.next_change(def, *cmp, now),
            Node::Segment(_) | Node::Identity { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    /// A profile-like subject for tests.
    #[derive(Default)]
    struct Subj {
        traits: HashMap<Sym, Value>,
        ids: Vec<IdType>,
        counters: HashMap<SpecId, Counter>,
        members: Vec<SegIdx>,
    }

    impl Subject for Subj {
        fn trait_value(&self, key: Sym) -> Option<&Value> {
            self.traits.get(&key)
        }
        fn has_identity(&self, ty: IdType) -> bool {
            self.ids.contains(&ty)
        }
        fn counter(&self, spec: SpecId) -> Option<&Counter> {
            self.counters.get(&spec)
        }
        fn member_of(&self, seg: SegIdx) -> bool {
            self.members.contains(&seg)
        }
    }

    #[derive(Default)]
    struct Res {
        specs: Vec<Arc<CounterSpec>>,
    }

    impl Resolver for Res {
        fn segment(&mut self, id: &str) -> Option<SegIdx> {
            (id == "known").then_some(7)
        }
        fn spec(&mut self, spec: CounterSpec) -> (SpecId, Arc<CounterSpec>) {
            if let Some(i) = self.specs.iter().position(|s| s.key() == spec.key()) {
                return (i as SpecId, self.specs[i].clone());
            }
            self.specs.push(Arc::new(spec));
            (
                (self.specs.len() - 1) as SpecId,
                self.specs.last().unwrap().clone(),
            )
        }
    }

    fn compiled(v: serde_json::Value) -> (Compiled, Res) {
        let mut res = Res::default();
        let c = compile(&Rule::parse(&v, "rule").unwrap(), &mut res).unwrap();
        (c, res)
    }

    fn set(s: &mut Subj, k: &str, v: serde_json::Value) {
        s.traits.insert(trait_keys().intern(k), Value::from_json(v));
    }

    #[test]
    fn evaluates_and_lists_what_it_reads() {
        let (c, _) = compiled(json!({"all": [
            {"trait": "plan", "op": "eq", "value": "pro"},
            {"trait": "address.country", "op": "eq", "value": "IN"},
            {"not": {"identity": "email", "op": "not_exists"}},
            {"segment": "known"},
        ]}));
        assert_eq!(c.deps.segments, vec![7]);
        assert_eq!(c.deps.identities, vec![IdType::EMAIL]);
        assert_eq!(c.deps.traits.len(), 2);
        assert!(!c.deps.timed);
        let mut s = Subj::default();
        set(&mut s, "plan", json!("pro"));
        set(&mut s, "address", json!({"country": "IN", "city": "Pune"}));
        s.ids.push(IdType::EMAIL);
        assert!(!c.root.eval(&s, 0));
        s.members.push(7);
        assert!(c.root.eval(&s, 0));
        set(&mut s, "plan", json!("free"));
        assert!(!c.root.eval(&s, 0));
    }

    #[test]
    fn unknown_segment_is_an_error_at_its_path() {
        let mut res = Res::default();
        let rule = Rule::parse(&json!({"any": [{"segment": "nope"}]}), "rule").unwrap();
        let e = compile(&rule, &mut res).unwrap_err();
        assert_eq!(e.path, "rule.any[0].segment");
        assert!(e.message.contains("\"nope\""), "{e:?}");
    }

    #[test]
    fn equal_event_conditions_share_a_counter_and_time_is_tracked() {
        let (c, res) = compiled(json!({"any": [
            {"event": "V", "count": {"gte": 2}, "within": {"days": 1}},
            {"event": "V", "count": {"gte": 2}, "within": {"days": 1}},
            {"trait": "last_login", "op": "within_last", "value": {"days": 30}},
        ]}));
        assert_eq!(res.specs.len(), 1);
        assert_eq!(c.deps.specs, vec![0]);
        assert!(c.deps.timed);
        let day = 86_400_000;
        let mut s = Subj::default();
        let spec = res.specs[0].clone();
        let mut counter = spec.empty();
        counter.record(&spec, 10 * day, None);
        counter.record(&spec, 10 * day + 1000, None);
        s.counters.insert(0, counter);
        assert!(c.root.eval(&s, 10 * day + 2000));
        assert_eq!(c.root.next_change(&s, 10 * day + 2000), Some(11 * day));
        assert!(!c.root.eval(&s, 11 * day));
        set(
            &mut s,
            "last_login",
            json!(crate::segment::timefmt::format_ms(11 * day)),
        );
        assert!(c.root.eval(&s, 11 * day));
        // One event left in the window can no longer make the count rule true by time
        // alone, so the next change is the trait date leaving its window.
        assert_eq!(c.root.next_change(&s, 11 * day), Some(41 * day));
    }
}
