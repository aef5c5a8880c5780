//! The rule language: paths, typed comparisons, property conditions, segment rules, their
//! compiled form and the per-profile event counters they read.
//!
//! Owns parsing and validating rules and conditions (errors carry a JSON path into the
//! input), compiling rules with their dependency sets, and evaluating them over any
//! [`compile::Subject`] / [`value_view::JsonView`]. It must not touch profiles, actors or
//! storage: callers hand it values, counters and the current time.

pub mod compile;
pub mod cond;
pub mod counter;
pub mod mapping;
pub mod path;
pub mod rule;
pub mod set;
pub mod timefmt;
pub mod value_view;
