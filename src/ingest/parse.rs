//! From request bytes to validated [`Message`]s: envelope splitting, per-message limits,
//! field types, ids as text, time correction and identity extraction.
//!
//! Every problem is a [`Problem`] that names the field and the value. In a batch, a problem
//! inside one element rejects that element only; only a body that is not JSON (or not of
//! the batch shape) fails the whole request.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::scan::{self, ScanError, ScanErrorKind};
use crate::config::IngestSettings;
use crate::domain::event::EventKind;
use crate::domain::identity::{IdType, Identity, IdentityRules, normalize, valid_type_name};
use crate::domain::message::Message;
use crate::error::{ErrorCode, Problem};
use crate::segment::timefmt::parse_rfc3339_ms;

/// Which ingest endpoint a body came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// A single-message endpoint of this kind.
    Single(EventKind),
    /// `/v1/batch` or `/v1/import`.
    Batch,
}

/// A parsed body: the write key it carries and each message or why it was rejected.
#[derive(Debug)]
pub struct Envelope {
    /// `writeKey` from the body (used only without an Authorization header).
    pub write_key: Option<String>,
    /// Messages in body order.
    pub messages: Vec<Result<Message, Problem>>,
}

/// Counters of things accepted but not used (bad timestamps, ignored external ids).
#[derive(Debug, Default, Clone, Copy)]
pub struct ParseNotes {
    /// Invalid or out-of-range timestamps ignored.
    pub bad_timestamps: u64,
    /// externalIds entries ignored.
    pub ignored_external_ids: u64,
}

/// Limits and rules parsing needs.
pub struct ParseContext<'a> {
    /// Ingest limits.
    pub limits: &'a IngestSettings,
    /// Identity rules (blocked values).
    pub rules: &'a IdentityRules,
    /// Server time the request was received.
    pub received_ms: i64,
}

fn scan_problem(e: ScanError, prefix: &str) -> Problem {
    let path = join_path(prefix, &e.path);
    match e.kind {
        ScanErrorKind::TooDeep { limit } => Problem::at(
            ErrorCode::TooDeep,
            path.clone(),
            format!(
                "the message is nested deeper than {limit} levels at {}",
                if path.is_empty() {
                    "the top level"
                } else {
                    &path
                }
            ),
        ),
        ScanErrorKind::LoneSurrogate { escape } => Problem::at(
            ErrorCode::InvalidJson,
            path.clone(),
            format!(
                "{} holds an unpaired UTF-16 surrogate ({escape}), which has no UTF-8 form",
                if path.is_empty() { "the body" } else { &path }
            ),
        ),
        ScanErrorKind::Syntax(s) => Problem::at(
            ErrorCode::InvalidJson,
            path,
            format!("invalid JSON at byte {}: {s}", e.offset),
        ),
    }
}

fn join_path(prefix: &str, rest: &str) -> String {
    match (prefix.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) if rest.starts_with('[') => format!("{prefix}{rest}"),
        (false, false) => format!("{prefix}.{rest}"),
    }
}

/// Parses a decoded body for `endpoint`.
pub fn parse_body(
    endpoint: Endpoint,
    body: &[u8],
    ctx: &ParseContext<'_>,
    notes: &mut ParseNotes,
) -> Result<Envelope, Problem> {
    if body.starts_with(&[0x1f, 0x8b]) {
        return Err(Problem::new(
            ErrorCode::InvalidJson,
            "the body is not JSON: it looks gzip-compressed but the request has no Content-Encoding: gzip header",
        ));
    }
    match endpoint {
        Endpoint::Single(kind) => {
            if body.len() > ctx.limits.max_message_bytes {
                // Tell "not JSON" apart from "too large" only when cheap to do so.
                return Err(message_too_large(body.len(), ctx.limits, ""));
            }
            if let Err(e) = scan::check_value(body, ctx.limits.max_depth) {
                return Err(scan_problem(e, ""));
            }
            let msg = parse_message(body, Some(kind), None, ctx, notes, "")?;
            let write_key = msg.1;
            Ok(Envelope {
                write_key,
                messages: vec![Ok(msg.0)],
            })
        }
        Endpoint::Batch => parse_batch(body, ctx, notes),
    }
}

