//! Ingestion: from an ingest request's bytes to accepted, deduplicated messages applied
//! on their profiles.
//!
//! Owns the order of the ingest path: decode → parse and validate → body write key →
//! admission → dedup reservation → identity resolution → one batch per shard → answer.
//! It must not know HTTP (status codes, headers): the API layer hands it bytes and turns
//! its [`Problem`]s into responses.

pub mod body;
pub mod dedup;
pub mod parse;
pub mod scan;

use std::sync::Arc;

use serde::Serialize;

use crate::domain::event::EventKind;
use crate::error::{ErrorCode, Problem};
use crate::grid::Grid;
use crate::grid::registry::ResolveError;
use crate::grid::shard::ApplyItem;
use dedup::Dedup;
use parse::{Endpoint, ParseContext, ParseNotes};

/// One rejected message of a request.
#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    /// Position in the request (0 for single-message endpoints).
    pub index: usize,
    /// Error code.
    pub code: &'static str,
    /// What was wrong, naming the field and value.
    pub message: String,
}

/// The answer to an ingest request.
#[derive(Debug, Clone, Serialize)]
pub struct IngestAnswer {
    /// Always true on a 200.
    pub success: bool,
    /// Messages applied.
    pub accepted: usize,
    /// Messages whose messageId was accepted before.
    pub duplicates: usize,
    /// Messages refused, with why.
    pub rejected: Vec<Rejected>,
}

/// How the request authenticated before its body was read.
pub enum KeyCheck<'a> {
    /// The Authorization header carried a valid write key.
    Header,
    /// No Authorization header: the body's `writeKey` must pass this check.
    Body(&'a (dyn Fn(&str) -> bool + Sync)),
}

/// The entry for the profile's `…/merges` list when links of a message were refused.
fn refusal_note(
    m: &crate::domain::message::Message,
    r: &crate::grid::registry::Resolution,
    now: i64,
) -> Option<String> {
    let ident = |ty: &str, v: &str| serde_json::json!({"type": ty, "value": v});
    let identities: Vec<serde_json::Value> = if r.refused {
        vec![
            ident("user_id", m.user_id.as_deref().unwrap_or_default()),
            ident("previous_id", m.previous_id.as_deref().unwrap_or_default()),
        ]
    } else if !r.dropped_ids.is_empty() {
        r.dropped_ids
            .iter()
            .map(|i| ident(i.ty.name(), &i.value))
            .collect()
    } else {
        return None;
    };
    Some(crate::grid::registry::refusal_entry(
        Some(&m.message_id),
        None,
        identities,
        now,
    ))
}

/// The ingest service; one per server.
pub struct Ingestor {
    /// The grid messages go to.
    grid: Arc<Grid>,
    /// Accepted messageIds (owned by the grid, so recovery and snapshots see them).
    dedup: Arc<Dedup>,
}

impl Ingestor {
    /// A service over `grid`.
    pub fn new(grid: Arc<Grid>) -> Ingestor {
        let dedup = grid.dedup.clone();
        Ingestor { grid, dedup }
    }

    /// The suppressed identity a message carries (alias: both ids, as either type).
    fn suppressed(
        &self,
        m: &crate::domain::message::Message,
    ) -> Option<crate::domain::identity::Identity> {
        use crate::domain::identity::{IdType, Identity};
        let registry = &self.grid.registry;
        if m.kind != EventKind::Alias {
            return registry.suppressed_among(&m.identities).cloned();
        }
        let mut ids = Vec::with_capacity(4);
        for v in [&m.user_id, &m.previous_id].into_iter().flatten() {
            for ty in [IdType::USER_ID, IdType::ANONYMOUS_ID] {
                ids.push(Identity {
                    ty,
                    value: v.as_str().into(),
                });
            }
        }
        registry.suppressed_among(&ids).cloned()
    }

