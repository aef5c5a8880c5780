//! Export and import endpoints: profiles and events streamed out as CSV or JSONL, and
//! profiles streamed in.

use std::collections::HashMap;
use std::sync::Arc;

use super::extract::Query;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use super::events::parse_filter;
use crate::error::{ErrorCode, Problem};
use crate::export::{default_columns, parse_fields};
use crate::grid::export::{ImportFormat, ProfileFormat};
use crate::segment::compile::SegIdx;

fn format_of(q: &HashMap<String, String>) -> Result<bool, ApiError> {
    match q.get("format").map(String::as_str) {
        None | Some("jsonl") => Ok(false),
        Some("csv") => Ok(true),
        Some(other) => Err(ApiError::field(
            "format",
            format!("format must be csv or jsonl, got {other:?}"),
        )),
    }
}

fn segment_of(
    app: &crate::api::Services,
    q: &HashMap<String, String>,
) -> Result<Option<SegIdx>, ApiError> {
    match q.get("segment").filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => app.grid.segments.find(s).map(Some).ok_or_else(|| {
            ApiError(Problem::at(
                ErrorCode::NotFound,
                "segment",
                format!("no segment has the id {s:?}"),
            ))
        }),
    }
}

fn streamed(csv: bool, body: Body) -> Response {
    let ct = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    (StatusCode::OK, [(header::CONTENT_TYPE, ct)], body).into_response()
}

/// `GET /v1/export/profiles?format=csv|jsonl&segment=&fields=`
pub async fn profiles(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let csv = format_of(&q)?;
    let segment = segment_of(svc, &q)?;
    let fields = match q.get("fields").filter(|f| !f.trim().is_empty()) {
        None => None,
        Some(f) => Some(parse_fields(f).map_err(|e| ApiError::field("fields", e))?),
    };
    let format = match (csv, fields) {
        (false, f) => ProfileFormat::Jsonl(f),
        (true, Some(f)) => ProfileFormat::Csv(f),
        (true, None) => ProfileFormat::Csv(default_columns(
            &svc.grid.registry.custom_type_names(),
            &svc.grid.catalog.sorted(),
        )),
    };
    let stream = svc.grid.export_profiles(format, segment);
    Ok(streamed(csv, Body::from_stream(stream)))
}

/// `GET /v1/export/events?format=csv|jsonl&name=&type=&since=&until=&segment=`
pub async fn events(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?;
    let csv = format_of(&q)?;
    let segment = segment_of(svc, &q)?;
    let mut filter = parse_filter(&q)?;
    filter.before = None;
    let stream = svc.grid.export_events(filter, segment, csv);
    Ok(streamed(csv, Body::from_stream(stream)))
}

/// `POST /v1/import/profiles?format=csv|jsonl` (body streamed; gzip allowed)
pub async fn import(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> Result<Response, ApiError> {
    let svc = app.admin(&headers)?.clone();
    let format = match q.get("format").map(String::as_str) {
        Some("csv") => ImportFormat::Csv,
        Some("jsonl") => ImportFormat::Jsonl,
        None => {
            return Err(ApiError::field(
                "format",
                "format is required: csv or jsonl",
            ));
        }
        Some(other) => {
            return Err(ApiError::field(
                "format",
                format!("format must be csv or jsonl, got {other:?}"),
            ));
        }
    };
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| {
            v.to_str()
                .unwrap_or("(not text)")
                .trim()
                .to_ascii_lowercase()
        })
        .as_deref()
    {
        None | Some("identity") => false,
        Some("gzip") => true,
        Some(other) => {
            return Err(ApiError(Problem::new(
                ErrorCode::UnsupportedEncoding,
                format!("Content-Encoding {other:?} is not supported; use gzip or identity"),
            )));
        }
    };
    // The body goes to the parser as it arrives; a full queue holds the client back.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let item = chunk.map_err(|e| std::io::Error::other(e.to_string()));
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    let answer = svc.grid.import(format, gzip, rx).await?;
    Ok(Json(answer).into_response())
}
