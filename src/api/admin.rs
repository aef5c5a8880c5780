//! Admin endpoints: the manual test clock.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use crate::error::{ErrorCode, Problem};
use crate::segment::timefmt::format_ms;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Advance {
    advance_ms: i64,
}

fn manual_only(app: &AppState, headers: &HeaderMap) -> Result<Arc<super::Services>, ApiError> {
    let svc = app.admin(headers)?.clone();
    if !svc.grid.clock.is_manual() {
        return Err(ApiError::not_found(
            "the clock endpoint exists only with clock = \"manual\"",
        ));
    }
    Ok(svc)
}

/// `GET /v1/admin/clock`
pub async fn get_clock(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let svc = manual_only(&app, &headers)?;
    Ok(Json(serde_json::json!({"now": format_ms(svc.grid.clock.now_ms())})).into_response())
}

/// `POST /v1/admin/clock {"advance_ms": N}`: answers once every timer due by then has run.
pub async fn advance_clock(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let svc = manual_only(&app, &headers)?;
    let adv: Advance = serde_json::from_slice(&body).map_err(|e| {
        ApiError(Problem::at(
            ErrorCode::InvalidField,
            "advance_ms",
            format!("expected {{\"advance_ms\": N}} with N a whole number ≥ 0: {e}"),
        ))
    })?;
    if adv.advance_ms < 0 {
        return Err(ApiError::field(
            "advance_ms",
            format!("advance_ms must be ≥ 0, got {}", adv.advance_ms),
        ));
    }
    let now = svc.grid.timers.advance(adv.advance_ms).await;
    Ok(Json(serde_json::json!({"now": format_ms(now)})).into_response())
}
