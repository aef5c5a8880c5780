//! The one place an error code becomes an HTTP status and a JSON error body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{ErrorCode, Problem};

/// An error on its way out as a response.
#[derive(Debug)]
pub struct ApiError(pub Problem);

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        ApiError(p)
    }
}

impl ApiError {
    /// 400 `invalid_field` at `path`.
    pub fn field(path: &str, message: impl Into<String>) -> ApiError {
        ApiError(Problem::at(ErrorCode::InvalidField, path, message))
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError(Problem::new(ErrorCode::NotFound, message))
    }
}

/// The HTTP status of an error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidJson
        | ErrorCode::InvalidBody
        | ErrorCode::InvalidField
        | ErrorCode::MissingId
        | ErrorCode::BlockedId
        | ErrorCode::TooDeep
        | ErrorCode::TooManyMessages
        | ErrorCode::TooManyTraits
        | ErrorCode::InvalidRule
        | ErrorCode::Suppressed => StatusCode::BAD_REQUEST,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable | ErrorCode::Recovering => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let p = self.0;
        let status = status_of(p.code);
        let path = p.path.filter(|path| !path.is_empty());
        let body = json!({"code": p.code.as_str(), "message": p.message, "path": path});
        let mut resp = (status, Json(body)).into_response();
        if matches!(
            p.code,
            ErrorCode::Overloaded | ErrorCode::Unavailable | ErrorCode::Recovering
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if p.code == ErrorCode::Unauthorized {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"user360\""),
            );
        }
        resp
    }
}
