//! The shard's outbox: webhook deliveries made in the step of the membership change they
//! announce (an `Outbox` record in the same log batch), held until the dispatcher says they
//! ended (an `OutboxDone` record). The outbox is shard state like any other: it is in the
//! shard's last snapshot chunk and rebuilt by replay, so a crash between a change and its
//! delivery neither loses nor invents one.
//!
//! Payloads are rendered here, at the change, because a delivery carries the profile as it
//! was right after the change.

use std::sync::atomic::Ordering;

use actix::{Handler, Message as ActixMessage};
use tokio::sync::oneshot;

use super::Shard;
use crate::domain::ids::ProfileId;
use crate::domain::profile::Profile;
use crate::grid::membership::Reason;
use crate::segment::compile::SegIdx;
use crate::segment::timefmt::write_ms;
use crate::store::log::{LogRecord, OutboxDoneRecord, OutboxEntry, OutboxRecord};

/// The delivery id of a change for a trigger: stable across crashes and replays (the same
/// trigger, profile and change sequence always give the same id).
pub fn delivery_id(trigger: &str, profile: ProfileId, seq: u64) -> String {
    let mut key = Vec::with_capacity(trigger.len() + 24);
    key.extend_from_slice(trigger.as_bytes());
    key.push(0);
    key.extend_from_slice(&profile.0.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    format!("dlv_{:032x}", xxhash_rust::xxh3::xxh3_128(&key))
}

/// How much of the profile a delivery shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// Id, identities and traits (the profile right after the change).
    Full,
    /// Id and identities (an erased profile's exits).
    Identities,
    /// The id only (a merged-away profile's exits).
    IdOnly,
}

/// The `profile` object of a delivery.
pub fn profile_payload(p: &Profile, shown: Shown) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("{\"id\":\"");
    out.push_str(&p.id.to_string());
    out.push('"');
    if shown != Shown::IdOnly {
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
        out.push_str(",\"identities\":");
        out.push_str(&serde_json::to_string(&identities).expect("json"));
    }
    if shown == Shown::Full {
        out.push_str(",\"traits\":");
        out.push_str(&serde_json::to_string(&p.traits_view()).expect("json"));
    }
    out.push('}');
    out
}

/// A delivery payload (as queued: without its closing brace) with the profile's traits
/// taken out, for an erased profile; `None` when it is not a payload.
pub fn without_traits(body: &str) -> Option<String> {
    let mut whole = String::with_capacity(body.len() + 1);
    whole.push_str(body);
    whole.push('}');
    let mut v = serde_json::from_str::<serde_json::Value>(&whole).ok()?;
    if let Some(p) = v.get_mut("profile").and_then(|p| p.as_object_mut()) {
        p.remove("traits");
    }
    let mut out = v.to_string();
    out.pop(); // the closing brace comes with the attempt number
    Some(out)
}

/// A delivery payload without its closing `,"attempt":N}` (added per attempt).
#[allow(clippy::too_many_arguments)]
fn payload(
    delivery: &str,
    entered: bool,
    reason: Reason,
    segment_id: &str,
    segment_name: &str,
    profile_json: &str,
    merged_into: Option<ProfileId>,
    at: i64,
) -> String {
    use crate::domain::event::push_json_str;
    let mut b = String::with_capacity(200 + profile_json.len());
    b.push_str("{\"id\":\"");
    b.push_str(delivery);
    b.push_str("\",\"type\":\"");
    b.push_str(if entered {
        "segment.entered"
    } else {
        "segment.exited"
    });
    b.push_str("\",\"reason\":\"");
    b.push_str(reason.as_str());
    b.push_str("\",\"segment\":{\"id\":");
    push_json_str(&mut b, segment_id);
    b.push_str(",\"name\":");
    push_json_str(&mut b, segment_name);
    b.push_str("},\"profile\":");
    b.push_str(profile_json);
    if let Some(into) = merged_into {
        b.push_str(",\"merged_into\":\"");
        b.push_str(&into.to_string());
        b.push('"');
    }
    b.push_str(",\"occurred_at\":\"");
    write_ms(&mut b, at);
    b.push('"');
    b
}

