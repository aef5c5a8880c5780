//! The sharded registry: the identity index `(type, value) → profile id` and the rules
//! for linking a message's identities to one profile.
//!
//! Owns which profile holds which identity. Routing needs no actor hop: the index is a
//! `DashMap` of 128-bit identity fingerprints, and the profile id carries its shard.
//! Linking to one profile is serialised by that profile's entry in `owners`, so two
//! requests can never push a profile over an identity limit together. It must not touch
//! profile state: shards hold that and apply what the registry decided.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::domain::identity::{IdType, Identity, IdentityRules};
use crate::domain::ids::ProfileId;

/// What the registry decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The profile the message goes to.
    pub profile: ProfileId,
    /// Whether the message creates it.
    pub created: bool,
    /// Identities newly linked to it (with their first-seen time).
    pub linked: Vec<(Identity, i64)>,
    /// How many of the message's identities were dropped to respect limits.
    pub dropped: usize,
    /// Which ones (for the profile's list of refused links).
    pub dropped_ids: Vec<Identity>,
    /// Profiles merged into `profile` for this message (their data must be moved over
    /// before the message is applied).
    pub merged: Vec<ProfileId>,
    /// The message named identities of two or more profiles (merging is not done here).
    pub conflict: bool,
    /// A link was refused (alias over a limit): nothing was linked.
    pub refused: bool,
    /// The message's accept sequence, taken while the registry's decision was still
    /// exclusive (0: none taken), so decisions about one profile and their `seq`s come in
    /// the same order whatever order the shards then receive the messages in.
    pub seq: u64,
}

/// A merge-list entry (`GET /v1/profiles/{key}/merges`) for links refused under an
/// identity limit: by a message (`message_id`) or, with `cause` (`patch`,
/// `import:line N`), by a `PATCH` or an import row.
pub fn refusal_entry(
    message_id: Option<&str>,
    cause: Option<&str>,
    identities: Vec<serde_json::Value>,
    now: i64,
) -> String {
    let mut entry = serde_json::json!({
        "type": "refused",
        "message_id": message_id,
        "identities": identities,
        "rule": "identity limit: linking or merging would give a profile more identities of a type than identity.limits allows",
        "at": crate::segment::timefmt::format_ms(now),
    });
    if let Some(c) = cause {
        entry["cause"] = c.into();
    }
    entry.to_string()
}

/// The merge-list entry for identities a `PATCH` or an import row could not link, or
/// `None` when none were refused. Messages carry theirs with the event
/// (`ingest::refusal_note`).
pub fn refused_links_note(dropped: &[Identity], cause: &str, now: i64) -> Option<String> {
    if dropped.is_empty() {
        return None;
    }
    let identities = dropped
        .iter()
        .map(|i| serde_json::json!({"type": i.ty.name(), "value": &*i.value}))
        .collect();
    Some(refusal_entry(None, Some(cause), identities, now))
}

impl Resolution {
    /// A message going to `profile` with nothing created, linked, dropped or merged; the
    /// other constructors start from it.
    pub fn to(profile: ProfileId) -> Resolution {
        Resolution {
            profile,
            created: false,
            linked: Vec::new(),
            dropped: 0,
            dropped_ids: Vec::new(),
            merged: Vec::new(),
            conflict: false,
            refused: false,
            seq: 0,
        }
    }
}

/// Why no profile could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Nothing usable was left after limits.
    #[error("no identity of the message can be linked within the identity limits")]
    NoUsableIdentity,
}

/// Identity types, first-seen times and fingerprints of one profile, for limit checks and
/// for moving its index entries when it is merged away.
type OwnerEntry = Vec<(IdType, i64, u128)>;

