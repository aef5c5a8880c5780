//! The HTTP API (axum): routes, authentication, query/body parsing and error translation.
//!
//! Owns nothing but the translation between HTTP and the services below it: handlers parse
//! and authenticate, call one service function, and turn its [`crate::error::Problem`]
//! into a response through [`error::ApiError`]. No domain logic lives here.

pub mod admin;
pub mod auth;
pub mod error;
pub mod events;
pub mod export;
pub mod extract;
pub mod ingest;
pub mod mappings;
pub mod ops;
pub mod profiles;
pub mod segments;
pub mod snapshots;
pub mod triggers;

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::error::{ErrorCode, Problem};
use crate::grid::Grid;
use crate::ingest::Ingestor;
use auth::Keys;
use error::ApiError;

/// What handlers need once recovery has finished.
pub struct Services {
    /// The actor grid.
    pub grid: Arc<Grid>,
    /// The ingest service.
    pub ingestor: Ingestor,
    /// Keys in force.
    pub keys: Keys,
}

/// Shared state of the router: services appear when recovery is done.
pub struct AppState {
    /// Set once, when the server is ready.
    pub services: OnceLock<Arc<Services>>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

impl AppState {
    /// The services, or 503 `recovering` while the server starts.
    pub fn ready(&self) -> Result<&Arc<Services>, ApiError> {
        self.services.get().ok_or_else(|| {
            ApiError(Problem::new(
                ErrorCode::Recovering,
                "the server is still recovering its data; retry shortly",
            ))
        })
    }

    /// The services for an admin request (ready and Bearer-authenticated).
    pub fn admin(&self, headers: &HeaderMap) -> Result<&Arc<Services>, ApiError> {
        let s = self.ready()?;
        s.keys.admin_auth(headers)?;
        Ok(s)
    }
}

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/v1/identify", post(ingest::identify))
        .route("/v1/track", post(ingest::track))
        .route("/v1/page", post(ingest::page))
        .route("/v1/screen", post(ingest::screen))
        .route("/v1/group", post(ingest::group))
        .route("/v1/alias", post(ingest::alias))
        .route("/v1/batch", post(ingest::batch))
        .route("/v1/import", post(ingest::batch))
        .route("/v1/profiles", get(profiles::list))
        .route("/v1/profiles/query", post(segments::query))
        .route("/v1/segments", get(segments::list).post(segments::create))
        .route("/v1/segments/preview", post(segments::preview))
        .route(
            "/v1/segments/{id}",
            get(segments::get_one)
                .put(segments::replace)
                .delete(segments::delete),
        )
        .route("/v1/segments/{id}/members", get(segments::members))
        .route("/v1/segments/{id}/stream", get(triggers::stream))
        .route("/v1/mappings", get(mappings::list).post(mappings::create))
        .route(
            "/v1/mappings/{id}",
            get(mappings::get_one).delete(mappings::delete),
        )
        .route("/v1/mappings/{id}/stats", get(mappings::stats))
        .route("/v1/export/profiles", get(export::profiles))
        .route("/v1/export/events", get(export::events))
        .route("/v1/import/profiles", post(export::import))
        .route("/v1/triggers", get(triggers::list).post(triggers::create))
        .route(
            "/v1/triggers/{id}",
            get(triggers::get_one).delete(triggers::delete),
        )
        .route("/v1/triggers/{id}/deliveries", get(triggers::deliveries))
        .route(
            "/v1/triggers/{id}/deliveries/{delivery}/retry",
            post(triggers::retry),
        )
        .route(
            "/v1/profiles/{key}",
            get(profiles::get_one).delete(profiles::delete),
        )
        .route(
            "/v1/profiles/{key}/traits",
            axum::routing::patch(profiles::patch_traits),
        )
        .route("/v1/profiles/{key}/events", get(events::profile_events))
        .route("/v1/profiles/{key}/segments", get(profiles::segments))
        .route("/v1/profiles/{key}/merges", get(profiles::merges))
        .route("/v1/events", get(events::global_events))
        .route(
            "/v1/admin/clock",
            get(admin::get_clock).post(admin::advance_clock),
        )
        .route(
            "/v1/admin/snapshots",
            get(snapshots::list).post(snapshots::create),
        )
        .route("/v1/admin/snapshots/{id}", get(snapshots::download))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        // Bodies are bounded by each handler (before and after gunzip), with our own errors.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}
