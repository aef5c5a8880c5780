//! Segment membership inside a shard's step: counting events into the counters of the
//! rules in force, evaluating the segments a change can affect (in evaluation order, so a
//! segment referred to is decided before the segments that refer to it), recounting a
//! counter from a profile's retained events (backfill, ad-hoc queries), and the next
//! instant a profile must be re-checked because time alone can change an answer.
//!
//! Everything here is a synchronous function over one profile; the shard logs what these
//! return and owns ordering, durability and timers.

use crate::domain::event::{EventKind, event_names};
use crate::domain::ids::ProfileId;
use crate::domain::profile::Profile;
use crate::segment::compile::{Node, SegIdx, SpecId, Subject};
use crate::segment::counter::{Counter, CounterSpec};
use crate::segment::set::{RuleSet, SpecSet};
use crate::store::log::LogReader;

/// Why a membership changed (the `reason` of API.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A change of the profile's data (event, traits, identities, merge).
    Rule,
    /// Time passed a window's edge.
    Window,
    /// The segment's rule was changed (PUT).
    SegmentChanged,
    /// The profile was erased.
    Deleted,
    /// The profile was merged into another.
    Merged,
}

impl Reason {
    /// Every reason, indexed by its stored number.
    pub const ALL: [Reason; 5] = [
        Reason::Rule,
        Reason::Window,
        Reason::SegmentChanged,
        Reason::Deleted,
        Reason::Merged,
    ];

    /// The stored number.
    pub fn code(self) -> u8 {
        Reason::ALL.iter().position(|r| *r == self).unwrap_or(0) as u8
    }

    /// The reason of a stored number.
    pub fn from_code(c: u8) -> Reason {
        Reason::ALL.get(c as usize).copied().unwrap_or(Reason::Rule)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rule => "rule",
            Reason::Window => "window",
            Reason::SegmentChanged => "segment_changed",
            Reason::Deleted => "deleted",
            Reason::Merged => "merged",
        }
    }
}

/// A membership change, announced to the segment's actor once durable.
#[derive(Debug, Clone)]
pub struct MembershipChanged {
    /// The segment.
    pub segment: SegIdx,
    /// The profile.
    pub profile: ProfileId,
    /// Entered (true) or left.
    pub entered: bool,
    /// Why.
    pub reason: Reason,
    /// Server time of the change (for a window, the instant it passed).
    pub at: i64,
    /// The change sequence (the accept sequence of its log record).
    pub seq: u64,
    /// The survivor, when the profile was merged away.
    pub merged_into: Option<ProfileId>,
}

/// The `segment.entered` / `segment.exited` event a membership record stands for, as the
/// API shows events (field order of `EventOut`). Its message id is derived from the change
/// sequence, so rendering it again gives the same text.
pub fn render_membership(m: &crate::store::log::MembershipRecord) -> String {
    use std::fmt::Write as _;
    let mut json = String::with_capacity(360 + m.segment_id.len());
    let name = if m.entered {
        "segment.entered"
    } else {
        "segment.exited"
    };
    let _ = write!(
        json,
        "{{\"message_id\":\"sys-{:016x}\",\"seq\":{},\"type\":\"system\",\"event\":\"{name}\",\"name\":null,\"category\":null,\"properties\":{{\"segment_id\":",
        m.seq, m.seq
    );
    crate::domain::event::push_json_str(&mut json, &m.segment_id);
    let _ = write!(
        json,
        ",\"reason\":\"{}\"}},\"traits\":null,\"context\":null,\"user_id\":null,\"anonymous_id\":null,\"group_id\":null,\"previous_id\":null,\"timestamp\":\"",
        Reason::from_code(m.reason).as_str()
    );
    crate::segment::timefmt::write_ms(&mut json, m.at_ms);
    json.push_str("\",\"received_at\":\"");
    crate::segment::timefmt::write_ms(&mut json, m.at_ms);
    json.push_str("\"}");
    json
}

/// The timeline entry of a membership record at `pos`.
pub fn membership_ref(
    m: &crate::store::log::MembershipRecord,
    pos: u64,
) -> crate::domain::event::EventRef {
    let name = if m.entered {
        "segment.entered"
    } else {
        "segment.exited"
    };
    crate::domain::event::EventRef::new(
        m.at_ms,
        m.seq,
        pos,
        (m.at_ms / 1000).clamp(0, u32::MAX as i64) as u32,
        event_names().intern(name),
        EventKind::System,
    )
}

