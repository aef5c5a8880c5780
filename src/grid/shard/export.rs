//! The shard's part of export and import: rendering slices of profiles in id order (each
//! row in one step, so it is consistent), listing events to export, and applying import
//! rows like `PATCH`.

use std::sync::Arc;

use actix::{Handler, Message as ActixMessage};
use tokio::sync::oneshot;

use super::{EventFilter, Shard};
use crate::domain::ids::ProfileId;
use crate::error::Problem;
use crate::export::{csv_cells, jsonl_fields};
use crate::grid::export::{ProfileFormat, Row};
use crate::segment::compile::SegIdx;

/// A slice of events to export: (last profile visited, whether the shard is done,
/// (profile, log position) pairs).
pub type EventSlice = (Option<ProfileId>, bool, Vec<(ProfileId, u64)>);

/// Profiles per export slice.
pub const EXPORT_SLICE: usize = 1024;

/// The next slice of a shard's profiles for an export, rendered in one step.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ExportSlice {
    /// Only ids greater than this.
    pub after: Option<ProfileId>,
    /// Only members of this segment.
    pub segment: Option<SegIdx>,
    /// How rows are rendered.
    pub format: Arc<ProfileFormat>,
    /// The rows, in id order (fewer than the slice size: the shard is done).
    pub reply: oneshot::Sender<Vec<(ProfileId, Row)>>,
}

impl Handler<ExportSlice> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ExportSlice, _: &mut Self::Context) {
        // One CSV writer for the slice; each record is taken out of its sink as written.
        let sink = RecordSink::default();
        let csv = std::cell::RefCell::new(
            csv::WriterBuilder::new()
                .terminator(csv::Terminator::CRLF)
                .from_writer(sink.clone()),
        );
        let line = |mut text: String| -> Row {
            text.push('\n');
            text.into_bytes()
        };
        let rows = self.export_rows(
            msg.after,
            msg.segment,
            EXPORT_SLICE,
            |p, render| match &*msg.format {
                ProfileFormat::Jsonl(None) => line(render(p)),
                ProfileFormat::Jsonl(Some(fields)) => line(jsonl_fields(p, fields)),
                ProfileFormat::Csv(cols) => {
                    let mut w = csv.borrow_mut();
                    // Writing to a Vec cannot fail.
                    let _ = w.write_record(csv_cells(p, cols));
                    let _ = w.flush();
                    std::mem::take(&mut *sink.0.borrow_mut())
                }
            },
        );
        let _ = msg.reply.send(rows);
    }
}

/// Where a slice's CSV writer puts each record, to be taken out row by row.
#[derive(Default, Clone)]
struct RecordSink(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl std::io::Write for RecordSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The events of the next slice of a shard's profiles (profile by profile, each oldest
/// first), as log positions to read.
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ExportEventsSlice {
    /// Only profiles with ids greater than this.
    pub after: Option<ProfileId>,
    /// Only members of this segment.
    pub segment: Option<SegIdx>,
    /// Which events.
    pub filter: EventFilter,
    /// (last profile of the slice, whether the shard is done, (profile, position) pairs).
    pub reply: oneshot::Sender<EventSlice>,
}

impl Handler<ExportEventsSlice> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ExportEventsSlice, _: &mut Self::Context) {
        let (last, done, hits) = self.export_event_refs(msg.after, msg.segment, &msg.filter, 256);
        let _ = msg.reply.send((last, done, hits));
    }
}

/// Per import row (by its index in the batch): applied, or why not.
pub type RowResults = Vec<(usize, Result<(), Problem>)>;

/// Rows to upsert on one shard (already resolved to its profiles).
#[derive(ActixMessage)]
#[rtype(result = "()")]
pub struct ImportRows {
    /// (index in the batch, resolution, traits, merge-list entry of refused links).
    pub rows: Vec<crate::grid::export::ImportItem>,
    /// Nested traits are merged into what the profile holds (CSV: one cell per leaf, and
    /// an empty cell leaves its leaf), not put in place whole (JSONL: the whole value).
    pub merge_nested: bool,
    /// Per row: applied or why not; answered once durable.
    pub reply: oneshot::Sender<RowResults>,
}

impl Handler<ImportRows> for Shard {
    type Result = ();

    fn handle(&mut self, msg: ImportRows, _: &mut Self::Context) {
        let now = self.ctx.clock.now_ms();
        let mut out = Vec::with_capacity(msg.rows.len());
        for (i, resolution, mut traits, note) in msg.rows {
            if msg.merge_nested
                && let Some(p) = self.profiles.get(&resolution.profile)
            {
                merge_nested(p, &mut traits);
            }
            let r = self.apply_patch(resolution, &traits, note, now);
            out.push((i, r));
        }
        let reply = msg.reply;
        self.commit_then(move |durable| {
            let out = match durable {
                Ok(()) => out,
                Err(p) => out
                    .into_iter()
                    .map(|(i, r)| (i, r.and(Err(p.clone()))))
                    .collect(),
            };
            let _ = reply.send(out);
        });
    }
}

/// Turns each object-valued trait of `traits` into the profile's current object with those
/// leaves set (the patch logged is the merged value, so replay needs no profile state).
fn merge_nested(
    profile: &crate::domain::profile::Profile,
    traits: &mut serde_json::Map<String, serde_json::Value>,
) {
    use crate::domain::value::trait_keys;
    for (key, value) in traits.iter_mut() {
        if !value.is_object() {
            continue;
        }
        let Some(serde_json::Value::Object(mut current)) = trait_keys()
            .lookup(key)
            .and_then(|k| profile.trait_value(k))
            .map(|v| v.to_json())
        else {
            continue;
        };
        if let serde_json::Value::Object(patch) = std::mem::take(value) {
            merge_object(&mut current, patch);
        }
        *value = serde_json::Value::Object(current);
    }
}

/// Sets every leaf of `patch` in `base`, descending where both hold objects.
fn merge_object(
    base: &mut serde_json::Map<String, serde_json::Value>,
    patch: serde_json::Map<String, serde_json::Value>,
) {
    for (k, v) in patch {
        match (base.get_mut(&k), v) {
            (Some(serde_json::Value::Object(b)), serde_json::Value::Object(p)) => {
                merge_object(b, p)
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::merge_object;
    use serde_json::json;

    #[test]
    fn nested_leaves_merge_into_what_is_there() {
        let mut base =
            json!({"city": "Paris", "zip": "75001", "geo": {"lat": 1, "lon": 2}, "n": 1})
                .as_object()
                .unwrap()
                .clone();
        let patch = json!({"city": "Lyon", "geo": {"lat": 5}, "n": {"x": 1}})
            .as_object()
            .unwrap()
            .clone();
        merge_object(&mut base, patch);
        assert_eq!(
            serde_json::Value::Object(base),
            json!({"city": "Lyon", "zip": "75001", "geo": {"lat": 5, "lon": 2}, "n": {"x": 1}})
        );
    }
}
