//! The shard actor: hosts many profiles as virtual actors and applies their messages one
//! at a time, in arrival order, on its own Arbiter thread.
//!
//! Owns the profiles of its shard (a `BTreeMap`, so listing and export walk ids in order)
//! and its segment of the log. Everything that changes a profile goes through here and is
//! appended to the log in the same step — including the segment membership changes it
//! causes (evaluated here, where the data is; see [`segments`]). Requests arrive as one
//! message per shard per HTTP request (`do_send` with a oneshot reply), never one per event.

pub mod export;
pub mod outbox;
pub mod segments;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use actix::{Actor, Addr, AsyncContext, Context, Handler, Message as ActixMessage};
use tokio::sync::oneshot;

use super::catalog::Catalog;
use super::clock::Clock;
use super::membership::{MembershipChanged, Reason};
use super::registry::{Registry, Resolution};
use super::timer::{TimerId, Timers};
use crate::config::Settings;
use crate::domain::event::{EventKind, EventOut, EventRef, event_names, ts};
use crate::domain::identity::{IdType, Identity};
use crate::domain::ids::ProfileId;
use crate::domain::message::Message;
use crate::domain::profile::{Profile, TraitChange, TraitLimits, TraitTime};
use crate::domain::value::trait_keys;
use crate::error::{ErrorCode, Problem};
use crate::segment::compile::SegIdx;
use crate::segment::set::{RuleSet, SpecSet};
use crate::store::flush::{Flusher, Ticket};
use crate::store::log::{
    DeleteRecord, EventRecord, LinkedIdentity, LogReader, LogRecord, NoteRecord, OutboxEntry,
    PatchRecord, Position, ShardLog, SystemRecord,
};
use crate::store::snapshot::{ChunkInfo, ShardChunk};

/// What every shard shares: settings, registry, clock, the accept sequence.
pub struct ShardContext {
    /// Settings in force.
    pub settings: Arc<Settings>,
    /// Identity index.
    pub registry: Arc<Registry>,
    /// Server time.
    pub clock: Arc<Clock>,
    /// Next server-wide accept sequence number.
    pub next_seq: Arc<AtomicU64>,
    /// Trait paths seen.
    pub catalog: Arc<Catalog>,
    /// The data dir.
    pub data_dir: PathBuf,
    /// Group commit: syncs the logs and answers requests once durable.
    pub flusher: Flusher,
    /// Accepted messageIds (restored from snapshots and the log at start).
    pub dedup: Arc<crate::ingest::dedup::Dedup>,
    /// Random-access reads of every shard's log (backfills read retained events).
    pub reader: Arc<LogReader>,
    /// Deferred actions (time re-checks of segment windows).
    pub timers: Arc<Timers>,
    /// Where membership changes go once durable (the segment actors' hub).
    pub notify: tokio::sync::mpsc::UnboundedSender<Vec<MembershipChanged>>,
    /// Where queued webhook deliveries go once durable (the dispatcher).
    pub dispatch: tokio::sync::mpsc::UnboundedSender<super::dispatch::DispatchEvent>,
    /// What each mapping did (counted live, not in replay).
    pub mapping_stats: Arc<super::mappings::MappingStats>,
}

/// One shard.
pub struct Shard {
    /// Shard number (also in the ids of its profiles).
    id: u16,
    /// Shared context.
    ctx: Arc<ShardContext>,
    /// Profiles hosted here, by id.
    profiles: BTreeMap<ProfileId, Box<Profile>>,
    /// Standard events that belong to no live profile (`user.deleted`), with their profile.
    system_log: Vec<(ProfileId, EventRef)>,
    /// This shard's log.
    log: ShardLog,
    /// Messages queued for this shard (raised by senders, lowered here) for admission.
    depth: Arc<AtomicUsize>,
    /// Set when a log write or fsync failed: the shard then refuses every change (fail-stop)
    /// until the server restarts and recovers from what is on disk, because memory may hold
    /// changes the disk does not.
    failed: Arc<std::sync::atomic::AtomicBool>,
    /// Set when an `fsync` (not just a write) failed: the current segment's file is then
    /// rewritten before the shard recovers, since the OS may have dropped its dirty pages.
    sync_failed: Arc<std::sync::atomic::AtomicBool>,
    /// Trait budget per profile.
    limits: TraitLimits,
    /// Whether each step waits for the disk.
    sync: bool,
    /// Segments in force (compiled once, shared read-only by every shard).
    rules: Arc<RuleSet>,
    /// The counters this shard keeps: what its log's install records say, so replay
    /// counts exactly what the live shard counted.
    specs: SpecSet,
    /// The mappings this shard applies (likewise from its install records).
    mappings: crate::segment::mapping::MappingSet,
    /// A segment backfill in progress (after a segment was created or changed).
    backfill: Option<segments::Backfill>,
    /// Time re-checks of segment windows: (due, profile).
    schedule: BTreeSet<(i64, ProfileId)>,
    /// Each scheduled profile's due instant.
    due_of: HashMap<ProfileId, i64>,
    /// The timer armed for the earliest re-check: (due, timer).
    armed: Option<(i64, TimerId)>,
    /// This actor's address, for the timers that wake it.
    addr: Option<Addr<Shard>>,
    /// Profiles whose records were replayed at start: re-evaluated once rules arrive (a
    /// crash can cut a step between an event and the membership change it caused).
    replayed: HashSet<ProfileId>,
    /// Membership changes of the current step, announced once it is durable.
    notices: Vec<MembershipChanged>,
    /// Memberships of profiles handed over to a merge, until it confirms or gives back.
    leaving: HashMap<ProfileId, Vec<(SegIdx, i64)>>,
    /// Member-count changes of the current step.
    step_counts: segments::StepCounts,
    /// Webhook deliveries queued here and not ended yet, by delivery id.
    outbox: HashMap<String, OutboxEntry>,
    /// Deliveries queued in the current step (logged at its end).
    step_outbox: Vec<OutboxEntry>,
    /// Deliveries logged in the current step, for the dispatcher once durable.
    new_deliveries: Vec<OutboxEntry>,
    /// Erased profile ids (with what they had absorbed) whose records may still be in the
    /// log; scrubbed after the next snapshot.
    erased: HashSet<u128>,
}

/// Size at which a log segment is rolled.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

