//! Storage: the per-shard segmented log (write-ahead log and event store in one), the
//! binary codec, and the data dir's metadata.
//!
//! Owns every byte written under the data dir. It must not know about actors or HTTP, nor
//! decide what a record means: the grid decides that and replays records through the same
//! domain functions.

pub mod backup;
pub mod codec;
pub mod compat;
pub mod definitions;
pub mod deliveries;
pub mod flush;
pub mod log;
pub mod meta;
pub mod snapshot;