/// The identity index and per-profile identity counts.
pub struct Registry {
    /// Identity fingerprint → profile.
    index: DashMap<u128, ProfileId>,
    /// Profile → the types of the identities it holds.
    owners: DashMap<ProfileId, OwnerEntry>,
    /// Merged-away profile → the profile that absorbed it (keys of absorbed profiles
    /// resolve to the survivor; messages in flight to them are forwarded).
    forwards: DashMap<ProfileId, ProfileId>,
    /// Merges take it for writing, every other identity change for reading, so a merge
    /// never races a link against the same profiles.
    merge_lock: parking_lot::RwLock<()>,
    /// Fingerprints of identities erased with `?suppress=true`: messages carrying them are
    /// refused, so an SDK's queued resend cannot recreate the person.
    suppressed: dashmap::DashSet<u128>,
    /// How many shards exist (new profiles are spread over them).
    shards: u16,
    /// Custom identity types ever linked (the CSV export's `identity:<type>` columns).
    custom_types: dashmap::DashSet<IdType>,
    /// Limits, priority, blocked values.
    rules: Arc<IdentityRules>,
    /// The server-wide accept sequence (shared with the shards, which number their other
    /// records from it too). Messages take theirs here, inside the decision that routes them.
    pub seq: Arc<AtomicU64>,
}

