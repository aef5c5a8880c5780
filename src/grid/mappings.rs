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

fn mapping_json(m: &MappingDef) -> Value {
    mapping_object(&m.body, &m.id, &format_ms(m.created_at))
}

/// Validates a mapping body; answers its id and the body without `id`.
fn parse_body(body: &Value) -> Result<(String, Map<String, Value>), Problem> {
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
    Mapping::parse(body, &id)
        .map_err(|e| Problem::at(ErrorCode::InvalidRule, e.path, e.message))?;
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

impl Grid {
    /// Folds the mappings file's mappings into the definitions (called once at start, before
    /// the rules are installed); an invalid mapping in the file stops the start.
    pub(crate) fn load_mapping_file(&self, entries: Vec<Value>) -> anyhow::Result<usize> {
        let now = self.clock.now_ms();
        let mut parsed = Vec::with_capacity(entries.len());
        for (i, v) in entries.iter().enumerate() {
            if v.get("id").and_then(Value::as_str).is_none() {
                anyhow::bail!("mapping {} of the mappings file needs an \"id\"", i + 1);
            }
            let (id, body) = parse_body(v).map_err(|p| {
                anyhow::anyhow!(
                    "mapping {} of the mappings file: {} ({})",
                    i + 1,
                    p.message,
                    p.path.unwrap_or_default()
                )
            })?;
            parsed.push((id, body));
        }
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
        let (id, body) = parse_body(body)?;
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
        Ok(())
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
