//! Mapping endpoints: create, list, get, delete, and what each mapping did.

use std::collections::HashMap;
use std::sync::Arc;

use super::extract::{Path, Query};
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::profiles::parse_limit;
use super::segments::json_body;

fn no_mapping(id: &str) -> ApiError {
    ApiError::not_found(format!("no mapping has the id {id:?}"))
}

/// `POST /v1/mappings`
pub async fn create(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let body = json_body(body).await?;
    let m = svc.grid.create_mapping(&body).await?;
    Ok((StatusCode::CREATED, Json(m)).into_response())
}

/// `GET /v1/mappings?limit=&cursor=` (in the order they apply)
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
    let (mappings, next) = svc.grid.list_mappings(after, limit);
    Ok(Json(json!({"mappings": mappings, "next_cursor": next})).into_response())
}

/// `GET /v1/mappings/{id}`
pub async fn get_one(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let m = svc.grid.mapping(&id).ok_or_else(|| no_mapping(&id))?;
    Ok(Json(m).into_response())
}

/// `DELETE /v1/mappings/{id}`
pub async fn delete(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    svc.grid.delete_mapping(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/mappings/{id}/stats`: applied, missing paths, skipped updates (with the last
/// reason) since the server started.
pub async fn stats(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let v = svc.grid.mapping_stats(&id).ok_or_else(|| no_mapping(&id))?;
    Ok(Json(v).into_response())
}
