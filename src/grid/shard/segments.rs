//! The shard's segment work: membership changes produced inside the step that caused
//! them (logged in the same batch, as `segment.entered` / `segment.exited` on the
//! timeline), backfills of created or changed segments in slices while ingest goes on,
//! time re-checks of window conditions, and the membership reads (a profile's segments,
//! a segment's members, ad-hoc rule matches).
//!
//! Counting and evaluating are [`crate::grid::membership`]'s; this file decides when, logs
//! what they return and keeps the re-check schedule.

use std::collections::HashSet;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix::{Handler, Message as ActixMessage};
use smallvec::SmallVec;
use tokio::sync::oneshot;

use super::{Shard, io_problem};
use crate::domain::identity::IdType;
use crate::domain::ids::ProfileId;
use crate::domain::profile::Profile;
use crate::domain::value::Sym;
use crate::error::Problem;
use crate::grid::membership::{self, AdHocRule, MembershipChanged, Reason};
use crate::segment::compile::{SegIdx, SpecId};
use crate::segment::counter::SpecDef;
use crate::segment::set::{RuleSet, SpecSet};
use crate::store::log::{CounterRecord, InstallRecord, LogRecord, MembershipRecord};

/// What one change to a profile touched: the inputs segment rules subscribe to.
#[derive(Debug, Default)]
pub struct Touched {
    /// Top-level trait keys that changed.
    pub traits: SmallVec<[Sym; 8]>,
    /// Counters that counted an event.
    pub specs: SmallVec<[SpecId; 8]>,
    /// Identity types linked.
    pub ids: SmallVec<[IdType; 4]>,
    /// Everything may have changed (a merge): evaluate every segment.
    pub all: bool,
}

/// Member-count changes of the current step: (segment, delta, entered, exited).
#[derive(Debug, Default)]
pub struct StepCounts(Vec<(SegIdx, i64, u64, u64)>);

impl StepCounts {
    fn add(&mut self, seg: SegIdx, entered: bool) {
        let i = match self.0.iter().position(|c| c.0 == seg) {
            Some(i) => i,
            None => {
                self.0.push((seg, 0, 0, 0));
                self.0.len() - 1
            }
        };
        let c = &mut self.0[i];
        if entered {
            c.1 += 1;
            c.2 += 1;
        } else {
            c.1 -= 1;
            c.3 += 1;
        }
    }
}

/// A backfill in progress on this shard.
#[derive(Debug)]
pub struct Backfill {
    /// Segments evaluated for every profile, in evaluation order (with dependents).
    segments: Vec<SegIdx>,
    /// Counters recounted from every profile's retained events.
    specs: Vec<SpecId>,
    /// The reason of the membership changes it makes.
    reason: Reason,
    /// Profiles up to and including this one are done.
    cursor: Option<ProfileId>,
}

/// Counts a standard event (`user.*`) into the counters that read it.
pub fn count_system(
    specs: &SpecSet,
    profile: &mut Profile,
    name: &str,
    properties: Option<&serde_json::Value>,
    now: i64,
    touched: &mut Touched,
) {
    let empty = serde_json::Value::Object(Default::default());
    membership::count_event(
        specs,
        profile,
        name,
        now,
        Some(properties.unwrap_or(&empty)),
        now,
        &mut touched.specs,
    );
}

/// Whether counting events of this name needs their properties (replay parses them then).
pub fn counts_with_properties(specs: &SpecSet, name: &str) -> bool {
    if name.is_empty() || specs.all.is_empty() {
        return false;
    }
    let Some(sym) = crate::domain::event::event_names().lookup(name) else {
        return false;
    };
    specs.by_name.get(&sym).is_some_and(|ids| {
        ids.iter().any(|id| {
            specs
                .get(*id)
                .is_some_and(|s| !s.where_.is_empty() || s.per.is_some())
        })
    })
}

/// The spec set of an install record or snapshot chunk.
pub fn specs_from_json(json: &str) -> SpecSet {
    match serde_json::from_str::<Vec<(SpecId, SpecDef)>>(json) {
        Ok(defs) => SpecSet::from_defs(&defs),
        Err(e) => {
            if !json.is_empty() {
                tracing::error!(error = %e, "unreadable counter specs in the log or a snapshot; counting starts empty");
            }
            SpecSet::default()
        }
    }
}

