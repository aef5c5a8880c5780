//! The set of segments in force: their definitions as stored, and the compiled form every
//! shard shares read-only — compiled rules in evaluation order (a referenced segment before
//! the segments that refer to it) and subscription indexes from what changed (a trait key,
//! a counter, an identity type, a segment) to the segments that read it.
//!
//! Building a set validates the whole graph: unknown references and reference cycles are
//! `invalid_rule` errors with the path of the reference.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::compile::{Compiled, Resolver, SegIdx, SpecId, compile};
use super::cond::CondError;
use super::counter::{CounterSpec, SpecDef};
use super::rule::Rule;
use crate::domain::identity::IdType;
use crate::domain::value::Sym;

/// Where a segment's membership computation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SegmentStatus {
    /// Existing profiles are being evaluated (after create or PUT).
    Backfilling,
    /// Membership is complete and kept in real time.
    Ready,
}

/// A segment as stored and as the API shows it (plus its internal index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentDef {
    /// Internal number (never reused, so old log records of a deleted segment cannot be
    /// mistaken for a new one with the same id).
    pub idx: SegIdx,
    /// API id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// The rule as written.
    pub rule: Value,
    /// Backfill state.
    pub status: SegmentStatus,
    /// Server time of creation.
    pub created_at: i64,
    /// Server time of the last PUT.
    pub updated_at: i64,
}

/// A trigger as stored: where a segment's entries and exits are pushed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerDef {
    /// Internal number (never reused).
    pub idx: u32,
    /// API id.
    pub id: String,
    /// The segment's API id.
    pub segment: String,
    /// Deliver entries.
    pub on_enter: bool,
    /// Deliver exits.
    pub on_exit: bool,
    /// Where deliveries are POSTed.
    pub url: String,
    /// HMAC key of `X-User360-Signature` (never shown).
    pub secret: Option<String>,
    /// Extra request headers.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Whether current members were queued at creation.
    pub send_existing: bool,
    /// Server time of creation.
    pub created_at: i64,
}

/// A mapping as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MappingDef {
    /// Internal number (never reused).
    pub idx: u32,
    /// API id.
    pub id: String,
    /// The object as sent (without `id` and `created_at`).
    pub body: serde_json::Map<String, Value>,
    /// Server time of creation.
    pub created_at: i64,
    /// Loaded from the mappings file (it wins over API edits of the same id at start).
    #[serde(default)]
    pub from_file: bool,
}

/// Everything defined by users that must survive restarts (segments, triggers, mappings).
/// Stored as JSON, small.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Definitions {
    /// Segments, in creation order.
    pub segments: Vec<SegmentDef>,
    /// Triggers, in creation order.
    #[serde(default)]
    pub triggers: Vec<TriggerDef>,
    /// Next trigger index.
    #[serde(default)]
    pub next_trigger: u32,
    /// Mappings, in creation order (the order they apply in).
    #[serde(default)]
    pub mappings: Vec<MappingDef>,
    /// Next mapping index.
    #[serde(default)]
    pub next_mapping: u32,
    /// Counter specs in use, by id.
    pub specs: Vec<(SpecId, SpecDef)>,
    /// Next segment index.
    pub next_idx: SegIdx,
    /// Next spec id.
    pub next_spec: SpecId,
}

impl Definitions {
    /// The segment with an API id.
    pub fn segment(&self, id: &str) -> Option<&SegmentDef> {
        self.segments.iter().find(|s| s.id == id)
    }

    /// The trigger with an API id.
    pub fn trigger(&self, id: &str) -> Option<&TriggerDef> {
        self.triggers.iter().find(|t| t.id == id)
    }

    /// The mapping with an API id.
    pub fn mapping(&self, id: &str) -> Option<&MappingDef> {
        self.mappings.iter().find(|m| m.id == id)
    }
}