impl Shard {
    /// Loads the shard's part of a snapshot, then replays the log after it: for each
    /// profile, only the records at or after the position its chunk covers.
    pub fn open(
        id: u16,
        ctx: Arc<ShardContext>,
        depth: Arc<AtomicUsize>,
        failed: Arc<std::sync::atomic::AtomicBool>,
        snapshot: Vec<(ChunkInfo, ShardChunk)>,
    ) -> std::io::Result<Shard> {
        let mut profiles = BTreeMap::new();
        let mut system_log = Vec::new();
        let mut covers: Vec<(Option<u128>, Position)> = Vec::with_capacity(snapshot.len());
        // Replay starts at the first chunk's position, with the counters kept then.
        let mut specs = snapshot
            .first()
            .map(|(_, c)| segments::specs_from_json(&c.specs_json))
            .unwrap_or_default();
        let mut mappings = snapshot
            .first()
            .map(|(_, c)| crate::segment::mapping::MappingSet::from_json(&c.mappings_json))
            .unwrap_or_default();
        // The outbox is in the last chunk; replay applies outbox records after its position.
        let mut erased: HashSet<u128> = snapshot
            .last()
            .map(|(_, c)| c.erased.iter().copied().collect())
            .unwrap_or_default();
        let (mut outbox, outbox_from): (HashMap<String, OutboxEntry>, Position) = snapshot
            .last()
            .map(|(info, c)| {
                (
                    c.outbox
                        .iter()
                        .map(|e| (e.delivery.clone(), e.clone()))
                        .collect(),
                    info.covers,
                )
            })
            .unwrap_or_default();
        for (info, chunk) in snapshot {
            let (ps, sys) = super::snapshot::decode_chunk(chunk);
            for p in ps {
                ctx.registry.restore_profile(p.id);
                for m in &p.merged_from {
                    ctx.registry.restore_forward(*m, p.id);
                }
                for h in &p.identities {
                    ctx.registry.restore_link(p.id, &h.identity, h.first_seen);
                }
                for t in &p.traits {
                    if let Some(v) = &t.value {
                        ctx.catalog.add(trait_keys().name(t.key), v);
                    }
                }
                profiles.insert(p.id, Box::new(p));
            }
            system_log.extend(sys);
            covers.push((info.through, info.covers));
        }
        let from = covers.iter().map(|(_, c)| *c).min().unwrap_or(0);
        let covering = |pid: u128| -> Position {
            covers
                .iter()
                .find(|(through, _)| through.is_none_or(|t| pid <= t))
                .map(|(_, c)| *c)
                .unwrap_or(0)
        };
        let limits = TraitLimits {
            max_keys: usize::MAX,
            max_bytes: usize::MAX,
            same_time_ms: ctx.settings.ingest.same_time_ms,
        };
        let started = std::time::Instant::now();
        let mut replayed = 0u64;
        let mut touched = HashSet::new();
        let log = ShardLog::open(&ctx.data_dir, id, SEGMENT_BYTES, from, |pos, rec| {
            ctx.next_seq.fetch_max(rec.seq() + 1, Ordering::AcqRel);
            if let LogRecord::Event(e) = &rec
                && e.dedup_hash != 0
            {
                ctx.dedup.restore(e.dedup_hash, e.received_ms);
            }
            match &rec {
                LogRecord::Install(i) => {
                    // About the whole shard: counters kept and mappings applied from this
                    // position on.
                    specs = segments::specs_from_json(&i.specs_json);
                    mappings = crate::segment::mapping::MappingSet::from_json(&i.mappings_json);
                    return;
                }
                LogRecord::Outbox(o) => {
                    if pos >= outbox_from {
                        for e in &o.entries {
                            outbox.insert(e.delivery.clone(), e.clone());
                        }
                    }
                    return;
                }
                LogRecord::OutboxDone(d) => {
                    if pos >= outbox_from {
                        for id in &d.deliveries {
                            outbox.remove(id);
                        }
                    }
                    return;
                }
                _ => {}
            }
            if pos >= covering(rec.profile()) {
                replayed += 1;
                touched.insert(ProfileId(rec.profile()));
                if let LogRecord::Delete(d) = &rec {
                    erased.insert(d.profile);
                    if let Some(p) = profiles.get(&ProfileId(d.profile)) {
                        erased.extend(p.merged_from.iter().map(|m| m.0));
                    }
                }
                replay(
                    &ctx,
                    &mut profiles,
                    &mut system_log,
                    (&specs, &mappings),
                    limits,
                    pos,
                    rec,
                );
            }
        })?;
        if replayed > 0 {
            tracing::info!(
                shard = id,
                replayed,
                profiles = profiles.len(),
                ms = started.elapsed().as_millis() as u64,
                "shard recovered"
            );
        }
        let settings = &ctx.settings;
        Ok(Shard {
            id,
            limits: TraitLimits {
                max_keys: settings.ingest.max_trait_keys,
                max_bytes: settings.ingest.max_trait_bytes,
                same_time_ms: settings.ingest.same_time_ms,
            },
            sync: settings.durability == crate::config::Durability::Sync,
            ctx,
            profiles,
            system_log,
            log,
            depth,
            failed,
            sync_failed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            rules: Arc::new(RuleSet::default()),
            specs,
            mappings,
            backfill: None,
            schedule: BTreeSet::new(),
            due_of: HashMap::new(),
            armed: None,
            addr: None,
            replayed: touched,
            notices: Vec::new(),
            leaving: HashMap::new(),
            step_counts: Default::default(),
            outbox,
            step_outbox: Vec::new(),
            new_deliveries: Vec::new(),
            erased,
        })
    }

    fn next_seq(&self) -> u64 {
        self.ctx.next_seq.fetch_add(1, Ordering::AcqRel)
    }

    /// Applies one message; a rejection leaves no trace (its links are undone).
    fn apply_message(
        &mut self,
        m: Message,
        r: Resolution,
        note: Option<String>,
        now: i64,
    ) -> Result<(), Problem> {
        let pid = r.profile;
        debug_assert_eq!(pid.shard(), self.id);
        let exists = self.profiles.contains_key(&pid);
        let plan = match m.trait_updates() {
            Some(updates) => {
                let fresh;
                let profile = match self.profiles.get(&pid) {
                    Some(p) => p,
                    None => {
                        fresh = Profile::new(pid, now);
                        &fresh
                    }
                };
                match profile.plan_traits(updates, TraitTime::Event(m.timestamp_ms), self.limits) {
                    Ok(plan) => Some(plan),
                    Err(e) => {
                        self.undo_links(&r, exists);
                        return Err(Problem::at(
                            ErrorCode::TooManyTraits,
                            "traits",
                            e.to_string(),
                        ));
                    }
                }
            }
            None => None,
        };

        let mut touched = segments::Touched::default();
        let profile = self
            .profiles
            .entry(pid)
            .or_insert_with(|| Box::new(Profile::new(pid, now)));
        if !exists {
            let seq = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
            append_system(&mut self.log, profile, seq, "user.created", None, now)?;
            segments::count_system(
                &self.specs,
                profile,
                "user.created",
                None,
                now,
                &mut touched,
            );
            // A new profile can match rules that read nothing it has ("did not perform").
            touched.all = true;
            metrics::gauge!("user360_profiles").increment(1.0);
        }
        touched.ids.extend(r.linked.iter().map(|(id, _)| id.ty));
        let linked: Vec<LinkedIdentity> = r
            .linked
            .iter()
            .map(|(id, seen)| LinkedIdentity {
                ty: id.ty.name().to_string(),
                value: id.value.to_string(),
                first_seen: *seen,
            })
            .collect();
        for (id, seen) in r.linked {
            profile.add_identity(id, seen);
        }
        // The registry numbered the message when it decided where it goes.
        let seq = match r.seq {
            0 => self.ctx.next_seq.fetch_add(1, Ordering::AcqRel),
            s => s,
        };
        let json = render_message(&m, seq);
        let name = m.event.clone().unwrap_or_default();
        // Mappings read the message as stored (parsed only when one applies to its name).
        let mapped = self
            .mappings
            .has(&name)
            .then(|| serde_json::from_str::<serde_json::Value>(&json).ok())
            .flatten();
        let record = EventRecord {
            seq,
            profile: pid.0,
            ts_ms: m.timestamp_ms,
            received_ms: m.received_ms,
            kind: m.kind,
            name,
            created: !exists,
            dedup_hash: crate::ingest::dedup::hash_id(&m.message_id),
            note: note.clone(),
            linked,
            json,
        };
        if let Some(n) = note {
            profile.add_merge_note(n);
        }
        // The index entry is taken first so the record moves into the log uncloned.
        let mut entry = event_ref(&record, 0);
        entry.pos = self
            .log
            .append(&LogRecord::Event(record))
            .map_err(io_problem)?;
        profile.add_event(entry);
        metrics::counter!("user360_events_stored_total").increment(1);
        profile.updated_at = now;
        if let Some(name) = m.event.as_deref() {
            super::membership::count_event(
                &self.specs,
                profile,
                name,
                m.timestamp_ms,
                m.properties.as_ref(),
                now,
                &mut touched.specs,
            );
        }
        let mut changes = match plan {
            Some(plan) => profile.commit_traits(plan, now),
            None => Vec::new(),
        };
        if let Some(view) = &mapped {
            changes.extend(apply_mappings(
                &self.mappings,
                profile,
                view,
                m.timestamp_ms,
                self.limits,
                now,
                Some(&self.ctx.mapping_stats),
            ));
        }
        record_changes(
            &mut self.log,
            &self.ctx.catalog,
            &self.ctx.next_seq,
            profile,
            &changes,
            now,
            (&self.specs, &mut touched),
        )?;
        trim(profile, &self.ctx.settings, now);
        self.settle(pid, &touched, now)
    }

    /// Writes this step's records to the OS, then runs `answer` once they are durable
    /// (`durability = "sync"`: after the group-commit fsync) or at once (`"relaxed"`: the
    /// fsync follows in the flusher's next round).
    fn commit_then(&mut self, answer: impl FnOnce(Result<(), Problem>) + Send + 'static) {
        self.flush_counts();
        if let Err(e) = self.flush_outbox().and_then(|()| self.log.write_pending()) {
            self.fail(&e);
            self.notices.clear();
            self.new_deliveries.clear();
            answer(Err(io_problem(e)));
            return;
        }
        // Membership changes and deliveries of this step leave the shard only once durable.
        let notices = std::mem::take(&mut self.notices);
        let notify = self.ctx.notify.clone();
        let deliveries = std::mem::take(&mut self.new_deliveries);
        let dispatch = self.ctx.dispatch.clone();
        let shard = self.id;
        let answer = move |r: Result<(), Problem>| {
            if r.is_ok() {
                if !notices.is_empty() {
                    let _ = notify.send(notices);
                }
                if !deliveries.is_empty() {
                    let _ = dispatch.send(super::dispatch::DispatchEvent {
                        shard,
                        entries: deliveries,
                    });
                }
            }
            answer(r)
        };
        let files = vec![self.log.current_file()];
        let failed = self.failed.clone();
        let sync_failed = self.sync_failed.clone();
        let shard = self.id;
        let on_sync_error = move |e: &std::io::Error| {
            sync_failed.store(true, Ordering::Release);
            if !failed.swap(true, Ordering::AcqRel) {
                tracing::error!(shard, error = %e, "log fsync failed; the shard refuses changes until a restart");
            }
        };
        if self.sync {
            self.ctx.flusher.submit(Ticket {
                files,
                done: Box::new(move |r| {
                    if let Err(e) = &r {
                        on_sync_error(e);
                    }
                    answer(r.map_err(io_problem))
                }),
            });
        } else {
            answer(Ok(()));
            self.ctx.flusher.submit(Ticket {
                files,
                done: Box::new(move |r| {
                    if let Err(e) = &r {
                        on_sync_error(e);
                    }
                }),
            });
        }
    }