impl Registry {
    /// An empty registry for `shards` shards.
    pub fn new(shards: u16, rules: Arc<IdentityRules>) -> Registry {
        Registry {
            index: DashMap::new(),
            owners: DashMap::new(),
            suppressed: dashmap::DashSet::new(),
            forwards: DashMap::new(),
            merge_lock: parking_lot::RwLock::new(()),
            shards,
            custom_types: dashmap::DashSet::new(),
            rules,
            seq: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Takes the next accept sequence number for a decided resolution. Called while the
    /// decision is still exclusive (the profile's owner entry or the merge lock held).
    fn stamp(&self, mut r: Resolution) -> Resolution {
        r.seq = self.seq.fetch_add(1, Ordering::AcqRel);
        r
    }

    /// The identity rules in force.
    pub fn rules(&self) -> &IdentityRules {
        &self.rules
    }

    /// The profile holding an identity.
    pub fn lookup(&self, identity: &Identity) -> Option<ProfileId> {
        self.index.get(&identity.hash()).map(|p| *p)
    }

    /// Whether a profile id is known (created and not erased).
    pub fn exists(&self, id: ProfileId) -> bool {
        self.owners.contains_key(&id)
    }

    /// The survivor a merged-away id resolves to (following chains of merges).
    pub fn forward(&self, mut id: ProfileId) -> Option<ProfileId> {
        let mut found = None;
        for _ in 0..64 {
            match self.forwards.get(&id).map(|f| *f) {
                Some(next) => {
                    found = Some(next);
                    id = next;
                }
                None => break,
            }
        }
        found
    }

    /// The identity types, first-seen times and fingerprints of several profiles together.
    fn held_by(&self, profiles: &[ProfileId]) -> Vec<(IdType, i64, u128)> {
        let mut held = Vec::new();
        for p in profiles {
            if let Some(o) = self.owners.get(p) {
                held.extend(o.iter().copied());
            }
        }
        held
    }

    /// Whether `held` plus the message identities at `extra` would exceed a type's limit
    /// (counting, for windowed limits, only identities first seen within the window).
    /// Checks the types of `extra`, or with `all_types` every type involved.
    fn breaks_limit(
        &self,
        held: &[(IdType, i64, u128)],
        message: &[Identity],
        extra: &[usize],
        now: i64,
        all_types: bool,
    ) -> bool {
        let mut types: Vec<IdType> = extra.iter().map(|&i| message[i].ty).collect();
        if all_types {
            types.extend(held.iter().map(|(t, _, _)| *t));
        }
        types.sort_unstable();
        types.dedup();
        types.into_iter().any(|ty| {
            self.rules.limit(ty).is_some_and(|limit| {
                let since = limit.per_ms.map(|p| now - p);
                let existing = held
                    .iter()
                    .filter(|(t, seen, _)| *t == ty && since.is_none_or(|s| *seen > s))
                    .count();
                let added = extra.iter().filter(|&&j| message[j].ty == ty).count();
                existing + added > limit.max
            })
        })
    }

    /// Whether merging `profiles` (plus `extra` identities of the message) would put a
    /// profile over a limit; if so, the index of the message identity to drop.
    fn merge_over_limit(
        &self,
        profiles: &[ProfileId],
        message: &[Identity],
        extra: &[usize],
        now: i64,
    ) -> Option<usize> {
        let held = self.held_by(profiles);
        if self.breaks_limit(&held, message, extra, now, true) {
            self.rules.lowest_priority(message)
        } else {
            None
        }
    }

    /// Whether the union of the profiles' identities breaks a limit by itself.
    fn union_over_limit(&self, profiles: &[ProfileId], now: i64) -> bool {
        self.breaks_limit(&self.held_by(profiles), &[], &[], now, true)
    }

    /// Merges `absorbed` into `survivor` in the index: every identity of the absorbed
    /// profiles now points at the survivor. Caller holds the merge lock for writing.
    fn merge_index(&self, survivor: ProfileId, absorbed: &[ProfileId]) {
        for a in absorbed {
            let Some((_, entry)) = self.owners.remove(a) else {
                continue;
            };
            for (_, _, h) in &entry {
                self.index.insert(*h, survivor);
            }
            self.owners.entry(survivor).or_default().extend(entry);
            self.forwards.insert(*a, survivor);
        }
    }

    /// Replays a merge recorded in the log (idempotent).
    pub fn restore_merge(
        &self,
        survivor: ProfileId,
        absorbed: ProfileId,
        identities: &[(Identity, i64)],
    ) {
        let _w = self.merge_lock.write();
        self.owners.remove(&absorbed);
        let mut owner = self.owners.entry(survivor).or_default();
        for (id, seen) in identities {
            let h = id.hash();
            self.index.insert(h, survivor);
            if !owner.iter().any(|(_, _, x)| *x == h) {
                owner.push((id.ty, *seen, h));
            }
        }
        drop(owner);
        self.forwards.insert(absorbed, survivor);
    }

    /// Replays the absorbed side of a merge: the profile no longer owns identities.
    pub fn restore_merged_away(&self, absorbed: ProfileId, survivor: ProfileId) {
        let _w = self.merge_lock.write();
        self.owners.remove(&absorbed);
        self.forwards.insert(absorbed, survivor);
    }

    /// Forgets the identity counts of a profile found absorbed after recovery (its
    /// identities already point at the survivor).
    pub fn drop_owner(&self, id: ProfileId) {
        let _w = self.merge_lock.write();
        self.owners.remove(&id);
    }

    /// Records a merged-away id (from a snapshot's `merged_from` lists).
    pub fn restore_forward(&self, absorbed: ProfileId, survivor: ProfileId) {
        self.forwards.insert(absorbed, survivor);
    }

    /// Number of profiles.
    pub fn profile_count(&self) -> usize {
        self.owners.len()
    }

    /// Picks a shard for a new profile from its first identity, so load spreads evenly.
    fn shard_for(&self, first: &Identity) -> u16 {
        (first.hash() % self.shards as u128) as u16
    }

    /// Index of the identity a limit forces out, if `extra` added to `held` breaks a limit.
    fn over_limit(
        &self,
        held: &[(IdType, i64, u128)],
        message: &[Identity],
        extra: &[usize],
        now: i64,
    ) -> Option<usize> {
        if self.breaks_limit(held, message, extra, now, false) {
            self.rules.lowest_priority(message)
        } else {
            None
        }
    }

    /// Resolves a message's identities (normalised, unblocked, in message order) to one
    /// profile, creating or linking as needed. When a limit would be broken the message's
    /// lowest-priority identity is dropped and the rest retried.
    pub fn resolve(&self, identities: &[Identity], now: i64) -> Result<Resolution, ResolveError> {
        self.resolve_inner(identities, now, None)
    }

    /// Like [`Registry::resolve`], but the first identity is never the one dropped (a
    /// PATCH's profile key decides which profile it changes).
    pub fn resolve_keeping_first(
        &self,
        identities: &[Identity],
        now: i64,
    ) -> Result<Resolution, ResolveError> {
        self.resolve_inner(identities, now, identities.first().cloned())
    }

    /// Which identity to drop: the lowest-priority one, never `keep`.
    fn drop_index(
        &self,
        ids: &[Identity],
        suggested: usize,
        keep: &Option<Identity>,
    ) -> Option<usize> {
        match keep {
            Some(k) if ids[suggested] == *k => {
                let others: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] != *k).collect();
                let rest: Vec<Identity> = others.iter().map(|&i| ids[i].clone()).collect();
                self.rules.lowest_priority(&rest).map(|j| others[j])
            }
            _ => Some(suggested),
        }
    }

