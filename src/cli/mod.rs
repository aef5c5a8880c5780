//! Command-line tools besides `serve`: talking to a server (`--server URL --token T`) or to
//! a data dir, with progress bars on stderr for long work.
//!
//! Owns argument-level behaviour only; the work itself is done by `store` (backup files)
//! and the server's HTTP API.

pub mod snapshot;
pub mod transfer;