fn message_too_large(len: usize, limits: &IngestSettings, path: &str) -> Problem {
    Problem {
        code: ErrorCode::TooLarge,
        message: format!(
            "the message is {len} bytes, over the per-message limit of {} bytes ({} KiB)",
            limits.max_message_bytes,
            limits.max_message_bytes / 1024
        ),
        path: (!path.is_empty()).then(|| path.to_owned()),
    }
}

/// Batch-level fields that apply to every message.
#[derive(Default)]
struct BatchDefaults {
    context: Option<Map<String, Value>>,
    integrations: Option<Value>,
    sent_at: Option<i64>,
}

fn parse_batch(
    body: &[u8],
    ctx: &ParseContext<'_>,
    notes: &mut ParseNotes,
) -> Result<Envelope, Problem> {
    let members = match scan::split_object(body) {
        Ok(m) => m,
        Err(e) => {
            // Valid JSON of the wrong shape is a field problem, anything else is not JSON.
            if scan::check_value(body, usize::MAX).is_ok() {
                return Err(Problem::at(
                    ErrorCode::InvalidField,
                    "",
                    "the body must be a JSON object with a \"batch\" list",
                ));
            }
            return Err(scan_problem(e, ""));
        }
    };
    let mut defaults = BatchDefaults::default();
    let mut write_key = None;
    let mut batch_span = None;
    for (key, span) in members {
        let raw = &body[span.clone()];
        match key.as_str() {
            "batch" => batch_span = Some(span),
            "writeKey" => write_key = parse_string_field(raw, "writeKey")?,
            "sentAt" => {
                defaults.sent_at = time_field(raw, notes);
            }
            "context" => {
                defaults.context = parse_object_field(raw, "context", ctx)?;
            }
            "integrations" => {
                defaults.integrations =
                    parse_object_field(raw, "integrations", ctx)?.map(Value::Object);
            }
            _ => {}
        }
    }
    let span = batch_span.ok_or_else(|| {
        Problem::at(
            ErrorCode::InvalidField,
            "batch",
            "the body has no \"batch\" list of messages",
        )
    })?;
    let elements = match scan::split_array(&body[span.clone()]) {
        Ok(e) => e,
        Err(_) => {
            return Err(Problem::at(
                ErrorCode::InvalidField,
                "batch",
                format!(
                    "\"batch\" must be a list of messages, got {}",
                    preview(&body[span])
                ),
            ));
        }
    };
    let base = span.start;
    let mut messages = Vec::with_capacity(elements.len());
    for (i, el) in elements.into_iter().enumerate() {
        let path = format!("batch[{i}]");
        if i >= ctx.limits.max_batch_messages {
            messages.push(Err(Problem::at(
                ErrorCode::TooManyMessages,
                path,
                format!(
                    "a batch holds at most {} messages; this is message {}",
                    ctx.limits.max_batch_messages,
                    i + 1
                ),
            )));
            continue;
        }
        let raw = &body[base + el.start..base + el.end];
        let r = (|| {
            if raw.len() > ctx.limits.max_message_bytes {
                return Err(message_too_large(raw.len(), ctx.limits, &path));
            }
            scan::check_value(raw, ctx.limits.max_depth).map_err(|e| scan_problem(e, &path))?;
            parse_message(raw, None, Some(&defaults), ctx, notes, &path).map(|(m, _)| m)
        })();
        messages.push(r);
    }
    Ok(Envelope {
        write_key,
        messages,
    })
}

fn preview(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(&raw[..raw.len().min(60)]).into_owned();
    if raw.len() > 60 { format!("{s}…") } else { s }
}

fn parse_string_field(raw: &[u8], field: &str) -> Result<Option<String>, Problem> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::String(s)) => Ok(Some(s)),
        Ok(Value::Null) => Ok(None),
        Ok(other) => Err(Problem::at(
            ErrorCode::InvalidField,
            field,
            format!("{field} must be a string, got {}", short(&other)),
        )),
        Err(e) => Err(Problem::at(
            ErrorCode::InvalidJson,
            field,
            format!("{field}: {e}"),
        )),
    }
}