    fn resolve_inner(
        &self,
        identities: &[Identity],
        now: i64,
        keep: Option<Identity>,
    ) -> Result<Resolution, ResolveError> {
        let mut ids: Vec<Identity> = identities.to_vec();
        let mut dropped = 0;
        let mut dropped_ids: Vec<Identity> = Vec::new();
        let mut merged: Vec<ProfileId> = Vec::new();
        loop {
            if ids.is_empty() {
                return Err(ResolveError::NoUsableIdentity);
            }
            let guard = self.merge_lock.read();
            let found: Vec<Option<ProfileId>> = ids.iter().map(|i| self.lookup(i)).collect();
            let mut distinct: Vec<ProfileId> = found.iter().flatten().copied().collect();
            distinct.sort_unstable();
            distinct.dedup();
            let unheld: Vec<usize> = (0..ids.len()).filter(|&i| found[i].is_none()).collect();
            if distinct.len() > 1 {
                // Identities of several profiles: merge them into the oldest (ids are
                // time-ordered), unless the union would break a limit.
                drop(guard);
                let _w = self.merge_lock.write();
                let still: Vec<Option<ProfileId>> = ids.iter().map(|i| self.lookup(i)).collect();
                if still != found {
                    continue; // changed meanwhile: look again
                }
                if let Some(i) = self.merge_over_limit(&distinct, &ids, &unheld, now) {
                    let Some(i) = self.drop_index(&ids, i, &keep) else {
                        return Err(ResolveError::NoUsableIdentity);
                    };
                    dropped_ids.push(ids.remove(i));
                    dropped += 1;
                    continue;
                }
                let survivor = distinct[0];
                self.merge_index(survivor, &distinct[1..]);
                merged.extend_from_slice(&distinct[1..]);
                // Link the rest within the same exclusive decision, so no other message
                // can be decided between the merge and this message's links.
                match self.try_link(survivor, &ids, &unheld, now) {
                    Attempt::Done(mut r) => {
                        r.dropped = dropped;
                        r.dropped_ids = std::mem::take(&mut dropped_ids);
                        r.merged = std::mem::take(&mut merged);
                        return Ok(r);
                    }
                    // The limit check above covered the links; nothing else links while
                    // the write lock is held. Should it happen, look again.
                    Attempt::Drop(_) | Attempt::Retry => continue,
                }
            }
            let outcome = match distinct.first() {
                None => self.try_create(&ids, now),
                Some(p) => self.try_link(*p, &ids, &unheld, now),
            };
            drop(guard);
            match outcome {
                Attempt::Done(mut r) => {
                    r.dropped = dropped;
                    r.dropped_ids = std::mem::take(&mut dropped_ids);
                    r.merged = std::mem::take(&mut merged);
                    return Ok(r);
                }
                Attempt::Drop(i) => {
                    let Some(i) = self.drop_index(&ids, i, &keep) else {
                        return Err(ResolveError::NoUsableIdentity);
                    };
                    dropped_ids.push(ids.remove(i));
                    dropped += 1;
                }
                Attempt::Retry => {}
            }
        }
    }

