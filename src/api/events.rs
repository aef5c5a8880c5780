//! Event endpoints: one profile's timeline and the global query, newest first, paged by
//! an opaque `(timestamp, seq)` cursor.

use std::collections::HashMap;
use std::sync::Arc;

use super::extract::{Path, Query};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::AppState;
use super::error::ApiError;
use super::profiles::{parse_limit, raw_json};
use crate::domain::event::{EventKind, with_profile_id};
use crate::domain::identity::ProfileKey;
use crate::error::{ErrorCode, Problem};
use crate::grid::shard::{EventFilter, EventHit};
use crate::segment::cond::{PropertyCondition, parse_conditions};
use crate::segment::timefmt::parse_rfc3339_ms;

fn parse_time(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(s) => parse_rfc3339_ms(s, false).map(Some).ok_or_else(|| {
            ApiError::field(
                name,
                format!("{name} must be an RFC 3339 time with an offset, got {s:?}"),
            )
        }),
    }
}

pub fn parse_filter(q: &HashMap<String, String>) -> Result<EventFilter, ApiError> {
    let kind = match q.get("type") {
        None => None,
        Some(t) => Some(EventKind::parse(t).ok_or_else(|| {
            ApiError::field("type", format!("type must be one of identify, track, page, screen, group, alias, system; got {t:?}"))
        })?),
    };
    let before = match q.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::field(
                "cursor",
                format!("cursor {c:?} is not one this server gave out"),
            )
        })?),
    };
    Ok(EventFilter {
        // An empty filter is no filter (like an empty `segment=`).
        name: q.get("name").filter(|n| !n.is_empty()).cloned(),
        kind,
        since: parse_time(q, "since")?,
        until: parse_time(q, "until")?,
        before,
    })
}

fn encode_cursor(ts: i64, seq: u64) -> String {
    format!("{ts}_{seq}")
}

fn decode_cursor(c: &str) -> Option<(i64, u64)> {
    let (a, b) = c.split_once('_')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn page_body(events: &[String], next: Option<(i64, u64)>, partial: Option<bool>) -> String {
    let mut body = String::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 64);
    body.push_str("{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(e);
    }
    body.push_str("],\"next_cursor\":");
    match next {
        Some((ts, seq)) => body.push_str(&format!("\"{}\"", encode_cursor(ts, seq))),
        None => body.push_str("null"),
    }
    if let Some(p) = partial {
        body.push_str(&format!(",\"partial\":{p}"));
    }
    body.push('}');
    body
}

fn read(svc: &super::Services, hit: &EventHit) -> Result<String, ApiError> {
    svc.grid
        .read_event(hit.pos)
        .map(|json| with_profile_id(&json, hit.profile))
        .map_err(|e| {
            ApiError(Problem::new(
                ErrorCode::Internal,
                format!("cannot read a stored event: {e}"),
            ))
        })
}

/// `GET /v1/profiles/{key}/events?name=&type=&since=&until=&limit=&cursor=`
pub async fn profile_events(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let pk = ProfileKey::parse(&key)?;
    let limit = parse_limit(&q)?;
    let filter = parse_filter(&q)?;
    let not_found = || ApiError::not_found(format!("no profile holds the key {key:?}"));
    let id = svc.grid.find(&pk).ok_or_else(not_found)?;
    let hits = svc
        .grid
        .timeline(id, filter, limit + 1)
        .await
        .ok_or_else(not_found)?;
    let more = hits.len() > limit;
    let hits = &hits[..hits.len().min(limit)];
    let events = hits
        .iter()
        .map(|h| read(svc, h))
        .collect::<Result<Vec<_>, _>>()?;
    let next = if more {
        hits.last().map(|h| (h.ts_ms, h.seq))
    } else {
        None
    };
    Ok(raw_json(StatusCode::OK, page_body(&events, next, None)))
}

/// `GET /v1/events?name=&type=&since=&until=&where=&limit=&cursor=` across all profiles.
pub async fn global_events(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let limit = parse_limit(&q)?;
    let mut filter = parse_filter(&q)?;
    let now = svc.grid.clock.now_ms();
    if filter.since.is_none() {
        filter.since = Some(now - 7 * 86_400_000);
    }
    let conditions: Vec<PropertyCondition> = match q.get("where") {
        None => Vec::new(),
        Some(w) => {
            let v: serde_json::Value = serde_json::from_str(w).map_err(|e| {
                ApiError(Problem::at(
                    ErrorCode::InvalidRule,
                    "where",
                    format!("where must be a JSON list of conditions: {e}"),
                ))
            })?;
            parse_conditions(&v, "where")
                .map_err(|e| ApiError(Problem::at(ErrorCode::InvalidRule, e.path, e.message)))?
        }
    };
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_millis(svc.grid.settings.query.timeout_ms);
    let round = if conditions.is_empty() {
        limit + 1
    } else {
        (limit * 4).max(256)
    };
    let mut found: Vec<(String, (i64, u64))> = Vec::new();
    let mut partial = false;
    'rounds: loop {
        let hits = svc.grid.query_events(filter.clone(), round).await;
        let exhausted = hits.len() < round;
        for h in &hits {
            let json = read(svc, h)?;
            if !conditions.is_empty() {
                let value: serde_json::Value = serde_json::from_str(&json).map_err(|e| {
                    ApiError(Problem::new(
                        ErrorCode::Internal,
                        format!("stored event is not JSON: {e}"),
                    ))
                })?;
                let props = value.get("properties");
                if !conditions.iter().all(|c| c.matches(props, now)) {
                    filter.before = Some((h.ts_ms, h.seq));
                    continue;
                }
            }
            found.push((json, (h.ts_ms, h.seq)));
            filter.before = Some((h.ts_ms, h.seq));
            if found.len() > limit {
                break 'rounds;
            }
        }
        if exhausted || hits.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            partial = true;
            break;
        }
    }
    let more = found.len() > limit;
    found.truncate(limit);
    let next = if more || partial {
        found.last().map(|(_, k)| *k).or(filter.before)
    } else {
        None
    };
    let events: Vec<String> = found.into_iter().map(|(j, _)| j).collect();
    Ok(raw_json(
        StatusCode::OK,
        page_body(&events, next, partial.then_some(true)),
    ))
}
