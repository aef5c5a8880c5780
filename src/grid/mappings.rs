//! Mappings as a service: definitions (create, list, get, delete) kept with the segment
//! definitions and compiled into the rule set every shard applies, plus the mappings file
//! (`mappings_file`, default `config/mappings.toml`) loaded at start.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::Grid;
use super::membership::Reason;
use super::segments::Edit;
use crate::error::{ErrorCode, Problem};
use crate::segment::mapping::{Mapping, mapping_object};
use crate::segment::set::{Definitions, MappingDef};
use crate::segment::timefmt::format_ms;

/// What each mapping did since the server started: how often it applied, how many of its
/// paths were missing from a message, and which updates it could not apply (with the last
/// reason), so a mapping that quietly does nothing can be seen (`GET /v1/mappings/{id}/stats`).
/// Shards record into it in the event's step (only for events some mapping names); replay
/// does not count.
#[derive(Default)]
pub struct MappingStats {
    by_id: dashmap::DashMap<String, Counters>,
}

#[derive(Default, Clone)]
struct Counters {
    applied: u64,
    missing_paths: u64,
    ignored_late: u64,
    skipped: u64,
    last_skipped: Option<(i64, crate::domain::ids::ProfileId, String, String)>,
    last_warned_ms: i64,
}

/// How often a mapping's skipped updates are logged (they are all counted).
const WARN_EVERY_MS: i64 = 60_000;

impl MappingStats {
    /// Records one message's outcome for a mapping whose conditions held.
    pub fn record(
        &self,
        mapping: &str,
        profile: crate::domain::ids::ProfileId,
        changed: bool,
        missing: u64,
        skipped: &[crate::domain::profile::SkippedUpdate],
        now: i64,
    ) {
        // The id is copied only the first time (this runs for every mapped event).
        let mut c = match self.by_id.get_mut(mapping) {
            Some(c) => c,
            None => self.by_id.entry(mapping.to_owned()).or_default(),
        };
        c.applied += u64::from(changed);
        c.missing_paths += missing;
        let late = skipped.iter().filter(|s| s.late).count() as u64;
        c.ignored_late += late;
        if let Some(last) = skipped.iter().rev().find(|s| !s.late) {
            c.skipped += skipped.len() as u64 - late;
            c.last_skipped = Some((now, profile, last.key.clone(), last.reason.clone()));
            if now - c.last_warned_ms >= WARN_EVERY_MS {
                c.last_warned_ms = now;
                tracing::warn!(
                    mapping,
                    profile = %profile,
                    skipped = skipped.len(),
                    reason = %last.reason,
                    "a mapping could not apply updates (counted in GET /v1/mappings/{{id}}/stats)"
                );
            }
        }
    }

    /// The counters of a mapping as the API shows them.
    pub fn json(&self, mapping: &str) -> Value {
        let c = self
            .by_id
            .get(mapping)
            .map(|c| c.clone())
            .unwrap_or_default();
        serde_json::json!({
            "id": mapping,
            "applied": c.applied,
            "missing_paths": c.missing_paths,
            "ignored_late_sets": c.ignored_late,
            "skipped_updates": c.skipped,
            "last_skipped": c.last_skipped.map(|(at, profile, key, reason)| serde_json::json!({
                "at": format_ms(at),
                "profile_id": profile.to_string(),
                "trait": key,
                "reason": reason,
            })),
        })
    }

    /// Forgets a deleted mapping's counters.
    pub fn forget(&self, mapping: &str) {
        self.by_id.remove(mapping);
    }
}

fn mapping_json(m: &MappingDef) -> Value {
    mapping_object(&m.body, &m.id, &format_ms(m.created_at))
}

/// Validates a mapping body; answers its id and the body without `id`. A `set` of a
/// value that no profile could hold (larger than `max_trait_bytes`) is refused here rather
/// than skipped at every event.
fn parse_body(
    body: &Value,
    (max_trait_bytes, max_depth): (usize, usize),
) -> Result<(String, Map<String, Value>), Problem> {
    let Some(obj) = body.as_object() else {
        return Err(Problem::at(
            ErrorCode::InvalidField,
            "",
            "a mapping must be a JSON object with \"event\" and \"actions\"",
        ));
    };
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
            return Err(Problem::at(
                ErrorCode::InvalidRule,
                "id",
                format!(
                    "a mapping id is 1 to 64 letters, digits, '_', '-' or '.'; got {}",
                    crate::segment::cond::show(other)
                ),
            ));
        }
    };
    let m = Mapping::parse(body, &id)
        .map_err(|e| Problem::at(ErrorCode::InvalidRule, e.path, e.message))?;
    for (i, a) in m.actions.iter().enumerate() {
        if let crate::segment::mapping::Action::SetValue(k, v) = a {
            let text = v.to_string();
            let bytes = k.len() + text.len() + 4;
            // A trait value sits one level below the traits object, as in a PATCH body.
            if let Err(e) =
                crate::ingest::scan::check_value(text.as_bytes(), max_depth.saturating_sub(1))
            {
                return Err(Problem::at(
                    ErrorCode::TooDeep,
                    format!("actions[{i}].value"),
                    format!("the value of {k:?} cannot be a trait: {e}"),
                ));
            }
            if bytes > max_trait_bytes {
                return Err(Problem::at(
                    ErrorCode::InvalidRule,
                    format!("actions[{i}].value"),
                    format!(
                        "the value of {k:?} takes {bytes} bytes as JSON, more than a profile's \
                         traits may hold ({max_trait_bytes})"
                    ),
                ));
            }
        }
    }
    let mut body = obj.clone();
    body.remove("id");
    body.remove("created_at");
    Ok((id, body))
}