/// The stored form of a spec set.
pub fn specs_to_json(specs: &SpecSet) -> String {
    serde_json::to_string(&specs.defs()).expect("specs serialise")
}

impl Shard {
    /// The API's profile object, with its segments.
    pub(super) fn render(&self, id: ProfileId) -> Option<String> {
        let p = self.profiles.get(&id)?;
        let ids: Vec<&str> = p
            .memberships
            .iter()
            .filter_map(|(idx, _)| self.rules.get(*idx).map(|r| &*r.id))
            .collect();
        Some(serde_json::to_string(&p.view(&ids)).expect("profiles serialise"))
    }

    /// After a change to a profile's data: evaluates the segments it can affect, logs the
    /// membership changes in this step, and re-plans the profile's time re-check.
    pub(super) fn settle(
        &mut self,
        pid: ProfileId,
        touched: &Touched,
        now: i64,
    ) -> Result<(), Problem> {
        if self.rules.order.is_empty() {
            return Ok(());
        }
        self.ensure_backfilled(pid, now)?;
        let segs = if touched.all {
            self.rules.all()
        } else {
            self.rules
                .affected(&touched.traits, &touched.specs, &touched.ids)
        };
        if segs.is_empty() {
            return Ok(());
        }
        let Some(profile) = self.profiles.get_mut(&pid) else {
            return Ok(());
        };
        let changes = membership::evaluate(&self.rules, profile, &segs, now);
        if !self.rules.timed.is_empty() {
            // Which timed segments can bring the re-check earlier: those whose answer
            // changed, those that read a changed trait date, or all on a new profile or
            // merge. A new event alone never brings a window edge earlier (the k-th newest
            // event of a superset is never older). A re-check planned earlier than needed
            // just finds nothing to change, and plans the next from every timed segment.
            let rules = &self.rules;
            let due = segs
                .iter()
                .filter_map(|i| rules.get(*i))
                .filter(|r| r.compiled.deps.timed)
                .filter(|r| {
                    touched.all
                        || changes.iter().any(|(s, _)| *s == r.idx)
                        || r.compiled
                            .deps
                            .traits
                            .iter()
                            .any(|k| touched.traits.contains(k))
                })
                .filter_map(|r| r.compiled.root.next_change(&**profile, now))
                .min();
            if let Some(d) = due
                && self.due_of.get(&pid).is_none_or(|old| d < *old)
            {
                self.set_due(pid, d);
            }
        }
        self.log_changes(pid, changes, Reason::Rule, now)
    }

    /// Plans the profile's re-check at `due`.
    fn set_due(&mut self, pid: ProfileId, due: i64) {
        self.unschedule(pid);
        self.schedule.insert((due, pid));
        self.due_of.insert(pid, due);
        self.arm();
    }

    /// Logs membership changes (already applied to the profile) as `segment.*` events of
    /// its timeline, adjusts member counts, and queues the announcements.
    fn log_changes(
        &mut self,
        pid: ProfileId,
        changes: Vec<(SegIdx, bool)>,
        reason: Reason,
        at: i64,
    ) -> Result<(), Problem> {
        if changes.is_empty() {
            return Ok(());
        }
        for (seg, entered) in changes {
            let Some(rule) = self.rules.get(seg).cloned() else {
                continue;
            };
            let Some(profile) = self.profiles.get_mut(&pid) else {
                return Ok(());
            };
            let seq = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
            let record = MembershipRecord {
                seq,
                profile: pid.0,
                at_ms: at,
                segment: seg,
                segment_id: rule.id.to_string(),
                entered,
                reason: reason.code(),
            };
            let mut entry = membership::membership_ref(&record, 0);
            entry.pos = self
                .log
                .append(&LogRecord::Membership(record))
                .map_err(io_problem)?;
            profile.add_event(entry);
            self.step_counts.add(seg, entered);
            if self.rules.triggers.contains_key(&seg) {
                let shown = super::outbox::profile_payload(profile, super::outbox::Shown::Full);
                self.queue_deliveries(seg, pid, entered, reason, seq, at, None, &mut || {
                    shown.clone()
                });
            }
            self.notices.push(MembershipChanged {
                segment: seg,
                profile: pid,
                entered,
                reason,
                at,
                seq,
                merged_into: None,
            });
        }
        Ok(())
    }

