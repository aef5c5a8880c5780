//! Per-profile event counters: what an event condition of a rule reads instead of the
//! timeline, so evaluating it costs O(kept times), never O(events), and trimming old events
//! (retention, `events.max_per_profile`) never changes the membership of a segment.
//!
//! A [`CounterSpec`] is what one event condition counts (name, `where`, `per`, window). A
//! [`Counter`] is one profile's state for one spec:
//! - without a rolling window (no `within`, or `within.since`): a plain count (per value
//!   with `per`);
//! - with a rolling window: the exact times of the newest `keep` matching events, where
//!   `keep` is what the condition's comparison needs (`{"gte": 3}` needs 3). Older events can
//!   never change the answer: counts only fall as time passes, and new events are newer. So
//!   the answer, and the instant it next changes (the oldest kept time inside the window
//!   plus the window), are exact to the millisecond — no bucket edges.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cond::{PropertyCondition, Window, parse_conditions};
use super::path::Path;
use super::rule::{CountCmp, EventCond};
use super::value_view::{JsonView, View, lookup};

/// Distinct `per` values one counter keeps per profile; past it the value whose newest
/// event is oldest (or whose count is smallest) is forgotten.
pub const MAX_PER_VALUES: usize = 1000;

/// What an event condition counts. Two conditions with equal specs share one counter.
#[derive(Debug, Clone)]
pub struct CounterSpec {
    /// Event name.
    pub name: String,
    /// Conditions on the event's `properties`.
    pub where_: Vec<PropertyCondition>,
    /// `where` as written (part of the spec's identity).
    pub where_json: Value,
    /// Count per distinct value of this property.
    pub per: Option<Path>,
    /// Only events inside it count.
    pub window: Option<Window>,
    /// Newest event times kept (rolling windows); 0 for plain counts.
    pub keep: u32,
}

/// The stored (and logged) form of a spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecDef {
    /// Event name.
    pub event: String,
    /// `where` as written.
    #[serde(rename = "where")]
    pub where_: Value,
    /// `per` as written.
    pub per: Option<String>,
    /// `within` as written.
    pub within: Option<Value>,
    /// Newest times kept.
    pub keep: u32,
}

impl CounterSpec {
    /// The spec an event condition reads.
    pub fn for_condition(c: &EventCond) -> CounterSpec {
        let keep = match c.within {
            Some(Window::Duration { .. }) => c.count.needs().min(u32::MAX as u64) as u32,
            _ => 0,
        };
        CounterSpec {
            name: c.name.clone(),
            where_: c.where_.clone(),
            where_json: c.where_json.clone(),
            per: c.per.clone(),
            window: c.within,
            keep,
        }
    }

    /// The stored form.
    pub fn def(&self) -> SpecDef {
        SpecDef {
            event: self.name.clone(),
            where_: self.where_json.clone(),
            per: self.per.as_ref().map(|p| p.to_string()),
            within: self.window.map(|w| match w {
                Window::Duration { ms } => serde_json::json!({ "minutes": ms / 60_000 }),
                Window::Since { ms } => {
                    serde_json::json!({ "since": super::timefmt::format_ms(ms) })
                }
            }),
            keep: self.keep,
        }
    }

    /// Rebuilds a spec from its stored form; None if it no longer validates.
    pub fn from_def(d: &SpecDef) -> Option<CounterSpec> {
        let where_ = parse_conditions(&d.where_, "where").ok()?;
        let per = match &d.per {
            Some(p) => Some(Path::parse(p).ok()?),
            None => None,
        };
        let window = match &d.within {
            Some(w) => Some(Window::parse(w, "within").ok()?),
            None => None,
        };
        Some(CounterSpec {
            name: d.event.clone(),
            where_,
            where_json: d.where_.clone(),
            per,
            window,
            keep: d.keep,
        })
    }

    /// The spec's identity: equal keys count the same thing.
    pub fn key(&self) -> String {
        format!("{}\u{0}{}", self.base_key(), self.keep)
    }