    /// Enters the failed state after a log write error.
    fn fail(&self, e: &std::io::Error) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(shard = self.id, error = %e, "log write failed; the shard refuses changes until a restart");
        }
    }

    /// The error every change gets while the shard is failed.
    fn refusal(&self) -> Option<Problem> {
        self.failed.load(Ordering::Acquire).then(|| {
            Problem::new(
                ErrorCode::Unavailable,
                format!("shard {} cannot write its log (disk full or failing); restart the server once the disk is writable", self.id),
            )
        })
    }

    fn undo_links(&self, r: &Resolution, existed: bool) {
        let ids: Vec<Identity> = r.linked.iter().map(|(i, _)| i.clone()).collect();
        if r.created && !existed {
            self.ctx.registry.remove_profile(r.profile, &ids);
        } else {
            self.ctx.registry.unlink(r.profile, &ids);
        }
    }
}

fn io_problem(e: std::io::Error) -> Problem {
    tracing::error!(error = %e, "log write failed");
    Problem::new(ErrorCode::Unavailable, format!("cannot write the log: {e}"))
}

fn event_ref(r: &EventRecord, pos: Position) -> EventRef {
    EventRef::new(
        r.ts_ms,
        r.seq,
        pos,
        (r.received_ms / 1000).clamp(0, u32::MAX as i64) as u32,
        event_names().intern(&r.name),
        r.kind,
    )
}

/// Renders an accepted message as the API's event object.
pub fn render_message(m: &Message, seq: u64) -> String {
    let out = EventOut {
        message_id: &m.message_id,
        seq,
        kind: m.kind.as_str(),
        event: m.event.as_deref(),
        name: m.name.as_deref(),
        category: m.category.as_deref(),
        properties: m.properties.as_ref(),
        traits: m.traits.as_ref(),
        context: m.context.as_ref(),
        user_id: m.user_id.as_deref(),
        anonymous_id: m.anonymous_id.as_deref(),
        group_id: m.group_id.as_deref(),
        previous_id: m.previous_id.as_deref(),
        timestamp: ts(m.timestamp_ms),
        received_at: ts(m.received_ms),
    };
    serde_json::to_string(&out).expect("events serialise")
}

/// Appends a standard event (`user.*`) to a profile's timeline, stored compact.
fn append_system(
    log: &mut ShardLog,
    profile: &mut Profile,
    seq: u64,
    name: &str,
    properties: Option<serde_json::Value>,
    now: i64,
) -> Result<(), Problem> {
    let props = properties.map(|p| p.to_string());
    append_system_json(
        log,
        profile,
        seq,
        name,
        props.unwrap_or_else(|| "{}".into()),
        now,
    )
}

/// [`append_system`] with the properties already rendered as JSON.
fn append_system_json(
    log: &mut ShardLog,
    profile: &mut Profile,
    seq: u64,
    name: &str,
    properties_json: String,
    now: i64,
) -> Result<(), Problem> {
    let record = SystemRecord {
        seq,
        profile: profile.id.0,
        at_ms: now,
        name: name.to_owned(),
        properties_json,
    };
    let pos = log.append(&LogRecord::System(record)).map_err(io_problem)?;
    profile.add_event(EventRef::new(
        now,
        seq,
        pos,
        (now / 1000).clamp(0, u32::MAX as i64) as u32,
        event_names().intern(name),
        EventKind::System,
    ));
    Ok(())
}

/// A standard event with its `properties` given as JSON, in full (stored that way for
/// `user.deleted`, which outlives its profile's other records).
fn system_record(
    profile: ProfileId,
    seq: u64,
    name: &str,
    properties: Option<serde_json::Value>,
    now: i64,
) -> EventRecord {
    let props = properties.map(|p| p.to_string());
    expand_system(&SystemRecord {
        seq,
        profile: profile.0,
        at_ms: now,
        name: name.to_owned(),
        properties_json: props.unwrap_or_else(|| "{}".into()),
    })
}

/// The full stored event of a compact standard event: its API object rendered (by hand,
/// in the field order of [`EventOut`]; the message id is `sys-` and the sequence in hex,
/// as for membership events, so it reads the same every time).
pub(crate) fn expand_system(r: &SystemRecord) -> EventRecord {
    use std::fmt::Write as _;
    // The fixed part below is ~320 bytes: room for all of it, so the string never grows.
    let mut json = String::with_capacity(384 + r.name.len() + r.properties_json.len());
    let _ = write!(
        json,
        "{{\"message_id\":\"sys-{:016x}\",\"seq\":{},\"type\":\"system\",\"event\":",
        r.seq, r.seq
    );
    crate::domain::event::push_json_str(&mut json, &r.name);
    json.push_str(",\"name\":null,\"category\":null,\"properties\":");
    json.push_str(&r.properties_json);
    json.push_str(",\"traits\":null,\"context\":null,\"user_id\":null,\"anonymous_id\":null,\"group_id\":null,\"previous_id\":null,\"timestamp\":\"");
    crate::segment::timefmt::write_ms(&mut json, r.at_ms);
    json.push_str("\",\"received_at\":\"");
    crate::segment::timefmt::write_ms(&mut json, r.at_ms);
    json.push_str("\"}");
    debug_assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
    EventRecord {
        seq: r.seq,
        profile: r.profile,
        ts_ms: r.at_ms,
        received_ms: r.at_ms,
        kind: EventKind::System,
        name: r.name.clone(),
        created: false,
        dedup_hash: 0,
        note: None,
        linked: Vec::new(),
        json,
    }
}

/// Writes `user.updated` for trait changes and notes new trait paths.
fn record_changes(
    log: &mut ShardLog,
    catalog: &Catalog,
    next_seq: &AtomicU64,
    profile: &mut Profile,
    changes: &[TraitChange],
    now: i64,
    (specs, touched): (&SpecSet, &mut segments::Touched),
) -> Result<(), Problem> {
    if changes.is_empty() {
        return Ok(());
    }
    touched.traits.extend(changes.iter().map(|c| c.key));
    // `{"changes": {KEY: {"from": V, "to": V}, ...}}`, keys sorted, written directly (this
    // runs for every trait change: no intermediate JSON tree).
    // Stable: several changes of one key in a step (a message's traits, then mappings)
    // stay in order, and become one entry from the first `from` to the last `to`.
    let mut named: Vec<(&str, &TraitChange)> = changes
        .iter()
        .map(|c| (trait_keys().name(c.key), c))
        .collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let mut props = String::with_capacity(16 + changes.len() * 48);
    props.push_str("{\"changes\":{");
    let mut first = true;
    let mut rest = &named[..];
    while let Some(((key, c), _)) = rest.split_first() {
        let run = rest.iter().take_while(|(k, _)| k == key).count();
        let last = rest[run - 1].1;
        rest = &rest[run..];
        if run > 1 && c.from == last.to {
            continue; // back where it started: no change
        }
        if let Some(v) = &last.to {
            catalog.add(key, v);
        }
        if !first {
            props.push(',');
        }
        first = false;
        crate::domain::event::push_json_str(&mut props, key);
        props.push_str(":{\"from\":");
        push_json_value(&mut props, c.from.as_ref());
        props.push_str(",\"to\":");
        push_json_value(&mut props, last.to.as_ref());
        props.push('}');
    }
    if first {
        return Ok(()); // every change was undone within the step
    }
    props.push_str("}}");
    let seq = next_seq.fetch_add(1, Ordering::AcqRel);
    // Parsed back only when a counter reads `user.updated` properties.
    let parsed = segments::counts_with_properties(specs, "user.updated")
        .then(|| serde_json::from_str::<serde_json::Value>(&props).ok())
        .flatten();
    segments::count_system(
        specs,
        profile,
        "user.updated",
        parsed.as_ref(),
        now,
        touched,
    );
    append_system_json(log, profile, seq, "user.updated", props, now)
}