    /// Ends the memberships of a profile leaving the shard's data (erased, merged away):
    /// counts, announcements and deliveries (showing `shown` of the profile) — its
    /// timeline is gone.
    pub(super) fn end_memberships(
        &mut self,
        pid: ProfileId,
        memberships: Vec<(SegIdx, i64)>,
        reason: Reason,
        at: i64,
        merged_into: Option<ProfileId>,
        shown: &str,
    ) {
        for (seg, _) in memberships {
            if self.rules.get(seg).is_none() {
                continue;
            }
            self.step_counts.add(seg, false);
            let seq = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
            self.queue_deliveries(seg, pid, false, reason, seq, at, merged_into, &mut || {
                shown.to_owned()
            });
            self.notices.push(MembershipChanged {
                segment: seg,
                profile: pid,
                entered: false,
                reason,
                at,
                seq,
                merged_into,
            });
        }
    }

    /// Runs the backfill for one profile now if the shard's backfill has not reached it
    /// yet, so an event never meets a half-built counter.
    fn ensure_backfilled(&mut self, pid: ProfileId, now: i64) -> Result<(), Problem> {
        match &self.backfill {
            Some(b) if b.cursor.is_none_or(|c| pid > c) => self.backfill_profile(pid, now),
            _ => Ok(()),
        }
    }

    /// Recounts the backfill's counters from the profile's retained events and evaluates
    /// its segments (idempotent: running it twice changes nothing the second time).
    fn backfill_profile(&mut self, pid: ProfileId, now: i64) -> Result<(), Problem> {
        let Some(b) = &self.backfill else {
            return Ok(());
        };
        let (specs, segments, reason) = (b.specs.clone(), b.segments.clone(), b.reason);
        let Some(profile) = self.profiles.get_mut(&pid) else {
            return Ok(());
        };
        for id in specs {
            let Some(spec) = self.specs.get(id) else {
                continue;
            };
            let counter = membership::recount(spec, profile, &self.ctx.reader, now);
            let counter = (!counter.is_empty()).then_some(counter);
            use crate::segment::compile::Subject;
            if profile.counter(id) == counter.as_ref() {
                continue;
            }
            profile.set_counter(id, counter.clone());
            let seq = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
            self.log
                .append(&LogRecord::Counter(CounterRecord {
                    seq,
                    profile: pid.0,
                    spec: id,
                    counter,
                }))
                .map_err(io_problem)?;
        }
        let changes = membership::evaluate(&self.rules, profile, &segments, now);
        self.log_changes(pid, changes, reason, now)?;
        self.reschedule(pid, now);
        Ok(())
    }

    /// Applies the step's member-count changes to the shared counts and metrics (once per
    /// step rather than once per change: counts are shared by every shard).
    pub(super) fn flush_counts(&mut self) {
        let (mut entered, mut exited) = (0u64, 0u64);
        for (seg, delta, e, x) in self.step_counts.0.drain(..) {
            if let Some(r) = self.rules.get(seg) {
                r.count.fetch_add(delta, Ordering::AcqRel);
            }
            entered += e;
            exited += x;
        }
        if entered > 0 {
            metrics::counter!("user360_segment_changes_total", "change" => "entered")
                .increment(entered);
        }
        if exited > 0 {
            metrics::counter!("user360_segment_changes_total", "change" => "exited")
                .increment(exited);
        }
    }

    /// Removes a profile's re-check.
    pub(super) fn unschedule(&mut self, pid: ProfileId) {
        if let Some(d) = self.due_of.remove(&pid) {
            self.schedule.remove(&(d, pid));
        }
    }

    /// Plans the profile's next time re-check (if time alone can change a segment of it).
    pub(super) fn reschedule(&mut self, pid: ProfileId, now: i64) {
        if self.rules.timed.is_empty() && self.due_of.is_empty() {
            return;
        }
        let due = match (self.rules.timed.is_empty(), self.profiles.get(&pid)) {
            (false, Some(p)) => membership::next_due(&self.rules, p, now),
            _ => None,
        };
        if self.due_of.get(&pid).copied() == due {
            return;
        }
        match due {
            Some(d) => self.set_due(pid, d),
            None => self.unschedule(pid),
        }
    }

