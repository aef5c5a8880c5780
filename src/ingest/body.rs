//! Request bodies: `Content-Encoding` handling and bounded gzip inflation.
//!
//! A gzip body is inflated only up to the body limit, so a bomb costs at most that much
//! memory; the error names the limit.

use std::io::Read;

use crate::error::{ErrorCode, Problem};

/// Decodes a body according to its `Content-Encoding`, refusing more than `max` bytes.
pub fn decode(encoding: Option<&str>, raw: &[u8], max: usize) -> Result<Vec<u8>, Problem> {
    let enc = encoding.map(|e| e.trim().to_ascii_lowercase());
    match enc.as_deref() {
        None | Some("") | Some("identity") => {
            if raw.len() > max {
                return Err(too_large(max));
            }
            Ok(raw.to_vec())
        }
        Some("gzip") | Some("x-gzip") => {
            let mut out = Vec::with_capacity((raw.len() * 4).min(max + 1));
            let mut dec = flate2::read::MultiGzDecoder::new(raw).take(max as u64 + 1);
            match dec.read_to_end(&mut out) {
                Ok(_) if out.len() > max => Err(too_large(max)),
                Ok(_) => Ok(out),
                Err(e) => Err(Problem::new(
                    ErrorCode::InvalidBody,
                    format!("the gzip body is corrupt or truncated: {e}"),
                )),
            }
        }
        Some(other) => Err(Problem::at(
            ErrorCode::UnsupportedEncoding,
            "Content-Encoding",
            format!("Content-Encoding {other:?} is not supported; use gzip or identity"),
        )),
    }
}

/// The error for a body over the limit.
pub fn too_large(max: usize) -> Problem {
    Problem::new(
        ErrorCode::TooLarge,
        format!(
            "the request body is larger than the limit of {max} bytes ({} MiB) after decompression",
            max / (1024 * 1024)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn encodings() {
        assert_eq!(decode(None, b"{}", 10).unwrap(), b"{}");
        assert_eq!(decode(Some("GZIP"), &gz(b"{}"), 10).unwrap(), b"{}");
        let z = gz(b"{\"a\":1}");
        assert_eq!(
            decode(Some("gzip"), &z[..z.len() - 5], 100)
                .unwrap_err()
                .code,
            ErrorCode::InvalidBody
        );
        assert_eq!(
            decode(Some("br"), b"{}", 10).unwrap_err().code,
            ErrorCode::UnsupportedEncoding
        );
        assert_eq!(
            decode(None, &[b' '; 11], 10).unwrap_err().code,
            ErrorCode::TooLarge
        );
        let bomb = gz(&vec![b' '; 10_000_000]);
        assert_eq!(
            decode(Some("gzip"), &bomb, 1000).unwrap_err().code,
            ErrorCode::TooLarge
        );
    }
}
