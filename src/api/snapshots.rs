//! Backups: cut a snapshot, list them, download one as a self-checking file.

use std::sync::Arc;

use super::extract::Path;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use crate::error::{ErrorCode, Problem};
use crate::segment::timefmt::format_ms;
use crate::store::snapshot::Manifest;

fn view(m: &Manifest) -> serde_json::Value {
    json!({"id": m.id.to_string(), "created_at": format_ms(m.created_at), "profiles": m.profiles(), "bytes": m.bytes()})
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError(Problem::new(
        ErrorCode::Unavailable,
        format!("cannot take or read snapshots: {e}"),
    ))
}

/// `POST /v1/admin/snapshots`: takes a snapshot now.
pub async fn create(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let m = svc.grid.snapshot().await.map_err(unavailable)?;
    Ok((StatusCode::CREATED, Json(view(&m))).into_response())
}

/// `GET /v1/admin/snapshots`: committed snapshots, newest first.
pub async fn list(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let all = svc.grid.snapshots.manifests().map_err(unavailable)?;
    let items: Vec<serde_json::Value> = all.iter().map(view).collect();
    Ok(Json(json!({"snapshots": items, "next_cursor": null})).into_response())
}

/// `GET /v1/admin/snapshots/{id}`: the backup file (snapshot plus the log up to its cut).
pub async fn download(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?.clone();
    let not_found = || ApiError::not_found(format!("no snapshot with id {id:?}"));
    let wanted: u64 = id.parse().map_err(|_| not_found())?;
    // Hold off other snapshots (which prune and delete log segments) while copying.
    let guard = svc.grid.snapshot_guard().await;
    let manifest = svc
        .grid
        .snapshots
        .manifests()
        .map_err(unavailable)?
        .into_iter()
        .find(|m| m.id == wanted)
        .ok_or_else(not_found)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(8);
    let grid = svc.grid.clone();
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let writer = ChannelWriter { tx: tx.clone() };
        if let Err(e) = crate::store::backup::write_backup(
            writer,
            &grid.snapshots,
            &manifest,
            &grid.settings.data_dir,
        ) {
            tracing::error!(error = %e, "backup download failed");
            // An error after the first byte aborts the response: a cut file never looks whole.
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"user360-snapshot-{wanted}.u360bak\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Sends written bytes to the response body.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(bytes::Bytes::copy_from_slice(buf)))
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
            })?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