/// Appends a trait value as JSON (`null` for none).
fn push_json_value(out: &mut String, v: Option<&crate::domain::value::Value>) {
    match v {
        None => out.push_str("null"),
        // A trait value always serialises.
        Some(v) => out.push_str(&serde_json::to_string(v).unwrap_or_else(|_| "null".into())),
    }
}

fn trim(profile: &mut Profile, settings: &Settings, now: i64) {
    let retention_s = settings.events.retention_days as i64 * 86_400;
    let min_received = (now / 1000 - retention_s).max(0) as u32;
    profile.trim_events(settings.events.max_per_profile, min_received);
}

/// Applies the mappings of the event `view` (the stored event object) to the profile, in
/// order; answers the trait changes. Actions whose path the message lacks, and updates
/// that cannot apply, are counted.
fn apply_mappings(
    mappings: &crate::segment::mapping::MappingSet,
    profile: &mut Profile,
    view: &serde_json::Value,
    ts: i64,
    limits: TraitLimits,
    now: i64,
    stats: Option<&super::mappings::MappingStats>,
) -> Vec<TraitChange> {
    let name = view.get("event").and_then(|e| e.as_str()).unwrap_or("");
    let mut changes = Vec::new();
    for mapping in mappings.for_event(name) {
        let Some((updates, missing)) = mapping.updates(view, now) else {
            continue;
        };
        let (c, skipped) = profile.apply_updates(&updates, ts, limits, now);
        if let Some(stats) = stats {
            if missing > 0 {
                metrics::counter!("user360_mapping_missing_paths_total").increment(missing);
            }
            let failed = skipped.iter().filter(|s| !s.late).count() as u64;
            if failed > 0 {
                metrics::counter!("user360_mapping_skipped_updates_total").increment(failed);
            }
            if !c.is_empty() {
                metrics::counter!("user360_mapping_applied_total").increment(1);
            }
            stats.record(
                &mapping.id,
                profile.id,
                !c.is_empty(),
                missing,
                &skipped,
                now,
            );
        }
        changes.extend(c);
    }
    changes
}

/// Applies one log record during recovery, through the same domain functions as live.
/// Events are counted into the counters `specs` names (those the live shard kept at that
/// position); membership changes come from their own records, never from re-evaluating.
fn replay(
    ctx: &ShardContext,
    profiles: &mut BTreeMap<ProfileId, Box<Profile>>,
    system_log: &mut Vec<(ProfileId, EventRef)>,
    (specs, mappings): (&SpecSet, &crate::segment::mapping::MappingSet),
    limits: TraitLimits,
    pos: Position,
    rec: LogRecord,
) {
    match rec {
        LogRecord::Note(r) => {
            if let Some(p) = profiles.get_mut(&ProfileId(r.profile)) {
                p.add_merge_note(r.note);
            }
        }
        // The same as its full form (a compact record never is `user.deleted`).
        LogRecord::System(r) => replay(
            ctx,
            profiles,
            system_log,
            (specs, mappings),
            limits,
            pos,
            LogRecord::Event(expand_system(&r)),
        ),
        LogRecord::Event(e) => {
            let pid = ProfileId(e.profile);
            if e.kind == EventKind::System && e.name == "user.deleted" {
                // The snapshot's last chunk may already hold it (it is encoded after the
                // chunk that covers this profile's id range).
                if !system_log.iter().any(|(_, r)| r.seq() == e.seq) {
                    system_log.push((pid, event_ref(&e, pos)));
                }
                return;
            }
            let profile = profiles.entry(pid).or_insert_with(|| {
                ctx.registry.restore_profile(pid);
                Box::new(Profile::new(pid, e.received_ms))
            });
            restore_links(ctx, profile, &e.linked);
            if let Some(n) = &e.note {
                profile.add_merge_note(n.clone());
            }
            let parsed = (e.kind == EventKind::Identify
                || segments::counts_with_properties(specs, &e.name)
                || (e.kind != EventKind::System && mappings.has(&e.name)))
            .then(|| serde_json::from_str::<serde_json::Value>(&e.json).ok())
            .flatten();
            if e.kind == EventKind::Identify
                && let Some(traits) = parsed
                    .as_ref()
                    .and_then(|v| v.get("traits"))
                    .and_then(|t| t.as_object())
                && let Ok(plan) = profile.plan_traits(traits, TraitTime::Event(e.ts_ms), limits)
            {
                for c in profile.commit_traits(plan, e.received_ms) {
                    if let Some(v) = &c.to {
                        ctx.catalog.add(trait_keys().name(c.key), v);
                    }
                }
            }
            if e.kind != EventKind::System
                && mappings.has(&e.name)
                && let Some(view) = &parsed
            {
                for c in apply_mappings(
                    mappings,
                    profile,
                    view,
                    e.ts_ms,
                    limits,
                    e.received_ms,
                    None,
                ) {
                    if let Some(v) = &c.to {
                        ctx.catalog.add(trait_keys().name(c.key), v);
                    }
                }
            }
            if !e.name.is_empty() {
                let props = parsed.as_ref().and_then(|v| v.get("properties"));
                super::membership::count_event(
                    specs,
                    profile,
                    &e.name,
                    e.ts_ms,
                    props,
                    e.received_ms,
                    &mut Vec::new(),
                );
            }
            profile.add_event(event_ref(&e, pos));
            profile.updated_at = profile.updated_at.max(e.received_ms);
        }
        LogRecord::Membership(m) => {
            if let Some(profile) = profiles.get_mut(&ProfileId(m.profile)) {
                profile.set_member(m.segment, m.entered, m.at_ms);
                profile.add_event(super::membership::membership_ref(&m, pos));
            }
        }
        LogRecord::Counter(c) => {
            if let Some(profile) = profiles.get_mut(&ProfileId(c.profile)) {
                profile.set_counter(c.spec, c.counter);
            }
        }
        // Handled by the caller: they are about the whole shard. Fillers are erased space.
        LogRecord::Install(_)
        | LogRecord::Outbox(_)
        | LogRecord::OutboxDone(_)
        | LogRecord::Filler(_) => {}
        LogRecord::Patch(p) => {
            let pid = ProfileId(p.profile);
            let profile = profiles.entry(pid).or_insert_with(|| {
                ctx.registry.restore_profile(pid);
                Box::new(Profile::new(pid, p.now_ms))
            });
            restore_links(ctx, profile, &p.linked);
            if let Ok(traits) =
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&p.traits_json)
                && let Ok(plan) = profile.plan_traits(&traits, TraitTime::Now(p.now_ms), limits)
            {
                for c in profile.commit_traits(plan, p.now_ms) {
                    if let Some(v) = &c.to {
                        ctx.catalog.add(trait_keys().name(c.key), v);
                    }
                }
            }
        }
        LogRecord::MergedAway(m) => {
            profiles.remove(&ProfileId(m.profile));
            ctx.registry
                .restore_merged_away(ProfileId(m.profile), ProfileId(m.into));
        }
        LogRecord::Absorbed(a) => {
            let sid = ProfileId(a.profile);
            let (mut absorbed, _) = super::snapshot::decode_chunk(a.state);
            if let Some(other) = absorbed.pop() {
                let ids: Vec<(Identity, i64)> = other
                    .identities
                    .iter()
                    .map(|h| (h.identity.clone(), h.first_seen))
                    .collect();
                ctx.registry.restore_merge(sid, other.id, &ids);
                let survivor = profiles.entry(sid).or_insert_with(|| {
                    ctx.registry.restore_profile(sid);
                    Box::new(Profile::new(sid, a.now_ms))
                });
                survivor.absorb(other, a.now_ms, &|id| specs.get(id).cloned());
            }
        }
        LogRecord::Delete(d) => {
            ctx.registry.suppress(&d.suppressed);
            let pid = ProfileId(d.profile);
            if let Some(p) = profiles.remove(&pid) {
                let ids: Vec<Identity> = p.identities.into_iter().map(|h| h.identity).collect();
                ctx.registry.remove_profile(pid, &ids);
            }
        }
    }
}

