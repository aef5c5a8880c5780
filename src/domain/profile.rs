//! A profile's in-memory state and the rules for changing it.
//!
//! Owns trait times (late events never undo newer facts), trait budgets, the timeline
//! index, first/last seen, and the `changes` of `user.updated`. The shard actor is the only
//! caller that mutates a [`Profile`]; everything here is synchronous and pure.

use serde::Serialize;
use serde::ser::SerializeMap;

use super::event::{EventKind, EventRef};
use super::identity::{IdType, Identity};
use super::ids::ProfileId;
use super::value::{Sym, Value, trait_keys};
use crate::segment::compile::{SegIdx, SpecId, Subject};
use crate::segment::counter::{Counter, CounterSpec};
use crate::segment::timefmt::format_ms;

/// An identity held by a profile, with when it was first seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldIdentity {
    /// The identity.
    pub identity: Identity,
    /// Server time it was linked.
    pub first_seen: i64,
}

/// One top-level trait with the time of its last set or unset.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitSlot {
    /// Interned key.
    pub key: Sym,
    /// The value; None is a tombstone (unset, remembered so older sets stay ignored).
    pub value: Option<Value>,
    /// Time of the fact that set it (event time for messages).
    pub time: i64,
}

/// One change to a trait, for `user.updated`.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitChange {
    /// Trait key.
    pub key: Sym,
    /// Value before (None: absent).
    pub from: Option<Value>,
    /// Value after (None: unset).
    pub to: Option<Value>,
}

/// How trait times are decided for an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraitTime {
    /// A message or mapping: applies only if not older than the key's time.
    Event(i64),
    /// PATCH or import: max(now, key's time), so it always applies.
    Now(i64),
}

/// Why a trait update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraitLimitError {
    /// Too many top-level keys.
    #[error("the profile would hold {count} top-level trait keys, more than the limit of {limit}")]
    TooManyKeys {
        /// Keys after the update.
        count: usize,
        /// Limit.
        limit: usize,
    },
    /// Traits too large as JSON.
    #[error(
        "the profile's traits would take {bytes} bytes as JSON, more than the limit of {limit}"
    )]
    TooManyBytes {
        /// Bytes after the update.
        bytes: usize,
        /// Limit.
        limit: usize,
    },
}

/// A mapping's update that could not be applied to a profile (reported per mapping).
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedUpdate {
    /// The trait.
    pub key: String,
    /// Why, naming the trait and the value or limit.
    pub reason: String,
    /// A `set` from an event older than the trait's value, ignored by design (a late event
    /// never undoes a newer fact), rather than an update that could not be applied.
    pub late: bool,
}

impl SkippedUpdate {
    fn new(key: &str, reason: String) -> SkippedUpdate {
        SkippedUpdate {
            key: key.to_owned(),
            reason,
            late: false,
        }
    }
}

/// An `increment` (or, when not `increment`, an `append`) of `key` that its current value
/// (`held`) does not allow: of another kind, or a number the increment would overflow.
fn cannot_derive(key: &str, increment: bool, held: Option<serde_json::Value>) -> SkippedUpdate {
    let (verb, kind) = if increment {
        ("increment", "a number")
    } else {
        ("append to", "a list")
    };
    let held = held.unwrap_or(serde_json::Value::Null);
    let why = if increment && held.is_number() {
        format!("the result would overflow (it holds {held})")
    } else {
        format!("it holds {}, not {kind}", crate::segment::cond::show(&held))
    };
    SkippedUpdate::new(key, format!("cannot {verb} {key:?}: {why}"))
}

/// Trait budget of one profile, and how close two event times must be to count as equal.
#[derive(Debug, Clone, Copy)]
pub struct TraitLimits {
    /// Most top-level keys.
    pub max_keys: usize,
    /// Most bytes as JSON.
    pub max_bytes: usize,
    /// Event times this close count as equal, so the later arrival wins: skew correction
    /// (`receivedAt − (sentAt − timestamp)`) also counts the time a message waited in the
    /// SDK after `sentAt` was stamped, so corrected times of messages sent moments apart
    /// can come out in the wrong order by that much.
    pub same_time_ms: i64,
}

