//! Pure data and rules of the domain: ids, compact values, identities, messages, profiles
//! and stored events.
//!
//! Owns how a profile changes when a message is applied (trait times, standard events,
//! identity normalisation and limits). It must not do I/O, talk to actors or know HTTP:
//! the grid calls these functions inside a shard's step, and replay calls the same ones.

pub mod event;
pub mod identity;
pub mod ids;
pub mod message;
pub mod profile;
pub mod value;
