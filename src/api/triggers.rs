//! Trigger endpoints: definitions, delivery listings, re-queuing a failed delivery; and
//! the segment change stream (Server-Sent Events).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use super::extract::{Path, Query};
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::profiles::parse_limit;
use super::segments::json_body;
use crate::grid::segment_actor::StreamItem;
use crate::store::deliveries::DeliveryStatus;

fn no_trigger(id: &str) -> ApiError {
    ApiError::not_found(format!("no trigger has the id {id:?}"))
}

/// `POST /v1/triggers`
pub async fn create(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let body = json_body(body).await?;
    let t = svc.grid.create_trigger(&body).await?;
    Ok((StatusCode::CREATED, Json(t)).into_response())
}

/// `GET /v1/triggers?limit=&cursor=`
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
    let (triggers, next) = svc.grid.list_triggers(after, limit);
    Ok(Json(json!({"triggers": triggers, "next_cursor": next})).into_response())
}

/// `GET /v1/triggers/{id}`
pub async fn get_one(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let t = svc.grid.trigger(&id).ok_or_else(|| no_trigger(&id))?;
    Ok(Json(t).into_response())
}

/// `DELETE /v1/triggers/{id}`
pub async fn delete(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    svc.grid.delete_trigger(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/triggers/{id}/deliveries?status=&limit=&cursor=`
pub async fn deliveries(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let limit = parse_limit(&q)?;
    let status = match q.get("status").map(String::as_str) {
        None | Some("") => None,
        Some("pending") => Some(DeliveryStatus::Pending),
        Some("delivered") => Some(DeliveryStatus::Delivered),
        Some("failed") => Some(DeliveryStatus::Failed),
        Some(other) => {
            return Err(ApiError::field(
                "status",
                format!("status must be pending, delivered or failed, got {other:?}"),
            ));
        }
    };
    let after = match q.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(c.parse::<u64>().map_err(|_| {
            ApiError::field(
                "cursor",
                format!("cursor {c:?} is not one this server gave out"),
            )
        })?),
    };
    let (list, next) = svc
        .grid
        .deliveries(&id, status, after, limit)
        .await
        .ok_or_else(|| no_trigger(&id))?;
    Ok(
        Json(json!({"deliveries": list, "next_cursor": next.map(|n| n.to_string())}))
            .into_response(),
    )
}

/// `POST /v1/triggers/{id}/deliveries/{delivery}/retry` → 202
pub async fn retry(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, delivery)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    svc.grid.retry_delivery(&id, &delivery).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": delivery, "status": "pending"})),
    )
        .into_response())
}

/// `GET /v1/segments/{id}/stream`: `event: entered|exited`, `id: <change sequence>`,
/// `data: {"profile_id", "reason", "occurred_at"}`; resumes after `Last-Event-ID` from the
/// segment's buffer, else starts with `event: reset`; keep-alive comments every 15 s.
pub async fn stream(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let idx = svc
        .grid
        .segments
        .find(&id)
        .ok_or_else(|| ApiError::not_found(format!("no segment has the id {id:?}")))?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let actor = svc
        .grid
        .segments
        .actor(idx)
        .ok_or_else(|| ApiError::not_found(format!("no segment has the id {id:?}")))?;
    let listener = actor
        .listen(after)
        .await
        .ok_or_else(|| ApiError::not_found(format!("segment {id:?} was deleted")))?;
    let to_event = |item: StreamItem| -> Result<Event, Infallible> {
        Ok(match item {
            StreamItem::Reset => Event::default().event("reset").data("{}"),
            StreamItem::Change(c) => Event::default()
                .event(if c.entered { "entered" } else { "exited" })
                .id(c.seq.to_string())
                .data(
                    json!({
                        "profile_id": c.profile.to_string(),
                        "reason": c.reason.as_str(),
                        "occurred_at": crate::segment::timefmt::format_ms(c.at),
                    })
                    .to_string(),
                ),
        })
    };
    let backlog = futures_util::stream::iter(listener.backlog.into_iter().map(to_event));
    let live = futures_util::stream::unfold(listener.live, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    use futures_util::StreamExt;
    let events = backlog.chain(live.map(to_event));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