/// A profile: identities, traits, timeline index and times. Around 1 KiB for a typical
/// profile; events themselves live in the shard's log.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Its id.
    pub id: ProfileId,
    /// Server time it was created.
    pub created_at: i64,
    /// Server time of its last change.
    pub updated_at: i64,
    /// Earliest event time (i64::MAX: none yet).
    pub first_seen: i64,
    /// Latest event time (i64::MIN: none yet).
    pub last_seen: i64,
    /// Identities it holds.
    pub identities: Vec<HeldIdentity>,
    /// Traits, sorted by interned key.
    pub traits: Vec<TraitSlot>,
    /// Live (non-tombstone) keys.
    pub live_keys: u32,
    /// Approximate size of the traits as JSON.
    pub trait_bytes: u32,
    /// Timeline index, sorted by (timestamp, seq).
    pub events: Vec<EventRef>,
    /// Ids absorbed into this one.
    pub merged_from: Vec<ProfileId>,
    /// Merges into this profile, as the JSON objects `GET …/merges` lists (rare, so boxed).
    pub merge_notes: Option<Box<Vec<Box<str>>>>,
    /// Segments it is a member of: (segment index, since), sorted by index.
    pub memberships: Vec<(SegIdx, i64)>,
    /// Event counters of the segment rules in force: (spec id, counter), sorted by id;
    /// absent means nothing counted.
    pub counters: Vec<(SpecId, Counter)>,
}

/// Size a slot adds to the JSON object: `"key":value,`.
fn slot_bytes(key: &str, v: &Value) -> usize {
    key.len() + 4 + v.json_len()
}

impl Profile {
    /// A new, empty profile. Its creation time is the one in its id, so "the older
    /// profile" by `created_at` and by id agree.
    pub fn new(id: ProfileId, now: i64) -> Profile {
        let created_at = if id.created_ms() > 0 {
            id.created_ms()
        } else {
            now
        };
        Profile {
            id,
            created_at,
            updated_at: now,
            first_seen: i64::MAX,
            last_seen: i64::MIN,
            identities: Vec::new(),
            traits: Vec::new(),
            live_keys: 0,
            trait_bytes: 2,
            // `user.created` and the event or update that made it: nearly every profile.
            events: Vec::with_capacity(2),
            merged_from: Vec::new(),
            merge_notes: None,
            memberships: Vec::new(),
            counters: Vec::new(),
        }
    }

    /// Since when the profile is a member of a segment.
    pub fn member_since(&self, seg: SegIdx) -> Option<i64> {
        self.memberships
            .binary_search_by_key(&seg, |m| m.0)
            .ok()
            .map(|i| self.memberships[i].1)
    }

    /// Records (true) or ends (false) a membership; returns whether anything changed.
    pub fn set_member(&mut self, seg: SegIdx, member: bool, since: i64) -> bool {
        match (self.memberships.binary_search_by_key(&seg, |m| m.0), member) {
            (Ok(_), true) | (Err(_), false) => false,
            (Err(i), true) => {
                self.memberships.insert(i, (seg, since));
                true
            }
            (Ok(i), false) => {
                self.memberships.remove(i);
                true
            }
        }
    }

    /// The counter for a spec, created empty if absent.
    pub fn counter_mut(&mut self, spec: SpecId, empty: impl FnOnce() -> Counter) -> &mut Counter {
        let i = match self.counters.binary_search_by_key(&spec, |c| c.0) {
            Ok(i) => i,
            Err(i) => {
                self.counters.insert(i, (spec, empty()));
                i
            }
        };
        &mut self.counters[i].1
    }

    /// Replaces (Some) or drops (None) the counter for a spec.
    pub fn set_counter(&mut self, spec: SpecId, counter: Option<Counter>) {
        match (
            self.counters.binary_search_by_key(&spec, |c| c.0),
            counter.filter(|c| !c.is_empty()),
        ) {
            (Ok(i), Some(c)) => self.counters[i].1 = c,
            (Ok(i), None) => {
                self.counters.remove(i);
            }
            (Err(i), Some(c)) => self.counters.insert(i, (spec, c)),
            (Err(_), None) => {}
        }
    }

