//! User360: a self-hosted, real-time Customer Data Platform engine.
//!
//! An actor-based in-memory data grid: each user profile is a virtual actor hosted by a
//! shard actor; a sharded registry routes every message to its shard; every change is a
//! record in the shard's log, which is also the event store.
//!
//! # Layout
//! - [`config`]: settings (embedded defaults < file < `USER360_*` env < flags).
//! - [`error`]: error codes and [`error::Problem`], shared by every layer.
//! - [`domain`]: pure data and rules: ids, compact values, identities, messages, profiles.
//! - [`segment`]: the rule language (paths, comparisons, property conditions).
//! - [`ingest`]: from ingest request bytes to validated, deduplicated, routed messages.
//! - [`grid`]: actors: registry, shards (hosting profiles), clock and timers, catalog.
//! - [`store`]: the per-shard log (WAL + event store), group commit, snapshots and backup
//!   files, codec, data dir metadata.
//! - [`export`]: export and import formats (CSV, JSONL, formula guard, import row rules).
//! - [`api`]: axum routes; parse, authenticate, translate errors; nothing else.
//! - [`server`]: start (keys, shard count, bind, recover) and graceful shutdown.
//! - [`cli`]: the other commands (`export`, `import`, `snapshot create|restore|inspect`).
//!
//! # Data flow
//! HTTP → `api::ingest` (auth, bounded body) → `ingest::Ingestor` (decode, parse,
//! validate, dedup, resolve identities in `grid::registry`) → `grid::Grid::apply` (one
//! `ApplyBatch` per shard) → `grid::shard::Shard` (apply to profiles, append to the log,
//! flush) → answer. See `docs/architecture.md`.

/// Installs the TLS crypto provider (rustls with ring) for every HTTP client of the
/// process: webhook delivery, the CLI, the load generator, tests. Without it, building a
/// client panics; calling it twice is harmless.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub mod api;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod export;
pub mod grid;
pub mod ingest;
pub mod segment;
pub mod server;
pub mod store;