/// A trigger as the shards see it: which changes of its segment make deliveries.
#[derive(Debug)]
pub struct TriggerRule {
    /// Internal index.
    pub idx: u32,
    /// API id (part of every delivery id).
    pub id: Arc<str>,
    /// Entries make deliveries.
    pub on_enter: bool,
    /// Exits make deliveries.
    pub on_exit: bool,
}

/// One compiled segment.
#[derive(Debug)]
pub struct SegmentRule {
    /// Internal index.
    pub idx: SegIdx,
    /// API id.
    pub id: Arc<str>,
    /// Display name.
    pub name: Arc<str>,
    /// The compiled rule and what it reads.
    pub compiled: Compiled,
    /// Position in evaluation order.
    pub rank: u32,
    /// Members across all shards (shards add and subtract as memberships change).
    pub count: Arc<AtomicI64>,
}

/// The compiled segments in force.
#[derive(Debug, Default)]
pub struct RuleSet {
    /// Increases with every change of the definitions.
    pub version: u64,
    /// Segments by index (None: no segment with that index).
    pub segments: Vec<Option<Arc<SegmentRule>>>,
    /// Segment indexes in evaluation order.
    pub order: Vec<SegIdx>,
    /// Trait key → segments reading it.
    pub by_trait: HashMap<Sym, Vec<SegIdx>>,
    /// Counter → segments reading it.
    pub by_spec: HashMap<SpecId, Vec<SegIdx>>,
    /// Identity type → segments reading it.
    pub by_identity: HashMap<IdType, Vec<SegIdx>>,
    /// Segment → segments that refer to it.
    pub dependents: HashMap<SegIdx, Vec<SegIdx>>,
    /// Segments whose answer can change by time alone.
    pub timed: Vec<SegIdx>,
    /// Counter specs in use.
    pub specs: HashMap<SpecId, Arc<CounterSpec>>,
    /// Segment → the triggers pushing its changes.
    pub triggers: HashMap<SegIdx, Vec<Arc<TriggerRule>>>,
    /// Mappings in force, in the order they apply.
    pub mappings: super::mapping::MappingSet,
}

/// Allocates segment indexes and spec ids against the stored definitions.
struct Alloc<'a> {
    ids: &'a HashMap<String, SegIdx>,
    /// Base key → the most newest times any condition over it needs.
    keep: HashMap<String, u32>,
    by_key: HashMap<String, SpecId>,
    specs: HashMap<SpecId, Arc<CounterSpec>>,
    used: Vec<SpecId>,
    next_spec: SpecId,
}

impl Resolver for Alloc<'_> {
    fn segment(&mut self, id: &str) -> Option<SegIdx> {
        self.ids.get(id).copied()
    }

    fn spec(&mut self, mut spec: CounterSpec) -> (SpecId, Arc<CounterSpec>) {
        if let Some(k) = self.keep.get(&spec.base_key()) {
            spec.keep = spec.keep.max(*k);
        }
        let key = spec.key();
        let id = match self.by_key.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.next_spec;
                self.next_spec += 1;
                self.by_key.insert(key, id);
                self.specs.insert(id, Arc::new(spec));
                id
            }
        };
        self.used.push(id);
        (id, self.specs[&id].clone())
    }
}