    fn try_create(&self, ids: &[Identity], now: i64) -> Attempt {
        let all: Vec<usize> = (0..ids.len()).collect();
        if let Some(i) = self.over_limit(&[], ids, &all, now) {
            return Attempt::Drop(i);
        }
        let pid = ProfileId::new(now, self.shard_for(&ids[0]), rand::random());
        let mut owner = self.owners.entry(pid).or_default();
        match self.link_all(pid, &mut owner, ids, &all, now) {
            Some(linked) => Attempt::Done(self.stamp(Resolution {
                created: true,
                linked,
                ..Resolution::to(pid)
            })),
            None => {
                drop(owner);
                self.owners.remove(&pid);
                Attempt::Retry
            }
        }
    }

    fn try_link(&self, pid: ProfileId, ids: &[Identity], unheld: &[usize], now: i64) -> Attempt {
        let Some(mut owner) = self.owners.get_mut(&pid) else {
            return Attempt::Retry; // erased meanwhile: look again
        };
        if let Some(i) = self.over_limit(&owner, ids, unheld, now) {
            return Attempt::Drop(i);
        }
        match self.link_all(pid, &mut owner, ids, unheld, now) {
            Some(linked) => Attempt::Done(self.stamp(Resolution {
                linked,
                ..Resolution::to(pid)
            })),
            None => Attempt::Retry,
        }
    }

    /// Links `which` of `ids` to `pid` while its owner entry is held. If another request
    /// took one of them meanwhile, undoes this call's links and returns None.
    fn link_all(
        &self,
        pid: ProfileId,
        owner: &mut OwnerEntry,
        ids: &[Identity],
        which: &[usize],
        now: i64,
    ) -> Option<Vec<(Identity, i64)>> {
        let mut linked: Vec<(Identity, i64)> = Vec::with_capacity(which.len());
        for &i in which {
            let id = &ids[i];
            match self.index.entry(id.hash()) {
                Entry::Vacant(v) => {
                    v.insert(pid);
                    owner.push((id.ty, now, id.hash()));
                    linked.push((id.clone(), now));
                    self.note_type(id.ty);
                }
                Entry::Occupied(o) if *o.get() == pid => {}
                Entry::Occupied(_) => {
                    for (l, _) in &linked {
                        self.index.remove(&l.hash());
                        if let Some(at) = owner.iter().rposition(|(_, _, h)| *h == l.hash()) {
                            owner.remove(at);
                        }
                    }
                    return None;
                }
            }
        }
        Some(linked)
    }

    /// Links extra identities onto a known profile (PATCH of email/phone traits): ones
    /// held by other profiles are left alone, and limits drop the lowest-priority first.
    pub fn link_onto(
        &self,
        pid: ProfileId,
        identities: &[Identity],
        now: i64,
    ) -> Vec<(Identity, i64)> {
        let mut ids: Vec<Identity> = identities.to_vec();
        loop {
            if ids.is_empty() {
                return Vec::new();
            }
            let _r = self.merge_lock.read();
            let unheld: Vec<usize> = (0..ids.len())
                .filter(|&i| self.lookup(&ids[i]).is_none())
                .collect();
            match self.try_link(pid, &ids, &unheld, now) {
                Attempt::Done(r) => return r.linked,
                Attempt::Drop(i) => {
                    ids.remove(i);
                }
                Attempt::Retry => {
                    if !self.exists(pid) {
                        return Vec::new();
                    }
                }
            }
        }
    }

