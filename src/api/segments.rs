//! Segment endpoints: definitions (create, list, get, replace, delete), members, preview,
//! and the ad-hoc profile query.

use std::collections::HashMap;
use std::sync::Arc;

use super::extract::{Path, Query};
use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::profiles::{parse_cursor, parse_limit, raw_json};
use crate::error::{ErrorCode, Problem};

/// Largest definition or query body.
const MAX_DEFINITION_BYTES: usize = 1 << 20;

/// Reads a JSON object body of at most [`MAX_DEFINITION_BYTES`].
pub async fn json_body(body: Body) -> Result<Value, ApiError> {
    let bytes = to_bytes(body, MAX_DEFINITION_BYTES).await.map_err(|_| {
        ApiError(Problem::new(
            ErrorCode::TooLarge,
            format!("the body is larger than {MAX_DEFINITION_BYTES} bytes"),
        ))
    })?;
    crate::grid::segments::object_body(&bytes)
        .map(Value::Object)
        .map_err(ApiError)
}

fn no_segment(id: &str) -> ApiError {
    ApiError::not_found(format!("no segment has the id {id:?}"))
}

/// `POST /v1/segments`
pub async fn create(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let body = json_body(body).await?;
    let seg = svc.grid.create_segment(&body).await?;
    Ok((StatusCode::CREATED, Json(seg)).into_response())
}

/// `GET /v1/segments?limit=&cursor=`
pub async fn list(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let limit = parse_limit(&q)?;
    let after = q
        .get("cursor")
        .filter(|c| !c.is_empty())
        .map(String::as_str);
    let (segments, next) = svc.grid.list_segments(after, limit);
    Ok(Json(json!({"segments": segments, "next_cursor": next})).into_response())
}

/// `GET /v1/segments/{id}`
pub async fn get_one(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let seg = svc.grid.segment(&id).ok_or_else(|| no_segment(&id))?;
    Ok(Json(seg).into_response())
}

/// `PUT /v1/segments/{id}`
pub async fn replace(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let body = json_body(body).await?;
    let seg = svc.grid.replace_segment(&id, &body).await?;
    Ok(Json(seg).into_response())
}

/// `DELETE /v1/segments/{id}`
pub async fn delete(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    svc.grid.delete_segment(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/segments/{id}/members?limit=&cursor=`
pub async fn members(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let limit = parse_limit(&q)?;
    let after = parse_cursor(&q)?;
    let (members, next) = svc
        .grid
        .members(&id, after, limit)
        .await
        .ok_or_else(|| no_segment(&id))?;
    let mut body = String::from("{\"members\":[");
    body.push_str(&members.join(","));
    body.push_str("],\"next_cursor\":");
    match next {
        Some(n) => body.push_str(&format!("\"{n}\"")),
        None => body.push_str("null"),
    }
    body.push('}');
    Ok(raw_json(StatusCode::OK, body))
}

/// Only `rule` (and, for queries, `limit` and `cursor`) may be given.
fn check_keys(body: &Value, allowed: &[&str]) -> Result<(), ApiError> {
    if let Some(k) = body
        .as_object()
        .and_then(|o| o.keys().find(|k| !allowed.contains(&k.as_str())))
    {
        return Err(ApiError(Problem::at(
            ErrorCode::InvalidRule,
            k.as_str(),
            format!("unknown key {k:?}; expected {}", allowed.join(", ")),
        )));
    }
    Ok(())
}

fn rule_of(body: &Value) -> Result<&Value, ApiError> {
    body.get("rule").ok_or_else(|| {
        ApiError(Problem::at(
            ErrorCode::InvalidRule,
            "rule",
            "the body needs a \"rule\"",
        ))
    })
}

/// `POST /v1/segments/preview` `{"rule"}` → `{"count", "sample"}`
pub async fn preview(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let body = json_body(body).await?;
    check_keys(&body, &["rule"])?;
    let (ids, count, partial) = svc.grid.match_rule(rule_of(&body)?, None, 10, true).await?;
    let sample: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let mut out = json!({"count": count, "sample": sample});
    if partial {
        out["partial"] = json!(true);
    }
    Ok(Json(out).into_response())
}

/// `POST /v1/profiles/query` `{"rule", "limit", "cursor"}` → `{"profiles", "next_cursor"}`
pub async fn query(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let body = json_body(body).await?;
    check_keys(&body, &["rule", "limit", "cursor"])?;
    let mut q = HashMap::new();
    match body.get("limit") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => {
            q.insert("limit".to_owned(), n.to_string());
        }
        Some(other) => {
            return Err(ApiError::field(
                "limit",
                format!("limit must be a whole number from 1 to 1000, got {other}"),
            ));
        }
    }
    match body.get("cursor") {
        None | Some(Value::Null) => {}
        Some(Value::String(c)) => {
            q.insert("cursor".to_owned(), c.clone());
        }
        Some(other) => {
            return Err(ApiError::field(
                "cursor",
                format!("cursor must be a string this server gave out, got {other}"),
            ));
        }
    }
    let limit = parse_limit(&q)?;
    let after = parse_cursor(&q)?;
    let (ids, _, partial) = svc
        .grid
        .match_rule(rule_of(&body)?, after, limit + 1, false)
        .await?;
    let more = ids.len() > limit;
    let ids = &ids[..ids.len().min(limit)];
    let profiles = svc.grid.profiles_json(ids).await;
    let mut out = String::from("{\"profiles\":[");
    out.push_str(&profiles.into_iter().flatten().collect::<Vec<_>>().join(","));
    out.push_str("],\"next_cursor\":");
    match (more, ids.last()) {
        (true, Some(last)) => out.push_str(&format!("\"{last}\"")),
        _ => out.push_str("null"),
    }
    if partial {
        out.push_str(",\"partial\":true");
    }
    out.push('}');
    Ok(raw_json(StatusCode::OK, out))
}
