//! Error codes shared by every layer, and [`Problem`]: a code, a human message naming the
//! field and value, and the JSON path.
//!
//! Modules return their own typed errors or a `Problem`; only `api::error` turns a code
//! into an HTTP status, so no handler decides a status by itself.

use std::fmt;

/// Every error code of the API (`code` in error bodies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The body (or one message) is not JSON, or holds a lone surrogate.
    InvalidJson,
    /// The body cannot be decoded (corrupt gzip).
    InvalidBody,
    /// A field has the wrong shape or type.
    InvalidField,
    /// No usable id.
    MissingId,
    /// Every id is a blocked value.
    BlockedId,
    /// Over a size limit.
    TooLarge,
    /// Nested too deep.
    TooDeep,
    /// A batch element past the limit.
    TooManyMessages,
    /// A profile's traits would pass their limits.
    TooManyTraits,
    /// A `Content-Encoding` other than gzip or identity.
    UnsupportedEncoding,
    /// No or wrong key.
    Unauthorized,
    /// Unknown resource.
    NotFound,
    /// Conflicts with existing state.
    Conflict,
    /// A rule, mapping or trigger definition is invalid.
    InvalidRule,
    /// Queues are full; retry later.
    Overloaded,
    /// Cannot persist right now.
    Unavailable,
    /// Still recovering at start.
    Recovering,
    /// The person was erased with suppression.
    Suppressed,
    /// A bug.
    Internal,
}

impl ErrorCode {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::MissingId => "missing_id",
            ErrorCode::BlockedId => "blocked_id",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::TooDeep => "too_deep",
            ErrorCode::TooManyMessages => "too_many_messages",
            ErrorCode::TooManyTraits => "too_many_traits",
            ErrorCode::UnsupportedEncoding => "unsupported_encoding",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::InvalidRule => "invalid_rule",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Recovering => "recovering",
            ErrorCode::Suppressed => "suppressed",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A client-facing error: what went wrong, where, in words that name the field and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human sentence (lowercase, no trailing period).
    pub message: String,
    /// JSON path of the offending field, when there is one.
    pub path: Option<String>,
}

impl Problem {
    /// A problem without a path.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Problem {
        Problem {
            code,
            message: message.into(),
            path: None,
        }
    }

    /// A problem at `path`.
    pub fn at(code: ErrorCode, path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            code,
            message: message.into(),
            path: Some(path.into()),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for Problem {}