    /// Makes sure a timer wakes the shard at its earliest re-check.
    fn arm(&mut self) {
        let Some(&(due, _)) = self.schedule.first() else {
            return;
        };
        if self.armed.is_some_and(|(at, _)| at <= due) {
            return;
        }
        let Some(addr) = self.addr.clone() else {
            return;
        };
        if let Some((_, t)) = self.armed.take() {
            self.ctx.timers.cancel(t);
        }
        let id = self.ctx.timers.schedule(
            due,
            Box::new(move |at| {
                Box::pin(async move {
                    let (tx, rx) = oneshot::channel();
                    addr.do_send(RunDue {
                        upto: at,
                        reply: tx,
                    });
                    let _ = rx.await;
                })
            }),
        );
        self.armed = Some((due, id));
    }

    /// Takes in the rules at start (after replay) or after a failed disk recovered: drops
    /// memberships and counters no rule reads, counts members, re-evaluates the profiles
    /// replayed from the log, and plans every time re-check.
    pub(super) fn install_startup(&mut self, rules: Arc<RuleSet>) {
        self.rules = rules;
        self.prune_to_rules();
        for p in self.profiles.values() {
            for (idx, _) in &p.memberships {
                if let Some(r) = self.rules.get(*idx) {
                    r.count.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        let now = self.ctx.clock.now_ms();
        let replayed: Vec<ProfileId> = std::mem::take(&mut self.replayed).into_iter().collect();
        if !self.rules.order.is_empty() {
            let all = self.rules.all();
            for pid in replayed {
                if let Some(profile) = self.profiles.get_mut(&pid) {
                    let changes = membership::evaluate(&self.rules, profile, &all, now);
                    if let Err(e) = self.log_changes(pid, changes, Reason::Rule, now) {
                        tracing::error!(shard = self.id, error = %e.message, "cannot log membership changes after replay");
                        break;
                    }
                }
            }
        }
        if !self.rules.timed.is_empty() {
            let ids: Vec<ProfileId> = self.profiles.keys().copied().collect();
            for pid in ids {
                self.reschedule(pid, now);
            }
        }
    }

    /// Drops memberships of segments that no longer exist and counters no rule reads.
    fn prune_to_rules(&mut self) {
        let rules = &self.rules;
        for p in self.profiles.values_mut() {
            p.memberships.retain(|(idx, _)| rules.get(*idx).is_some());
            p.counters.retain(|(id, _)| rules.specs.contains_key(id));
        }
    }
}

/// Puts new rules in force on this shard: logs the counters it keeps from here on, drops
/// what no rule reads, and starts a backfill of created or changed segments.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct InstallRules {
    /// The rules.
    pub rules: Arc<RuleSet>,
    /// Segments to compute for every profile (created or changed), and the reason of the
    /// changes that makes.
    pub backfill: Option<(Vec<SegIdx>, Reason)>,
    /// A new trigger with `send_existing`, and its segment: its current members are queued.
    pub send_existing: Option<(u32, SegIdx)>,
    /// First install after start (or after a disk recovery).
    pub startup: bool,
    /// Answered once the install is durable.
    pub reply: oneshot::Sender<Result<(), Problem>>,
}

impl Handler<InstallRules> for Shard {
    type Result = ();

    fn handle(&mut self, msg: InstallRules, _: &mut Self::Context) {
        if let Some(p) = self.refusal() {
            let _ = msg.reply.send(Err(p));
            return;
        }
        let rules = msg.rules;
        let wanted: HashSet<SpecId> = rules.specs.keys().copied().collect();
        let have: HashSet<SpecId> = self.specs.all.keys().copied().collect();
        let mut new_specs: Vec<SpecId> = wanted.difference(&have).copied().collect();
        new_specs.sort_unstable();
        let mappings_changed = !rules.mappings.same_as(&self.mappings);
        if wanted != have || mappings_changed {
            self.specs = SpecSet::new(rules.specs.iter().map(|(id, s)| (*id, s.clone())));
            self.mappings = rules.mappings.clone();
            let seq = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = self.log.append(&LogRecord::Install(InstallRecord {
                seq,
                specs_json: specs_to_json(&self.specs),
                mappings_json: self.mappings.to_json(),
            })) {
                self.fail(&e);
                let _ = msg.reply.send(Err(io_problem(e)));
                return;
            }
        }
        if msg.startup {
            self.install_startup(rules);
        } else {
            self.rules = rules;
            self.prune_to_rules();
            // Re-checks are re-planned under the new rules.
            let now = self.ctx.clock.now_ms();
            let ids: Vec<ProfileId> = self.due_of.keys().copied().collect();
            for pid in ids {
                self.reschedule(pid, now);
            }
        }
        if let Err(e) = self.drop_orphan_deliveries() {
            self.fail(&e);
            let _ = msg.reply.send(Err(io_problem(e)));
            return;
        }
        if let Some((trigger, seg)) = msg.send_existing {
            self.queue_existing(trigger, seg);
        }
        match msg.backfill {
            Some((mut segments, reason)) => {
                self.rules.closure(&mut segments);
                self.backfill = Some(Backfill {
                    segments,
                    specs: new_specs,
                    reason,
                    cursor: None,
                });
            }
            None if !new_specs.is_empty() => {
                tracing::warn!(
                    shard = self.id,
                    specs = ?new_specs,
                    "counters start empty without a backfill"
                );
            }
            None => {}
        }
        let reply = msg.reply;
        self.commit_then(move |r| {
            let _ = reply.send(r);
        });
    }
}

/// Runs the next slice of the shard's backfill; answers true once it is complete.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct BackfillSlice {
    /// Profiles per slice (small, so ingest waits little between slices).
    pub max: usize,
    /// True when the backfill is done; answered once the slice is durable.
    pub reply: oneshot::Sender<Result<bool, Problem>>,
}

impl Handler<BackfillSlice> for Shard {
    type Result = ();

