//! Triggers as a service: definitions (create, list, get, delete) kept with the segment
//! definitions, starting dispatch at boot from the shards' outboxes, delivery listings and
//! re-queuing failed deliveries. Sending is [`super::dispatch`]'s.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::Grid;
use super::dispatch::DispatchEvent;
use super::membership::Reason;
use super::segments::Edit;
use super::shard::outbox::{PendingDeliveries, RequeueDelivery};
use crate::domain::ids::ProfileId;
use crate::error::{ErrorCode, Problem};
use crate::segment::cond::show;
use crate::segment::set::TriggerDef;
use crate::segment::timefmt::format_ms;
use crate::store::deliveries::{DeliveryState, DeliveryStatus};
use crate::store::log::OutboxEntry;

/// A trigger's API object (never its secret).
fn trigger_json(t: &TriggerDef) -> Value {
    let mut on = Vec::new();
    if t.on_enter {
        on.push("enter");
    }
    if t.on_exit {
        on.push("exit");
    }
    json!({
        "id": t.id,
        "segment": t.segment,
        "on": on,
        "url": t.url,
        "headers": t.headers,
        "send_existing": t.send_existing,
        "created_at": format_ms(t.created_at),
    })
}

/// A delivery's API object.
pub fn delivery_json(d: &DeliveryState, trigger: &str) -> Value {
    json!({
        "id": d.id,
        "trigger": trigger,
        "profile_id": ProfileId(d.profile).to_string(),
        "type": if d.entered { "segment.entered" } else { "segment.exited" },
        "status": d.status.as_str(),
        "attempts": d.attempts,
        "last_error": d.last_error,
        "next_attempt_at": d.next_attempt_at.map(format_ms),
        "created_at": format_ms(d.created_at),
        "delivered_at": d.delivered_at.map(format_ms),
    })
}

fn rule_error(path: &str, message: String) -> Problem {
    Problem::at(ErrorCode::InvalidRule, path, message)
}

/// Headers a trigger may not set (User360 sets them, or HTTP does).
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "x-user360-delivery",
    "x-user360-timestamp",
    "x-user360-signature",
];

/// Validates a trigger body against the definitions (`segment` must exist).
fn parse_trigger(
    body: &Value,
    defs: &crate::segment::set::Definitions,
) -> Result<TriggerDef, Problem> {
    let Some(obj) = body.as_object() else {
        return Err(Problem::at(
            ErrorCode::InvalidField,
            "",
            format!("a trigger must be a JSON object; got {}", show(body)),
        ));
    };
    const KEYS: &[&str] = &[
        "id",
        "segment",
        "on",
        "url",
        "secret",
        "headers",
        "send_existing",
    ];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(rule_error(
            k,
            format!(
                "unknown key {k:?} in a trigger; expected {}",
                KEYS.join(", ")
            ),
        ));
    }
    let id = match obj.get("id") {
        None | Some(Value::Null) => ulid::Ulid::new().to_string(),
        Some(Value::String(s))
            if !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) =>
        {
            s.clone()
        }
        Some(other) => {
            return Err(rule_error(
                "id",
                format!(
                    "a trigger id is 1 to 64 letters, digits, '_', '-' or '.'; got {}",
                    show(other)
                ),
            ));
        }
    };
    let segment = match obj.get("segment") {
        Some(Value::String(s)) if defs.segment(s).is_some() => s.clone(),
        Some(Value::String(s)) => {
            return Err(rule_error(
                "segment",
                format!("no segment has the id {s:?}"),
            ));
        }
        Some(other) => {
            return Err(rule_error(
                "segment",
                format!("\"segment\" must be a segment id; got {}", show(other)),
            ));
        }
        None => {
            return Err(rule_error(
                "segment",
                "a trigger needs a \"segment\"".into(),
            ));
        }
    };
    let (mut on_enter, mut on_exit) = (false, false);
    match obj.get("on") {
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some("enter") => on_enter = true,
                    Some("exit") => on_exit = true,
                    _ => {
                        return Err(rule_error(
                            &format!("on[{i}]"),
                            format!("\"on\" holds \"enter\" and/or \"exit\"; got {}", show(item)),
                        ));
                    }
                }
            }
        }
        Some(other) => {
            return Err(rule_error(
                "on",
                format!(
                    "\"on\" must be a non-empty list of \"enter\" and \"exit\"; got {}",
                    show(other)
                ),
            ));
        }
        None => {
            return Err(rule_error(
                "on",
                "a trigger needs \"on\": [\"enter\"], [\"exit\"] or both".into(),
            ));
        }
    }
    let url = match obj.get("url") {
        Some(Value::String(u)) => match reqwest::Url::parse(u) {
            Ok(p) if matches!(p.scheme(), "http" | "https") && p.host().is_some() => u.clone(),
            _ => {
                return Err(rule_error(
                    "url",
                    format!("\"url\" must be an absolute http or https URL; got {u:?}"),
                ));
            }
        },
        Some(other) => {
            return Err(rule_error(
                "url",
                format!("\"url\" must be a string; got {}", show(other)),
            ));
        }
        None => return Err(rule_error("url", "a trigger needs a \"url\"".into())),
    };
    let secret = match obj.get("secret") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            return Err(rule_error(
                "secret",
                format!("\"secret\" must be a non-empty string; got {}", show(other)),
            ));
        }
    };
    let mut headers = BTreeMap::new();
    match obj.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            for (k, v) in h {
                let path = format!("headers[{}]", Value::from(k.as_str()));
                let Some(v) = v.as_str() else {
                    return Err(rule_error(
                        &path,
                        format!("header values must be strings; got {}", show(v)),
                    ));
                };
                if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(v).is_err()
                {
                    return Err(rule_error(
                        &path,
                        format!("{k:?}: {v:?} is not a valid HTTP header"),
                    ));
                }
                if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
                    return Err(rule_error(
                        &path,
                        format!("header {k:?} is set by User360 and cannot be given"),
                    ));
                }
                headers.insert(k.clone(), v.to_owned());
            }
        }
        Some(other) => {
            return Err(rule_error(
                "headers",
                format!(
                    "\"headers\" must be an object of strings; got {}",
                    show(other)
                ),
            ));
        }
    }
    let send_existing = match obj.get("send_existing") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(rule_error(
                "send_existing",
                format!(
                    "\"send_existing\" must be true or false; got {}",
                    show(other)
                ),
            ));
        }
    };
    Ok(TriggerDef {
        idx: 0,
        id,
        segment,
        on_enter,
        on_exit,
        url,
        secret,
        headers,
        send_existing,
        created_at: 0,
    })
}

