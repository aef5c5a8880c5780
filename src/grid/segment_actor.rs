//! Segment actors: one tokio task per segment, fed the segment's membership changes once
//! they are durable. A segment actor owns the segment's change stream — the last
//! `stream.buffer` changes, for resuming readers — and its live listeners; shards own the
//! memberships themselves (they are decided where the profile's data is) and the member
//! counts (atomics shared with the compiled rules).
//!
//! A tokio task with an unbounded channel rather than an actix actor: its senders are the
//! flusher thread and the hub, outside any actix system, and its work per change is tiny.
//! A listener too slow to keep up is dropped (its channel is bounded), never buffered.

use std::collections::VecDeque;

use tokio::sync::{mpsc, oneshot};

use super::membership::MembershipChanged;
use crate::segment::compile::SegIdx;

/// How many changes a listener may fall behind before it is dropped.
pub const LISTENER_QUEUE: usize = 1024;

/// What a listener receives.
#[derive(Debug, Clone)]
pub enum StreamItem {
    /// A change, in the order the segment actor received it.
    Change(MembershipChanged),
    /// The listener asked to resume from a change no longer buffered: start over.
    Reset,
}

/// A new listener's start: the buffered changes after the one it saw last, then live ones.
pub struct Listener {
    /// Changes to replay first.
    pub backlog: Vec<StreamItem>,
    /// Live changes (closed when the listener falls behind or the segment is deleted).
    pub live: mpsc::Receiver<StreamItem>,
}

enum Msg {
    Changed(Vec<MembershipChanged>),
    Listen {
        after: Option<u64>,
        reply: oneshot::Sender<Listener>,
    },
}

/// Handle on a segment's actor; dropping every handle stops it.
#[derive(Clone)]
pub struct SegmentActor {
    tx: mpsc::UnboundedSender<Msg>,
}

impl SegmentActor {
    /// Starts the actor of segment `idx`, keeping `buffer` changes for resumption.
    pub fn start(idx: SegIdx, buffer: usize) -> SegmentActor {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(idx, buffer.max(1), rx));
        SegmentActor { tx }
    }

    /// Hands over durable changes, in the order they happened.
    pub fn changed(&self, batch: Vec<MembershipChanged>) {
        let _ = self.tx.send(Msg::Changed(batch));
    }

    /// Adds a listener; with `after` (a change sequence it saw), it first gets the
    /// buffered changes after that one, or a reset when that one is no longer buffered.
    pub async fn listen(&self, after: Option<u64>) -> Option<Listener> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Listen { after, reply }).ok()?;
        rx.await.ok()
    }
}

async fn run(idx: SegIdx, buffer: usize, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut recent: VecDeque<MembershipChanged> = VecDeque::with_capacity(buffer.min(1024));
    let mut listeners: Vec<mpsc::Sender<StreamItem>> = Vec::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Changed(batch) => {
                for c in batch {
                    debug_assert_eq!(c.segment, idx);
                    if !listeners.is_empty() {
                        listeners.retain(|l| match l.try_send(StreamItem::Change(c.clone())) {
                            Ok(()) => true,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                tracing::info!(
                                    segment = idx,
                                    "dropping a segment stream listener that fell behind"
                                );
                                false
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => false,
                        });
                    }
                    if recent.len() == buffer {
                        recent.pop_front();
                    }
                    recent.push_back(c);
                }
            }
            Msg::Listen { after, reply } => {
                let backlog = match after {
                    None => Vec::new(),
                    Some(seq) => match recent.iter().position(|c| c.seq == seq) {
                        Some(i) => recent
                            .iter()
                            .skip(i + 1)
                            .cloned()
                            .map(StreamItem::Change)
                            .collect(),
                        None => vec![StreamItem::Reset],
                    },
                };
                let (tx, live) = mpsc::channel(LISTENER_QUEUE);
                listeners.push(tx);
                let _ = reply.send(Listener { backlog, live });
            }
        }
    }
}