impl RuleSet {
    /// Compiles every segment of `defs`, checks references and cycles, and builds the
    /// indexes. Updates `defs.specs` / `defs.next_spec` to the specs now in use. `counts`
    /// carries member counts over from the previous set. Errors carry the path of the rule
    /// of segment `blame` (the one being created or changed) when it is at fault.
    pub fn build(
        defs: &mut Definitions,
        version: u64,
        counts: &dyn Fn(SegIdx) -> Option<Arc<AtomicI64>>,
    ) -> Result<RuleSet, (String, CondError)> {
        let ids: HashMap<String, SegIdx> = defs
            .segments
            .iter()
            .map(|s| (s.id.clone(), s.idx))
            .collect();
        // Conditions counting the same events share one counter, keeping what the most
        // demanding of them needs (a larger keep is a new spec, recounted by a backfill).
        let mut keep: HashMap<String, u32> = HashMap::new();
        for s in &defs.segments {
            if let Ok(rule) = Rule::parse(&s.rule, "rule") {
                rule.walk(&mut |r| {
                    if let Rule::Event(e) = r {
                        let spec = CounterSpec::for_condition(e);
                        let k = keep.entry(spec.base_key()).or_default();
                        *k = (*k).max(spec.keep);
                    }
                });
            }
        }
        let mut alloc = Alloc {
            ids: &ids,
            keep,
            by_key: HashMap::new(),
            specs: HashMap::new(),
            used: Vec::new(),
            next_spec: defs.next_spec,
        };
        for (id, def) in &defs.specs {
            if let Some(spec) = CounterSpec::from_def(def) {
                alloc.by_key.insert(spec.key(), *id);
                alloc.specs.insert(*id, Arc::new(spec));
            }
        }
        let mut compiled: Vec<(SegmentDef, Compiled)> = Vec::with_capacity(defs.segments.len());
        for s in &defs.segments {
            let rule = Rule::parse(&s.rule, "rule").map_err(|e| (s.id.clone(), e))?;
            let c = compile(&rule, &mut alloc).map_err(|e| (s.id.clone(), e))?;
            compiled.push((s.clone(), c));
        }
        // Evaluation order: Kahn's algorithm over references; what is left is a cycle.
        let by_idx: HashMap<SegIdx, usize> = compiled
            .iter()
            .enumerate()
            .map(|(i, (d, _))| (d.idx, i))
            .collect();
        let mut pending: Vec<usize> = compiled
            .iter()
            .map(|(_, c)| c.deps.segments.len())
            .collect();
        let mut dependents: HashMap<SegIdx, Vec<SegIdx>> = HashMap::new();
        for (d, c) in &compiled {
            for r in &c.deps.segments {
                dependents.entry(*r).or_default().push(d.idx);
            }
        }
        let mut order: Vec<SegIdx> = Vec::with_capacity(compiled.len());
        let mut ready: Vec<usize> = (0..compiled.len()).filter(|&i| pending[i] == 0).collect();
        while let Some(i) = ready.pop() {
            let idx = compiled[i].0.idx;
            order.push(idx);
            for dep in dependents.get(&idx).into_iter().flatten() {
                let j = by_idx[dep];
                pending[j] -= 1;
                if pending[j] == 0 {
                    ready.push(j);
                }
            }
        }
        if order.len() < compiled.len() {
            // Blame the most recently changed segment of the cycle (the one being edited),
            // at its reference into the cycle.
            let in_cycle: Vec<&SegmentDef> = compiled
                .iter()
                .map(|(d, _)| d)
                .filter(|d| !order.contains(&d.idx))
                .collect();
            let d = in_cycle
                .iter()
                .max_by_key(|d| (d.updated_at, d.idx))
                .expect("a segment left out of the order");
            let path = Rule::parse(&d.rule, "rule")
                .ok()
                .and_then(|r| {
                    let mut found = None;
                    r.walk(&mut |x| {
                        if let Rule::Segment { id, path } = x
                            && found.is_none()
                            && in_cycle.iter().any(|c| c.id == *id)
                        {
                            found = Some(path.clone());
                        }
                    });
                    found
                })
                .unwrap_or_else(|| "rule".to_owned());
            return Err((
                d.id.clone(),
                CondError::new(
                    path,
                    format!(
                        "segment {} refers to itself through \"segment\" references (directly or through other segments)",
                        Value::from(d.id.as_str())
                    ),
                ),
            ));
        }
        let mut set = RuleSet {
            version,
            dependents,
            ..RuleSet::default()
        };
        let max_idx = compiled.iter().map(|(d, _)| d.idx).max();
        set.segments = (0..max_idx.map_or(0, |m| m + 1)).map(|_| None).collect();
        let rank: HashMap<SegIdx, u32> = order
            .iter()
            .enumerate()
            .map(|(i, idx)| (*idx, i as u32))
            .collect();
        for (d, c) in compiled {
            for k in &c.deps.traits {
                set.by_trait.entry(*k).or_default().push(d.idx);
            }
            for s in &c.deps.specs {
                set.by_spec.entry(*s).or_default().push(d.idx);
            }
            for t in &c.deps.identities {
                set.by_identity.entry(*t).or_default().push(d.idx);
            }
            if c.deps.timed {
                set.timed.push(d.idx);
            }
            let idx = d.idx;
            set.segments[idx as usize] = Some(Arc::new(SegmentRule {
                idx,
                id: d.id.as_str().into(),
                name: d.name.as_str().into(),
                compiled: c,
                rank: rank[&idx],
                count: counts(idx).unwrap_or_default(),
            }));
        }
        set.order = order;
        for m in &defs.mappings {
            let mapping = super::mapping::Mapping::parse(&Value::Object(m.body.clone()), &m.id)
                .map_err(|e| (m.id.clone(), e))?;
            set.mappings
                .list
                .push((m.idx, Arc::new(mapping), Value::Object(m.body.clone())));
        }
        for t in &defs.triggers {
            if let Some(seg) = ids.get(&t.segment) {
                set.triggers
                    .entry(*seg)
                    .or_default()
                    .push(Arc::new(TriggerRule {
                        idx: t.idx,
                        id: t.id.as_str().into(),
                        on_enter: t.on_enter,
                        on_exit: t.on_exit,
                    }));
            }
        }
        // Only the specs some rule reads stay.
        alloc.used.sort_unstable();
        alloc.used.dedup();
        set.specs = alloc
            .used
            .iter()
            .map(|id| (*id, alloc.specs[id].clone()))
            .collect();
        defs.specs = alloc
            .used
            .iter()
            .map(|id| (*id, alloc.specs[id].def()))
            .collect();
        defs.next_spec = alloc.next_spec;
        Ok(set)
    }

