//! Settings: `config/default.toml` (embedded) < `--config FILE` < `USER360_*` env < flags.
//!
//! Owns the shape of every setting and its validation. It must not open the data dir or
//! start anything: `server::run` does that with a validated [`Settings`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};

/// The defaults shipped with the binary, so `user360 serve` runs with no files around it.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Every setting of a running server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to bind; port 0 takes a free port.
    pub listen: String,
    /// Where logs, keys, snapshots and the shard count live.
    pub data_dir: PathBuf,
    /// Bearer token for the admin API; empty means "create a development token".
    #[serde(deserialize_with = "string_like")]
    pub admin_token: String,
    /// Accepted ingest write keys; empty means "create a development key".
    #[serde(deserialize_with = "string_or_list")]
    pub write_keys: Vec<String>,
    /// Shard count for a new data dir; 0 = one per core.
    pub shards: usize,
    /// `system` or `manual` (test clock).
    pub clock: ClockSetting,
    /// `sync` or `relaxed`.
    pub durability: Durability,
    /// Ingest limits.
    pub ingest: IngestSettings,
    /// messageId deduplication.
    pub dedup: DedupSettings,
    /// Event retention.
    pub events: EventSettings,
    /// Identity resolution rules.
    pub identity: IdentitySettings,
    /// Webhook triggers.
    pub triggers: TriggerSettings,
    /// Server-sent event streams.
    pub stream: StreamSettings,
    /// Query bounds.
    pub query: QuerySettings,
    /// Periodic snapshots.
    pub snapshots: SnapshotSettings,
    /// A TOML file of mappings loaded at start (`[[mappings]]` tables); missing is fine.
    pub mappings_file: PathBuf,
}

/// When snapshots are taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSettings {
    /// Seconds of server time between periodic snapshots (0: only at shutdown and on demand).
    pub interval_seconds: u64,
}

/// Which clock drives server time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockSetting {
    /// Wall-clock time.
    System,
    /// Time stands still until `POST /v1/admin/clock` moves it (tests only).
    Manual,
}

/// When a 200 is sent relative to the disk flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Answer after the accepted messages are on disk.
    Sync,
    /// Answer before the flush; a crash may lose the last flush interval.
    Relaxed,
}

/// Limits on what one request or message may carry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    /// Largest message (JSON text bytes).
    pub max_message_bytes: usize,
    /// Largest body after decompression.
    pub max_body_bytes: usize,
    /// Most messages per batch.
    pub max_batch_messages: usize,
    /// Deepest nesting per message.
    pub max_depth: usize,
    /// Clamp event times further ahead than this.
    pub max_future_skew_ms: i64,
    /// Most top-level trait keys per profile.
    pub max_trait_keys: usize,
    /// Most trait bytes (JSON text) per profile.
    pub max_trait_bytes: usize,
    /// Messages queued per shard before 429.
    pub shard_queue_messages: usize,
    /// Trait updates whose event times are this close are ordered by arrival.
    pub same_time_ms: i64,
}

/// How long messageIds are remembered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupSettings {
    /// Window in hours.
    pub window_hours: u64,
    /// Most ids remembered.
    pub max_ids: usize,
}

/// Timeline retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// Events kept per profile.
    pub max_per_profile: usize,
    /// Days kept, counted from received_at.
    pub retention_days: u64,
}

/// A per-type identity limit, optionally over a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IdentityLimit {
    /// Most identities of the type.
    pub max: usize,
    /// Only identities first seen within this many ms count (None: all).
    pub per_ms: Option<i64>,
}

impl<'de> Deserialize<'de> for IdentityLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Max(usize),
            Windowed { max: usize, per: String },
        }
        match Raw::deserialize(d)? {
            Raw::Max(max) => Ok(IdentityLimit { max, per_ms: None }),
            Raw::Windowed { max, per } => {
                let per_ms = parse_duration_ms(&per).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "invalid identity limit window {per:?}; expected a number and a unit (d, h, m, s), like \"7d\""
                    ))
                })?;
                Ok(IdentityLimit {
                    max,
                    per_ms: Some(per_ms),
                })
            }
        }
    }
}

/// Identity resolution rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// Limits per type (`default` for custom types).
    pub limits: BTreeMap<String, IdentityLimit>,
    /// Priority order, highest first.
    pub priority: Vec<String>,
    /// Extra blocked values per type.
    pub blocked: BTreeMap<String, Vec<String>>,
}