impl Shard {
    /// Queues one delivery per trigger of `seg` that wants this change (in this step's
    /// outbox record). `profile_json` renders the profile when a delivery needs it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn queue_deliveries(
        &mut self,
        seg: SegIdx,
        pid: ProfileId,
        entered: bool,
        reason: Reason,
        seq: u64,
        at: i64,
        merged_into: Option<ProfileId>,
        profile_json: &mut dyn FnMut() -> String,
    ) {
        let Some(triggers) = self.rules.triggers.get(&seg) else {
            return;
        };
        let Some(rule) = self.rules.get(seg) else {
            return;
        };
        let mut rendered: Option<String> = None;
        for t in triggers {
            if !(if entered { t.on_enter } else { t.on_exit }) {
                continue;
            }
            let delivery = delivery_id(&t.id, pid, seq);
            let pj = rendered.get_or_insert_with(&mut *profile_json);
            let body = payload(
                &delivery,
                entered,
                reason,
                &rule.id,
                &rule.name,
                pj,
                merged_into,
                at,
            );
            self.step_outbox.push(OutboxEntry {
                delivery,
                trigger: t.idx,
                profile: pid.0,
                seq,
                entered,
                body,
                at_ms: at,
            });
        }
    }

    /// Logs this step's new outbox entries (before the step's write) and keeps them until
    /// they end; they go to the dispatcher once durable.
    pub(super) fn flush_outbox(&mut self) -> Result<(), std::io::Error> {
        if self.step_outbox.is_empty() {
            return Ok(());
        }
        let entries = std::mem::take(&mut self.step_outbox);
        let seq = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
        let record = LogRecord::Outbox(OutboxRecord { seq, entries });
        self.log.append(&record)?;
        let LogRecord::Outbox(OutboxRecord { entries, .. }) = record else {
            unreachable!()
        };
        for e in &entries {
            self.outbox.insert(e.delivery.clone(), e.clone());
        }
        self.new_deliveries.extend(entries);
        Ok(())
    }

    /// An erased profile's queued deliveries keep their order but lose its traits.
    pub(super) fn strip_deliveries(&mut self, pid: ProfileId) {
        let ids: Vec<String> = self
            .outbox
            .values()
            .filter(|e| e.profile == pid.0)
            .map(|e| e.delivery.clone())
            .collect();
        for id in ids {
            let Some(e) = self.outbox.get(&id) else {
                continue;
            };
            let Some(body) = without_traits(&e.body) else {
                continue;
            };
            let mut stripped = e.clone();
            stripped.body = body;
            self.step_outbox.push(stripped);
        }
    }

    /// Forgets (and logs the end of) deliveries whose trigger no longer exists.
    pub(super) fn drop_orphan_deliveries(&mut self) -> Result<(), std::io::Error> {
        let live: Vec<u32> = self
            .rules
            .triggers
            .values()
            .flatten()
            .map(|t| t.idx)
            .collect();
        let gone: Vec<String> = self
            .outbox
            .values()
            .filter(|e| !live.contains(&e.trigger))
            .map(|e| e.delivery.clone())
            .collect();
        self.end_deliveries(gone)
    }

    fn end_deliveries(&mut self, ids: Vec<String>) -> Result<(), std::io::Error> {
        let ids: Vec<String> = ids
            .into_iter()
            .filter(|id| self.outbox.remove(id).is_some())
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let seq = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
        self.log.append(&LogRecord::OutboxDone(OutboxDoneRecord {
            seq,
            deliveries: ids,
        }))?;
        Ok(())
    }

    /// Queues one `segment.entered` per current member of `seg` for a new trigger with
    /// `send_existing` (dated when each entered).
    pub(super) fn queue_existing(&mut self, trigger: u32, seg: SegIdx) {
        let Some(t) = self
            .rules
            .triggers
            .get(&seg)
            .and_then(|ts| ts.iter().find(|t| t.idx == trigger))
            .cloned()
        else {
            return;
        };
        let Some(rule) = self.rules.get(seg).cloned() else {
            return;
        };
        let members: Vec<(ProfileId, i64, String)> = self
            .profiles
            .values()
            .filter_map(|p| {
                p.member_since(seg)
                    .map(|since| (p.id, since, profile_payload(p, Shown::Full)))
            })
            .collect();
        for (pid, since, pj) in members {
            let seq = self.ctx.next_seq.fetch_add(1, Ordering::AcqRel);
            let delivery = delivery_id(&t.id, pid, seq);
            let body = payload(
                &delivery,
                true,
                Reason::Rule,
                &rule.id,
                &rule.name,
                &pj,
                None,
                since,
            );
            self.step_outbox.push(OutboxEntry {
                delivery,
                trigger: t.idx,
                profile: pid.0,
                seq,
                entered: true,
                body,
                at_ms: since,
            });
        }
    }
}

/// The dispatcher's word that deliveries ended (delivered or failed): the shard logs it
/// and forgets them.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct EndDeliveries {
    /// Their ids.
    pub deliveries: Vec<String>,
}

impl Handler<EndDeliveries> for Shard {
    type Result = ();

    fn handle(&mut self, msg: EndDeliveries, _: &mut Self::Context) {
        if self.refusal().is_some() {
            return; // a restart re-sends them: at least once
        }
        if let Err(e) = self.end_deliveries(msg.deliveries) {
            self.fail(&e);
            return;
        }
        self.commit_then(|_| {});
    }
}

/// Puts a failed delivery back in the outbox (`POST …/deliveries/{id}/retry`).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct RequeueDelivery {
    /// The delivery as it was queued.
    pub entry: OutboxEntry,
    /// Answered once it is durable again.
    pub reply: oneshot::Sender<Result<(), crate::error::Problem>>,
}

impl Handler<RequeueDelivery> for Shard {
    type Result = ();

    fn handle(&mut self, msg: RequeueDelivery, _: &mut Self::Context) {
        if let Some(p) = self.refusal() {
            let _ = msg.reply.send(Err(p));
            return;
        }
        self.step_outbox.push(msg.entry);
        let reply = msg.reply;
        self.commit_then(move |r| {
            let _ = reply.send(r);
        });
    }
}

/// Every delivery this shard's outbox holds (for the dispatcher at start).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct PendingDeliveries {
    /// The entries.
    pub reply: oneshot::Sender<Vec<OutboxEntry>>,
}

impl Handler<PendingDeliveries> for Shard {
    type Result = ();

    fn handle(&mut self, msg: PendingDeliveries, _: &mut Self::Context) {
        let mut all: Vec<OutboxEntry> = self.outbox.values().cloned().collect();
        all.sort_by_key(|e| e.seq);
        let _ = msg.reply.send(all);
    }
}