fn restore_links(ctx: &ShardContext, profile: &mut Profile, linked: &[LinkedIdentity]) {
    for l in linked {
        let id = Identity {
            ty: IdType::named(&l.ty),
            value: l.value.as_str().into(),
        };
        ctx.registry.restore_link(profile.id, &id, l.first_seen);
        profile.add_identity(id, l.first_seen);
    }
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Senders bound the queue themselves (admission); do_send ignores this capacity.
        ctx.set_mailbox_capacity(1024);
        self.addr = Some(ctx.address());
    }
}

// ---------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------

/// One message of a request, resolved to a profile of this shard.
pub struct ApplyItem {
    /// Position of the message in its request (for the answer).
    pub index: usize,
    /// The message.
    pub message: Message,
    /// Where the registry put it.
    pub resolution: Resolution,
    /// A refused link to list in the profile's merges (JSON object), if any.
    pub note: Option<String>,
}

/// What a shard did with a batch: per item accepted or why not, and the items whose
/// profile was merged away meanwhile (to be sent on to the survivor's shard).
pub struct BatchOutcome {
    /// Applied or refused items.
    pub done: Vec<(usize, Result<(), Problem>)>,
    /// Items for merged-away profiles, re-targeted at their survivors.
    pub moved: Vec<ApplyItem>,
}

/// Applies a request's messages for this shard in order, logs them, then answers.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ApplyBatch {
    /// The messages.
    pub items: Vec<ApplyItem>,
    /// What happened to each.
    pub reply: oneshot::Sender<BatchOutcome>,
}

impl Handler<ApplyBatch> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ApplyBatch, _: &mut Self::Context) {
        let n = msg.items.len();
        if let Some(p) = self.refusal() {
            self.depth.fetch_sub(n, Ordering::AcqRel);
            for item in &msg.items {
                self.undo_links(
                    &item.resolution,
                    self.profiles.contains_key(&item.resolution.profile),
                );
            }
            let done = msg
                .items
                .iter()
                .map(|i| (i.index, Err(p.clone())))
                .collect();
            let _ = msg.reply.send(BatchOutcome {
                done,
                moved: Vec::new(),
            });
            return;
        }
        let now = self.ctx.clock.now_ms();
        let mut out = Vec::with_capacity(n);
        let mut moved = Vec::new();
        for mut item in msg.items {
            let pid = item.resolution.profile;
            if !self.profiles.contains_key(&pid)
                && let Some(survivor) = self.ctx.registry.forward(pid)
            {
                // Merged away after routing — also a profile this very message created,
                // when a merge absorbed it before the message got here (the merge found
                // nothing to take, so the message carries the profile's whole start): the
                // survivor's shard takes it.
                item.resolution.profile = survivor;
                item.resolution.created = false;
                moved.push(item);
                continue;
            }
            let r = self.apply_message(item.message, item.resolution, item.note, now);
            out.push((item.index, r));
        }
        self.depth.fetch_sub(n, Ordering::AcqRel);
        let reply = msg.reply;
        self.commit_then(move |durable| {
            let done = match durable {
                Ok(()) => out,
                Err(p) => out
                    .into_iter()
                    .map(|(i, r)| (i, r.and(Err(p.clone()))))
                    .collect(),
            };
            let _ = reply.send(BatchOutcome { done, moved });
        });
    }
}

/// Renders profiles as the API's profile objects.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct GetProfiles {
    /// Which.
    pub ids: Vec<ProfileId>,
    /// JSON per id (None: not here).
    pub reply: oneshot::Sender<Vec<Option<String>>>,
}

impl Handler<GetProfiles> for Shard {
    type Result = ();

    fn handle(&mut self, msg: GetProfiles, _: &mut Self::Context) {
        let out = msg.ids.iter().map(|id| self.render(*id)).collect();
        let _ = msg.reply.send(out);
    }
}

/// Filters shared by timeline and global event queries.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this event name (`event`).
    pub name: Option<String>,
    /// Only this kind.
    pub kind: Option<EventKind>,
    /// Event time ≥ since.
    pub since: Option<i64>,
    /// Event time < until.
    pub until: Option<i64>,
    /// Only events strictly older than this (timestamp, seq): the cursor.
    pub before: Option<(i64, u64)>,
}

impl EventFilter {
    pub(crate) fn matcher(&self) -> Option<impl Fn(&EventRef) -> bool + '_> {
        let name = match &self.name {
            Some(n) => Some(event_names().lookup(n)?),
            None => None,
        };
        Some(move |e: &EventRef| {
            name.is_none_or(|n| e.name == n)
                && self.kind.is_none_or(|k| e.kind() == k)
                && self.since.is_none_or(|s| e.ts_ms >= s)
                && self.until.is_none_or(|u| e.ts_ms < u)
                && self.before.is_none_or(|b| e.key() < b)
        })
    }
}

/// An event found by a query: where to read it and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventHit {
    /// Event time.
    pub ts_ms: i64,
    /// Accept sequence.
    pub seq: u64,
    /// Log position.
    pub pos: Position,
    /// Profile it belongs to.
    pub profile: ProfileId,
}

/// Newest-first events of one profile.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ReadTimeline {
    /// Whose.
    pub profile: ProfileId,
    /// Filters and cursor.
    pub filter: EventFilter,
    /// At most this many (the caller asks one more to know if there is a next page).
    pub limit: usize,
    /// None when the profile is not here.
    pub reply: oneshot::Sender<Option<Vec<EventHit>>>,
}

impl Handler<ReadTimeline> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ReadTimeline, _: &mut Self::Context) {
        let Some(p) = self.profiles.get(&msg.profile) else {
            let _ = msg.reply.send(None);
            return;
        };
        let hits = match msg.filter.matcher() {
            None => Vec::new(),
            Some(m) => p
                .events
                .iter()
                .rev()
                .filter(|e| m(e))
                .take(msg.limit)
                .map(|e| EventHit {
                    ts_ms: e.ts_ms,
                    seq: e.seq(),
                    pos: e.pos,
                    profile: p.id,
                })
                .collect(),
        };
        let _ = msg.reply.send(Some(hits));
    }
}

/// The newest matching events across this shard's profiles (bounded heap, no copies).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct QueryEvents {
    /// Filters and cursor.
    pub filter: EventFilter,
    /// At most this many, newest first.
    pub limit: usize,
    /// The hits.
    pub reply: oneshot::Sender<Vec<EventHit>>,
}

impl Handler<QueryEvents> for Shard {
    type Result = ();

    fn handle(&mut self, msg: QueryEvents, _: &mut Self::Context) {
        let mut heap: BinaryHeap<Reverse<EventHit>> = BinaryHeap::with_capacity(msg.limit + 1);
        if let Some(m) = msg.filter.matcher() {
            let mut consider = |e: &EventRef, profile: ProfileId| {
                if !m(e) {
                    return;
                }
                let hit = EventHit {
                    ts_ms: e.ts_ms,
                    seq: e.seq(),
                    pos: e.pos,
                    profile,
                };
                if heap.len() < msg.limit {
                    heap.push(Reverse(hit));
                } else if let Some(Reverse(min)) = heap.peek()
                    && (hit.ts_ms, hit.seq) > (min.ts_ms, min.seq)
                {
                    heap.pop();
                    heap.push(Reverse(hit));
                }
            };
            for p in self.profiles.values() {
                for e in &p.events {
                    consider(e, p.id);
                }
            }
            for (pid, e) in &self.system_log {
                consider(e, *pid);
            }
        }
        let mut hits: Vec<EventHit> = heap.into_iter().map(|Reverse(h)| h).collect();
        hits.sort_by_key(|h| std::cmp::Reverse((h.ts_ms, h.seq)));
        let _ = msg.reply.send(hits);
    }
}

/// Profile ids in ascending order after a cursor.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ListProfiles {
    /// Only members of this segment.
    pub segment: Option<SegIdx>,
    /// Only ids greater than this.
    pub after: Option<ProfileId>,
    /// At most this many.
    pub limit: usize,
    /// The ids.
    pub reply: oneshot::Sender<Vec<ProfileId>>,
}

impl Handler<ListProfiles> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ListProfiles, _: &mut Self::Context) {
        use std::ops::Bound;
        let start = match msg.after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let ids = self
            .profiles
            .range((start, Bound::Unbounded))
            .filter(|(_, p)| msg.segment.is_none_or(|s| p.member_since(s).is_some()))
            .take(msg.limit)
            .map(|(id, _)| *id)
            .collect();
        let _ = msg.reply.send(ids);
    }
}

/// `PATCH /v1/profiles/{key}/traits`: sets traits at max(now, key time).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct PatchTraits {
    /// Where the registry put it (created or linked by the key and email/phone traits).
    pub resolution: Resolution,
    /// The merge-list entry of links the registry refused, if any.
    pub note: Option<String>,
    /// The traits (null unsets).
    pub traits: serde_json::Map<String, serde_json::Value>,
    /// The profile object after the patch.
    pub reply: oneshot::Sender<Result<String, Problem>>,
}