    /// The segment with an index.
    pub fn get(&self, idx: SegIdx) -> Option<&Arc<SegmentRule>> {
        self.segments.get(idx as usize).and_then(|s| s.as_ref())
    }

    /// `seeds` plus every segment that refers to them (transitively), in evaluation order.
    pub fn closure(&self, seeds: &mut Vec<SegIdx>) {
        let mut i = 0;
        while i < seeds.len() {
            if let Some(deps) = self.dependents.get(&seeds[i]) {
                for d in deps {
                    if !seeds.contains(d) {
                        seeds.push(*d);
                    }
                }
            }
            i += 1;
        }
        seeds.sort_by_key(|s| self.get(*s).map_or(u32::MAX, |r| r.rank));
    }

    /// The segments a change of these trait keys, counters and identity types can change,
    /// with their dependents, in evaluation order.
    pub fn affected(&self, traits: &[Sym], specs: &[SpecId], ids: &[IdType]) -> Vec<SegIdx> {
        let mut out: Vec<SegIdx> = Vec::new();
        let mut add = |list: Option<&Vec<SegIdx>>| {
            for s in list.into_iter().flatten() {
                if !out.contains(s) {
                    out.push(*s);
                }
            }
        };
        for k in traits {
            add(self.by_trait.get(k));
        }
        for s in specs {
            add(self.by_spec.get(s));
        }
        for t in ids {
            add(self.by_identity.get(t));
        }
        if !out.is_empty() {
            self.closure(&mut out);
        }
        out
    }

    /// Every segment, in evaluation order.
    pub fn all(&self) -> Vec<SegIdx> {
        self.order.clone()
    }
}

/// The counters a shard keeps, by id and by the event name they count.
#[derive(Debug, Default, Clone)]
pub struct SpecSet {
    /// By id.
    pub all: HashMap<SpecId, Arc<CounterSpec>>,
    /// Event name (interned in `event_names()`) → the specs counting it.
    pub by_name: HashMap<Sym, Vec<SpecId>>,
}