    /// Takes in a profile merged into this one: events combined in time order, traits
    /// newest-wins by key time (ties keep this profile's), identities united, times
    /// widened, event counters added up (`spec` gives what each counts; unknown ones are
    /// dropped), and the absorbed id (and everything it had absorbed) in `merged_from`.
    /// The absorbed profile's memberships end: the survivor's are re-evaluated.
    pub fn absorb(
        &mut self,
        other: Profile,
        now: i64,
        spec: &dyn Fn(SpecId) -> Option<std::sync::Arc<CounterSpec>>,
    ) {
        for (id, c) in other.counters {
            if let Some(s) = spec(id) {
                self.counter_mut(id, || s.empty()).absorb(c, &s);
            }
        }
        for h in other.identities {
            self.add_identity(h.identity, h.first_seen);
        }
        let mut traits = std::mem::take(&mut self.traits);
        for slot in other.traits {
            match traits.binary_search_by_key(&slot.key, |t| t.key) {
                Ok(i) => {
                    if slot.time > traits[i].time {
                        traits[i] = slot;
                    }
                }
                Err(i) => traits.insert(i, slot),
            }
        }
        self.set_traits(traits);
        let mut events = std::mem::take(&mut self.events);
        events.extend(other.events);
        events.sort_by_key(|e| e.key());
        self.events = events;
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        self.created_at = self.created_at.min(other.created_at);
        self.updated_at = now;
        self.merged_from.push(other.id);
        self.merged_from.extend(other.merged_from);
        if let Some(notes) = other.merge_notes {
            self.merge_notes
                .get_or_insert_with(Default::default)
                .extend(*notes);
        }
    }

    /// Records how a merge into this profile happened.
    pub fn add_merge_note(&mut self, note: String) {
        self.merge_notes
            .get_or_insert_with(Default::default)
            .push(note.into_boxed_str());
    }

    /// Adds an identity unless it is already held.
    pub fn add_identity(&mut self, identity: Identity, first_seen: i64) {
        if !self.identities.iter().any(|h| h.identity == identity) {
            self.identities.reserve_exact(1);
            self.identities.push(HeldIdentity {
                identity,
                first_seen,
            });
        }
    }

    /// Count of identities of a type, optionally only those first seen after `since`.
    pub fn count_identities(&self, ty: IdType, since: Option<i64>) -> usize {
        self.identities
            .iter()
            .filter(|h| h.identity.ty == ty && since.is_none_or(|s| h.first_seen > s))
            .count()
    }

    /// The value of a top-level trait.
    pub fn trait_value(&self, key: Sym) -> Option<&Value> {
        self.slot(key).and_then(|s| s.value.as_ref())
    }

    fn slot(&self, key: Sym) -> Option<&TraitSlot> {
        self.traits
            .binary_search_by_key(&key, |s| s.key)
            .ok()
            .map(|i| &self.traits[i])
    }

    /// Works out what `updates` (null = unset) would change, without changing anything,
    /// and checks the trait budget. Keys are in the map's order.
    pub fn plan_traits(
        &self,
        updates: &serde_json::Map<String, serde_json::Value>,
        time: TraitTime,
        limits: TraitLimits,
    ) -> Result<Vec<PlannedTrait>, TraitLimitError> {
        let mut plan = Vec::with_capacity(updates.len());
        let mut keys = self.live_keys as i64;
        let mut bytes = self.trait_bytes as i64;
        for (name, raw) in updates {
            let key = trait_keys().intern(name);
            let slot = self.slot(key);
            let slot_time = slot.map(|s| s.time).unwrap_or(i64::MIN);
            let at = match time {
                TraitTime::Event(t) => {
                    if t < slot_time.saturating_sub(limits.same_time_ms) {
                        continue; // a late event never undoes a newer fact
                    }
                    t.max(slot_time)
                }
                TraitTime::Now(now) => now.max(slot_time),
            };
            let new = if raw.is_null() {
                None
            } else {
                Some(Value::from_json(raw.clone()))
            };
            let old = slot.and_then(|s| s.value.as_ref());
            if let Some(o) = old {
                keys -= 1;
                bytes -= slot_bytes(name, o) as i64;
            }
            if let Some(n) = &new {
                keys += 1;
                bytes += slot_bytes(name, n) as i64;
            }
            let changed = old != new.as_ref();
            plan.push(PlannedTrait {
                key,
                value: new,
                time: at,
                changed,
            });
        }
        if keys as usize > limits.max_keys && keys > self.live_keys as i64 {
            return Err(TraitLimitError::TooManyKeys {
                count: keys as usize,
                limit: limits.max_keys,
            });
        }
        if bytes as usize > limits.max_bytes && bytes > self.trait_bytes as i64 {
            return Err(TraitLimitError::TooManyBytes {
                bytes: bytes as usize,
                limit: limits.max_bytes,
            });
        }
        Ok(plan)
    }