    /// What the spec counts, regardless of how many times it keeps: conditions with equal
    /// base keys share one counter that keeps as many as the most demanding needs.
    pub fn base_key(&self) -> String {
        let w = match self.window {
            None => "all".to_owned(),
            Some(Window::Duration { ms }) => format!("last:{ms}"),
            Some(Window::Since { ms }) => format!("since:{ms}"),
        };
        format!(
            "{}\u{0}{}\u{0}{}\u{0}{w}",
            self.name,
            self.where_json,
            self.per.as_ref().map(|p| p.to_string()).unwrap_or_default(),
        )
    }

    /// The rolling window's length, if it has one.
    pub fn rolling_ms(&self) -> Option<i64> {
        match self.window {
            Some(Window::Duration { ms }) => Some(ms),
            _ => None,
        }
    }

    /// Whether an event (already known to carry this spec's name) counts, and under which
    /// `per` value: `None` = does not count; `Some(None)` = counts (no `per`).
    pub fn admits<V: JsonView>(
        &self,
        ts_ms: i64,
        properties: Option<&V>,
        now_ms: i64,
    ) -> Option<Option<String>> {
        if let Some(Window::Since { ms }) = self.window
            && ts_ms < ms
        {
            return None;
        }
        if !self.where_.iter().all(|c| c.matches(properties, now_ms)) {
            return None;
        }
        match &self.per {
            None => Some(None),
            Some(path) => per_key(properties.and_then(|p| lookup(p, path))?).map(Some),
        }
    }

    /// A fresh, empty counter for this spec.
    pub fn empty(&self) -> Counter {
        match (self.rolling_ms().is_some(), self.per.is_some()) {
            (false, false) => Counter::Total(0),
            (true, false) => Counter::Recent(Vec::new()),
            (false, true) => Counter::PerTotal(Vec::new()),
            (true, true) => Counter::PerRecent(Vec::new()),
        }
    }
}