impl Handler<PatchTraits> for Shard {
    type Result = ();

    fn handle(&mut self, msg: PatchTraits, _: &mut Self::Context) {
        let now = self.ctx.clock.now_ms();
        let pid = msg.resolution.profile;
        let result = self
            .apply_patch(msg.resolution, &msg.traits, msg.note, now)
            .map(|()| self.render(pid).unwrap_or_default());
        let reply = msg.reply;
        match result {
            Err(p) => {
                let _ = reply.send(Err(p));
            }
            Ok(json) => self.commit_then(move |durable| {
                let _ = reply.send(durable.map(|()| json));
            }),
        }
    }
}

impl Shard {
    /// Sets traits at max(now, key time) on a resolved profile — `PATCH` and import rows:
    /// creating it if needed, linking the resolution's identities, logging a `Patch`
    /// record, then `user.updated` and segments like any change. A refusal undoes the links.
    pub(super) fn apply_patch(
        &mut self,
        r: Resolution,
        traits: &serde_json::Map<String, serde_json::Value>,
        note: Option<String>,
        now: i64,
    ) -> Result<(), Problem> {
        let pid = r.profile;
        let exists = self.profiles.contains_key(&pid);
        if let Some(p) = self.refusal() {
            self.undo_links(&r, exists);
            return Err(p);
        }
        let plan = {
            let fresh;
            let profile = match self.profiles.get(&pid) {
                Some(p) => p,
                None => {
                    fresh = Profile::new(pid, now);
                    &fresh
                }
            };
            profile.plan_traits(traits, TraitTime::Now(now), self.limits)
        };
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                self.undo_links(&r, exists);
                return Err(Problem::at(ErrorCode::TooManyTraits, "", e.to_string()));
            }
        };
        let seq = self.next_seq();
        let linked: Vec<LinkedIdentity> = r
            .linked
            .iter()
            .map(|(id, seen)| LinkedIdentity {
                ty: id.ty.name().to_string(),
                value: id.value.to_string(),
                first_seen: *seen,
            })
            .collect();
        let mut touched = segments::Touched::default();
        let profile = self
            .profiles
            .entry(pid)
            .or_insert_with(|| Box::new(Profile::new(pid, now)));
        if !exists {
            let s = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
            append_system(&mut self.log, profile, s, "user.created", None, now)?;
            segments::count_system(
                &self.specs,
                profile,
                "user.created",
                None,
                now,
                &mut touched,
            );
            // A new profile can match rules that read nothing it has ("did not perform").
            touched.all = true;
            metrics::gauge!("user360_profiles").increment(1.0);
        }
        touched.ids.extend(r.linked.iter().map(|(id, _)| id.ty));
        for (id, seen) in r.linked {
            profile.add_identity(id, seen);
        }
        self.log
            .append(&LogRecord::Patch(PatchRecord {
                seq,
                profile: pid.0,
                now_ms: now,
                created: !exists,
                linked,
                traits_json: serde_json::to_string(traits).expect("json"),
            }))
            .map_err(io_problem)?;
        if let Some(note) = note {
            let seq = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
            self.log
                .append(&LogRecord::Note(NoteRecord {
                    seq,
                    profile: pid.0,
                    note: note.clone(),
                }))
                .map_err(io_problem)?;
            profile.add_merge_note(note);
        }
        let changes = profile.commit_traits(plan, now);
        record_changes(
            &mut self.log,
            &self.ctx.catalog,
            &self.ctx.next_seq,
            profile,
            &changes,
            now,
            (&self.specs, &mut touched),
        )?;
        self.settle(pid, &touched, now)
    }

    /// Rows of profiles after `after` (members of `segment` only, if given), at most
    /// `limit`, each rendered by `row` (given the profile and its API-object renderer).
    pub(crate) fn export_rows<R>(
        &self,
        after: Option<ProfileId>,
        segment: Option<SegIdx>,
        limit: usize,
        row: impl Fn(&Profile, &dyn Fn(&Profile) -> String) -> R,
    ) -> Vec<(ProfileId, R)> {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let render = |p: &Profile| self.render(p.id).unwrap_or_default();
        self.profiles
            .range((start, Bound::Unbounded))
            .filter(|(_, p)| segment.is_none_or(|s| p.member_since(s).is_some()))
            .take(limit)
            .map(|(id, p)| (*id, row(p, &render)))
            .collect()
    }

    /// The positions of matching events of the profiles after `after` (members of
    /// `segment` only), about `max_events` at a time but never splitting a profile;
    /// answers (last profile visited, whether the shard is done, hits).
    pub(crate) fn export_event_refs(
        &self,
        after: Option<ProfileId>,
        segment: Option<SegIdx>,
        filter: &EventFilter,
        max_events: usize,
    ) -> (Option<ProfileId>, bool, Vec<(ProfileId, u64)>) {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let Some(matches) = filter.matcher() else {
            return (None, true, Vec::new());
        };
        let mut hits = Vec::new();
        let mut last = None;
        for (id, p) in self.profiles.range((start, Bound::Unbounded)) {
            last = Some(*id);
            if segment.is_some_and(|s| p.member_since(s).is_none()) {
                continue;
            }
            hits.extend(p.events.iter().filter(|e| matches(e)).map(|e| (*id, e.pos)));
            if hits.len() >= max_events {
                return (last, false, hits);
            }
        }
        (last, true, hits)
    }
}

/// `DELETE /v1/profiles/{key}`: erases a profile from every read.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct DeleteProfile {
    /// Which.
    pub profile: ProfileId,
    /// Keep fingerprints of its identities so later messages carrying them are refused.
    pub suppress: bool,
    /// False when the profile was not here.
    pub reply: oneshot::Sender<Result<bool, Problem>>,
}

impl Handler<DeleteProfile> for Shard {
    type Result = ();

    fn handle(&mut self, msg: DeleteProfile, _: &mut Self::Context) {
        if let Some(p) = self.refusal() {
            let _ = msg.reply.send(Err(p));
            return;
        }
        let now = self.ctx.clock.now_ms();
        let pid = msg.profile;
        let Some(mut profile) = self.profiles.remove(&pid) else {
            let _ = msg.reply.send(Ok(false));
            return;
        };
        let memberships = std::mem::take(&mut profile.memberships);
        // Queued deliveries about it lose its traits; then one exit per membership, with
        // its id and identities only.
        self.strip_deliveries(pid);
        for m in &profile.merged_from {
            self.strip_deliveries(*m);
        }
        let shown = outbox::profile_payload(&profile, outbox::Shown::Identities);
        self.erased.insert(pid.0);
        self.erased.extend(profile.merged_from.iter().map(|m| m.0));
        self.end_memberships(pid, memberships, Reason::Deleted, now, None, &shown);
        self.unschedule(pid);
        let ids: Vec<Identity> = profile.identities.into_iter().map(|h| h.identity).collect();
        self.ctx.registry.remove_profile(pid, &ids);
        let suppressed: Vec<u128> = if msg.suppress {
            ids.iter().map(Identity::hash).collect()
        } else {
            Vec::new()
        };
        self.ctx.registry.suppress(&suppressed);
        metrics::gauge!("user360_profiles").decrement(1.0);
        let result = (|| -> Result<bool, Problem> {
            let seq = self.next_seq();
            self.log
                .append(&LogRecord::Delete(DeleteRecord {
                    seq,
                    profile: pid.0,
                    now_ms: now,
                    suppressed,
                }))
                .map_err(io_problem)?;
            let s = self.next_seq();
            let record = system_record(
                pid,
                s,
                "user.deleted",
                Some(serde_json::json!({"profile_id": pid.to_string()})),
                now,
            );
            let mut entry = event_ref(&record, 0);
            entry.pos = self
                .log
                .append(&LogRecord::Event(record))
                .map_err(io_problem)?;
            self.system_log.push((pid, entry));
            Ok(true)
        })();
        let reply = msg.reply;
        match result {
            Err(p) => {
                let _ = reply.send(Err(p));
            }
            Ok(found) => self.commit_then(move |durable| {
                let _ = reply.send(durable.map(|()| found));
            }),
        }
    }
}

/// Drops events past retention from every profile (run by a timer).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct SweepRetention {
    /// Answered when done.
    pub reply: oneshot::Sender<usize>,
}

impl Handler<SweepRetention> for Shard {
    type Result = ();

