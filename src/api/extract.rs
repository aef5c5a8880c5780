//! Path and query extractors whose failures are the API's JSON errors.
//!
//! axum's own `Path` and `Query` answer a malformed request with a plain-text body, and
//! `Query` decodes bytes that are not UTF-8 into U+FFFD, so `fields=traits.%FF` would quietly
//! become another field. These wrappers take their place in every handler: a percent-encoded
//! segment or parameter that is not UTF-8 is a 400 `{code, message, path}` naming it.

use std::collections::HashMap;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Path parameters (`/v1/profiles/{key}`), decoded strictly.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(ApiError::field(
                "path",
                format!(
                    "the path {:?} cannot be read: {}",
                    parts.uri.path(),
                    e.body_text()
                ),
            )),
        }
    }
}

/// Query parameters by name (the last of a repeated one wins), each percent-decoded
/// (`+` is a space) and required to be UTF-8.
pub struct Query<T>(pub T);

impl<S: Send + Sync> FromRequestParts<S> for Query<HashMap<String, String>> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or("")).map(Query)
    }
}

/// Decodes `a=1&b=x%20y` strictly.
fn parse_query(raw: &str) -> Result<HashMap<String, String>, ApiError> {
    let decode = |s: &str| -> Result<String, String> {
        let spaced = s.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| s.to_owned())
    };
    let mut out = HashMap::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k).map_err(|raw| {
            ApiError::field(
                "query",
                format!("the query parameter name {raw:?} is not UTF-8 once percent-decoded"),
            )
        })?;
        let value = decode(v).map_err(|raw| {
            ApiError::field(
                &key,
                format!("the query parameter {key} ({raw:?}) is not UTF-8 once percent-decoded"),
            )
        })?;
        out.insert(key, value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_strictly() {
        let q = parse_query("fields=id%2Ctraits.plan&name=Order+Completed&empty=&flag").unwrap();
        assert_eq!(q["fields"], "id,traits.plan");
        assert_eq!(q["name"], "Order Completed");
        assert_eq!((q["empty"].as_str(), q["flag"].as_str()), ("", ""));
        assert_eq!(parse_query("a=1&a=2").unwrap()["a"], "2");
        let e = parse_query("limit=5&fields=traits.%FF").err().unwrap();
        assert_eq!(e.0.path.as_deref(), Some("fields"));
        assert!(e.0.message.contains("%FF"), "{}", e.0.message);
    }
}
