//! Dot paths into nested JSON objects (`address.city`, `address\.city`):
//! parsing with `\.` / `\\` escapes and printing back in the same syntax.

use std::fmt;

/// A parsed dot path; segments are exact keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Path {
    segments: Vec<String>,
}

impl Path {
    /// Parses the rule syntax so lookups work on exact keys; the error message names the bad input.
    pub fn parse(s: &str) -> Result<Path, String> {
        let shown = quote(s);
        if s.is_empty() {
            return Err(format!(
                "invalid path {shown}: a path needs at least one key"
            ));
        }
        let empty_key = |n: usize| format!("invalid path {shown}: key {n} is empty");
        let mut segments = Vec::new();
        let mut current = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(escaped @ ('.' | '\\')) => current.push(escaped),
                    Some(other) => {
                        return Err(format!(
                            "invalid path {shown}: unknown escape {}; only a dot or a backslash may follow a backslash",
                            quote(&format!("\\{other}"))
                        ));
                    }
                    None => {
                        return Err(format!(
                            "invalid path {shown}: a trailing backslash must be escaped as two backslashes"
                        ));
                    }
                },
                '.' => {
                    if current.is_empty() {
                        return Err(empty_key(segments.len() + 1));
                    }
                    segments.push(std::mem::take(&mut current));
                }
                other => current.push(other),
            }
        }
        if current.is_empty() {
            return Err(empty_key(segments.len() + 1));
        }
        segments.push(current);
        Ok(Path { segments })
    }

    /// The exact keys, outermost first, so value types can walk them.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// A path of exact keys (none empty), e.g. the tail of another path.
    pub fn from_segments(segments: Vec<String>) -> Path {
        debug_assert!(!segments.is_empty());
        Path { segments }
    }

    /// A one-key path (key taken literally), for callers that already hold a raw key.
    ///
    /// An empty key is allowed here, but its display (`""`) does not parse back.
    pub fn single(key: &str) -> Path {
        Path {
            segments: vec![key.to_owned()],
        }
    }
}

impl fmt::Display for Path {
    /// Re-escapes dots and backslashes so the output parses back to the same path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            for c in segment.chars() {
                if matches!(c, '.' | '\\') {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// Shows a string the way it appears in JSON input.
fn quote(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(s: &str) -> Vec<String> {
        Path::parse(s).unwrap().segments().to_vec()
    }

    #[test]
    fn plain_and_nested() {
        assert_eq!(segs("plan"), ["plan"]);
        assert_eq!(segs("address.city"), ["address", "city"]);
        assert_eq!(segs("a.b.c"), ["a", "b", "c"]);
        assert_eq!(segs("with space.ünï"), ["with space", "ünï"]);
    }

    #[test]
    fn escapes() {
        assert_eq!(segs(r"address\.city"), ["address.city"]);
        assert_eq!(segs(r"a\\b"), [r"a\b"]);
        assert_eq!(segs(r"a\\.b"), [r"a\", "b"]);
        assert_eq!(segs(r"a\\\.b"), [r"a\.b"]);
        assert_eq!(segs(r"\."), ["."]);
        assert_eq!(segs(r"x.\.\."), ["x", ".."]);
    }

    #[test]
    fn errors_name_the_input() {
        for (input, fragment) in [
            ("", "at least one key"),
            ("a..b", "key 2 is empty"),
            ("a.", "key 2 is empty"),
            (".a", "key 1 is empty"),
            (".", "key 1 is empty"),
            (r"a\b", "unknown escape"),
            ("a\\", "trailing backslash"),
        ] {
            let err = Path::parse(input).unwrap_err();
            assert!(err.contains(&quote(input)), "{err}");
            assert!(err.contains(fragment), "{err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for input in [
            "plan",
            "address.city",
            r"address\.city",
            r"a\\b",
            r"a\\\.b.c",
            r"\.\\",
        ] {
            let path = Path::parse(input).unwrap();
            assert_eq!(path.to_string(), input);
            assert_eq!(Path::parse(&path.to_string()).unwrap(), path);
        }
    }

    #[test]
    fn single_is_literal() {
        let path = Path::single("address.city");
        assert_eq!(path.segments(), ["address.city"]);
        assert_eq!(path.to_string(), r"address\.city");
        assert_eq!(Path::parse(&path.to_string()).unwrap(), path);
        let path = Path::single(r"a\b");
        assert_eq!(path.to_string(), r"a\\b");
        assert_eq!(Path::parse(&path.to_string()).unwrap(), path);
    }
}