/// Counts an event into the profile's counters of the specs that read its name. Pushes the
/// ids of counters that changed onto `touched`.
pub fn count_event(
    specs: &SpecSet,
    profile: &mut Profile,
    name: &str,
    ts_ms: i64,
    properties: Option<&serde_json::Value>,
    now: i64,
    touched: &mut impl Extend<SpecId>,
) {
    if specs.all.is_empty() || name.is_empty() || name.starts_with("segment.") {
        return;
    }
    let Some(sym) = event_names().lookup(name) else {
        return;
    };
    let Some(ids) = specs.by_name.get(&sym) else {
        return;
    };
    for id in ids {
        let Some(spec) = specs.get(*id) else {
            continue;
        };
        if let Some(per) = spec.admits(ts_ms, properties, now) {
            profile
                .counter_mut(*id, || spec.empty())
                .record(spec, ts_ms, per.as_deref());
            touched.extend(std::iter::once(*id));
        }
    }
}

/// Evaluates `segments` (already in evaluation order) for the profile at `now`, applying
/// each change to its memberships (entries dated `now`); returns (segment, entered) pairs.
pub fn evaluate(
    rules: &RuleSet,
    profile: &mut Profile,
    segments: &[SegIdx],
    now: i64,
) -> Vec<(SegIdx, bool)> {
    let mut changes = Vec::new();
    for idx in segments {
        let Some(seg) = rules.get(*idx) else {
            continue;
        };
        let holds = seg.compiled.root.eval(&*profile, now);
        if profile.set_member(*idx, holds, now) {
            changes.push((*idx, holds));
        }
    }
    changes
}

/// The next instant after `now` at which a time-dependent segment may change its answer for
/// this profile (None: not before some new event).
pub fn next_due(rules: &RuleSet, profile: &Profile, now: i64) -> Option<i64> {
    if profile.counters.is_empty() && profile.traits.is_empty() {
        return None;
    }
    rules
        .timed
        .iter()
        .filter_map(|idx| rules.get(*idx))
        .filter_map(|seg| seg.compiled.root.next_change(profile, now))
        .min()
}

/// Recounts a spec over the profile's retained events (reading event bodies only when the
/// spec looks at properties).
pub fn recount(spec: &CounterSpec, profile: &Profile, reader: &LogReader, now: i64) -> Counter {
    let mut counter = spec.empty();
    let Some(sym) = event_names().lookup(&spec.name) else {
        return counter;
    };
    let needs_body = !spec.where_.is_empty() || spec.per.is_some();
    for e in profile.events.iter().filter(|e| e.name == sym) {
        if e.kind() == EventKind::System && !spec.name.starts_with("user.") {
            continue;
        }
        let admitted = if needs_body {
            let props = match reader.read(e.pos) {
                Ok(crate::store::log::LogRecord::System(r)) => {
                    serde_json::from_str::<serde_json::Value>(&r.properties_json).ok()
                }
                Ok(rec) => rec.event().and_then(|ev| {
                    serde_json::from_str::<serde_json::Value>(&ev.json)
                        .ok()
                        .and_then(|mut v| v.get_mut("properties").map(serde_json::Value::take))
                }),
                Err(err) => {
                    tracing::warn!(error = %err, pos = e.pos, "cannot read an event to recount a segment counter");
                    None
                }
            };
            spec.admits(e.ts_ms, props.as_ref(), now)
        } else {
            spec.admits::<serde_json::Value>(e.ts_ms, None, now)
        };
        if let Some(per) = admitted {
            counter.record(spec, e.ts_ms, per.as_deref());
        }
    }
    counter
}

/// A profile seen through a rule compiled outside the rules in force (ad-hoc queries and
/// previews): counters the shard does not keep are recounted from retained events.
pub struct AdHoc<'a> {
    /// The profile.
    pub profile: &'a Profile,
    /// Counters recounted for this evaluation.
    pub extra: Vec<(SpecId, Counter)>,
}

impl Subject for AdHoc<'_> {
    fn trait_value(&self, key: crate::domain::value::Sym) -> Option<&crate::domain::value::Value> {
        self.profile.trait_value(key)
    }

    fn has_identity(&self, ty: crate::domain::identity::IdType) -> bool {
        self.profile.has_identity(ty)
    }

    fn counter(&self, spec: SpecId) -> Option<&Counter> {
        match self.extra.iter().find(|(id, _)| *id == spec) {
            Some((_, c)) => Some(c),
            None => self.profile.counter(spec),
        }
    }

    fn member_of(&self, seg: SegIdx) -> bool {
        self.profile.member_of(seg)
    }
}

/// An ad-hoc rule compiled against the rules in force: its tree, and the specs it reads
/// that the shards do not keep (recounted per profile).
pub struct AdHocRule {
    /// The compiled tree.
    pub root: Node,
    /// Specs to recount: (id, spec).
    pub recount: Vec<(SpecId, std::sync::Arc<CounterSpec>)>,
}

impl AdHocRule {
    /// Whether the rule holds for a profile at `now`.
    pub fn holds(&self, profile: &Profile, reader: &LogReader, now: i64) -> bool {
        let extra = self
            .recount
            .iter()
            .map(|(id, spec)| (*id, recount(spec, profile, reader, now)))
            .collect();
        self.root.eval(&AdHoc { profile, extra }, now)
    }
}
