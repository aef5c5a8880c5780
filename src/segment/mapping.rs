//! Event-based updates (mappings): "when a `Plan Changed` event arrives, set `plan`".
//!
//! A mapping names an event, optional property conditions (the rule language's), and
//! actions applied in order: `set` (from a message path or a value), `increment`,
//! `append` (to a list, without duplicates) and `unset`. This module validates mapping
//! JSON (errors carry a path into it) and turns a message into the trait updates a mapping
//! asks for; the shard applies them in the same step as the event.

use serde_json::{Map, Value};

use super::cond::{CondError, PropertyCondition, child_key, parse_conditions, show, show_str};
use super::path::Path;
use super::value_view::{json_eq, lookup};

/// One action of a mapping.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `{"set": TRAIT, "from": PATH}`: the value at a path of the message.
    SetFrom(String, Path),
    /// `{"set": TRAIT, "value": V}`.
    SetValue(String, Value),
    /// `{"increment": TRAIT, "by": N}`.
    Increment(String, f64, bool),
    /// `{"append": TRAIT, "from": PATH}`.
    Append(String, Path),
    /// `{"unset": TRAIT}`.
    Unset(String),
}

/// A validated mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    /// API id.
    pub id: String,
    /// The event name it applies to (`event` of the message).
    pub event: String,
    /// Conditions on the event's `properties`.
    pub where_: Vec<PropertyCondition>,
    /// What it does, in order.
    pub actions: Vec<Action>,
}

/// What a mapping asks for one message: trait updates in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Set (at the event's time; ignored if older than the key's time). `None` unsets.
    Set(String, Option<Value>),
    /// Add to a number (always applies).
    Increment(String, f64, bool),
    /// Add to a list unless present (always applies); the elements to add.
    Append(String, Vec<Value>),
}

fn trait_name(v: &Value, path: &str) -> Result<String, CondError> {
    match v.as_str() {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(CondError::new(
            path,
            format!("a trait name must be a non-empty string; got {}", show(v)),
        )),
    }
}

/// Most actions in one mapping.
pub const MAX_ACTIONS: usize = 256;

/// The fields of a stored message a `from` path may start with: (as stored, as the
/// Tracking API spells it where that differs).
const MESSAGE_FIELDS: &[(&str, Option<&str>)] = &[
    ("properties", None),
    ("traits", None),
    ("context", None),
    ("event", None),
    ("name", None),
    ("category", None),
    ("type", None),
    ("timestamp", None),
    ("received_at", Some("receivedAt")),
    ("user_id", Some("userId")),
    ("anonymous_id", Some("anonymousId")),
    ("group_id", Some("groupId")),
    ("previous_id", Some("previousId")),
    ("message_id", Some("messageId")),
];

/// The stored name of a message field written either way (`userId` → `user_id`).
fn stored_field(name: &str) -> Option<&'static str> {
    MESSAGE_FIELDS
        .iter()
        .find(|(stored, api)| *stored == name || *api == Some(name))
        .map(|(stored, _)| *stored)
}