impl SpecSet {
    /// A set of these specs.
    pub fn new(specs: impl IntoIterator<Item = (SpecId, Arc<CounterSpec>)>) -> SpecSet {
        let mut set = SpecSet::default();
        for (id, spec) in specs {
            set.by_name
                .entry(crate::domain::event::event_names().intern(&spec.name))
                .or_default()
                .push(id);
            set.all.insert(id, spec);
        }
        for v in set.by_name.values_mut() {
            v.sort_unstable();
        }
        set
    }

    /// From stored definitions (dropping any that no longer validate).
    pub fn from_defs(defs: &[(SpecId, SpecDef)]) -> SpecSet {
        SpecSet::new(
            defs.iter()
                .filter_map(|(id, d)| CounterSpec::from_def(d).map(|s| (*id, Arc::new(s)))),
        )
    }

    /// The stored form.
    pub fn defs(&self) -> Vec<(SpecId, SpecDef)> {
        let mut v: Vec<(SpecId, SpecDef)> = self.all.iter().map(|(id, s)| (*id, s.def())).collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    /// One spec.
    pub fn get(&self, id: SpecId) -> Option<&Arc<CounterSpec>> {
        self.all.get(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seg(idx: SegIdx, id: &str, rule: Value) -> SegmentDef {
        SegmentDef {
            idx,
            id: id.into(),
            name: id.into(),
            description: None,
            rule,
            status: SegmentStatus::Ready,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn build(defs: &mut Definitions) -> Result<RuleSet, (String, CondError)> {
        RuleSet::build(defs, 1, &|_| None)
    }

    #[test]
    fn orders_references_first_and_indexes_dependencies() {
        let mut defs = Definitions {
            segments: vec![
                seg(
                    0,
                    "top",
                    json!({"all": [{"segment": "mid"}, {"trait": "plan", "op": "eq", "value": "pro"}]}),
                ),
                seg(1, "mid", json!({"segment": "base"})),
                seg(
                    2,
                    "base",
                    json!({"event": "V", "count": {"gte": 2}, "within": {"days": 1}}),
                ),
            ],
            next_idx: 3,
            ..Definitions::default()
        };
        let set = build(&mut defs).unwrap();
        assert_eq!(set.order, vec![2, 1, 0]);
        assert_eq!(set.timed, vec![2]);
        assert_eq!(defs.specs.len(), 1);
        let spec = defs.specs[0].0;
        assert_eq!(set.affected(&[], &[spec], &[]), vec![2, 1, 0]);
        let plan = crate::domain::value::trait_keys().intern("plan");
        assert_eq!(set.affected(&[plan], &[], &[]), vec![0]);
        // Spec ids stay stable across rebuilds.
        let again = build(&mut defs).unwrap();
        assert_eq!(again.specs.keys().copied().collect::<Vec<_>>(), vec![spec]);
    }

    #[test]
    fn cycles_and_unknown_references_are_refused() {
        let mut defs = Definitions {
            segments: vec![
                seg(0, "a", json!({"segment": "b"})),
                seg(1, "b", json!({"not": {"segment": "a"}})),
            ],
            next_idx: 2,
            ..Definitions::default()
        };
        let (_, e) = build(&mut defs).unwrap_err();
        assert!(e.message.contains("refers to itself"), "{e:?}");
        let mut defs = Definitions {
            segments: vec![seg(0, "a", json!({"segment": "a"}))],
            next_idx: 1,
            ..Definitions::default()
        };
        assert!(build(&mut defs).is_err());
        let mut defs = Definitions {
            segments: vec![seg(0, "a", json!({"all": [{"segment": "zzz"}]}))],
            next_idx: 1,
            ..Definitions::default()
        };
        let (id, e) = build(&mut defs).unwrap_err();
        assert_eq!(id, "a");
        assert_eq!(e.path, "rule.all[0].segment");
    }
}