    /// Applies a plan made by [`Profile::plan_traits`]; returns the changes for `user.updated`.
    pub fn commit_traits(&mut self, plan: Vec<PlannedTrait>, now: i64) -> Vec<TraitChange> {
        let mut changes = Vec::with_capacity(plan.len());
        // Room for the new keys at once (a new profile gets all its traits in one plan).
        let new_keys = plan
            .iter()
            .filter(|p| self.traits.binary_search_by_key(&p.key, |s| s.key).is_err())
            .count();
        self.traits.reserve_exact(new_keys);
        for p in plan {
            let name = trait_keys().name(p.key);
            match self.traits.binary_search_by_key(&p.key, |s| s.key) {
                Ok(i) => {
                    let slot = &mut self.traits[i];
                    let old = slot.value.take();
                    if let Some(o) = &old {
                        self.live_keys -= 1;
                        self.trait_bytes -= slot_bytes(name, o) as u32;
                    }
                    if let Some(n) = &p.value {
                        self.live_keys += 1;
                        self.trait_bytes += slot_bytes(name, n) as u32;
                    }
                    slot.value = p.value.clone();
                    slot.time = p.time;
                    if p.changed {
                        changes.push(TraitChange {
                            key: p.key,
                            from: old,
                            to: p.value,
                        });
                    }
                }
                Err(i) => {
                    if let Some(n) = &p.value {
                        self.live_keys += 1;
                        self.trait_bytes += slot_bytes(name, n) as u32;
                    }
                    self.traits.insert(
                        i,
                        TraitSlot {
                            key: p.key,
                            value: p.value.clone(),
                            time: p.time,
                        },
                    );
                    if p.changed {
                        changes.push(TraitChange {
                            key: p.key,
                            from: None,
                            to: p.value,
                        });
                    }
                }
            }
        }
        if !changes.is_empty() {
            self.updated_at = now;
        }
        // Profiles are many and small: keep no spare capacity after a change.
        if self.traits.capacity() > self.traits.len() + 1 {
            self.traits.shrink_to_fit();
        }
        changes
    }

    /// Applies a mapping's updates for an event at time `ts`: sets and unsets as a
    /// message's traits (ignored if older than the key's time), increments and appends
    /// always (the key's time becomes max(ts, key time)). Returns the changes, and how many
    /// updates could not apply (a non-number to increment, a non-list to append, the
    /// trait budget).
    pub fn apply_updates(
        &mut self,
        updates: &[crate::segment::mapping::Update],
        ts: i64,
        limits: TraitLimits,
        now: i64,
    ) -> (Vec<TraitChange>, Vec<SkippedUpdate>) {
        use crate::segment::mapping::{Update, appended, incremented};
        let mut changes = Vec::new();
        let mut skipped = Vec::new();
        for u in updates {
            let current = |k: &str| {
                trait_keys()
                    .lookup(k)
                    .and_then(|s| self.trait_value(s))
                    .map(Value::to_json)
            };
            // An increment or append computes its value from the current one, and cannot
            // when that is of another kind: skipped, with what it holds.
            let (key, value, time) = match u {
                Update::Set(k, v) => (k, v.clone(), TraitTime::Event(ts)),
                Update::Increment(k, by, int) => {
                    let held = current(k);
                    match incremented(held.as_ref(), *by, *int) {
                        Some(v) => (k, Some(v), TraitTime::Now(ts)),
                        None => {
                            skipped.push(cannot_derive(k, true, held));
                            continue;
                        }
                    }
                }
                Update::Append(k, items) => {
                    let held = current(k);
                    match appended(held.as_ref(), items) {
                        Some(v) => (k, Some(v), TraitTime::Now(ts)),
                        None => {
                            skipped.push(cannot_derive(k, false, held));
                            continue;
                        }
                    }
                }
            };
            let mut one = serde_json::Map::with_capacity(1);
            one.insert(key.clone(), value.unwrap_or(serde_json::Value::Null));
            match self.plan_traits(&one, time, limits) {
                Ok(plan) if plan.is_empty() => skipped.push(SkippedUpdate {
                    key: key.clone(),
                    reason: format!(
                        "set of {key:?} ignored: the event is older than the trait's value"
                    ),
                    late: true,
                }),
                Ok(plan) => changes.extend(self.commit_traits(plan, now)),
                Err(e) => skipped.push(SkippedUpdate::new(key, format!("cannot set {key:?}: {e}"))),
            }
        }
        (changes, skipped)
    }