fn from_path(v: Option<&Value>, path: &str) -> Result<Path, CondError> {
    match v {
        Some(Value::String(s)) => {
            let p = Path::parse(s).map_err(|m| CondError::new(path, m))?;
            if stored_field(&p.segments()[0]).is_none() {
                return Err(CondError::new(
                    path,
                    format!(
                        "{} does not start with a message field; a path starts with one of \
                         {} (e.g. properties.plan)",
                        show_str(s),
                        MESSAGE_FIELDS
                            .iter()
                            .map(|(stored, _)| *stored)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            Ok(p)
        }
        Some(other) => Err(CondError::new(
            path,
            format!(
                "\"from\" must be a path into the message (e.g. properties.plan); got {}",
                show(other)
            ),
        )),
        None => Err(CondError::new(path, "missing \"from\"")),
    }
}

fn parse_action(v: &Value, path: &str) -> Result<Action, CondError> {
    let Some(obj) = v.as_object() else {
        return Err(CondError::new(
            path,
            format!(
                "an action must be an object with set, increment, append or unset; got {}",
                show(v)
            ),
        ));
    };
    let kinds: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|k| matches!(*k, "set" | "increment" | "append" | "unset"))
        .collect();
    let kind = match kinds.as_slice() {
        [one] => *one,
        [] => {
            return Err(CondError::new(
                path,
                format!(
                    "an action needs one of set, increment, append or unset; got keys {}",
                    show(&Value::from(obj.keys().cloned().collect::<Vec<_>>()))
                ),
            ));
        }
        several => {
            return Err(CondError::new(
                path,
                format!(
                    "an action has exactly one of set, increment, append or unset; got {}",
                    several.join(" and ")
                ),
            ));
        }
    };
    let allowed: &[&str] = match kind {
        "set" => &["from", "value"],
        "increment" => &["by"],
        "append" => &["from"],
        _ => &[],
    };
    if let Some(k) = obj
        .keys()
        .find(|k| k.as_str() != kind && !allowed.contains(&k.as_str()))
    {
        return Err(CondError::new(
            child_key(path, k),
            format!("unknown key {} in a {kind} action", show_str(k)),
        ));
    }
    let name = trait_name(&obj[kind], &child_key(path, kind))?;
    Ok(match kind {
        "set" => match (obj.get("from"), obj.get("value")) {
            (Some(_), Some(_)) => {
                return Err(CondError::new(
                    path,
                    "a set action takes either \"from\" or \"value\", not both",
                ));
            }
            (Some(_), None) => {
                Action::SetFrom(name, from_path(obj.get("from"), &child_key(path, "from"))?)
            }
            (None, Some(v)) => Action::SetValue(name, v.clone()),
            (None, None) => {
                return Err(CondError::new(
                    path,
                    "a set action needs \"from\" (a message path) or \"value\"",
                ));
            }
        },
        "increment" => {
            let by_path = child_key(path, "by");
            let by = match obj.get("by") {
                None => {
                    return Err(CondError::new(
                        by_path,
                        "an increment action needs \"by\": the number to add (e.g. 1)",
                    ));
                }
                Some(v) => v.clone(),
            };
            match by.as_f64().filter(|f| f.is_finite()) {
                Some(f) => Action::Increment(name, f, by.is_i64() || by.is_u64()),
                None => {
                    return Err(CondError::new(
                        by_path,
                        format!("\"by\" must be a number; got {}", show(&by)),
                    ));
                }
            }
        }
        "append" => Action::Append(name, from_path(obj.get("from"), &child_key(path, "from"))?),
        _ => Action::Unset(name),
    })
}

impl Mapping {
    /// Validates a mapping body `{"id"?, "event", "where"?, "actions"}` (`id` given
    /// separately); errors point into the body.
    pub fn parse(v: &Value, id: &str) -> Result<Mapping, CondError> {
        let Some(obj) = v.as_object() else {
            return Err(CondError::new(
                "",
                format!(
                    "a mapping must be an object with \"event\" and \"actions\"; got {}",
                    show(v)
                ),
            ));
        };
        if let Some(k) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "id" | "event" | "where" | "actions"))
        {
            return Err(CondError::new(
                k.as_str(),
                format!(
                    "unknown key {} in a mapping; expected id, event, where, actions",
                    show_str(k)
                ),
            ));
        }
        let event = match obj.get("event") {
            Some(Value::String(e)) if !e.trim().is_empty() => e.clone(),
            other => {
                return Err(CondError::new(
                    "event",
                    format!(
                        "\"event\" must be an event name; got {}",
                        other.map(show).unwrap_or_else(|| "nothing".into())
                    ),
                ));
            }
        };
        if event.starts_with("user.") || event.starts_with("segment.") {
            return Err(CondError::new(
                "event",
                format!(
                    "mappings never run on standard events (no loops); got {}",
                    show_str(&event)
                ),
            ));
        }
        let where_ = match obj.get("where") {
            None | Some(Value::Null) => Vec::new(),
            Some(w) => parse_conditions(w, "where")?,
        };
        let actions = match obj.get("actions") {
            Some(Value::Array(items)) if items.len() > MAX_ACTIONS => {
                return Err(CondError::new(
                    "actions",
                    format!(
                        "a mapping has at most {MAX_ACTIONS} actions; got {}",
                        items.len()
                    ),
                ));
            }
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(i, a)| parse_action(a, &format!("actions[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
            other => {
                return Err(CondError::new(
                    "actions",
                    format!(
                        "\"actions\" must be a non-empty list; got {}",
                        other.map(show).unwrap_or_else(|| "nothing".into())
                    ),
                ));
            }
        };
        Ok(Mapping {
            id: id.to_owned(),
            event,
            where_,
            actions,
        })
    }

    /// The updates this mapping asks for `message` (the stored event object), and how many
    /// actions found nothing at their path. None when its conditions do not hold.
    pub fn updates(&self, message: &Value, now_ms: i64) -> Option<(Vec<Update>, u64)> {
        if !self
            .where_
            .iter()
            .all(|c| c.matches(message.get("properties"), now_ms))
        {
            return None;
        }
        let mut out = Vec::with_capacity(self.actions.len());
        let mut missing = 0;
        for a in &self.actions {
            match a {
                Action::SetFrom(k, p) => match lookup_message(message, p) {
                    Some(v) => out.push(Update::Set(k.clone(), (!v.is_null()).then(|| v.clone()))),
                    None => missing += 1,
                },
                Action::SetValue(k, v) => {
                    out.push(Update::Set(k.clone(), (!v.is_null()).then(|| v.clone())))
                }
                Action::Increment(k, by, int) => out.push(Update::Increment(k.clone(), *by, *int)),
                Action::Append(k, p) => match lookup_message(message, p) {
                    Some(Value::Array(items)) => out.push(Update::Append(k.clone(), items.clone())),
                    Some(Value::Null) | None => missing += 1,
                    Some(v) => out.push(Update::Append(k.clone(), vec![v.clone()])),
                },
                Action::Unset(k) => out.push(Update::Set(k.clone(), None)),
            }
        }
        Some((out, missing))
    }
}

/// Looks a path up in a stored event, where message field names may be written as the
/// Tracking API spells them (`userId`) or as stored (`user_id`).
fn lookup_message<'a>(message: &'a Value, p: &Path) -> Option<&'a Value> {
    let segs = p.segments();
    // Mappings made before `from` roots were checked may name other fields: as written.
    let first = stored_field(&segs[0]).unwrap_or(&segs[0]);
    let top = message.get(first)?;
    if segs.len() == 1 {
        return Some(top);
    }
    lookup(top, &Path::from_segments(segs[1..].to_vec()))
}

/// The new value of an `increment`: a number plus `by` (integers stay integers); None when
/// the current value is not a number.
pub fn incremented(current: Option<&Value>, by: f64, int: bool) -> Option<Value> {
    match current {
        None | Some(Value::Null) => Some(if int {
            Value::from(by as i64)
        } else {
            serde_json::Number::from_f64(by).map(Value::Number)?
        }),
        Some(Value::Number(n)) => {
            if int && let Some(i) = n.as_i64() {
                return Some(Value::from(i.saturating_add(by as i64)));
            }
            serde_json::Number::from_f64(n.as_f64()? + by).map(Value::Number)
        }
        Some(_) => None,
    }
}

/// The new value of an `append`: the list plus the elements it lacks; None when the current
/// value is not a list.
pub fn appended(current: Option<&Value>, items: &[Value]) -> Option<Value> {
    let mut list = match current {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return None,
    };
    for it in items {
        if !list.iter().any(|x| json_eq(x, it)) {
            list.push(it.clone());
        }
    }
    Some(Value::Array(list))
}

/// The mappings a shard applies (in order), as logged in its install records.
#[derive(Debug, Clone, Default)]
pub struct MappingSet {
    /// (index, mapping, body as sent), in the order they apply.
    pub list: Vec<(u32, std::sync::Arc<Mapping>, Value)>,
}

impl MappingSet {
    /// The mappings of an event name, in order.
    pub fn for_event<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Mapping> + 'a {
        self.list
            .iter()
            .map(|(_, m, _)| &**m)
            .filter(move |m| m.event == name)
    }

    /// Whether any mapping applies to this event name.
    pub fn has(&self, name: &str) -> bool {
        self.list.iter().any(|(_, m, _)| m.event == name)
    }

    /// Whether both sets apply the same mappings, bodies included (the mappings file can
    /// change a mapping's body under the same index).
    pub fn same_as(&self, other: &MappingSet) -> bool {
        self.list.len() == other.list.len()
            && self
                .list
                .iter()
                .zip(&other.list)
                .all(|((a, _, ab), (b, _, bb))| a == b && ab == bb)
    }

    /// The stored form: `[[index, id, body], ...]`.
    pub fn to_json(&self) -> String {
        let v: Vec<Value> = self
            .list
            .iter()
            .map(|(i, m, b)| serde_json::json!([i, m.id, b]))
            .collect();
        Value::Array(v).to_string()
    }

    /// From the stored form (mappings that no longer validate are dropped, logged).
    pub fn from_json(s: &str) -> MappingSet {
        let mut set = MappingSet::default();
        let Ok(Value::Array(items)) = serde_json::from_str::<Value>(s) else {
            return set;
        };
        for it in items {
            let (Some(i), Some(id), Some(body)) = (it[0].as_u64(), it[1].as_str(), it.get(2))
            else {
                continue;
            };
            match Mapping::parse(body, id) {
                Ok(m) => set
                    .list
                    .push((i as u32, std::sync::Arc::new(m), body.clone())),
                Err(e) => {
                    tracing::error!(mapping = id, error = %e, "a logged mapping no longer validates")
                }
            }
        }
        set
    }
}

