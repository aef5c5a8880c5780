//! The rule language: paths, typed comparisons and property conditions (used now by
//! `GET /v1/events?where=`; segment rules build on them).
//!
//! Owns parsing and validating conditions (errors carry a JSON path into the input) and
//! evaluating them over any [`value_view::JsonView`]. It must not touch profiles, actors or
//! storage: callers hand it values and the current time.

pub mod cond;
pub mod path;
pub mod timefmt;
pub mod value_view;