    fn handle(&mut self, msg: SweepRetention, _: &mut Self::Context) {
        let now = self.ctx.clock.now_ms();
        let mut dropped = 0;
        let retention_s = self.ctx.settings.events.retention_days as i64 * 86_400;
        let min_received = (now / 1000 - retention_s).max(0) as u32;
        for p in self.profiles.values_mut() {
            dropped += p.trim_events(self.ctx.settings.events.max_per_profile, min_received);
        }
        self.system_log
            .retain(|(_, e)| e.received_s >= min_received);
        let _ = msg.reply.send(dropped);
    }
}

/// After a log failure: if the disk takes writes again, rewrites the current segment into
/// a fresh file and rebuilds the shard from disk (the newest snapshot plus the log), so
/// memory holds exactly what is durable; then accepts changes again.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct Recover {
    /// This shard's chunks of the newest snapshot.
    pub snapshot: Vec<(ChunkInfo, ShardChunk)>,
    /// Whether the shard is healthy afterwards.
    pub reply: oneshot::Sender<bool>,
}

impl Handler<Recover> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Recover, _: &mut Self::Context) {
        if !self.failed.load(Ordering::Acquire) {
            let _ = msg.reply.send(true);
            return;
        }
        let ready = if self.sync_failed.load(Ordering::Acquire) {
            self.log.rewrite_current()
        } else {
            self.log.probe_writable()
        };
        if let Err(e) = ready {
            tracing::warn!(shard = self.id, error = %e, "the disk still refuses writes");
            let _ = msg.reply.send(false);
            return;
        }
        self.ctx.registry.remove_shard(self.id);
        match Shard::open(
            self.id,
            self.ctx.clone(),
            self.depth.clone(),
            self.failed.clone(),
            msg.snapshot,
        ) {
            Ok(fresh) => {
                let rules = self.rules.clone();
                let addr = self.addr.take();
                if let Some((_, t)) = self.armed.take() {
                    self.ctx.timers.cancel(t);
                }
                *self = fresh;
                self.addr = addr;
                self.install_startup(rules);
                self.failed.store(false, Ordering::Release);
                tracing::info!(
                    shard = self.id,
                    profiles = self.profiles.len(),
                    "shard recovered from disk after a write failure"
                );
                let _ = msg.reply.send(true);
            }
            Err(e) => {
                tracing::error!(shard = self.id, error = %e, "cannot reload the shard from disk");
                let _ = msg.reply.send(false);
            }
        }
    }
}

/// The erased profile ids this shard's log may still hold (for the scrub after a
/// snapshot).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ErasedIds {
    /// The ids.
    pub reply: oneshot::Sender<Vec<u128>>,
}

impl Handler<ErasedIds> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ErasedIds, _: &mut Self::Context) {
        let _ = msg.reply.send(self.erased.iter().copied().collect());
    }
}

/// The scrub removed these erased profiles' records from every log.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ForgetErased {
    /// The ids.
    pub ids: Vec<u128>,
}

impl Handler<ForgetErased> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ForgetErased, _: &mut Self::Context) {
        for id in msg.ids {
            self.erased.remove(&id);
        }
    }
}

/// Flushes the log to disk (shutdown).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct FlushLog {
    /// Answered when the log is on disk.
    pub reply: oneshot::Sender<std::io::Result<()>>,
}

impl Handler<FlushLog> for Shard {
    type Result = ();

    fn handle(&mut self, msg: FlushLog, _: &mut Self::Context) {
        let _ = msg.reply.send(self.log.flush(true));
    }
}

/// Counts profiles hosted here.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct CountProfiles {
    /// The count.
    pub reply: oneshot::Sender<usize>,
}

impl Handler<CountProfiles> for Shard {
    type Result = ();

    fn handle(&mut self, msg: CountProfiles, _: &mut Self::Context) {
        let _ = msg.reply.send(self.profiles.len());
    }
}

/// The leaf trait paths this shard's profiles hold (a catalog rebuild after an erasure).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct TraitPaths {
    /// The escaped paths.
    pub reply: oneshot::Sender<std::collections::HashSet<String>>,
}

impl Handler<TraitPaths> for Shard {
    type Result = ();

    fn handle(&mut self, msg: TraitPaths, _: &mut Self::Context) {
        let mut out = std::collections::HashSet::new();
        for p in self.profiles.values() {
            for t in &p.traits {
                if let Some(v) = &t.value {
                    super::catalog::leaf_paths(trait_keys().name(t.key), v, &mut out);
                }
            }
        }
        let _ = msg.reply.send(out);
    }
}

/// A slice of profiles for a snapshot: the chunk, its last id, the log position it
/// covers, and whether it is the shard's last.
pub type EncodedChunk = (ShardChunk, Option<ProfileId>, Position, bool);

/// Encodes the next slice of this shard's profiles for a snapshot. Slices are small so a
/// snapshot never holds the shard for more than a few milliseconds.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct EncodeChunk {
    /// Profiles with ids greater than this.
    pub after: Option<ProfileId>,
    /// At most this many.
    pub max: usize,
    /// The chunk, the last id in it, the log position it covers, and whether it is the last.
    pub reply: oneshot::Sender<std::io::Result<EncodedChunk>>,
}

impl Handler<EncodeChunk> for Shard {
    type Result = ();

    fn handle(&mut self, msg: EncodeChunk, _: &mut Self::Context) {
        use std::ops::Bound;
        // The chunk may only cover records that are on disk.
        if let Err(e) = self.log.flush(true) {
            let _ = msg.reply.send(Err(e));
            return;
        }
        let covers = self.log.end_position();
        let start = match msg.after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let slice: Vec<&Profile> = self
            .profiles
            .range((start, Bound::Unbounded))
            .take(msg.max)
            .map(|(_, p)| &**p)
            .collect();
        let done = slice.len() < msg.max;
        let last = slice.last().map(|p| p.id);
        let system: &[(ProfileId, EventRef)] = if done { &self.system_log } else { &[] };
        let mut chunk = super::snapshot::encode_chunk(slice.into_iter(), system);
        chunk.specs_json = segments::specs_to_json(&self.specs);
        chunk.mappings_json = self.mappings.to_json();
        if done {
            chunk.outbox = self.outbox.values().cloned().collect();
            chunk.outbox.sort_by_key(|e| e.seq);
            chunk.erased = self.erased.iter().copied().collect();
        }
        let _ = msg.reply.send(Ok((chunk, last, covers, done)));
    }
}

/// The log segments (of any shard) that this shard's profiles still reference.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct LiveSegments {
    /// (shard, segment) pairs.
    pub reply: oneshot::Sender<std::collections::HashSet<(u16, u32)>>,
}

impl Handler<LiveSegments> for Shard {
    type Result = ();

    fn handle(&mut self, msg: LiveSegments, _: &mut Self::Context) {
        let mut live = std::collections::HashSet::new();
        let mut add = |pos: Position| {
            let (s, seg, _) = crate::store::log::split_position(pos);
            live.insert((s, seg));
        };
        for p in self.profiles.values() {
            for e in &p.events {
                add(e.pos);
            }
        }
        for (_, e) in &self.system_log {
            add(e.pos);
        }
        let _ = msg.reply.send(live);
    }
}

/// Deletes log segments before a snapshot's position that no profile of any shard
/// references (merged profiles keep events in their old shard's log).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct TruncateLog {
    /// The position the newest snapshot covers for this shard.
    pub before: Position,
    /// Segments referenced anywhere in the grid.
    pub live: Arc<std::collections::HashSet<(u16, u32)>>,
    /// Segments deleted.
    pub reply: oneshot::Sender<std::io::Result<usize>>,
}

impl Handler<TruncateLog> for Shard {
    type Result = ();

    fn handle(&mut self, msg: TruncateLog, _: &mut Self::Context) {
        let mine: std::collections::HashSet<u32> = msg
            .live
            .iter()
            .filter(|(s, _)| *s == self.id)
            .map(|(_, seg)| *seg)
            .collect();
        let _ = msg
            .reply
            .send(self.log.delete_segments_before(msg.before, &mine));
    }
}

/// Merge, absorbed side, step 1: takes the profile out of memory and hands its state
/// over. Nothing is logged yet: the survivor logs the absorbed state first, then
/// [`ConfirmMergedAway`] logs the departure, so a crash in between never loses data (the
/// recovery drops a profile that some survivor already absorbed).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct TakeProfile {
    /// The absorbed profile.
    pub profile: ProfileId,
    /// Its state (None when it was not here).
    pub reply: oneshot::Sender<Result<Option<Profile>, Problem>>,
}

impl Handler<TakeProfile> for Shard {
    type Result = ();

