//! Keys: write keys for ingest (HTTP Basic username, or `writeKey` in the body only when
//! there is no Authorization header) and the admin token (Bearer) for everything else.
//! Every comparison is constant-time.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine;
use subtle::ConstantTimeEq;

use crate::error::{ErrorCode, Problem};

/// The keys in force.
#[derive(Clone)]
pub struct Keys {
    /// Accepted write keys.
    write_keys: Vec<String>,
    /// The admin token.
    admin_token: String,
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// What an ingest request's Authorization header said.
pub enum WriteAuth {
    /// A valid write key.
    Valid,
    /// No header: look for `writeKey` in the body.
    Absent,
}

impl Keys {
    /// Keys from settings (after development keys were filled in).
    pub fn new(write_keys: Vec<String>, admin_token: String) -> Keys {
        Keys {
            write_keys,
            admin_token,
        }
    }

    /// True for a configured write key.
    pub fn is_write_key(&self, key: &str) -> bool {
        // Check every key so the time taken does not depend on which one matched.
        self.write_keys
            .iter()
            .fold(false, |found, k| ct_eq(k, key) | found)
    }

    /// Checks an ingest request's Authorization header.
    pub fn write_auth(&self, headers: &HeaderMap) -> Result<WriteAuth, Problem> {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Ok(WriteAuth::Absent);
        };
        let value = value.to_str().unwrap_or("");
        let key = value
            .strip_prefix("Basic ")
            .or_else(|| value.strip_prefix("basic "))
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|b| String::from_utf8(b).ok())
            .map(|s| s.split_once(':').map(|(u, _)| u.to_owned()).unwrap_or(s));
        match key {
            Some(k) if self.is_write_key(&k) => Ok(WriteAuth::Valid),
            _ => Err(Problem::new(
                ErrorCode::Unauthorized,
                "the Authorization header does not carry a valid write key (HTTP Basic, the key as username, empty password)",
            )),
        }
    }

    /// Checks an admin request's Bearer token.
    pub fn admin_auth(&self, headers: &HeaderMap) -> Result<(), Problem> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        match token {
            Some(t) if ct_eq(t, &self.admin_token) => Ok(()),
            Some(_) => Err(Problem::new(
                ErrorCode::Unauthorized,
                "the Bearer token is not the admin token",
            )),
            None => Err(Problem::new(
                ErrorCode::Unauthorized,
                "this endpoint needs the admin token as Authorization: Bearer <token>",
            )),
        }
    }
}
