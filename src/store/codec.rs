//! The one place that turns records into bytes and back.
//!
//! bincode 2.x with a leading format-version byte. bincode is unmaintained, so nothing
//! else in the crate names it: swapping the encoding means editing this file and bumping
//! [`FORMAT_VERSION`] (old versions stay decodable here).
//!
//! Versions: 1 (first release of the log and snapshots); 2 adds segment state — log
//! records for memberships, counter installs and counter values, and memberships, counters
//! and counter specs in snapshot chunks. Types whose layout changed (log records, snapshot
//! chunks) decode version-1 bytes through [`decode_evolved`] and their `v1` forms
//! (`store::compat`); every other type is laid out the same in both versions. A new
//! enum variant appended at the end (log records for the outbox, fillers, compact standard
//! events, merge-list notes) keeps the version: every older record still decodes the same.

use bincode::{Decode, Encode};

/// Version byte written before every encoded value.
pub const FORMAT_VERSION: u8 = 2;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Empty input.
    #[error("empty record")]
    Empty,
    /// A version this build does not know.
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    /// The bytes do not decode.
    #[error("undecodable record: {0}")]
    Decode(String),
    /// The value does not encode.
    #[error("unencodable record: {0}")]
    Encode(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Appends the version byte and the encoding of `value` to `out`.
pub fn encode_into<T: Encode>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(FORMAT_VERSION);
    bincode::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

fn decode_exact<T: Decode<()>>(rest: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::decode_from_slice(rest, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != rest.len() {
        return Err(CodecError::Decode(format!(
            "{} trailing bytes",
            rest.len() - used
        )));
    }
    Ok(value)
}

/// Decodes a value written by [`encode_into`], of a type laid out the same in every
/// version.
pub fn decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version == 0 || version > FORMAT_VERSION {
        return Err(CodecError::UnknownVersion(version));
    }
    decode_exact(rest)
}

/// Decodes a value of a type whose layout changed in version 2: version-1 bytes decode as
/// `V1` and convert.
pub fn decode_evolved<T: Decode<()>, V1: Decode<()> + Into<T>>(
    bytes: &[u8],
) -> Result<T, CodecError> {
    let (&version, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    match version {
        1 => decode_exact::<V1>(rest).map(Into::into),
        FORMAT_VERSION => decode_exact(rest),
        v => Err(CodecError::UnknownVersion(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Encode, Decode)]
    struct Sample {
        a: u64,
        b: String,
    }

    #[test]
    fn round_trip_and_version_check() {
        let mut out = Vec::new();
        encode_into(
            &Sample {
                a: 7,
                b: "x\0y".into(),
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(out[0], FORMAT_VERSION);
        let back: Sample = decode(&out).unwrap();
        assert_eq!(back.b, "x\0y");
        out[0] = 99;
        assert!(matches!(
            decode::<Sample>(&out),
            Err(CodecError::UnknownVersion(99))
        ));
        assert!(decode::<Sample>(&out[..0]).is_err());
    }
}