    /// Replaces all trait slots (sorted by key) and recomputes the budget counters.
    pub fn set_traits(&mut self, traits: Vec<TraitSlot>) {
        debug_assert!(traits.windows(2).all(|w| w[0].key < w[1].key));
        self.live_keys = 0;
        self.trait_bytes = 2;
        for t in &traits {
            if let Some(v) = &t.value {
                self.live_keys += 1;
                self.trait_bytes += slot_bytes(trait_keys().name(t.key), v) as u32;
            }
        }
        self.traits = traits;
    }

    /// Records an event in the timeline index (kept sorted) and in first/last seen.
    pub fn add_event(&mut self, r: EventRef) {
        if r.kind() != EventKind::System {
            self.first_seen = self.first_seen.min(r.ts_ms);
            self.last_seen = self.last_seen.max(r.ts_ms);
        }
        let at = match self.events.last() {
            Some(last) if last.key() > r.key() => {
                self.events.partition_point(|e| e.key() < r.key())
            }
            _ => self.events.len(),
        };
        if self.events.len() < 16 {
            // Most profiles have few events: grow one at a time until they have many.
            self.events.reserve_exact(1);
        }
        self.events.insert(at, r);
    }

    /// Drops the oldest events beyond `max` and those received before `min_received_s`;
    /// returns how many were dropped.
    pub fn trim_events(&mut self, max: usize, min_received_s: u32) -> usize {
        let before = self.events.len();
        if min_received_s > 0 {
            self.events.retain(|e| e.received_s >= min_received_s);
        }
        if self.events.len() > max {
            let extra = self.events.len() - max;
            self.events.drain(..extra);
        }
        before - self.events.len()
    }

    /// A view that serialises as the API's profile object.
    pub fn view<'a>(&'a self, segments: &'a [&'a str]) -> ProfileView<'a> {
        ProfileView {
            profile: self,
            segments,
        }
    }

    /// Traits as the API shows them (sorted by key; tombstones left out).
    pub fn traits_view(&self) -> TraitsView<'_> {
        TraitsView(self)
    }
}

impl Subject for Profile {
    fn trait_value(&self, key: Sym) -> Option<&Value> {
        Profile::trait_value(self, key)
    }

    fn has_identity(&self, ty: IdType) -> bool {
        self.identities.iter().any(|h| h.identity.ty == ty)
    }

    fn counter(&self, spec: SpecId) -> Option<&Counter> {
        self.counters
            .binary_search_by_key(&spec, |c| c.0)
            .ok()
            .map(|i| &self.counters[i].1)
    }

    fn member_of(&self, seg: SegIdx) -> bool {
        self.memberships.binary_search_by_key(&seg, |m| m.0).is_ok()
    }
}

/// One planned trait write.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTrait {
    /// Key.
    pub key: Sym,
    /// New value (None: unset).
    pub value: Option<Value>,
    /// New key time.
    pub time: i64,
    /// Whether the value differs from the current one.
    pub changed: bool,
}

/// The traits object of a profile, serialised without copying.
pub struct TraitsView<'a>(&'a Profile);

impl Serialize for TraitsView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut live: Vec<(&str, &Value)> = self
            .0
            .traits
            .iter()
            .filter_map(|t| t.value.as_ref().map(|v| (trait_keys().name(t.key), v)))
            .collect();
        live.sort_by(|a, b| a.0.cmp(b.0));
        let mut map = s.serialize_map(Some(live.len()))?;
        for (k, v) in live {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The profile object of the API.
pub struct ProfileView<'a> {
    profile: &'a Profile,
    segments: &'a [&'a str],
}

