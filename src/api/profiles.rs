//! Profile endpoints: get by any key, list, patch traits, erase, memberships.

use std::collections::HashMap;
use std::sync::Arc;

use super::extract::{Path, Query};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::domain::identity::ProfileKey;
use crate::domain::ids::ProfileId;
use crate::error::{ErrorCode, Problem};

/// A JSON text answered as is (already rendered by the grid).
pub fn raw_json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn no_profile(key: &str) -> ApiError {
    ApiError::not_found(format!("no profile holds the key {key:?}"))
}

/// Parses `limit` (default 100, 1..=1000).
pub fn parse_limit(q: &HashMap<String, String>) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(100),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(ApiError::field(
                "limit",
                format!("limit must be a whole number from 1 to 1000, got {s:?}"),
            )),
        },
    }
}

/// Parses the `cursor` of a profile listing (the last id of the previous page).
pub fn parse_cursor(q: &HashMap<String, String>) -> Result<Option<ProfileId>, ApiError> {
    match q.get("cursor").filter(|c| !c.is_empty()) {
        None => Ok(None),
        Some(c) => c.parse::<ProfileId>().map(Some).map_err(|_| {
            ApiError::field(
                "cursor",
                format!("cursor {c:?} is not one this server gave out"),
            )
        }),
    }
}

/// `GET /v1/profiles/{key}`
pub async fn get_one(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let pk = ProfileKey::parse(&key)?;
    let id = svc.grid.find(&pk).ok_or_else(|| no_profile(&key))?;
    let json = svc
        .grid
        .profile_json(id)
        .await
        .ok_or_else(|| no_profile(&key))?;
    Ok(raw_json(StatusCode::OK, json))
}

/// `GET /v1/profiles/{key}/segments`
pub async fn segments(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let pk = ProfileKey::parse(&key)?;
    let id = svc.grid.find(&pk).ok_or_else(|| no_profile(&key))?;
    let list = svc
        .grid
        .profile_segments(id)
        .await
        .ok_or_else(|| no_profile(&key))?;
    let segments: Vec<serde_json::Value> = list
        .into_iter()
        .map(|(id, name, since)| {
            serde_json::json!({"id": &*id, "name": &*name, "since": crate::segment::timefmt::format_ms(since)})
        })
        .collect();
    Ok(Json(serde_json::json!({"segments": segments})).into_response())
}

/// `GET /v1/profiles/{key}/merges`
pub async fn merges(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let pk = ProfileKey::parse(&key)?;
    let id = svc.grid.find(&pk).ok_or_else(|| no_profile(&key))?;
    let notes = svc.grid.merges(id).await.ok_or_else(|| no_profile(&key))?;
    Ok(raw_json(
        StatusCode::OK,
        format!("{{\"merges\":[{}],\"next_cursor\":null}}", notes.join(",")),
    ))
}

/// `GET /v1/profiles?limit=&cursor=`
pub async fn list(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let limit = parse_limit(&q)?;
    let segment = match q.get("segment").filter(|s| !s.is_empty()) {
        None => None,
        Some(seg) => Some(
            svc.grid
                .segments
                .find(seg)
                .ok_or_else(|| ApiError::not_found(format!("no segment has the id {seg:?}")))?,
        ),
    };
    let after = parse_cursor(&q)?;
    let ids = svc.grid.list_profiles(segment, after, limit + 1).await;
    let more = ids.len() > limit;
    let ids = &ids[..ids.len().min(limit)];
    let profiles = svc.grid.profiles_json(ids).await;
    let mut body = String::from("{\"profiles\":[");
    let mut first = true;
    for p in profiles.into_iter().flatten() {
        if !first {
            body.push(',');
        }
        first = false;
        body.push_str(&p);
    }
    body.push_str("],\"next_cursor\":");
    match (more, ids.last()) {
        (true, Some(last)) => body.push_str(&format!("\"{last}\"")),
        _ => body.push_str("null"),
    }
    body.push('}');
    Ok(raw_json(StatusCode::OK, body))
}

/// `PATCH /v1/profiles/{key}/traits`
pub async fn patch_traits(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let pk = ProfileKey::parse(&key)?;
    let traits = match crate::ingest::scan::check_value(&body, svc.grid.settings.ingest.max_depth) {
        Err(e) => {
            return Err(ApiError(Problem::at(
                ErrorCode::InvalidJson,
                e.path.clone(),
                e.to_string(),
            )));
        }
        Ok(()) => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(other) => {
                return Err(ApiError::field(
                    "",
                    format!("the body must be a JSON object of traits, got {}", other),
                ));
            }
            Err(e) => {
                return Err(ApiError(Problem::new(
                    ErrorCode::InvalidJson,
                    format!("the body is not JSON: {e}"),
                )));
            }
        },
    };
    let json = svc.grid.patch_by_key(&pk, traits).await?;
    Ok(raw_json(StatusCode::OK, json))
}

/// `DELETE /v1/profiles/{key}[?suppress=true]`
pub async fn delete(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let suppress = match q.get("suppress").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::field(
                "suppress",
                format!("suppress must be true or false, got {other:?}"),
            ));
        }
    };
    let pk = ProfileKey::parse(&key)?;
    let id = svc.grid.find(&pk).ok_or_else(|| no_profile(&key))?;
    if svc.grid.delete_profile(id, suppress).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(no_profile(&key))
    }
}