/// The `per` value of an event as text; lists, objects and null do not count.
fn per_key<V: JsonView>(v: &V) -> Option<String> {
    match v.view() {
        View::Str(s) => Some(s.to_owned()),
        View::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => Some(format!("{}", n as i64)),
        View::Number(n) => Some(n.to_string()),
        View::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// One profile's counter for one spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub enum Counter {
    /// Matching events (all time, or since the window's start).
    Total(u64),
    /// Times of the newest matching events, newest first, at most `keep`.
    Recent(Vec<i64>),
    /// Per `per` value: matching events, sorted by value.
    PerTotal(Vec<(String, u64)>),
    /// Per `per` value: newest times, newest first, at most `keep` each; sorted by value.
    PerRecent(Vec<(String, Vec<i64>)>),
}

/// Inserts `ts` into newest-first `times`, keeping at most `keep`.
fn insert_time(times: &mut Vec<i64>, ts: i64, keep: usize) {
    if keep == 0 {
        return;
    }
    if times.len() >= keep && times.last().is_some_and(|&oldest| ts <= oldest) {
        return; // older than everything kept: it can never decide anything
    }
    let at = times.partition_point(|&t| t >= ts);
    times.insert(at, ts);
    times.truncate(keep);
}

/// Whether at least `k` of newest-first `times` are inside a window of `ms` ending at
/// `now` (then the k-th newest is): O(1).
fn at_least(times: &[i64], k: u64, ms: i64, now: i64) -> bool {
    k == 0 || (times.len() as u64 >= k && times[k as usize - 1] > now.saturating_sub(ms))
}

/// Whether the count of `times` inside the window satisfies `cmp`, in O(1).
fn holds_in_window(times: &[i64], cmp: CountCmp, ms: i64, now: i64) -> bool {
    let at = |k: u64| at_least(times, k, ms, now);
    match cmp {
        CountCmp::Gte(n) => at(n),
        CountCmp::Gt(n) => at(n + 1),
        CountCmp::Eq(n) => at(n) && !at(n + 1),
        CountCmp::Lte(n) => !at(n + 1),
        CountCmp::Lt(n) => !at(n),
    }
}

/// When `cmp` over the times inside the window next changes its answer by time alone:
/// counts only fall as events leave (the oldest first), so it is when the k-th newest
/// leaves, for the k at which the answer flips.
fn flips_at(times: &[i64], cmp: CountCmp, ms: i64, now: i64) -> Option<i64> {
    let at = |k: u64| at_least(times, k, ms, now);
    // The instant the count falls below `k` (the k-th newest leaves).
    let leaves = |k: u64| (k >= 1 && at(k)).then(|| times[k as usize - 1].saturating_add(ms));
    match cmp {
        CountCmp::Gte(n) | CountCmp::Lt(n) => leaves(n),
        CountCmp::Gt(n) | CountCmp::Lte(n) => leaves(n + 1),
        CountCmp::Eq(n) => leaves(n + 1).or_else(|| leaves(n)),
    }
    .filter(|t| *t > now)
}

impl Counter {
    /// Counts one event (its `per` value when the spec has `per`).
    pub fn record(&mut self, spec: &CounterSpec, ts_ms: i64, per: Option<&str>) {
        let keep = spec.keep as usize;
        match (self, per) {
            (Counter::Total(n), _) => *n += 1,
            (Counter::Recent(times), _) => insert_time(times, ts_ms, keep),
            (Counter::PerTotal(values), Some(v)) => {
                match values.binary_search_by(|(k, _)| k.as_str().cmp(v)) {
                    Ok(i) => values[i].1 += 1,
                    Err(i) => {
                        values.insert(i, (v.to_owned(), 1));
                        if values.len() > MAX_PER_VALUES {
                            let smallest =
                                (0..values.len()).min_by_key(|&j| values[j].1).unwrap_or(0);
                            values.remove(smallest);
                        }
                    }
                }
            }
            (Counter::PerRecent(values), Some(v)) => {
                match values.binary_search_by(|(k, _)| k.as_str().cmp(v)) {
                    Ok(i) => insert_time(&mut values[i].1, ts_ms, keep),
                    Err(i) => {
                        let mut times = Vec::with_capacity(1);
                        insert_time(&mut times, ts_ms, keep);
                        values.insert(i, (v.to_owned(), times));
                        if values.len() > MAX_PER_VALUES {
                            let stalest = (0..values.len())
                                .min_by_key(|&j| values[j].1.first().copied().unwrap_or(i64::MIN))
                                .unwrap_or(0);
                            values.remove(stalest);
                        }
                    }
                }
            }
            (Counter::PerTotal(_) | Counter::PerRecent(_), None) => {}
        }
    }

    /// Adds another profile's counter for the same spec (a merge).
    pub fn absorb(&mut self, other: Counter, spec: &CounterSpec) {
        match (self, other) {
            (Counter::Total(a), Counter::Total(b)) => *a += b,
            (Counter::Recent(a), Counter::Recent(b)) => {
                for t in b {
                    insert_time(a, t, spec.keep as usize);
                }
            }
            (Counter::PerTotal(a), Counter::PerTotal(b)) => {
                for (v, n) in b {
                    match a.binary_search_by(|(k, _)| k.cmp(&v)) {
                        Ok(i) => a[i].1 += n,
                        Err(i) => a.insert(i, (v, n)),
                    }
                }
                while a.len() > MAX_PER_VALUES {
                    let smallest = (0..a.len()).min_by_key(|&j| a[j].1).unwrap_or(0);
                    a.remove(smallest);
                }
            }
            (me @ Counter::PerRecent(_), Counter::PerRecent(b)) => {
                for (v, times) in b {
                    for t in times {
                        me.record(spec, t, Some(&v));
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether the count (any one value's, with `per`) satisfies `cmp` at `now`.
    pub fn holds(&self, spec: &CounterSpec, cmp: CountCmp, now: i64) -> bool {
        let w = spec.rolling_ms().unwrap_or(i64::MAX);
        match self {
            Counter::Total(n) => cmp.holds(*n),
            Counter::Recent(times) => holds_in_window(times, cmp, w, now),
            Counter::PerTotal(values) => values.iter().any(|(_, n)| cmp.holds(*n)),
            Counter::PerRecent(values) => values
                .iter()
                .any(|(_, times)| holds_in_window(times, cmp, w, now)),
        }
    }

    /// The next instant after `now` at which `cmp` over this counter may change its answer
    /// with no new event (when the event that decides it leaves the window).
    pub fn next_change(&self, spec: &CounterSpec, cmp: CountCmp, now: i64) -> Option<i64> {
        let w = spec.rolling_ms()?;
        match self {
            Counter::Recent(times) => flips_at(times, cmp, w, now),
            Counter::PerRecent(values) => values
                .iter()
                .filter_map(|(_, t)| flips_at(t, cmp, w, now))
                .min(),
            _ => None,
        }
    }

    /// True when nothing was counted (the counter need not be stored).
    pub fn is_empty(&self) -> bool {
        match self {
            Counter::Total(n) => *n == 0,
            Counter::Recent(t) => t.is_empty(),
            Counter::PerTotal(v) => v.is_empty(),
            Counter::PerRecent(v) => v.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::rule::Rule;
    use serde_json::json;

    fn spec(rule: Value) -> CounterSpec {
        match Rule::parse(&rule, "rule").unwrap() {
            Rule::Event(e) => CounterSpec::for_condition(&e),
            other => panic!("{other:?}"),
        }
    }

    const DAY: i64 = 86_400_000;

    #[test]
    fn rolling_window_is_exact_at_the_edge() {
        let s = spec(json!({"event": "V", "count": {"gte": 3}, "within": {"days": 7}}));
        assert_eq!(s.keep, 3);
        let mut c = s.empty();
        for t in [10 * DAY, 11 * DAY, 12 * DAY, DAY] {
            c.record(&s, t, None);
        }
        assert_eq!(c, Counter::Recent(vec![12 * DAY, 11 * DAY, 10 * DAY]));
        let cmp = CountCmp::Gte(3);
        assert!(c.holds(&s, cmp, 16 * DAY));
        // The oldest of the three leaves exactly 7 days after it happened.
        assert_eq!(c.next_change(&s, cmp, 16 * DAY), Some(17 * DAY));
        assert!(c.holds(&s, cmp, 17 * DAY - 1));
        assert!(!c.holds(&s, cmp, 17 * DAY));
        // A late event older than everything kept changes nothing.
        c.record(&s, 2 * DAY, None);
        assert_eq!(c, Counter::Recent(vec![12 * DAY, 11 * DAY, 10 * DAY]));
        // A late event inside the window is kept in order.
        c.record(&s, 10 * DAY + 5, None);
        assert_eq!(c, Counter::Recent(vec![12 * DAY, 11 * DAY, 10 * DAY + 5]));
    }

    #[test]
    fn did_not_perform_enters_as_the_last_event_ages_out() {
        let s = spec(json!({"event": "Login", "count": {"eq": 0}, "within": {"days": 30}}));
        let mut c = s.empty();
        let cmp = CountCmp::Eq(0);
        assert!(c.holds(&s, cmp, 0));
        c.record(&s, 100 * DAY, None);
        assert!(!c.holds(&s, cmp, 100 * DAY));
        assert_eq!(c.next_change(&s, cmp, 100 * DAY), Some(130 * DAY));
        assert!(c.holds(&s, cmp, 130 * DAY));
        assert_eq!(c.next_change(&s, cmp, 130 * DAY), None);
    }

    #[test]
    fn per_value_counts_separately() {
        let s = spec(json!({"event": "Product Viewed", "count": {"gte": 3},
                            "within": {"days": 7}, "per": "product_id"}));
        let mut c = s.empty();
        let props = |p: &str| json!({"product_id": p});
        for (t, p) in [(1, "a"), (2, "b"), (3, "a"), (4, "b")] {
            let per = s.admits(t, Some(&props(p)), t).unwrap();
            c.record(&s, t, per.as_deref());
        }
        assert!(!c.holds(&s, CountCmp::Gte(3), 5));
        let per = s.admits(6, Some(&props("a")), 6).unwrap();
        c.record(&s, 6, per.as_deref());
        assert!(c.holds(&s, CountCmp::Gte(3), 7));
        assert_eq!(c.next_change(&s, CountCmp::Gte(3), 7), Some(1 + 7 * DAY));
        // No per value: not counted.
        assert_eq!(s.admits(7, Some(&json!({"other": 1})), 7), None);
        assert_eq!(
            s.admits(7, Some(&json!({"product_id": 42})), 7),
            Some(Some("42".into()))
        );
    }

    #[test]
    fn where_and_since_filter_events() {
        let s = spec(
            json!({"event": "Export Used", "where": [{"property": "rows", "op": "gt", "value": 10}],
                            "within": {"since": "2026-01-01"}}),
        );
        let since = crate::segment::timefmt::parse_rule_instant_ms("2026-01-01").unwrap();
        assert_eq!(
            s.admits(since, Some(&json!({"rows": 11})), since),
            Some(None)
        );
        assert_eq!(s.admits(since - 1, Some(&json!({"rows": 11})), since), None);
        assert_eq!(s.admits(since, Some(&json!({"rows": 10})), since), None);
        assert_eq!(s.admits::<Value>(since, None, since), None);
        let mut c = s.empty();
        c.record(&s, since, None);
        c.record(&s, since, None);
        assert_eq!(c, Counter::Total(2));
        assert!(c.holds(&s, CountCmp::Gt(1), i64::MAX));
    }

    #[test]
    fn merging_counters_keeps_the_newest() {
        let s = spec(json!({"event": "V", "count": {"gt": 1}, "within": {"days": 1}}));
        let mut a = s.empty();
        let mut b = s.empty();
        a.record(&s, 5, None);
        b.record(&s, 9, None);
        b.record(&s, 7, None);
        a.absorb(b, &s);
        assert_eq!(a, Counter::Recent(vec![9, 7]));
        let t = spec(json!({"event": "V"}));
        let mut x = t.empty();
        x.record(&t, 1, None);
        x.absorb(Counter::Total(4), &t);
        assert_eq!(x, Counter::Total(5));
    }

    /// The O(1) threshold forms agree with counting, for every comparison and window edge.
    #[test]
    fn threshold_forms_agree_with_counting() {
        let times = [50i64, 40, 30, 20, 10];
        for ms in [5i64, 15, 25, 35, 45, 1000] {
            for now in [10i64, 29, 30, 31, 49, 54, 55, 56, 60, 100] {
                let count = times.iter().filter(|&&t| now - ms < t).count() as u64;
                for n in 0..7 {
                    for cmp in [
                        CountCmp::Gte(n),
                        CountCmp::Gt(n),
                        CountCmp::Eq(n),
                        CountCmp::Lte(n),
                        CountCmp::Lt(n),
                    ] {
                        assert_eq!(
                            holds_in_window(&times, cmp, ms, now),
                            cmp.holds(count),
                            "{cmp:?} ms={ms} now={now}"
                        );
                        // The flip instant is the first later instant where the answer differs.
                        let naive = (now + 1..now + 2000).find(|&t| {
                            let c = times.iter().filter(|&&x| t - ms < x).count() as u64;
                            cmp.holds(c) != cmp.holds(count)
                        });
                        assert_eq!(
                            flips_at(&times, cmp, ms, now),
                            naive,
                            "{cmp:?} ms={ms} now={now}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn specs_round_trip_through_their_stored_form() {
        for r in [
            json!({"event": "V", "count": {"gte": 3}, "within": {"days": 7}, "per": "a\\.b"}),
            json!({"event": "V", "where": [{"property": "x", "op": "eq", "value": 1}], "within": {"since": "2026-01-01"}}),
            json!({"event": "user.updated"}),
        ] {
            let s = spec(r);
            let back = CounterSpec::from_def(&s.def()).unwrap();
            assert_eq!(back.key(), s.key());
        }
    }
}
