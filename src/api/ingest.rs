//! The eight ingest endpoints (Segment Tracking API compatible).

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::CONTENT_ENCODING;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::auth::WriteAuth;
use super::error::ApiError;
use crate::domain::event::EventKind;
use crate::ingest::parse::Endpoint;
use crate::ingest::{KeyCheck, body::too_large};

async fn handle(
    app: Arc<AppState>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let svc = app.ready()?.clone();
    let auth = svc.keys.write_auth(&headers)?;
    let max = svc.grid.settings.ingest.max_body_bytes;
    let raw = to_bytes(body, max)
        .await
        .map_err(|_| ApiError(too_large(max)))?;
    let encoding = headers
        .get(CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let keys = svc.keys.clone();
    let check = move |k: &str| keys.is_write_key(k);
    let key = match auth {
        WriteAuth::Valid => KeyCheck::Header,
        WriteAuth::Absent => KeyCheck::Body(&check),
    };
    let started = std::time::Instant::now();
    let answer = svc.ingestor.ingest(endpoint, encoding, &raw, key).await?;
    metrics::histogram!("user360_ingest_request_seconds").record(started.elapsed().as_secs_f64());
    Ok(Json(answer).into_response())
}

/// `POST /v1/identify`
pub async fn identify(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    handle(app, Endpoint::Single(EventKind::Identify), headers, body).await
}

/// `POST /v1/track`
pub async fn track(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    handle(app, Endpoint::Single(EventKind::Track), headers, body).await
}

/// `POST /v1/page`
pub async fn page(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    handle(app, Endpoint::Single(EventKind::Page), headers, body).await
}

/// `POST /v1/screen`
pub async fn screen(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    handle(app, Endpoint::Single(EventKind::Screen), headers, body).await
}

/// `POST /v1/group`
pub async fn group(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    handle(app, Endpoint::Single(EventKind::Group), headers, body).await
}

/// `POST /v1/alias`
pub async fn alias(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    handle(app, Endpoint::Single(EventKind::Alias), headers, body).await
}

/// `POST /v1/batch` and `POST /v1/import`
pub async fn batch(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    handle(app, Endpoint::Batch, headers, body).await
}
