//! A validated incoming message, ready to route: the Segment fields the server uses, with
//! ids as text, corrected times and the identities it carries in priority-rule order.
//!
//! Produced by `ingest::parse`; consumed by the registry (identities) and the shard (apply).

use super::event::EventKind;
use super::identity::Identity;

/// One accepted message (or a standard event) on its way to a profile.
#[derive(Debug, Clone)]
pub struct Message {
    /// Kind of call.
    pub kind: EventKind,
    /// `messageId` (server-generated when absent).
    pub message_id: String,
    /// `userId` as text.
    pub user_id: Option<String>,
    /// `anonymousId` as text.
    pub anonymous_id: Option<String>,
    /// `previousId` (alias).
    pub previous_id: Option<String>,
    /// `groupId` (group).
    pub group_id: Option<String>,
    /// Event name: `event` of track, `Page Viewed`/`Screen Viewed` for page/screen.
    pub event: Option<String>,
    /// Page/screen name.
    pub name: Option<String>,
    /// Page/screen category.
    pub category: Option<String>,
    /// Properties as sent (page/screen: with name and category copied in).
    pub properties: Option<serde_json::Value>,
    /// Traits shown on the event: for identify the effective traits (context.traits
    /// overlaid by traits); for group the group's traits.
    pub traits: Option<serde_json::Value>,
    /// Context (batch context merged under the message's own).
    pub context: Option<serde_json::Value>,
    /// Corrected event time.
    pub timestamp_ms: i64,
    /// Receive time.
    pub received_ms: i64,
    /// Identities in message order (normalised, blocked values removed).
    pub identities: Vec<Identity>,
}

impl Message {
    /// The trait updates this message makes to its profile (identify only).
    pub fn trait_updates(&self) -> Option<&serde_json::Map<String, serde_json::Value>> {
        if self.kind != EventKind::Identify {
            return None;
        }
        self.traits.as_ref().and_then(|t| t.as_object())
    }
}