    /// Resolves an alias: both ids are looked up as `user_id` then `anonymous_id`; an
    /// unheld `previous_id` is an anonymous id, an unheld `user_id` a user id. Linking is
    /// all or nothing: over a limit nothing is linked and the event goes to the holder of
    /// `user_id`, else of `previous_id`.
    pub fn resolve_alias(
        &self,
        user_id: &str,
        previous_id: &str,
        now: i64,
    ) -> Result<Resolution, ResolveError> {
        let find = |value: &str, unheld: IdType| -> (Identity, Option<ProfileId>) {
            for ty in [IdType::USER_ID, IdType::ANONYMOUS_ID] {
                let id = Identity {
                    ty,
                    value: value.into(),
                };
                if let Some(p) = self.lookup(&id) {
                    return (id, Some(p));
                }
            }
            (
                Identity {
                    ty: unheld,
                    value: value.into(),
                },
                None,
            )
        };
        loop {
            // Decisions other than merges hold the merge lock for reading, so a merge never
            // happens between the lookups and the decision.
            let guard = self.merge_lock.read();
            let (uid, uid_owner) = find(user_id, IdType::USER_ID);
            let (prev, prev_owner) = find(previous_id, IdType::ANONYMOUS_ID);
            let refused = |profile: ProfileId| {
                self.stamp(Resolution {
                    refused: true,
                    ..Resolution::to(profile)
                })
            };
            let attempt = match (uid_owner, prev_owner) {
                (Some(a), Some(b)) if a == b || user_id == previous_id => {
                    return Ok(self.stamp(Resolution::to(a)));
                }
                (Some(a), Some(b)) => {
                    // Two profiles: merge them into the older one, under the same limits
                    // as identify; over a limit nothing is linked.
                    drop(guard);
                    let _w = self.merge_lock.write();
                    if self.lookup(&uid) != Some(a) || self.lookup(&prev) != Some(b) {
                        continue; // changed meanwhile: look again
                    }
                    let (survivor, absorbed) = if a < b { (a, b) } else { (b, a) };
                    if self.union_over_limit(&[a, b], now) {
                        return Ok(refused(a));
                    }
                    self.merge_index(survivor, &[absorbed]);
                    return Ok(self.stamp(Resolution {
                        merged: vec![absorbed],
                        ..Resolution::to(survivor)
                    }));
                }
                (Some(p), None) | (None, Some(p)) => {
                    let ids = [uid.clone(), prev.clone()];
                    let missing = if uid_owner.is_none() { 0 } else { 1 };
                    match self.try_link(p, &ids, &[missing], now) {
                        Attempt::Drop(_) => return Ok(refused(p)),
                        other => other,
                    }
                }
                (None, None) => {
                    let ids: Vec<Identity> = if user_id == previous_id {
                        vec![uid.clone()]
                    } else {
                        vec![uid.clone(), prev.clone()]
                    };
                    match self.try_create(&ids, now) {
                        Attempt::Drop(_) => return Err(ResolveError::NoUsableIdentity),
                        other => other,
                    }
                }
            };
            drop(guard);
            if let Attempt::Done(r) = attempt {
                return Ok(r);
            }
        }
    }

    fn note_type(&self, ty: IdType) {
        if ty.builtin_name().is_none() && !self.custom_types.contains(&ty) {
            self.custom_types.insert(ty);
        }
    }