impl Grid {
    /// After recovery: forwards durable deliveries from the shards to the dispatcher, hands
    /// it what the outboxes still hold, and prunes the delivery history daily.
    pub(crate) async fn start_dispatch(
        self: &Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<DispatchEvent>,
    ) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let Some(grid) = weak.upgrade() else { return };
                grid.dispatcher.queue(ev);
            }
        });
        let mut pending = 0;
        for i in 0..self.shard_count() as u16 {
            let (tx, rx) = oneshot::channel();
            self.shard(i).do_send(PendingDeliveries { reply: tx });
            let entries = rx.await.unwrap_or_default();
            pending += entries.len();
            if !entries.is_empty() {
                self.dispatcher.queue(DispatchEvent { shard: i, entries });
            }
        }
        if pending > 0 {
            tracing::info!(pending, "resuming webhook deliveries");
        }
        self.schedule_history_prune();
    }

    fn schedule_history_prune(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        self.timers.schedule(
            self.clock.now_ms() + 86_400_000,
            Box::new(move |now| {
                Box::pin(async move {
                    if let Some(grid) = weak.upgrade() {
                        let keep_ms = grid.settings.triggers.history_days as i64 * 86_400_000;
                        let triggers: Vec<u32> = grid
                            .segments
                            .definitions()
                            .triggers
                            .iter()
                            .map(|t| t.idx)
                            .collect();
                        let history = grid.dispatcher.context().history.clone();
                        let removed = tokio::task::spawn_blocking(move || {
                            history.prune(now - keep_ms, &triggers)
                        })
                        .await
                        .unwrap_or(0);
                        if removed > 0 {
                            tracing::info!(removed, "delivery history pruned");
                        }
                        grid.schedule_history_prune();
                    }
                })
            }),
        );
    }

    /// `POST /v1/triggers`.
    pub async fn create_trigger(self: &Arc<Self>, body: &Value) -> Result<Value, Problem> {
        let now = self.clock.now_ms();
        let body = body.clone();
        let mut made: Option<TriggerDef> = None;
        self.edit(
            |defs| {
                let mut t = parse_trigger(&body, defs)?;
                if defs.trigger(&t.id).is_some() {
                    return Err(Problem::at(
                        ErrorCode::Conflict,
                        "id",
                        format!("a trigger with the id {:?} already exists", t.id),
                    ));
                }
                t.idx = defs.next_trigger;
                defs.next_trigger += 1;
                t.created_at = now;
                let seg = defs.segment(&t.segment).map(|s| s.idx).expect("checked");
                let send_existing = t.send_existing.then_some((t.idx, seg));
                made = Some(t.clone());
                defs.triggers.push(t);
                Ok(Edit {
                    backfill: None,
                    send_existing,
                })
            },
            Reason::Rule,
        )
        .await?;
        Ok(trigger_json(&made.expect("created")))
    }

    /// `DELETE /v1/triggers/{id}`: its queued deliveries are dropped.
    pub async fn delete_trigger(self: &Arc<Self>, id: &str) -> Result<(), Problem> {
        self.edit(
            |defs| {
                let Some(pos) = defs.triggers.iter().position(|t| t.id == id) else {
                    return Err(Problem::new(
                        ErrorCode::NotFound,
                        format!("no trigger has the id {id:?}"),
                    ));
                };
                defs.triggers.remove(pos);
                Ok(Edit::default())
            },
            Reason::Rule,
        )
        .await?;
        Ok(())
    }

    /// `GET /v1/triggers/{id}`.
    pub fn trigger(&self, id: &str) -> Option<Value> {
        self.segments.definitions().trigger(id).map(trigger_json)
    }

    /// `GET /v1/triggers`: by ascending id after `after`.
    pub fn list_triggers(&self, after: Option<&str>, limit: usize) -> (Vec<Value>, Option<String>) {
        let defs = self.segments.definitions();
        let mut all: Vec<&TriggerDef> = defs
            .triggers
            .iter()
            .filter(|t| after.is_none_or(|a| t.id.as_str() > a))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let more = all.len() > limit;
        all.truncate(limit);
        let next = if more {
            all.last().map(|t| t.id.clone())
        } else {
            None
        };
        (all.into_iter().map(trigger_json).collect(), next)
    }

    /// `GET /v1/triggers/{id}/deliveries`: pending ones from the dispatcher, ended ones
    /// from the history, by change sequence (oldest first); the cursor is the last
    /// returned delivery's sequence. None when no such trigger.
    pub async fn deliveries(
        &self,
        id: &str,
        status: Option<DeliveryStatus>,
        after: Option<u64>,
        limit: usize,
    ) -> Option<(Vec<Value>, Option<u64>)> {
        let defs = self.segments.definitions();
        let t = defs.trigger(id)?;
        let pending = self.dispatcher.pending(t.idx).await;
        let history = {
            let h = self.dispatcher.context().history.clone();
            let idx = t.idx;
            tokio::task::spawn_blocking(move || h.of_trigger(idx))
                .await
                .unwrap_or_default()
        };
        let mut by_id: BTreeMap<String, DeliveryState> = BTreeMap::new();
        for d in history {
            by_id.insert(d.id.clone(), d);
        }
        // The dispatcher's view of pending ones is the current one.
        for d in pending {
            by_id.insert(d.id.clone(), d);
        }
        let mut all: Vec<DeliveryState> = by_id
            .into_values()
            .filter(|d| status.is_none_or(|s| d.status == s))
            .filter(|d| after.is_none_or(|a| d.seq > a))
            .collect();
        all.sort_by_key(|d| d.seq);
        let more = all.len() > limit;
        all.truncate(limit);
        let next = if more {
            all.last().map(|d| d.seq)
        } else {
            None
        };
        Some((all.iter().map(|d| delivery_json(d, &t.id)).collect(), next))
    }

    /// `POST /v1/triggers/{id}/deliveries/{delivery}/retry`: puts a failed delivery back
    /// in its shard's outbox (attempts go on counting).
    pub async fn retry_delivery(&self, id: &str, delivery: &str) -> Result<(), Problem> {
        let defs = self.segments.definitions();
        let t = defs.trigger(id).ok_or_else(|| {
            Problem::new(ErrorCode::NotFound, format!("no trigger has the id {id:?}"))
        })?;
        let d = self
            .dispatcher
            .context()
            .history
            .get(t.idx, delivery)
            .ok_or_else(|| {
                Problem::new(
                    ErrorCode::NotFound,
                    format!("trigger {id:?} has no delivery {delivery:?}"),
                )
            })?;
        if d.status != DeliveryStatus::Failed {
            return Err(Problem::new(
                ErrorCode::Conflict,
                format!(
                    "delivery {delivery:?} is {}; only failed deliveries can be re-queued",
                    d.status.as_str()
                ),
            ));
        }
        let Some(body) = d.body.clone() else {
            return Err(Problem::new(
                ErrorCode::Conflict,
                format!("delivery {delivery:?} has no stored payload to send again"),
            ));
        };
        let entry = OutboxEntry {
            delivery: d.id.clone(),
            trigger: t.idx,
            profile: d.profile,
            seq: d.seq,
            entered: d.entered,
            body,
            at_ms: d.created_at,
        };
        let mut pending = d;
        pending.status = DeliveryStatus::Pending;
        pending.ended_at = None;
        self.dispatcher.context().history.put(&pending);
        let shard = (pending.shard as usize).min(self.shard_count().saturating_sub(1)) as u16;
        let (tx, rx) = oneshot::channel();
        self.shard(shard)
            .do_send(RequeueDelivery { entry, reply: tx });
        rx.await.map_err(|_| super::gone())?
    }
}