fn parse_object_field(
    raw: &[u8],
    field: &str,
    ctx: &ParseContext<'_>,
) -> Result<Option<Map<String, Value>>, Problem> {
    scan::check_value(raw, ctx.limits.max_depth).map_err(|e| scan_problem(e, field))?;
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(Value::Null) => Ok(None),
        Ok(other) => Err(Problem::at(
            ErrorCode::InvalidField,
            field,
            format!("{field} must be an object, got {}", short(&other)),
        )),
        Err(e) => Err(Problem::at(
            ErrorCode::InvalidJson,
            field,
            format!("{field}: {e}"),
        )),
    }
}

fn time_field(raw: &[u8], notes: &mut ParseNotes) -> Option<i64> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::String(s)) => {
            let t = parse_rfc3339_ms(&s, true);
            if t.is_none() {
                notes.bad_timestamps += 1;
            }
            t
        }
        Ok(Value::Null) => None,
        _ => {
            notes.bad_timestamps += 1;
            None
        }
    }
}

/// A short rendering of a JSON value for error messages.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let cut: String = s.chars().take(60).collect();
        format!("{cut}…")
    } else {
        s
    }
}

/// The Segment fields, each kept raw so every type problem can name its field.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(rename = "userId", borrow)]
    user_id: Option<&'a RawValue>,
    #[serde(rename = "anonymousId", borrow)]
    anonymous_id: Option<&'a RawValue>,
    #[serde(rename = "previousId", borrow)]
    previous_id: Option<&'a RawValue>,
    #[serde(rename = "groupId", borrow)]
    group_id: Option<&'a RawValue>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    category: Option<&'a RawValue>,
    #[serde(borrow)]
    traits: Option<&'a RawValue>,
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(rename = "originalTimestamp", borrow)]
    original_timestamp: Option<&'a RawValue>,
    #[serde(rename = "sentAt", borrow)]
    sent_at: Option<&'a RawValue>,
    #[serde(rename = "messageId", borrow)]
    message_id: Option<&'a RawValue>,
    #[serde(rename = "writeKey", borrow)]
    write_key: Option<&'a RawValue>,
}

fn field_path(prefix: &str, field: &str) -> String {
    join_path(prefix, field)
}

/// An id field: a string (blank = absent) or a JSON number taken as its text as written.
fn id_field(raw: Option<&RawValue>, field: &str, prefix: &str) -> Result<Option<String>, Problem> {
    let Some(raw) = raw else { return Ok(None) };
    let text = raw.get().trim();
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).map_err(|e| {
            Problem::at(
                ErrorCode::InvalidJson,
                field_path(prefix, field),
                format!("{field}: {e}"),
            )
        })?;
        return Ok(if s.trim().is_empty() { None } else { Some(s) });
    }
    if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Ok(Some(text.to_owned()));
    }
    Err(Problem::at(
        ErrorCode::InvalidField,
        field_path(prefix, field),
        format!(
            "{field} must be a string or a number, got {}",
            truncate(text)
        ),
    ))
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 60 {
        let cut: String = s.chars().take(60).collect();
        format!("{cut}…")
    } else {
        s.to_owned()
    }
}

fn text_field(
    raw: Option<&RawValue>,
    field: &str,
    prefix: &str,
) -> Result<Option<String>, Problem> {
    let Some(raw) = raw else { return Ok(None) };
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::String(s)) => Ok(if s.is_empty() { None } else { Some(s) }),
        Ok(Value::Null) => Ok(None),
        Ok(other) => Err(Problem::at(
            ErrorCode::InvalidField,
            field_path(prefix, field),
            format!("{field} must be a string, got {}", short(&other)),
        )),
        Err(e) => Err(Problem::at(
            ErrorCode::InvalidJson,
            field_path(prefix, field),
            format!("{field}: {e}"),
        )),
    }
}