    fn handle(&mut self, msg: BackfillSlice, _: &mut Self::Context) {
        if let Some(p) = self.refusal() {
            let _ = msg.reply.send(Err(p));
            return;
        }
        let Some(b) = &self.backfill else {
            let _ = msg.reply.send(Ok(true));
            return;
        };
        let start = match b.cursor {
            Some(c) => Bound::Excluded(c),
            None => Bound::Unbounded,
        };
        let ids: Vec<ProfileId> = self
            .profiles
            .range((start, Bound::Unbounded))
            .take(msg.max)
            .map(|(id, _)| *id)
            .collect();
        let now = self.ctx.clock.now_ms();
        let mut result = Ok(());
        for id in &ids {
            result = self.backfill_profile(*id, now);
            if result.is_err() {
                break;
            }
            if let Some(b) = &mut self.backfill {
                b.cursor = Some(*id);
            }
        }
        let done = ids.len() < msg.max;
        if done {
            self.backfill = None;
        }
        let reply = msg.reply;
        match result {
            Err(p) => {
                let _ = reply.send(Err(p));
            }
            // Slices are pipelined: only the last waits for the disk (one fsync covers the
            // slices before it; a failed write fails the shard, so the next slice is refused).
            Ok(()) if !done => {
                self.commit_then(|_| {});
                let _ = reply.send(Ok(false));
            }
            Ok(()) => self.commit_then(move |r| {
                let _ = reply.send(r.map(|()| done));
            }),
        }
    }
}

/// A timer fired: re-checks every profile due by `upto`, each at its own due instant
/// (so a window exit happens at — and is dated — the instant the window passed).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct RunDue {
    /// Server time the timer was due.
    pub upto: i64,
    /// Answered once the changes are durable.
    pub reply: oneshot::Sender<()>,
}

impl Handler<RunDue> for Shard {
    type Result = ();

    fn handle(&mut self, msg: RunDue, _: &mut Self::Context) {
        if self.armed.is_some_and(|(at, _)| at <= msg.upto) {
            self.armed = None;
        }
        if self.refusal().is_some() {
            let _ = msg.reply.send(());
            return;
        }
        let mut timed = self.rules.timed.clone();
        self.rules.closure(&mut timed);
        while let Some(&(due, pid)) = self.schedule.first() {
            if due > msg.upto {
                break;
            }
            self.schedule.remove(&(due, pid));
            self.due_of.remove(&pid);
            if let Err(e) = self.ensure_backfilled(pid, due) {
                tracing::error!(shard = self.id, error = %e.message, "time re-check failed");
                break;
            }
            let Some(profile) = self.profiles.get_mut(&pid) else {
                continue;
            };
            let changes = membership::evaluate(&self.rules, profile, &timed, due);
            if let Err(e) = self.log_changes(pid, changes, Reason::Window, due) {
                tracing::error!(shard = self.id, error = %e.message, "time re-check failed");
                break;
            }
            self.reschedule(pid, due);
        }
        self.arm();
        let reply = msg.reply;
        self.commit_then(move |_| {
            let _ = reply.send(());
        });
    }
}