/// A mapping's API object: the object as sent, plus `id` and `created_at`.
pub fn mapping_object(body: &Map<String, Value>, id: &str, created_at: &str) -> Value {
    let mut m = body.clone();
    m.insert("id".into(), Value::from(id));
    m.insert("created_at".into(), Value::from(created_at));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(v: Value) -> Mapping {
        Mapping::parse(&v, "m").unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    #[test]
    fn updates_follow_the_actions_in_order() {
        let map = m(
            json!({"event": "Plan Changed", "where": [{"property": "plan", "op": "exists"}],
            "actions": [{"set": "plan", "from": "properties.plan"}, {"set": "source", "value": "billing"},
                        {"increment": "plan_changes", "by": 1}, {"append": "plans", "from": "properties.plan"},
                        {"unset": "trial"}, {"set": "by", "from": "userId"}, {"set": "x", "from": "properties.nope"}]}),
        );
        let msg = json!({"event": "Plan Changed", "user_id": "u1", "properties": {"plan": "pro"}});
        let (ups, missing) = map.updates(&msg, 0).unwrap();
        assert_eq!(missing, 1);
        assert_eq!(
            ups,
            vec![
                Update::Set("plan".into(), Some(json!("pro"))),
                Update::Set("source".into(), Some(json!("billing"))),
                Update::Increment("plan_changes".into(), 1.0, true),
                Update::Append("plans".into(), vec![json!("pro")]),
                Update::Set("trial".into(), None),
                Update::Set("by".into(), Some(json!("u1"))),
            ]
        );
        assert!(
            map.updates(&json!({"properties": {}}), 0).is_none(),
            "where fails"
        );
    }

    #[test]
    fn increments_and_appends() {
        assert_eq!(incremented(None, 2.0, true), Some(json!(2)));
        assert_eq!(incremented(Some(&json!(5)), 2.0, true), Some(json!(7)));
        assert_eq!(incremented(Some(&json!(1.5)), 1.0, true), Some(json!(2.5)));
        assert_eq!(incremented(Some(&json!("x")), 1.0, true), None);
        assert_eq!(appended(None, &[json!("a")]), Some(json!(["a"])));
        assert_eq!(
            appended(Some(&json!(["a"])), &[json!("a"), json!("b")]),
            Some(json!(["a", "b"]))
        );
        assert_eq!(appended(Some(&json!(3)), &[json!("a")]), None);
    }

    #[test]
    fn errors_point_into_the_mapping() {
        for (v, path) in [
            (
                json!({"event": "E", "actions": [{"set": "a", "from": "properties.x"}, {"sett": "b"}]}),
                "actions[1]",
            ),
            (
                json!({"event": "E", "actions": [{"set": "a", "from": "x"}]}),
                "actions[0].from",
            ),
            (
                json!({"event": "E", "actions": [{"increment": "a"}]}),
                "actions[0].by",
            ),
            (
                json!({"event": "E", "actions": [{"set": "a"}]}),
                "actions[0]",
            ),
            (
                json!({"event": "E", "actions": [{"increment": "a", "by": "x"}]}),
                "actions[0].by",
            ),
            (
                json!({"event": "E", "actions": [{"append": "a", "from": ""}]}),
                "actions[0].from",
            ),
            (
                json!({"event": "E", "actions": [{"unset": "a", "value": 1}]}),
                "actions[0].value",
            ),
            (json!({"event": "E", "actions": []}), "actions"),
            (
                json!({"event": "user.updated", "actions": [{"unset": "a"}]}),
                "event",
            ),
            (json!({"actions": [{"unset": "a"}]}), "event"),
            (
                json!({"event": "E", "actions": [{"unset": "a"}], "colour": 1}),
                "colour",
            ),
            (
                json!({"event": "E", "where": [{"property": "p", "op": "nope"}], "actions": [{"unset": "a"}]}),
                "where[0].op",
            ),
        ] {
            let e = Mapping::parse(&v, "m").unwrap_err();
            assert_eq!(e.path, path, "{v}: {e}");
        }
    }
}
