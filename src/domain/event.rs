//! Stored events: their kinds, the compact per-profile index entry, and the JSON form that
//! the log keeps and the API returns.
//!
//! Owns the event's wire shape (`GET /v1/profiles/{key}/events`). Events are rendered to
//! JSON once, when they are accepted; reads return those bytes with `profile_id` spliced in.

use std::sync::OnceLock;

use bincode::{Decode, Encode};
use serde::Serialize;

use super::ids::ProfileId;
use super::value::{Interner, Sym};
use crate::segment::timefmt::format_ms;

/// What kind of call produced an event (`system` for the standard `user.*` events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum EventKind {
    /// `identify`
    Identify,
    /// `track`
    Track,
    /// `page`
    Page,
    /// `screen`
    Screen,
    /// `group`
    Group,
    /// `alias`
    Alias,
    /// Standard events written by the server (`user.created`, `user.updated`, ...).
    System,
}

impl EventKind {
    /// Every kind, indexed by its discriminant.
    pub const ALL: [EventKind; 7] = [
        EventKind::Identify,
        EventKind::Track,
        EventKind::Page,
        EventKind::Screen,
        EventKind::Group,
        EventKind::Alias,
        EventKind::System,
    ];

    /// The `type` string of the API.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Identify => "identify",
            EventKind::Track => "track",
            EventKind::Page => "page",
            EventKind::Screen => "screen",
            EventKind::Group => "group",
            EventKind::Alias => "alias",
            EventKind::System => "system",
        }
    }

    /// Parses a `type` string (message or query filter).
    pub fn parse(s: &str) -> Option<EventKind> {
        Some(match s {
            "identify" => EventKind::Identify,
            "track" => EventKind::Track,
            "page" => EventKind::Page,
            "screen" => EventKind::Screen,
            "group" => EventKind::Group,
            "alias" => EventKind::Alias,
            "system" => EventKind::System,
            _ => return None,
        })
    }
}

/// The event names seen by this process, interned so a profile's index stays small.
pub fn event_names() -> &'static Interner {
    static NAMES: OnceLock<Interner> = OnceLock::new();
    NAMES.get_or_init(Interner::new)
}

/// One entry of a profile's timeline index: enough to filter and order without disk
/// reads, in 32 bytes (the kind rides in the top byte of the sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef {
    /// Event time (corrected), ms since the epoch.
    pub ts_ms: i64,
    /// Accept sequence (low 56 bits) and kind (top 8 bits).
    seq_kind: u64,
    /// Where the record lies in its shard's log (see `store::log::Position`).
    pub pos: u64,
    /// Receive time in whole seconds since the epoch (retention counts from it).
    pub received_s: u32,
    /// Interned event name (`event` of the API).
    pub name: Sym,
}

const SEQ_BITS: u32 = 56;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

impl EventRef {
    /// Builds an entry; `seq` must fit in 56 bits (72 quadrillion events).
    pub fn new(
        ts_ms: i64,
        seq: u64,
        pos: u64,
        received_s: u32,
        name: Sym,
        kind: EventKind,
    ) -> EventRef {
        debug_assert!(seq <= SEQ_MASK);
        EventRef {
            ts_ms,
            seq_kind: (seq & SEQ_MASK) | ((kind as u64) << SEQ_BITS),
            pos,
            received_s,
            name,
        }
    }

    /// Server-wide accept sequence.
    pub fn seq(&self) -> u64 {
        self.seq_kind & SEQ_MASK
    }

    /// Kind of call.
    pub fn kind(&self) -> EventKind {
        EventKind::ALL[(self.seq_kind >> SEQ_BITS) as usize]
    }

    /// Order of timelines: (timestamp, seq).
    pub fn key(&self) -> (i64, u64) {
        (self.ts_ms, self.seq())
    }
}

/// The event as the API shows it; rendered once at accept time and stored in the log.
#[derive(Debug, Serialize)]
pub struct EventOut<'a> {
    /// `messageId` (server-generated when absent).
    pub message_id: &'a str,
    /// Server-wide accept sequence.
    pub seq: u64,
    /// Kind of call.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Event name (`Page Viewed` for pages).
    pub event: Option<&'a str>,
    /// Page/screen name.
    pub name: Option<&'a str>,
    /// Page/screen category.
    pub category: Option<&'a str>,
    /// Properties as sent (plus page name/category).
    pub properties: Option<&'a serde_json::Value>,
    /// Traits carried by the call.
    pub traits: Option<&'a serde_json::Value>,
    /// Context as sent (batch context merged under it).
    pub context: Option<&'a serde_json::Value>,
    /// userId as sent (numbers as their JSON text).
    pub user_id: Option<&'a str>,
    /// anonymousId as sent.
    pub anonymous_id: Option<&'a str>,
    /// groupId (group calls).
    pub group_id: Option<&'a str>,
    /// previousId (alias calls).
    pub previous_id: Option<&'a str>,
    /// Corrected event time.
    pub timestamp: String,
    /// When the server received it.
    pub received_at: String,
}

/// Adds `"profile_id":"…"` at the front of a stored event's JSON object.
pub fn with_profile_id(json: &str, profile: ProfileId) -> String {
    let mut out = String::with_capacity(json.len() + 48);
    out.push_str("{\"profile_id\":\"");
    out.push_str(&profile.to_string());
    out.push('"');
    if json.len() > 2 {
        out.push(',');
    }
    out.push_str(&json[1..]);
    out
}

/// Appends `s` as a JSON string (quoted and escaped) to `out`.
pub fn push_json_str(out: &mut String, s: &str) {
    let mut buf = Vec::with_capacity(s.len() + 2);
    let _ = serde_json::to_writer(&mut buf, s);
    // serde_json writes valid UTF-8.
    out.push_str(std::str::from_utf8(&buf).unwrap_or("\"\""));
}

/// Formats a time for an event.
pub fn ts(ms: i64) -> String {
    format_ms(ms)
}