/// A membership as read: (segment id, name, since).
pub type MembershipView = (Arc<str>, Arc<str>, i64);

/// A profile's segments: (segment id, name, since).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ProfileSegments {
    /// Which.
    pub profile: ProfileId,
    /// None when the profile is not here.
    pub reply: oneshot::Sender<Option<Vec<MembershipView>>>,
}

impl Handler<ProfileSegments> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ProfileSegments, _: &mut Self::Context) {
        let out = self.profiles.get(&msg.profile).map(|p| {
            p.memberships
                .iter()
                .filter_map(|(idx, since)| {
                    self.rules
                        .get(*idx)
                        .map(|r| (r.id.clone(), r.name.clone(), *since))
                })
                .collect()
        });
        let _ = msg.reply.send(out);
    }
}

/// A page of a segment's members on this shard, ascending by id: (id, member object).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ListMembers {
    /// The segment.
    pub segment: SegIdx,
    /// Only ids greater than this.
    pub after: Option<ProfileId>,
    /// At most this many.
    pub limit: usize,
    /// Each member as `{"id", "identities", "since"}`.
    pub reply: oneshot::Sender<Vec<(ProfileId, String)>>,
}

impl Handler<ListMembers> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ListMembers, _: &mut Self::Context) {
        let start = match msg.after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let out = self
            .profiles
            .range((start, Bound::Unbounded))
            .filter_map(|(id, p)| p.member_since(msg.segment).map(|since| (id, p, since)))
            .take(msg.limit)
            .map(|(id, p, since)| (*id, member_json(p, since)))
            .collect();
        let _ = msg.reply.send(out);
    }
}

/// `{"id", "identities", "since"}` of a member.
pub fn member_json(p: &Profile, since: i64) -> String {
    let identities: Vec<serde_json::Value> = p
        .identities
        .iter()
        .map(|h| {
            serde_json::json!({
                "type": h.identity.ty.name(),
                "value": &*h.identity.value,
                "first_seen": crate::segment::timefmt::format_ms(h.first_seen),
            })
        })
        .collect();
    serde_json::json!({
        "id": p.id.to_string(),
        "identities": identities,
        "since": crate::segment::timefmt::format_ms(since),
    })
    .to_string()
}

/// Profiles of this shard matching an ad-hoc rule (queries and previews), ascending by id.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct MatchRule {
    /// The rule, compiled against the rules in force.
    pub rule: Arc<AdHocRule>,
    /// Only ids greater than this.
    pub after: Option<ProfileId>,
    /// Ids to return at most.
    pub limit: usize,
    /// Also count every match (previews).
    pub count_all: bool,
    /// Stop here and answer what was found (`partial`).
    pub deadline: std::time::Instant,
    /// (ids, matches counted, stopped at the deadline).
    pub reply: oneshot::Sender<(Vec<ProfileId>, u64, bool)>,
}

impl Handler<MatchRule> for Shard {
    type Result = ();

    fn handle(&mut self, msg: MatchRule, _: &mut Self::Context) {
        let start = match msg.after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let now = self.ctx.clock.now_ms();
        let mut ids = Vec::new();
        let mut count = 0u64;
        let mut partial = false;
        for (n, (id, p)) in self.profiles.range((start, Bound::Unbounded)).enumerate() {
            if n % 256 == 255 && std::time::Instant::now() >= msg.deadline {
                partial = true;
                break;
            }
            if !msg.rule.holds(p, &self.ctx.reader, now) {
                continue;
            }
            count += 1;
            if ids.len() < msg.limit {
                ids.push(*id);
            } else if !msg.count_all {
                break;
            }
        }
        let _ = msg.reply.send((ids, count, partial));
    }
}