impl Serialize for ProfileView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Ident<'a> {
            #[serde(rename = "type")]
            ty: &'a str,
            value: &'a str,
            first_seen: String,
        }
        let p = self.profile;
        let idents: Vec<(&str, &HeldIdentity)> = p
            .identities
            .iter()
            .map(|h| (h.identity.ty.name(), h))
            .collect();
        let idents: Vec<Ident<'_>> = idents
            .iter()
            .map(|(ty, h)| Ident {
                ty,
                value: &h.identity.value,
                first_seen: format_ms(h.first_seen),
            })
            .collect();
        let mut map = s.serialize_map(Some(9))?;
        map.serialize_entry("id", &p.id.to_string())?;
        map.serialize_entry("identities", &idents)?;
        map.serialize_entry("traits", &p.traits_view())?;
        map.serialize_entry("created_at", &format_ms(p.created_at))?;
        map.serialize_entry("updated_at", &format_ms(p.updated_at))?;
        let seen = |t: i64| (t != i64::MAX && t != i64::MIN).then(|| format_ms(t));
        map.serialize_entry("first_seen", &seen(p.first_seen))?;
        map.serialize_entry("last_seen", &seen(p.last_seen))?;
        map.serialize_entry("segments", self.segments)?;
        let merged: Vec<String> = p.merged_from.iter().map(|m| m.to_string()).collect();
        map.serialize_entry("merged_from", &merged)?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: TraitLimits = TraitLimits {
        max_keys: 3,
        max_bytes: 1000,
        same_time_ms: 0,
    };

    fn obj(s: &str) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn late_events_do_not_undo_newer_facts() {
        let mut p = Profile::new(ProfileId::new(1, 0, 1), 1);
        let plan = p
            .plan_traits(&obj(r#"{"plan":"pro"}"#), TraitTime::Event(100), LIMITS)
            .unwrap();
        assert_eq!(p.commit_traits(plan, 1).len(), 1);
        let plan = p
            .plan_traits(&obj(r#"{"plan":"free"}"#), TraitTime::Event(50), LIMITS)
            .unwrap();
        assert!(p.commit_traits(plan, 2).is_empty());
        assert_eq!(
            serde_json::to_string(&p.traits_view()).unwrap(),
            r#"{"plan":"pro"}"#
        );
        // Equal time: the later arrival wins.
        let plan = p
            .plan_traits(&obj(r#"{"plan":"free"}"#), TraitTime::Event(100), LIMITS)
            .unwrap();
        assert_eq!(p.commit_traits(plan, 3).len(), 1);
        // Unset leaves a tombstone that stops an older set.
        let plan = p
            .plan_traits(&obj(r#"{"plan":null}"#), TraitTime::Event(200), LIMITS)
            .unwrap();
        assert_eq!(p.commit_traits(plan, 4).len(), 1);
        let plan = p
            .plan_traits(&obj(r#"{"plan":"x"}"#), TraitTime::Event(150), LIMITS)
            .unwrap();
        assert!(p.commit_traits(plan, 5).is_empty());
        assert_eq!(serde_json::to_string(&p.traits_view()).unwrap(), "{}");
        assert_eq!(p.live_keys, 0);
        // PATCH always applies.
        let plan = p
            .plan_traits(&obj(r#"{"plan":"y"}"#), TraitTime::Now(10), LIMITS)
            .unwrap();
        assert_eq!(p.commit_traits(plan, 6).len(), 1);
    }

    #[test]
    fn near_equal_times_are_ordered_by_arrival() {
        let limits = TraitLimits {
            same_time_ms: 1000,
            ..LIMITS
        };
        let mut p = Profile::new(ProfileId::new(1, 0, 1), 1);
        let plan = p
            .plan_traits(&obj(r#"{"plan":"pro"}"#), TraitTime::Event(10_500), limits)
            .unwrap();
        p.commit_traits(plan, 1);
        // 400 ms "older" but arriving later: counts as the same time, so it wins.
        let plan = p
            .plan_traits(
                &obj(r#"{"plan":"enterprise"}"#),
                TraitTime::Event(10_100),
                limits,
            )
            .unwrap();
        assert_eq!(p.commit_traits(plan, 2).len(), 1);
        // The key's time never goes backwards, so this stays older than the first fact.
        let plan = p
            .plan_traits(&obj(r#"{"plan":"free"}"#), TraitTime::Event(9_400), limits)
            .unwrap();
        assert!(p.commit_traits(plan, 3).is_empty());
        assert_eq!(
            serde_json::to_string(&p.traits_view()).unwrap(),
            r#"{"plan":"enterprise"}"#
        );
    }

    #[test]
    fn budget_is_enforced_and_tracked() {
        let mut p = Profile::new(ProfileId::new(1, 0, 1), 1);
        let plan = p
            .plan_traits(&obj(r#"{"a":1,"b":2,"c":3}"#), TraitTime::Now(1), LIMITS)
            .unwrap();
        p.commit_traits(plan, 1);
        assert!(matches!(
            p.plan_traits(&obj(r#"{"d":4}"#), TraitTime::Now(1), LIMITS),
            Err(TraitLimitError::TooManyKeys { .. })
        ));
        // Replacing or removing stays possible at the limit.
        assert!(
            p.plan_traits(&obj(r#"{"a":5,"b":null}"#), TraitTime::Now(1), LIMITS)
                .is_ok()
        );
        let json = serde_json::to_string(&p.traits_view()).unwrap();
        assert_eq!(p.trait_bytes as usize, json.len() + 1);
    }
}
