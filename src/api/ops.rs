//! Operations endpoints: liveness, readiness, Prometheus metrics, and the JSON 404.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "ok"})),
    )
        .into_response()
}

/// `GET /readyz`: recovery has finished and traffic is accepted.
pub async fn readyz(State(app): State<Arc<AppState>>) -> Result<Response, ApiError> {
    app.ready()?.grid.healthy()?;
    Ok((
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "ready"})),
    )
        .into_response())
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    if let Some(s) = app.services.get() {
        metrics::gauge!("user360_profiles").set(s.grid.registry.profile_count() as f64);
    }
    metrics::gauge!("user360_process_rss_bytes").set(rss_bytes() as f64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
        .into_response()
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Any unknown route: a JSON 404.
pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", uri.path()))
}

/// A known route with another method: a JSON 405.
pub async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> Response {
    let body = serde_json::json!({
        "code": "method_not_allowed",
        "message": format!("{method} is not allowed on {}", uri.path()),
        "path": null
    });
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}