/// Webhook delivery settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSettings {
    /// Attempts before `failed`.
    pub max_attempts: u32,
    /// Days of delivery history.
    pub history_days: u64,
    /// Time allowed for one delivery attempt (connect, send, answer).
    pub timeout_ms: u64,
    /// Deliveries in flight at once per trigger (its endpoint).
    pub max_concurrency: usize,
    /// Wait before the first retry; it doubles with every attempt.
    pub first_retry_ms: u64,
    /// Longest wait between attempts.
    pub max_retry_ms: u64,
}

/// SSE settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    /// Changes buffered per segment for resumption.
    pub buffer: usize,
}

/// Query bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySettings {
    /// Time budget of one query.
    pub timeout_ms: u64,
}

/// Settings given on the command line; they override everything else.
#[derive(Debug, Default, Clone)]
pub struct FlagOverrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or has a bad value.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Loads the layers in order and validates the result.
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(
            Env::prefixed("USER360_")
                // USER360_LOG is the log filter, read by the binary, not a setting.
                .ignore(&["log"])
                .split("__")
                .map(|k| k.as_str().to_ascii_lowercase().into()),
        );
        if let Some(listen) = &flags.listen {
            figment = figment.merge(Serialized::default("listen", listen));
        }
        if let Some(dir) = &flags.data_dir {
            figment = figment.merge(Serialized::default("data_dir", dir));
        }
        let settings: Settings = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Default settings as shipped (for tests and tools).
    pub fn defaults() -> Settings {
        Figment::from(Toml::string(DEFAULT_TOML))
            .extract()
            .expect("embedded default.toml is valid")
    }

    /// Checks values that serde cannot check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.listen_addr().is_err() {
            return bad(format!(
                "listen = {:?} is not an address like 127.0.0.1:8080",
                self.listen
            ));
        }
        if self.clock == ClockSetting::Manual && !self.listen_is_loopback() {
            return bad(format!(
                "clock = \"manual\" is allowed only on a loopback listen address, not {}",
                self.listen
            ));
        }
        let i = &self.ingest;
        if i.max_message_bytes == 0 || i.max_body_bytes == 0 || i.max_batch_messages == 0 {
            return bad("ingest limits must be greater than 0".into());
        }
        if i.max_depth == 0 || i.max_depth > 10_000 {
            return bad(format!(
                "ingest.max_depth = {} must be between 1 and 10000",
                i.max_depth
            ));
        }
        if self.shards > 4096 {
            return bad(format!("shards = {} is more than 4096", self.shards));
        }
        for ty in self
            .identity
            .limits
            .keys()
            .chain(self.identity.priority.iter())
        {
            if ty != "default" && !crate::domain::identity::valid_type_name(ty) {
                return bad(format!(
                    "identity type {ty:?} must match [a-z0-9_.]{{1,64}} and not be \"id\""
                ));
            }
        }
        Ok(())
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        let s = self.listen.trim();
        let s = s
            .strip_prefix("http://")
            .unwrap_or(s)
            .replace("localhost", "127.0.0.1");
        s.parse()
    }

    /// True when the listen address is only reachable from this machine.
    pub fn listen_is_loopback(&self) -> bool {
        self.listen_addr()
            .map(|a| a.ip().is_loopback())
            .unwrap_or(false)
    }
}

/// A scalar taken as text: environment layers turn `USER360_ADMIN_TOKEN=123` into a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn into_text(self) -> String {
        match self {
            Scalar::Text(s) => s,
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

fn string_like<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Scalar::deserialize(d)?.into_text())
}

fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(Scalar),
        Many(Vec<Scalar>),
    }
    let list: Vec<String> = match Raw::deserialize(d)? {
        Raw::One(s) => s.into_text().split(',').map(str::to_owned).collect(),
        Raw::Many(v) => v.into_iter().map(Scalar::into_text).collect(),
    };
    Ok(list
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect())
}

/// Parses `7d`, `12h`, `30m`, `45s` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let unit_at = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(unit_at);
    let n: i64 = num.parse().ok()?;
    let mult = match unit {
        "d" => 86_400_000,
        "h" => 3_600_000,
        "m" => 60_000,
        "s" => 1_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_validate() {
        let s = Settings::defaults();
        s.validate().unwrap();
        assert_eq!(s.ingest.max_message_bytes, 32 * 1024);
        assert_eq!(s.identity.limits["user_id"].max, 1);
        assert_eq!(s.clock, ClockSetting::System);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("7d"), Some(7 * 86_400_000));
        assert_eq!(parse_duration_ms("x"), None);
        assert_eq!(parse_duration_ms("5w"), None);
    }
}