fn object_field(
    raw: Option<&RawValue>,
    field: &str,
    prefix: &str,
) -> Result<Option<Map<String, Value>>, Problem> {
    let Some(raw) = raw else { return Ok(None) };
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(Value::Null) => Ok(None),
        Ok(other) => Err(Problem::at(
            ErrorCode::InvalidField,
            field_path(prefix, field),
            format!("{field} must be an object, got {}", short(&other)),
        )),
        Err(e) => Err(Problem::at(
            ErrorCode::InvalidJson,
            field_path(prefix, field),
            format!("{field}: {e}"),
        )),
    }
}

fn time_of(raw: Option<&RawValue>, notes: &mut ParseNotes) -> Option<i64> {
    raw.and_then(|r| time_field(r.get().as_bytes(), notes))
}

/// Merges `base` under `top`: keys of `top` win; nested objects merge the same way.
fn merge_under(top: &mut Map<String, Value>, base: &Map<String, Value>) {
    for (k, v) in base {
        match top.get_mut(k) {
            None => {
                top.insert(k.clone(), v.clone());
            }
            Some(Value::Object(t)) => {
                if let Value::Object(b) = v {
                    merge_under(t, b);
                }
            }
            Some(_) => {}
        }
    }
}

/// Parses and validates one message. `kind` is fixed by a single-message endpoint; in a
/// batch it comes from `type`. Returns the message and its body `writeKey`.
fn parse_message(
    raw: &[u8],
    kind: Option<EventKind>,
    defaults: Option<&BatchDefaults>,
    ctx: &ParseContext<'_>,
    notes: &mut ParseNotes,
    prefix: &str,
) -> Result<(Message, Option<String>), Problem> {
    let wire: Wire<'_> = match serde_json::from_slice(raw) {
        Ok(w) => w,
        Err(e) => {
            let what = if raw.first().is_some_and(|b| *b != b'{') || e.is_syntax() || e.is_eof() {
                (
                    ErrorCode::InvalidJson,
                    format!("the message is not a JSON object: {e}"),
                )
            } else {
                (
                    ErrorCode::InvalidField,
                    format!("the message has a malformed field: {e}"),
                )
            };
            // A valid JSON value that is not an object is a shape problem.
            let code = if serde_json::from_slice::<Value>(raw).is_ok() {
                ErrorCode::InvalidField
            } else {
                what.0
            };
            return Err(Problem {
                code,
                message: what.1,
                path: Some(prefix.to_owned()),
            });
        }
    };
    let kind = match kind {
        Some(k) => k,
        None => {
            let t = text_field(wire.kind, "type", prefix)?;
            match t.as_deref().and_then(EventKind::parse) {
                Some(k) if k != EventKind::System => k,
                _ => {
                    return Err(Problem::at(
                        ErrorCode::InvalidField,
                        field_path(prefix, "type"),
                        format!(
                            "type must be one of identify, track, page, screen, group, alias; got {}",
                            wire.kind
                                .map(|r| truncate(r.get()))
                                .unwrap_or_else(|| "nothing".into())
                        ),
                    ));
                }
            }
        }
    };
    let write_key = match wire.write_key {
        Some(r) => parse_string_field(r.get().as_bytes(), "writeKey")?,
        None => None,
    };
    let user_id = id_field(wire.user_id, "userId", prefix)?;
    let anonymous_id = id_field(wire.anonymous_id, "anonymousId", prefix)?;
    let previous_id = id_field(wire.previous_id, "previousId", prefix)?;
    let group_id = id_field(wire.group_id, "groupId", prefix)?;
    let mut event = text_field(wire.event, "event", prefix)?;
    let name = text_field(wire.name, "name", prefix)?;
    let category = text_field(wire.category, "category", prefix)?;
    let traits = object_field(wire.traits, "traits", prefix)?;
    let mut properties = object_field(wire.properties, "properties", prefix)?;
    let mut context = object_field(wire.context, "context", prefix)?;
    if let Some(base) = defaults.and_then(|d| d.context.as_ref()) {
        merge_under(context.get_or_insert_with(Map::new), base);
    }
    let context_traits = match context.as_ref().and_then(|c| c.get("traits")) {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(other) => {
            return Err(Problem::at(
                ErrorCode::InvalidField,
                field_path(prefix, "context.traits"),
                format!("context.traits must be an object, got {}", short(other)),
            ));
        }
    };

    // Required fields per type.
    match kind {
        EventKind::Track if event.as_deref().is_none_or(|e| e.trim().is_empty()) => {
            return Err(Problem::at(
                ErrorCode::InvalidField,
                field_path(prefix, "event"),
                format!(
                    "track needs a non-empty event name; event is {}",
                    wire.event
                        .map(|r| truncate(r.get()))
                        .unwrap_or_else(|| "missing".into())
                ),
            ));
        }
        EventKind::Group if group_id.is_none() => {
            return Err(Problem::at(
                ErrorCode::InvalidField,
                field_path(prefix, "groupId"),
                "group needs a groupId",
            ));
        }
        EventKind::Alias if user_id.is_none() || previous_id.is_none() => {
            return Err(Problem::at(
                ErrorCode::MissingId,
                field_path(
                    prefix,
                    if user_id.is_none() {
                        "userId"
                    } else {
                        "previousId"
                    },
                ),
                format!(
                    "alias needs both userId and previousId; {} is missing, null or blank",
                    if user_id.is_none() {
                        "userId"
                    } else {
                        "previousId"
                    }
                ),
            ));
        }
        _ => {}
    }
    if kind != EventKind::Alias && user_id.is_none() && anonymous_id.is_none() {
        return Err(Problem::at(
            ErrorCode::MissingId,
            prefix.to_owned(),
            "the message needs a userId or an anonymousId; both are missing, null or blank",
        ));
    }

    // Page and screen: a fixed event name, with name and category copied into properties.
    if matches!(kind, EventKind::Page | EventKind::Screen) {
        event = Some(
            if kind == EventKind::Page {
                "Page Viewed"
            } else {
                "Screen Viewed"
            }
            .to_owned(),
        );
        let props = properties.get_or_insert_with(Map::new);
        if let Some(n) = &name {
            props.insert("name".into(), Value::String(n.clone()));
        }
        if let Some(c) = &category {
            props.insert("category".into(), Value::String(c.clone()));
        }
    }

    // Identities, in the order the limit rule uses.
    let identities = if kind == EventKind::Alias {
        // The registry looks both ids up by value; checked here only for blocked values.
        for (field, v) in [("userId", &user_id), ("previousId", &previous_id)] {
            let v = v.as_deref().unwrap_or_default();
            if ctx.rules.is_blocked(IdType::USER_ID, v) {
                return Err(Problem::at(
                    ErrorCode::BlockedId,
                    field_path(prefix, field),
                    format!("{field} {v:?} is a blocked value and cannot identify anyone"),
                ));
            }
        }
        Vec::new()
    } else {
        let ids = extract_identities(
            kind,
            user_id.as_deref(),
            anonymous_id.as_deref(),
            traits.as_ref(),
            context_traits.as_ref(),
            context.as_ref(),
            ctx.rules,
            notes,
        );
        if ids.is_empty() {
            return Err(Problem::at(
                ErrorCode::BlockedId,
                prefix.to_owned(),
                format!(
                    "every id of the message is a blocked value (userId {:?}, anonymousId {:?})",
                    user_id.as_deref().unwrap_or(""),
                    anonymous_id.as_deref().unwrap_or("")
                ),
            ));
        }
        ids
    };

    // Time: Segment's skew correction, then the future clamp.
    let t = time_of(wire.timestamp, notes).or_else(|| time_of(wire.original_timestamp, notes));
    let sent_at = time_of(wire.sent_at, notes).or_else(|| defaults.and_then(|d| d.sent_at));
    let received = ctx.received_ms;
    let mut timestamp_ms = match (t, sent_at) {
        (Some(t), Some(s)) => received - (s - t),
        (Some(t), None) => t,
        _ => received,
    };
    if timestamp_ms > received + ctx.limits.max_future_skew_ms {
        timestamp_ms = received;
    }

    let event_traits = if kind == EventKind::Identify {
        let mut effective = context_traits.clone().unwrap_or_default();
        if let Some(t) = &traits {
            for (k, v) in t {
                effective.insert(k.clone(), v.clone());
            }
        }
        (traits.is_some() || context_traits.is_some()).then_some(Value::Object(effective))
    } else {
        traits.map(Value::Object)
    };
    let message_id = match wire.message_id {
        Some(r) => id_field(Some(r), "messageId", prefix)?,
        None => None,
    }
    .unwrap_or_else(|| format!("u360-{}", ulid::Ulid::new().to_string().to_lowercase()));
    let _ = defaults.and_then(|d| d.integrations.as_ref());

    Ok((
        Message {
            kind,
            message_id,
            user_id,
            anonymous_id,
            previous_id,
            group_id,
            event,
            name,
            category,
            properties: properties.map(Value::Object),
            traits: event_traits,
            context: context.map(Value::Object),
            timestamp_ms,
            received_ms: received,
            identities,
        },
        write_key,
    ))
}