    /// Handles one ingest request. `Err` is a whole-request failure (a single-message
    /// endpoint's rejected message is one too).
    pub async fn ingest(
        &self,
        endpoint: Endpoint,
        encoding: Option<&str>,
        raw: &[u8],
        key: KeyCheck<'_>,
    ) -> Result<IngestAnswer, Problem> {
        let settings = &self.grid.settings;
        let received_ms = self.grid.clock.now_ms();
        let body = body::decode(encoding, raw, settings.ingest.max_body_bytes)?;
        let mut notes = ParseNotes::default();
        let ctx = ParseContext {
            limits: &settings.ingest,
            rules: self.grid.registry.rules(),
            received_ms,
        };
        let parsed = parse::parse_body(endpoint, &body, &ctx, &mut notes);
        if let KeyCheck::Body(check) = key {
            let ok = match &parsed {
                Ok(env) => env.write_key.as_deref().is_some_and(check),
                Err(_) => false,
            };
            if !ok {
                return Err(Problem::new(
                    ErrorCode::Unauthorized,
                    "a write key is required: send it as the HTTP Basic username or as writeKey in the body",
                ));
            }
        }
        let envelope = parsed?;
        if notes.bad_timestamps > 0 {
            metrics::counter!("user360_invalid_timestamps_total").increment(notes.bad_timestamps);
        }
        if notes.ignored_external_ids > 0 {
            metrics::counter!("user360_ignored_external_ids_total")
                .increment(notes.ignored_external_ids);
        }
        let total = envelope.messages.len();
        let valid = envelope.messages.iter().filter(|m| m.is_ok()).count();
        if valid > 0 {
            self.grid.admit(valid)?;
        }

        let mut rejected: Vec<(usize, Problem)> = Vec::new();
        let mut duplicates = 0;
        let mut items = Vec::with_capacity(valid);
        let mut reserved: Vec<(usize, u64)> = Vec::with_capacity(valid);
        for (index, m) in envelope.messages.into_iter().enumerate() {
            let message = match m {
                Ok(m) => m,
                Err(p) => {
                    rejected.push((index, p));
                    continue;
                }
            };
            let hash = dedup::hash_id(&message.message_id);
            if !self.dedup.reserve(hash, received_ms) {
                duplicates += 1;
                continue;
            }
            if let Some(id) = self.suppressed(&message) {
                self.dedup.release(hash);
                rejected.push((
                    index,
                    Problem::new(
                        ErrorCode::Suppressed,
                        format!(
                            "{} {:?} belongs to a person erased with suppression; the message is refused",
                            id.ty.name(),
                            id.value
                        ),
                    ),
                ));
                continue;
            }
            let resolution = if message.kind == EventKind::Alias {
                self.grid.registry.resolve_alias(
                    message.user_id.as_deref().unwrap_or_default(),
                    message.previous_id.as_deref().unwrap_or_default(),
                    received_ms,
                )
            } else {
                self.grid.registry.resolve(&message.identities, received_ms)
            };
            let resolution = match resolution {
                Ok(r) => r,
                Err(ResolveError::NoUsableIdentity) => {
                    self.dedup.release(hash);
                    rejected.push((
                        index,
                        Problem::new(
                            ErrorCode::MissingId,
                            "no identity of the message can be linked within the identity limits",
                        ),
                    ));
                    continue;
                }
            };
            if resolution.conflict {
                metrics::counter!("user360_identity_conflicts_total").increment(1);
                tracing::info!(message_id = %message.message_id, profile = %resolution.profile, "message names identities of two profiles; applied to the profile of its highest-priority identity");
            }
            if resolution.refused {
                metrics::counter!("user360_links_refused_total", "reason" => "limit").increment(1);
                tracing::info!(message_id = %message.message_id, profile = %resolution.profile, "alias refused: linking would break an identity limit");
            }
            if resolution.dropped > 0 {
                metrics::counter!("user360_identities_dropped_total")
                    .increment(resolution.dropped as u64);
                tracing::info!(message_id = %message.message_id, profile = %resolution.profile, dropped = resolution.dropped, "identities left unlinked to respect identity limits");
            }
            if !resolution.merged.is_empty() {
                tracing::info!(message_id = %message.message_id, survivor = %resolution.profile, absorbed = ?resolution.merged, "merging profiles");
            }
            let note = refusal_note(&message, &resolution, received_ms);
            reserved.push((index, hash));
            items.push(ApplyItem {
                index,
                message,
                resolution,
                note,
            });
        }
        let mut accepted = 0;
        if !items.is_empty() {
            let results = self.grid.apply(items).await;
            for ((index, result), (_, hash)) in results.into_iter().zip(reserved) {
                match result {
                    Ok(()) => accepted += 1,
                    Err(p) => {
                        self.dedup.release(hash);
                        if p.code == ErrorCode::Unavailable {
                            // Nothing of a request is acknowledged if it could not be persisted.
                            return Err(p);
                        }
                        rejected.push((index, p));
                    }
                }
            }
        }
        rejected.sort_by_key(|(i, _)| *i);
        metrics::counter!("user360_ingest_messages_total", "outcome" => "accepted")
            .increment(accepted as u64);
        metrics::counter!("user360_ingest_messages_total", "outcome" => "duplicate")
            .increment(duplicates as u64);
        for (_, p) in &rejected {
            metrics::counter!("user360_ingest_rejected_total", "reason" => p.code.as_str())
                .increment(1);
        }
        let suppressed_only = rejected
            .iter()
            .all(|(_, p)| p.code == ErrorCode::Suppressed);
        if let (Endpoint::Single(_), false) = (endpoint, suppressed_only) {
            if let Some((_, p)) = rejected.into_iter().next() {
                return Err(p);
            }
            return Ok(IngestAnswer {
                success: true,
                accepted,
                duplicates,
                rejected: Vec::new(),
            });
        }
        debug_assert_eq!(accepted + duplicates + rejected.len(), total);
        Ok(IngestAnswer {
            success: true,
            accepted,
            duplicates,
            rejected: rejected
                .into_iter()
                .map(|(index, p)| Rejected {
                    index,
                    code: p.code.as_str(),
                    message: p.message,
                })
                .collect(),
        })
    }
}