/// Adds (or, from the file, replaces) a mapping in `defs`.
fn upsert(defs: &mut Definitions, id: String, body: Map<String, Value>, now: i64, from_file: bool) {
    if let Some(m) = defs.mappings.iter_mut().find(|m| m.id == id) {
        if m.body != body {
            m.body = body;
            m.from_file = from_file;
        }
        return;
    }
    let idx = defs.next_mapping;
    defs.next_mapping += 1;
    defs.mappings.push(MappingDef {
        idx,
        id,
        body,
        created_at: now,
        from_file,
    });
}

/// Reads the mappings file: `[[mappings]]` tables, each a mapping body (with `id`).
pub fn read_file(path: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    use figment::Figment;
    use figment::providers::{Format, Toml};
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        mappings: Vec<Value>,
    }
    let f: File = Figment::from(Toml::file(path))
        .extract()
        .map_err(|e| anyhow::anyhow!("cannot read the mappings file {}: {e}", path.display()))?;
    Ok(f.mappings)
}

/// A mapping of the mappings file, validated: its id and its body without `id`.
pub type FileMapping = (String, Map<String, Value>);

/// Reads and validates the mappings file (once, at start, before anything listens): every
/// mapping with its id and body. An error names the file, the mapping (its id and place)
/// and the path of the problem in it.
pub fn check_file(
    path: &std::path::Path,
    (max_trait_bytes, max_depth): (usize, usize),
) -> anyhow::Result<Vec<FileMapping>> {
    let entries = read_file(path)?;
    let mut parsed = Vec::with_capacity(entries.len());
    for (i, v) in entries.iter().enumerate() {
        let Some(id) = v.get("id").and_then(Value::as_str) else {
            anyhow::bail!(
                "mappings file {}: [[mappings]] table {} needs an \"id\"",
                path.display(),
                i + 1
            );
        };
        let (id, body) = parse_body(v, (max_trait_bytes, max_depth)).map_err(|p| {
            let at = match p.path.as_deref() {
                Some(a) if !a.is_empty() => format!(" (at {a})"),
                _ => String::new(),
            };
            anyhow::anyhow!(
                "mappings file {}: mapping {id:?} ([[mappings]] table {}): {}{at}",
                path.display(),
                i + 1,
                p.message,
            )
        })?;
        parsed.push((id, body));
    }
    Ok(parsed)
}

impl Grid {
    /// Folds the mappings file's mappings (validated by [`check_file`]) into the
    /// definitions; called once at start, before the rules are installed.
    pub(crate) fn load_mapping_file(&self, parsed: Vec<FileMapping>) -> anyhow::Result<usize> {
        let now = self.clock.now_ms();
        let n = parsed.len();
        if n > 0 {
            self.segments.edit_offline(|defs| {
                for (id, body) in parsed {
                    upsert(defs, id, body, now, true);
                }
            })?;
        }
        Ok(n)
    }

    /// `POST /v1/mappings`.
    pub async fn create_mapping(self: &Arc<Self>, body: &Value) -> Result<Value, Problem> {
        let (id, body) = parse_body(
            body,
            (
                self.settings.ingest.max_trait_bytes,
                self.settings.ingest.max_depth,
            ),
        )?;
        let now = self.clock.now_ms();
        let (defs, _) = self
            .edit(
                |defs| {
                    if defs.mapping(&id).is_some() {
                        return Err(Problem::at(
                            ErrorCode::Conflict,
                            "id",
                            format!("a mapping with the id {id:?} already exists"),
                        ));
                    }
                    upsert(defs, id.clone(), body, now, false);
                    Ok(Edit::default())
                },
                Reason::Rule,
            )
            .await?;
        Ok(mapping_json(defs.mapping(&id).expect("created")))
    }

    /// `DELETE /v1/mappings/{id}`.
    pub async fn delete_mapping(self: &Arc<Self>, id: &str) -> Result<(), Problem> {
        self.edit(
            |defs| {
                let Some(pos) = defs.mappings.iter().position(|m| m.id == id) else {
                    return Err(Problem::new(
                        ErrorCode::NotFound,
                        format!("no mapping has the id {id:?}"),
                    ));
                };
                defs.mappings.remove(pos);
                Ok(Edit::default())
            },
            Reason::Rule,
        )
        .await?;
        self.mapping_stats.forget(id);
        Ok(())
    }

    /// `GET /v1/mappings/{id}/stats`.
    pub fn mapping_stats(&self, id: &str) -> Option<Value> {
        self.segments
            .definitions()
            .mapping(id)
            .map(|_| self.mapping_stats.json(id))
    }

    /// `GET /v1/mappings/{id}`.
    pub fn mapping(&self, id: &str) -> Option<Value> {
        self.segments.definitions().mapping(id).map(mapping_json)
    }

    /// `GET /v1/mappings`: in the order they apply (creation order), after `after`.
    pub fn list_mappings(&self, after: Option<&str>, limit: usize) -> (Vec<Value>, Option<String>) {
        let defs = self.segments.definitions();
        let start = match after {
            Some(a) => defs
                .mappings
                .iter()
                .position(|m| m.id == a)
                .map_or(defs.mappings.len(), |p| p + 1),
            None => 0,
        };
        let page: Vec<&MappingDef> = defs.mappings.iter().skip(start).take(limit + 1).collect();
        let more = page.len() > limit;
        let page = &page[..page.len().min(limit)];
        let next = if more {
            page.last().map(|m| m.id.clone())
        } else {
            None
        };
        (page.iter().map(|m| mapping_json(m)).collect(), next)
    }
}