    fn handle(&mut self, msg: TakeProfile, _: &mut Self::Context) {
        if let Some(p) = self.refusal() {
            let _ = msg.reply.send(Err(p));
            return;
        }
        let taken = self.profiles.remove(&msg.profile);
        if let Some(p) = &taken {
            // Its memberships end when the merge is confirmed (or come back with it).
            self.leaving.insert(p.id, p.memberships.clone());
            self.unschedule(p.id);
        }
        let _ = msg.reply.send(Ok(taken.map(|p| *p)));
    }
}

/// Merge, absorbed side, undo: the survivor could not take the state in; put it back.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ReturnProfile {
    /// The state handed out by [`TakeProfile`].
    pub profile: Profile,
}

impl Handler<ReturnProfile> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ReturnProfile, _: &mut Self::Context) {
        let id = msg.profile.id;
        self.leaving.remove(&id);
        self.profiles.insert(id, Box::new(msg.profile));
        let now = self.ctx.clock.now_ms();
        self.reschedule(id, now);
    }
}

/// Merge, absorbed side, step 3: logs that the profile went into `into` (after the
/// survivor logged the absorbed state) and answers once durable.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ConfirmMergedAway {
    /// The absorbed profile.
    pub profile: ProfileId,
    /// The survivor.
    pub into: ProfileId,
    /// Whether the profile was on this shard (not only decided by the registry).
    pub held: bool,
    /// Answered once durable.
    pub reply: oneshot::Sender<Result<(), Problem>>,
}

impl Handler<ConfirmMergedAway> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ConfirmMergedAway, _: &mut Self::Context) {
        let seq = self.next_seq();
        let record = LogRecord::MergedAway(crate::store::log::MergedAwayRecord {
            seq,
            profile: msg.profile.0,
            into: msg.into.0,
        });
        if let Err(e) = self.log.append(&record) {
            self.fail(&e);
            let _ = msg.reply.send(Err(io_problem(e)));
            return;
        }
        if msg.held {
            metrics::gauge!("user360_profiles").decrement(1.0);
        }
        if let Some(memberships) = self.leaving.remove(&msg.profile) {
            let now = self.ctx.clock.now_ms();
            let shown = format!("{{\"id\":\"{}\"}}", msg.profile);
            self.end_memberships(
                msg.profile,
                memberships,
                Reason::Merged,
                now,
                Some(msg.into),
                &shown,
            );
        }
        let reply = msg.reply;
        self.commit_then(move |durable| {
            let _ = reply.send(durable);
        });
    }
}

/// After recovery: every id some profile lists in `merged_from` on this shard.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct MergedIds {
    /// The ids.
    pub reply: oneshot::Sender<Vec<ProfileId>>,
}

impl Handler<MergedIds> for Shard {
    type Result = ();

    fn handle(&mut self, msg: MergedIds, _: &mut Self::Context) {
        let ids = self
            .profiles
            .values()
            .flat_map(|p| p.merged_from.iter().copied())
            .collect();
        let _ = msg.reply.send(ids);
    }
}

/// After recovery: drops profiles that a survivor already absorbed (a crash between the
/// survivor logging the merge and the absorbed side logging its departure).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct DropAbsorbed {
    /// Absorbed ids (of any shard).
    pub ids: Arc<Vec<ProfileId>>,
    /// How many were dropped here.
    pub reply: oneshot::Sender<usize>,
}

impl Handler<DropAbsorbed> for Shard {
    type Result = ();

    fn handle(&mut self, msg: DropAbsorbed, _: &mut Self::Context) {
        let mut dropped = 0;
        for id in msg.ids.iter().filter(|id| id.shard() == self.id) {
            if self.profiles.remove(id).is_some() {
                self.ctx.registry.drop_owner(*id);
                dropped += 1;
            }
        }
        let _ = msg.reply.send(dropped);
    }
}

/// Merge, survivor side: takes in an absorbed profile's state, records `user.merged` and
/// the merge note, and logs the whole absorbed state so replay needs nothing else.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct AbsorbProfile {
    /// The survivor.
    pub profile: ProfileId,
    /// The absorbed profile's state.
    pub absorbed: Profile,
    /// What caused it (message id, identities, rule), as a JSON object.
    pub note: serde_json::Value,
    /// Answered once durable; `Some(next)` when the survivor was merged away meanwhile
    /// (nothing done: send the state on to `next`).
    pub reply: oneshot::Sender<Result<Option<ProfileId>, Problem>>,
}

impl Handler<AbsorbProfile> for Shard {
    type Result = ();

    fn handle(&mut self, msg: AbsorbProfile, _: &mut Self::Context) {
        if let Some(p) = self.refusal() {
            let _ = msg.reply.send(Err(p));
            return;
        }
        let now = self.ctx.clock.now_ms();
        let sid = msg.profile;
        if !self.profiles.contains_key(&sid)
            && let Some(next) = self.ctx.registry.forward(sid)
        {
            let _ = msg.reply.send(Ok(Some(next)));
            return;
        }
        let absorbed_id = msg.absorbed.id;
        let mut absorbed = msg.absorbed;
        absorbed.add_merge_note(msg.note.to_string());
        let state = super::snapshot::encode_chunk(std::iter::once(&absorbed), &[]);
        let seq = self.next_seq();
        let record = LogRecord::Absorbed(crate::store::log::AbsorbedRecord {
            seq,
            profile: sid.0,
            now_ms: now,
            state,
        });
        if let Err(e) = self.log.append(&record) {
            self.fail(&e);
            let _ = msg.reply.send(Err(io_problem(e)));
            return;
        }
        let exists = self.profiles.contains_key(&sid);
        let survivor = self
            .profiles
            .entry(sid)
            .or_insert_with(|| Box::new(Profile::new(sid, now)));
        let mut result = Ok(());
        if !exists {
            // Its creating message is still on the way (it finds the profile here).
            metrics::gauge!("user360_profiles").increment(1.0);
            let s = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
            result = append_system(&mut self.log, survivor, s, "user.created", None, now);
        }
        let specs = &self.specs;
        survivor.absorb(absorbed, now, &|id| specs.get(id).cloned());
        let s2 = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
        let props = serde_json::json!({"merged_from": [absorbed_id.to_string()]});
        let mut touched = segments::Touched {
            all: true,
            ..Default::default()
        };
        segments::count_system(
            specs,
            survivor,
            "user.merged",
            Some(&props),
            now,
            &mut touched,
        );
        let result = result.and_then(|()| {
            append_system(&mut self.log, survivor, s2, "user.merged", Some(props), now)
        });
        trim(survivor, &self.ctx.settings, now);
        // Memberships are re-evaluated on the union.
        let result = result.and_then(|()| self.settle(sid, &touched, now));
        metrics::counter!("user360_merges_total").increment(1);
        let reply = msg.reply;
        match result {
            Err(p) => {
                let _ = reply.send(Err(p));
            }
            Ok(()) => self.commit_then(move |durable| {
                let _ = reply.send(durable.map(|()| None));
            }),
        }
    }
}

/// The merge notes of a profile (`GET /v1/profiles/{key}/merges`).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct GetMerges {
    /// Which.
    pub profile: ProfileId,
    /// Notes as JSON texts (None when the profile is not here).
    pub reply: oneshot::Sender<Option<Vec<String>>>,
}

impl Handler<GetMerges> for Shard {
    type Result = ();

    fn handle(&mut self, msg: GetMerges, _: &mut Self::Context) {
        let out = self.profiles.get(&msg.profile).map(|p| {
            p.merge_notes
                .as_ref()
                .map(|n| n.iter().map(|x| x.to_string()).collect())
                .unwrap_or_default()
        });
        let _ = msg.reply.send(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compact_standard_event_renders_as_the_api_event() {
        let e = expand_system(&SystemRecord {
            seq: 255,
            profile: 7,
            at_ms: 1_700_000_000_123,
            name: "user.updated".into(),
            properties_json: r#"{"changes":{"a\"b":{"from":null,"to":1}}}"#.into(),
        });
        let v: serde_json::Value = serde_json::from_str(&e.json).unwrap();
        assert_eq!(v["message_id"], "sys-00000000000000ff");
        assert_eq!(v["seq"], 255);
        assert_eq!(v["type"], "system");
        assert_eq!(v["event"], "user.updated");
        assert_eq!(v["properties"]["changes"]["a\"b"]["to"], 1);
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["received_at"], v["timestamp"]);
        assert_eq!(
            (e.kind, e.ts_ms, e.profile),
            (EventKind::System, 1_700_000_000_123, 7)
        );
    }
}