    /// The custom identity types ever linked, by name.
    pub fn custom_type_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .custom_types
            .iter()
            .map(|t| t.name().to_string())
            .collect();
        v.sort();
        v
    }

    /// Re-creates a link during replay (or undoes nothing if already there).
    pub fn restore_link(&self, pid: ProfileId, identity: &Identity, first_seen: i64) {
        self.note_type(identity.ty);
        let mut owner = self.owners.entry(pid).or_default();
        if let Entry::Vacant(v) = self.index.entry(identity.hash()) {
            v.insert(pid);
            owner.push((identity.ty, first_seen, identity.hash()));
        }
    }

    /// Registers a profile that holds no identity yet (replay of a creation).
    pub fn restore_profile(&self, pid: ProfileId) {
        self.owners.entry(pid).or_default();
    }

    /// Remembers identity fingerprints as suppressed.
    pub fn suppress(&self, hashes: &[u128]) {
        for h in hashes {
            self.suppressed.insert(*h);
        }
    }

    /// The suppressed identity among `identities`, if any.
    pub fn suppressed_among<'a>(&self, identities: &'a [Identity]) -> Option<&'a Identity> {
        if self.suppressed.is_empty() {
            return None;
        }
        identities
            .iter()
            .find(|i| self.suppressed.contains(&i.hash()))
    }

    /// Every suppressed fingerprint (for snapshots).
    pub fn suppressed_list(&self) -> Vec<u128> {
        self.suppressed.iter().map(|h| *h).collect()
    }

    /// Undoes links made for a message that was then rejected.
    pub fn unlink(&self, pid: ProfileId, identities: &[Identity]) {
        let Some(mut owner) = self.owners.get_mut(&pid) else {
            return;
        };
        for id in identities {
            if self.index.remove_if(&id.hash(), |_, p| *p == pid).is_some()
                && let Some(at) = owner.iter().rposition(|(_, _, h)| *h == id.hash())
            {
                owner.remove(at);
            }
        }
    }

    /// Forgets every profile of one shard and the identities pointing at them (before that
    /// shard reloads itself from disk after a write failure).
    pub fn remove_shard(&self, shard: u16) {
        self.owners.retain(|pid, _| pid.shard() != shard);
        self.index.retain(|_, pid| pid.shard() != shard);
    }

    /// Forgets a profile and every identity it holds (erasure).
    pub fn remove_profile(&self, pid: ProfileId, identities: &[Identity]) {
        let owner = self.owners.remove(&pid);
        for id in identities {
            self.index.remove_if(&id.hash(), |_, p| *p == pid);
        }
        drop(owner);
    }
}

enum Attempt {
    Done(Resolution),
    Drop(usize),
    Retry,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn reg() -> Registry {
        Registry::new(
            4,
            Arc::new(IdentityRules::new(&Settings::defaults().identity)),
        )
    }

    fn id(ty: IdType, v: &str) -> Identity {
        Identity {
            ty,
            value: v.into(),
        }
    }

    #[test]
    fn shared_anonymous_id_never_joins_two_users() {
        let r = reg();
        let anon = id(IdType::ANONYMOUS_ID, "kiosk");
        let a = r.resolve(std::slice::from_ref(&anon), 1).unwrap();
        assert!(a.created);
        let ava = r
            .resolve(&[id(IdType::USER_ID, "ava"), anon.clone()], 2)
            .unwrap();
        assert_eq!(ava.profile, a.profile);
        assert_eq!(ava.linked.len(), 1);
        let ben = r
            .resolve(
                &[
                    id(IdType::USER_ID, "ben"),
                    anon.clone(),
                    id(IdType::EMAIL, "ben@x"),
                ],
                3,
            )
            .unwrap();
        assert_ne!(ben.profile, a.profile);
        assert!(ben.created);
        assert_eq!(ben.dropped, 1);
        assert_eq!(r.lookup(&anon), Some(a.profile));
        assert_eq!(r.profile_count(), 2);
    }

    #[test]
    fn alias_links_all_or_nothing() {
        let r = reg();
        let dev = r.resolve(&[id(IdType::ANONYMOUS_ID, "dev")], 1).unwrap();
        let al = r.resolve_alias("u1", "dev", 2).unwrap();
        assert_eq!(al.profile, dev.profile);
        assert_eq!(al.linked, vec![(id(IdType::USER_ID, "u1"), 2)]);
        // u2 would be a second user_id on that profile: refused, nothing linked.
        let al2 = r.resolve_alias("u2", "u1", 3).unwrap();
        assert!(al2.refused);
        assert_eq!(al2.profile, dev.profile);
        assert_eq!(r.lookup(&id(IdType::USER_ID, "u2")), None);
        let same = r.resolve_alias("x", "x", 4).unwrap();
        assert!(same.created);
        assert_eq!(same.linked.len(), 1);
    }

    #[test]
    fn concurrent_creators_agree_on_one_profile() {
        let r = Arc::new(reg());
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    r.resolve(&[id(IdType::USER_ID, "same")], 1)
                        .unwrap()
                        .profile
                })
            })
            .collect();
        let ids: Vec<ProfileId> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(ids.iter().all(|p| *p == ids[0]));
        assert_eq!(r.profile_count(), 1);
    }
}