/// Identities of a (non-alias) message: userId, anonymousId, traits.email,
/// context.traits.email, traits.phone, context.traits.phone, then externalIds, each
/// normalised, without blocked values or repeats.
#[allow(clippy::too_many_arguments)]
fn extract_identities(
    kind: EventKind,
    user_id: Option<&str>,
    anonymous_id: Option<&str>,
    traits: Option<&Map<String, Value>>,
    context_traits: Option<&Map<String, Value>>,
    context: Option<&Map<String, Value>>,
    rules: &IdentityRules,
    notes: &mut ParseNotes,
) -> Vec<Identity> {
    let mut out: Vec<Identity> = Vec::with_capacity(4);
    let mut push = |ty: IdType, raw: &str| {
        if let Some(v) = normalize(ty, raw)
            && !rules.is_blocked(ty, &v)
        {
            let id = Identity {
                ty,
                value: v.into_boxed_str(),
            };
            if !out.contains(&id) {
                out.push(id);
            }
        }
    };
    if let Some(u) = user_id {
        push(IdType::USER_ID, u);
    }
    if let Some(a) = anonymous_id {
        push(IdType::ANONYMOUS_ID, a);
    }
    let own_traits = if kind == EventKind::Identify {
        traits
    } else {
        None
    };
    for (key, ty) in [("email", IdType::EMAIL), ("phone", IdType::PHONE)] {
        for source in [own_traits, context_traits].into_iter().flatten() {
            if let Some(v) = source.get(key) {
                match v {
                    Value::String(s) => push(ty, s),
                    Value::Number(n) if ty == IdType::PHONE => push(ty, &n.to_string()),
                    _ => {}
                }
            }
        }
    }
    if let Some(list) = context
        .and_then(|c| c.get("externalIds"))
        .and_then(|v| v.as_array())
    {
        for entry in list {
            let ok = (|| {
                let obj = entry.as_object()?;
                let collection = obj.get("collection");
                if !matches!(collection, None | Some(Value::Null))
                    && collection.and_then(|c| c.as_str()) != Some("users")
                {
                    return None;
                }
                let ty = obj.get("type")?.as_str()?;
                if !valid_type_name(ty) {
                    return None;
                }
                let id = match obj.get("id")? {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                Some((IdType::named(ty), id))
            })();
            match ok {
                Some((ty, id)) => push(ty, &id),
                None => notes.ignored_external_ids += 1,
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn ctx_parse(endpoint: Endpoint, body: &str) -> Result<Envelope, Problem> {
        let s = Settings::defaults();
        let rules = IdentityRules::new(&s.identity);
        let ctx = ParseContext {
            limits: &s.ingest,
            rules: &rules,
            received_ms: 1_000_000_000_000,
        };
        parse_body(endpoint, body.as_bytes(), &ctx, &mut ParseNotes::default())
    }

    fn one(kind: EventKind, body: &str) -> Result<Message, Problem> {
        ctx_parse(Endpoint::Single(kind), body).map(|mut e| e.messages.remove(0).unwrap())
    }

    #[test]
    fn numeric_ids_keep_their_text() {
        let m = one(
            EventKind::Identify,
            r#"{"userId": 123456789012345678901234567890}"#,
        )
        .unwrap();
        assert_eq!(m.user_id.as_deref(), Some("123456789012345678901234567890"));
        assert_eq!(&*m.identities[0].value, "123456789012345678901234567890");
    }

    #[test]
    fn blank_ids_are_absent_and_blocked_ids_rejected() {
        let e = one(EventKind::Track, r#"{"userId":"  ","event":"x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::MissingId);
        assert!(e.message.contains("userId") && e.message.contains("anonymousId"));
        let e = one(EventKind::Track, r#"{"userId":"undefined","event":"x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BlockedId);
        let m = one(
            EventKind::Track,
            r#"{"userId":null,"anonymousId":"a","event":"x"}"#,
        )
        .unwrap();
        assert_eq!(m.identities.len(), 1);
    }

    #[test]
    fn skew_correction_and_clamp() {
        let m = one(
            EventKind::Track,
            r#"{"userId":"u","event":"x","timestamp":"2030-01-01T00:00:00Z","sentAt":"2030-01-01T00:00:02Z"}"#,
        )
        .unwrap();
        assert_eq!(m.timestamp_ms, 1_000_000_000_000 - 2000);
        let m = one(
            EventKind::Track,
            r#"{"userId":"u","event":"x","timestamp":"2090-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(m.timestamp_ms, 1_000_000_000_000);
        let m = one(
            EventKind::Track,
            r#"{"userId":"u","event":"x","timestamp":"nope"}"#,
        )
        .unwrap();
        assert_eq!(m.timestamp_ms, 1_000_000_000_000);
    }

    #[test]
    fn batch_elements_fail_alone() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let body = format!(
            r#"{{"batch":[{{"type":"track","userId":"u","event":"a"}},{{"type":"track","userId":"u","event":"b","properties":{{"x":{deep}}}}},{{"type":"track","userId":"u","event":"c","properties":{{"n":"\ud83d"}}}},{{"type":"track","userId":"u"}},{{"type":"identify","userId":"u","traits":"str"}}],"sentAt":"2030-01-01T00:00:00Z","context":{{"library":{{"name":"t"}}}}}}"#
        );
        let env = ctx_parse(Endpoint::Batch, &body).unwrap();
        let codes: Vec<Option<ErrorCode>> = env
            .messages
            .iter()
            .map(|m| m.as_ref().err().map(|p| p.code))
            .collect();
        assert_eq!(
            codes,
            vec![
                None,
                Some(ErrorCode::TooDeep),
                Some(ErrorCode::InvalidJson),
                Some(ErrorCode::InvalidField),
                Some(ErrorCode::InvalidField)
            ]
        );
        let surrogate = env.messages[2].as_ref().unwrap_err();
        assert_eq!(surrogate.path.as_deref(), Some("batch[2].properties.n"));
        let first = env.messages[0].as_ref().unwrap();
        assert_eq!(first.context.as_ref().unwrap()["library"]["name"], "t");
    }

    #[test]
    fn identify_traits_overlay_and_identity_order() {
        let m = one(
            EventKind::Identify,
            r#"{"userId":"u","anonymousId":"a","traits":{"email":" Ana@X.com","plan":"pro"},"context":{"traits":{"plan":"free","phone":"+1 555","email":"other@x.com"},"externalIds":[{"id":"c1","type":"crm"},{"id":"z","type":"BAD"},{"id":"g","type":"crm","collection":"groups"}]}}"#,
        )
        .unwrap();
        assert_eq!(m.traits.as_ref().unwrap()["plan"], "pro");
        let ids: Vec<String> = m
            .identities
            .iter()
            .map(|i| format!("{:?}:{}", i.ty, i.value))
            .collect();
        assert_eq!(
            ids,
            vec![
                "user_id:u",
                "anonymous_id:a",
                "email:ana@x.com",
                "email:other@x.com",
                "phone:+1555",
                "crm:c1"
            ]
        );
    }
}
