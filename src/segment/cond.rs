//! Property conditions (`{"property": PATH, "op": OP, "value": V}`): the
//! operator set, validation of condition JSON into pre-parsed comparisons with
//! pathed errors, and allocation-free evaluation over any [`JsonView`] value.

use std::cmp::Ordering;
use std::fmt;

use serde_json::Value;

use super::path::Path;
use super::timefmt::parse_rule_instant_ms;
use super::value_view::{JsonView, View, json_eq, lookup};

const MS_PER_MINUTE: i64 = 60_000;
const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 86_400_000;
const SHOWN_MAX_CHARS: usize = 80;

/// A comparison operator as the rule language names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Typed equality.
    Eq,
    /// Negation of `eq`.
    Neq,
    /// Greater than (numbers numerically, strings by byte order).
    Gt,
    /// Greater than or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
    /// Inclusive range `[lo, hi]`.
    Between,
    /// Equal to any element of a list.
    In,
    /// Negation of `in`.
    NotIn,
    /// Element of a list, or substring of a string.
    Contains,
    /// Negation of `contains`.
    NotContains,
    /// String prefix.
    StartsWith,
    /// String suffix.
    EndsWith,
    /// Present and not null.
    Exists,
    /// Missing or null.
    NotExists,
    /// Instant strictly before.
    Before,
    /// Instant strictly after.
    After,
    /// Instant inside a window ending now.
    WithinLast,
    /// Valid instant outside a window ending now.
    NotWithinLast,
}

impl Op {
    /// Every operator in spec order, so messages can list the accepted names.
    pub const ALL: [Op; 19] = [
        Op::Eq,
        Op::Neq,
        Op::Gt,
        Op::Gte,
        Op::Lt,
        Op::Lte,
        Op::Between,
        Op::In,
        Op::NotIn,
        Op::Contains,
        Op::NotContains,
        Op::StartsWith,
        Op::EndsWith,
        Op::Exists,
        Op::NotExists,
        Op::Before,
        Op::After,
        Op::WithinLast,
        Op::NotWithinLast,
    ];

    /// Reads the wire name (exact, lowercase) so unknown names can be rejected.
    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == s)
    }

    /// The wire name, for messages and for serializing rules back out.
    pub fn as_str(&self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Neq => "neq",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Between => "between",
            Op::In => "in",
            Op::NotIn => "not_in",
            Op::Contains => "contains",
            Op::NotContains => "not_contains",
            Op::StartsWith => "starts_with",
            Op::EndsWith => "ends_with",
            Op::Exists => "exists",
            Op::NotExists => "not_exists",
            Op::Before => "before",
            Op::After => "after",
            Op::WithinLast => "within_last",
            Op::NotWithinLast => "not_within_last",
        }
    }

    /// True for the operators a missing, null or incomparable target satisfies (`neq`, `not_in`, `not_contains`, `not_exists`).
    pub fn is_negative(&self) -> bool {
        matches!(self, Op::Neq | Op::NotIn | Op::NotContains | Op::NotExists)
    }
}

impl fmt::Display for Op {
    /// Writes the wire name so messages read like the input.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A time window as the rule language writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// `{"days"|"hours"|"minutes": N}`: the last `ms` milliseconds before now.
    Duration {
        /// Window length in milliseconds.
        ms: i64,
    },
    /// `{"since": TIMESTAMP}`: from a fixed instant up to now.
    Since {
        /// Start instant, ms since the epoch (inclusive).
        ms: i64,
    },
}

impl Window {
    /// Validates a WINDOW object once so evaluation only compares integers; `path` is the JSON path of `v`.
    pub fn parse(v: &Value, path: &str) -> Result<Window, CondError> {
        const FORMS: &str = r#"{"days": N}, {"hours": N}, {"minutes": N} or {"since": TIMESTAMP}"#;
        let only_member = v
            .as_object()
            .filter(|obj| obj.len() == 1)
            .and_then(|obj| obj.iter().next());
        let Some((key, n)) = only_member else {
            return Err(CondError::new(
                path,
                format!("a window must be exactly one of {FORMS}; got {}", show(v)),
            ));
        };
        let key_path = child_key(path, key);
        let unit_ms = match key.as_str() {
            "days" => MS_PER_DAY,
            "hours" => MS_PER_HOUR,
            "minutes" => MS_PER_MINUTE,
            "since" => {
                return n
                    .as_str()
                    .and_then(parse_rule_instant_ms)
                    .map(|ms| Window::Since { ms })
                    .ok_or_else(|| {
                        CondError::new(
                            key_path,
                            format!(
                                "\"since\" must be an RFC 3339 timestamp or a YYYY-MM-DD date; got {}",
                                show(n)
                            ),
                        )
                    });
            }
            _ => {
                return Err(CondError::new(
                    key_path,
                    format!(
                        "unknown window unit {}; expected days, hours, minutes or since",
                        show_str(key)
                    ),
                ));
            }
        };
        let count = n.as_u64().ok_or_else(|| {
            CondError::new(
                &key_path,
                format!(
                    "{} must be a non-negative integer; got {}",
                    show_str(key),
                    show(n)
                ),
            )
        })?;
        i64::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(unit_ms))
            .map(|ms| Window::Duration { ms })
            .ok_or_else(|| {
                CondError::new(
                    &key_path,
                    format!("{} window is too large; got {}", show_str(key), show(n)),
                )
            })
    }

    /// Whether instant `t` lies inside the window ending at `now_ms`.
    pub fn contains(&self, t: i64, now_ms: i64) -> bool {
        match *self {
            Window::Duration { ms } => now_ms.saturating_sub(ms) < t && t <= now_ms,
            Window::Since { ms } => ms <= t && t <= now_ms,
        }
    }
}

/// The compared value, pre-parsed once (numbers as f64, instants as ms, lists kept) so evaluation allocates nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// No value (`exists`, `not_exists`).
    None,
    /// A JSON number; targets that are numbers or numeric strings compare numerically.
    Number(f64),
    /// A JSON string; compares with string targets only.
    Str(String),
    /// A bool, list or object; compares by JSON equality.
    Json(Value),
    /// `between` with two numbers.
    NumberRange(f64, f64),
    /// `between` with two strings.
    StrRange(String, String),
    /// `in` / `not_in`: each element is `Number`, `Str` or `Json`.
    List(Vec<Operand>),
    /// `before` / `after`: ms since the epoch.
    Instant(i64),
    /// `within_last` / `not_within_last`.
    Window(Window),
}

/// A validated comparison: op + operand; reusable by trait conditions (segments) and property conditions.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The operator.
    pub op: Op,
    /// The pre-parsed value, shaped for `op`.
    pub operand: Operand,
}

impl Comparison {
    /// Validates op/value from a condition object; `path` is the JSON path of the condition object for errors (e.g. "where[0]"); errors point at `<path>.op` or `<path>.value`.
    pub fn parse(
        op: Option<&Value>,
        value: Option<&Value>,
        path: &str,
    ) -> Result<Comparison, CondError> {
        let op_path = format!("{path}.op");
        let value_path = format!("{path}.value");
        let op = match op {
            None => {
                return Err(CondError::new(
                    op_path,
                    format!("missing \"op\"; expected one of {}", op_names()),
                ));
            }
            Some(Value::String(name)) => Op::parse(name).ok_or_else(|| {
                CondError::new(
                    &op_path,
                    format!(
                        "unknown operator {}; expected one of {}",
                        show_str(name),
                        op_names()
                    ),
                )
            })?,
            Some(other) => {
                return Err(CondError::new(
                    op_path,
                    format!(
                        "\"op\" must be a string, one of {}; got {}",
                        op_names(),
                        show(other)
                    ),
                ));
            }
        };
        let operand = match (op, value) {
            (Op::Exists | Op::NotExists, None) => Operand::None,
            (Op::Exists | Op::NotExists, Some(v)) => {
                return Err(CondError::new(
                    value_path,
                    format!("operator \"{op}\" takes no \"value\"; got {}", show(v)),
                ));
            }
            (_, None) => {
                return Err(CondError::new(
                    value_path,
                    format!("operator \"{op}\" needs a \"value\""),
                ));
            }
            (_, Some(v)) => parse_operand(op, v, &value_path)?,
        };
        Ok(Comparison { op, operand })
    }

    /// Evaluates against a target (None = missing), at server time `now_ms`.
    pub fn matches<V: JsonView>(&self, target: Option<&V>, now_ms: i64) -> bool {
        let Some(t) = target.filter(|t| !matches!(t.view(), View::Null)) else {
            return self.op.is_negative();
        };
        let operand = &self.operand;
        match self.op {
            Op::Exists => true,
            Op::NotExists => false,
            Op::Eq => typed_eq(operand, t),
            Op::Neq => !typed_eq(operand, t),
            Op::Gt => ordered(operand, t, Ordering::is_gt),
            Op::Gte => ordered(operand, t, Ordering::is_ge),
            Op::Lt => ordered(operand, t, Ordering::is_lt),
            Op::Lte => ordered(operand, t, Ordering::is_le),
            Op::Between => between(operand, t),
            Op::In => in_list(operand, t),
            Op::NotIn => !in_list(operand, t),
            Op::Contains => contains(operand, t),
            Op::NotContains => !contains(operand, t),
            Op::StartsWith => str_test(operand, t, |s, x| s.starts_with(x)),
            Op::EndsWith => str_test(operand, t, |s, x| s.ends_with(x)),
            Op::Before => instant_test(operand, t, |t, at| t < at),
            Op::After => instant_test(operand, t, |t, at| t > at),
            Op::WithinLast => window_test(operand, t, now_ms).unwrap_or(false),
            Op::NotWithinLast => window_test(operand, t, now_ms).is_some_and(|inside| !inside),
        }
    }
}

impl Comparison {
    /// The next instant after `now_ms` at which this comparison's result on `target` may
    /// change with no change of the target: only time-relative operators
    /// (`within_last`, `not_within_last`) have one. Timers re-check the rule then.
    pub fn next_change<V: JsonView>(&self, target: Option<&V>, now_ms: i64) -> Option<i64> {
        let Operand::Window(w) = &self.operand else {
            return None;
        };
        let t = target_instant(target?)?;
        let candidates = match *w {
            // Inside while now − W < t ≤ now: it enters at t and leaves at t + W.
            Window::Duration { ms } => [Some(t), t.checked_add(ms)],
            Window::Since { .. } => [Some(t), None],
        };
        candidates
            .into_iter()
            .flatten()
            .filter(|c| *c > now_ms)
            .min()
    }
}

/// {"property": PATH, "op": OP, "value": V}
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyCondition {
    /// Where the target lives, relative to the event's `properties`.
    pub path: Path,
    /// What the target is compared with.
    pub cmp: Comparison,
}

impl PropertyCondition {
    /// Validates one condition object, rejecting unknown keys with their path; `path` is the object's JSON path.
    pub fn parse(v: &Value, path: &str) -> Result<PropertyCondition, CondError> {
        let Some(obj) = v.as_object() else {
            return Err(CondError::new(
                path,
                format!(
                    "a condition must be an object with \"property\", \"op\" and \"value\"; got {}",
                    show(v)
                ),
            ));
        };
        if let Some(key) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "property" | "op" | "value"))
        {
            return Err(CondError::new(
                child_key(path, key),
                format!(
                    "unknown key {}; expected property, op, value",
                    show_str(key)
                ),
            ));
        }
        let property_path = format!("{path}.property");
        let target = match obj.get("property") {
            None => {
                return Err(CondError::new(property_path, "missing \"property\""));
            }
            Some(Value::String(s)) => {
                Path::parse(s).map_err(|message| CondError::new(&property_path, message))?
            }
            Some(other) => {
                return Err(CondError::new(
                    property_path,
                    format!("\"property\" must be a string path; got {}", show(other)),
                ));
            }
        };
        let cmp = Comparison::parse(obj.get("op"), obj.get("value"), path)?;
        Ok(PropertyCondition { path: target, cmp })
    }

    /// Looks the path up inside `properties` (None = no properties) and evaluates at `now_ms`.
    pub fn matches<V: JsonView>(&self, properties: Option<&V>, now_ms: i64) -> bool {
        let target = properties.and_then(|p| lookup(p, &self.path));
        self.cmp.matches(target, now_ms)
    }
}

/// Parses a JSON list of conditions; `path` names the list (e.g. "where").
pub fn parse_conditions(v: &Value, path: &str) -> Result<Vec<PropertyCondition>, CondError> {
    let Some(items) = v.as_array() else {
        return Err(CondError::new(
            path,
            format!("expected a JSON list of conditions; got {}", show(v)),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| PropertyCondition::parse(item, &format!("{path}[{i}]")))
        .collect()
}

/// An error with the JSON path into the input and a human message naming the bad value.
#[derive(Debug, Clone, PartialEq)]
pub struct CondError {
    /// JSON path of the offending input, e.g. `where[2].op`.
    pub path: String,
    /// Lowercase message naming the bad value, without a trailing period.
    pub message: String,
}

impl CondError {
    /// An error at `path` (a JSON path into the input) with a message naming the bad value.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> CondError {
        CondError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for CondError {
    /// `path: message`, for logs and plain-text responses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for CondError {}

/// Builds the operand `op` needs from `v` (which is present), or says why it is unfit.
fn parse_operand(op: Op, v: &Value, path: &str) -> Result<Operand, CondError> {
    let unfit = |wanted: &str| {
        CondError::new(
            path,
            format!("operator \"{op}\" needs {wanted}; got {}", show(v)),
        )
    };
    match op {
        Op::Exists | Op::NotExists => Ok(Operand::None),
        Op::Eq | Op::Neq | Op::Contains | Op::NotContains => literal(op, v, path),
        Op::In | Op::NotIn => {
            let items = v.as_array().ok_or_else(|| unfit("a list of values"))?;
            items
                .iter()
                .enumerate()
                .map(|(i, item)| literal(op, item, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()
                .map(Operand::List)
        }
        Op::Gt | Op::Gte | Op::Lt | Op::Lte => match v {
            Value::Number(_) => literal(op, v, path),
            Value::String(s) => Ok(Operand::Str(s.clone())),
            _ => Err(unfit("a number or a string")),
        },
        Op::Between => match v.as_array().map(Vec::as_slice) {
            Some([Value::Number(lo), Value::Number(hi)]) => match (finite(lo), finite(hi)) {
                (Some(lo), Some(hi)) => Ok(Operand::NumberRange(lo, hi)),
                _ => Err(unfit("[lo, hi] with two finite numbers")),
            },
            Some([Value::String(lo), Value::String(hi)]) => {
                Ok(Operand::StrRange(lo.clone(), hi.clone()))
            }
            _ => Err(unfit("[lo, hi] with two numbers or two strings")),
        },
        Op::StartsWith | Op::EndsWith => v
            .as_str()
            .map(|s| Operand::Str(s.to_owned()))
            .ok_or_else(|| unfit("a string")),
        Op::Before | Op::After => v
            .as_str()
            .and_then(parse_rule_instant_ms)
            .map(Operand::Instant)
            .ok_or_else(|| unfit("an RFC 3339 timestamp or a YYYY-MM-DD date")),
        Op::WithinLast | Op::NotWithinLast => Window::parse(v, path).map(Operand::Window),
    }
}

/// A value compared by typed equality; null is rejected because no target could ever equal it.
fn literal(op: Op, v: &Value, path: &str) -> Result<Operand, CondError> {
    match v {
        Value::Null => Err(CondError::new(
            path,
            format!(
                "operator \"{op}\" cannot compare with null (a null target never matches); use \"exists\" or \"not_exists\""
            ),
        )),
        Value::Number(n) => finite(n).map(Operand::Number).ok_or_else(|| {
            CondError::new(
                path,
                format!("number out of range for operator \"{op}\"; got {}", show(v)),
            )
        }),
        Value::String(s) => Ok(Operand::Str(s.clone())),
        _ => Ok(Operand::Json(v.clone())),
    }
}

fn finite(n: &serde_json::Number) -> Option<f64> {
    n.as_f64().filter(|f| f.is_finite())
}

/// Equality as `eq` defines it: the operand's type decides.
fn typed_eq<V: JsonView>(operand: &Operand, t: &V) -> bool {
    match operand {
        Operand::Number(x) => target_number(t) == Some(*x),
        Operand::Str(x) => matches!(t.view(), View::Str(s) if s == x),
        Operand::Json(x) => json_eq(x, t),
        _ => false,
    }
}

fn ordered<V: JsonView>(operand: &Operand, t: &V, accept: fn(Ordering) -> bool) -> bool {
    match operand {
        Operand::Number(x) => target_number(t)
            .and_then(|n| n.partial_cmp(x))
            .is_some_and(accept),
        Operand::Str(x) => matches!(t.view(), View::Str(s) if accept(s.cmp(x.as_str()))),
        _ => false,
    }
}

fn between<V: JsonView>(operand: &Operand, t: &V) -> bool {
    match operand {
        Operand::NumberRange(lo, hi) => target_number(t).is_some_and(|n| *lo <= n && n <= *hi),
        Operand::StrRange(lo, hi) => {
            matches!(t.view(), View::Str(s) if lo.as_str() <= s && s <= hi.as_str())
        }
        _ => false,
    }
}

fn in_list<V: JsonView>(operand: &Operand, t: &V) -> bool {
    match operand {
        Operand::List(items) => items.iter().any(|item| typed_eq(item, t)),
        _ => false,
    }
}

fn contains<V: JsonView>(operand: &Operand, t: &V) -> bool {
    match t.view() {
        View::Array(items) => items.iter().any(|item| typed_eq(operand, item)),
        View::Str(s) => matches!(operand, Operand::Str(x) if s.contains(x.as_str())),
        _ => false,
    }
}

fn str_test<V: JsonView>(operand: &Operand, t: &V, test: fn(&str, &str) -> bool) -> bool {
    match (operand, t.view()) {
        (Operand::Str(x), View::Str(s)) => test(s, x),
        _ => false,
    }
}

fn instant_test<V: JsonView>(operand: &Operand, t: &V, test: fn(i64, i64) -> bool) -> bool {
    match operand {
        Operand::Instant(at) => target_instant(t).is_some_and(|ms| test(ms, *at)),
        _ => false,
    }
}

/// Some(inside) when the target is a valid instant and the operand a window; None otherwise.
fn window_test<V: JsonView>(operand: &Operand, t: &V, now_ms: i64) -> Option<bool> {
    match operand {
        Operand::Window(w) => target_instant(t).map(|ms| w.contains(ms, now_ms)),
        _ => None,
    }
}

/// A number target, or a string target in exact JSON number syntax.
fn target_number<V: JsonView>(t: &V) -> Option<f64> {
    match t.view() {
        View::Number(n) => Some(n),
        View::Str(s) => parse_json_number(s),
        _ => None,
    }
}

fn target_instant<V: JsonView>(t: &V) -> Option<i64> {
    match t.view() {
        View::Str(s) => parse_rule_instant_ms(s),
        _ => None,
    }
}

/// Parses `s` only if it is in JSON number syntax (`-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?`) and finite.
fn parse_json_number(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let digits_from = |mut i: usize| {
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        (i > start).then_some(i)
    };
    let mut i = usize::from(b.first() == Some(&b'-'));
    i = match b.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits_from(i)?,
        _ => return None,
    };
    if b.get(i) == Some(&b'.') {
        i = digits_from(i + 1)?;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        i = digits_from(i)?;
    }
    if i != b.len() {
        return None;
    }
    s.parse::<f64>().ok().filter(|f| f.is_finite())
}

fn op_names() -> String {
    Op::ALL.map(|op| op.as_str()).join(", ")
}

/// The JSON path of member `key` under `base`: `.key` for identifiers, `["key"]` otherwise.
pub(crate) fn child_key(base: &str, key: &str) -> String {
    let mut chars = key.chars();
    let identifier = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if identifier {
        format!("{base}.{key}")
    } else {
        format!("{base}[{}]", show_str(key))
    }
}

/// A JSON rendering of a bad value for messages, cut short if long.
pub(crate) fn show(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(SHOWN_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

pub(crate) fn show_str(s: &str) -> String {
    show(&Value::from(s))
}

#[cfg(test)]
mod tests {
    use super::super::timefmt::format_ms;
    use super::super::value_view::mini::Mini;
    use super::*;
    use serde_json::json;

    /// 2026-12-03T10:15:00Z
    const NOW: i64 = 1_796_292_900_000;

    fn cmp(op: &str, value: Value) -> Comparison {
        Comparison::parse(Some(&json!(op)), Some(&value), "c")
            .unwrap_or_else(|e| panic!("{op} {value}: {e}"))
    }

    fn cmp_no_value(op: &str) -> Comparison {
        Comparison::parse(Some(&json!(op)), None, "c").unwrap()
    }

    fn on(c: &Comparison, target: Value) -> bool {
        c.matches(Some(&target), NOW)
    }

    fn missing(c: &Comparison) -> bool {
        c.matches::<Value>(None, NOW)
    }

    fn at(ms: i64) -> Value {
        json!(format_ms(ms))
    }

    fn err(op: Option<Value>, value: Option<Value>) -> CondError {
        Comparison::parse(op.as_ref(), value.as_ref(), "where[2]").unwrap_err()
    }

    fn assert_err(e: &CondError, path: &str, fragments: &[&str]) {
        assert_eq!(e.path, path, "{e}");
        for f in fragments {
            assert!(e.message.contains(f), "{e:?} lacks {f}");
        }
        assert!(!e.message.ends_with('.'), "{e:?}");
        assert!(e.message.starts_with(|c: char| !c.is_uppercase()), "{e:?}");
    }

    #[test]
    fn op_names() {
        for op in Op::ALL {
            assert_eq!(Op::parse(op.as_str()), Some(op));
            assert_eq!(op.to_string(), op.as_str());
        }
        assert_eq!(Op::parse("EQ"), None);
        assert_eq!(Op::parse("equals"), None);
        assert_eq!(Op::parse(""), None);
        let negative: Vec<_> = Op::ALL.into_iter().filter(Op::is_negative).collect();
        assert_eq!(
            negative,
            [Op::Neq, Op::NotIn, Op::NotContains, Op::NotExists]
        );
    }

    #[test]
    fn json_number_syntax() {
        for (s, n) in [
            ("17", 17.0),
            ("-17", -17.0),
            ("0", 0.0),
            ("-0", 0.0),
            ("17.5", 17.5),
            ("1e2", 100.0),
            ("1E+2", 100.0),
            ("2.5e-1", 0.25),
        ] {
            assert_eq!(parse_json_number(s), Some(n), "{s}");
        }
        for s in [
            "", " 17", "17 ", "17abc", "0x11", "+1", "01", "1.", ".5", "1e", "1e+", "-", "--1",
            "forty", "NaN", "inf", "1e400", "1_000",
        ] {
            assert_eq!(parse_json_number(s), None, "{s:?}");
        }
    }

    #[test]
    fn eq_with_number_value() {
        let c = cmp("eq", json!(17));
        assert!(on(&c, json!(17)));
        assert!(on(&c, json!(17.0)));
        assert!(on(&c, json!("17")));
        assert!(on(&c, json!("17.0")));
        assert!(on(&c, json!("1.7e1")));
        assert!(!on(&c, json!(18)));
        assert!(!on(&c, json!("18")));
        assert!(!on(&c, json!(" 17")));
        assert!(!on(&c, json!("17abc")));
        assert!(!on(&c, json!("0x11")));
        assert!(!on(&c, json!("forty")));
        assert!(!on(&c, json!(true)));
        assert!(!on(&c, json!([17])));
        assert!(!on(&c, json!({"v": 17})));
        assert!(on(&cmp("eq", json!(1.0)), json!(1)));
    }

    #[test]
    fn eq_with_string_value() {
        let c = cmp("eq", json!("Pro"));
        assert!(on(&c, json!("Pro")));
        assert!(!on(&c, json!("pro")));
        assert!(!on(&c, json!("Pro ")));
        assert!(!on(&c, json!({"plan": "Pro"})));
        assert!(!on(&c, json!(["Pro"])));
        // A string value compares as text only: the number 17 is not "17".
        assert!(!on(&cmp("eq", json!("17")), json!(17)));
        assert!(on(&cmp("eq", json!("17")), json!("17")));
        assert!(!on(&cmp("eq", json!("17")), json!("17.0")));
    }

    #[test]
    fn eq_with_bools_lists_objects() {
        let t = cmp("eq", json!(true));
        assert!(on(&t, json!(true)));
        assert!(!on(&t, json!(false)));
        assert!(!on(&t, json!("true")));
        assert!(!on(&t, json!(1)));
        let l = cmp("eq", json!([1, "a", [true]]));
        assert!(on(&l, json!([1.0, "a", [true]])));
        assert!(!on(&l, json!(["a", 1, [true]])));
        assert!(!on(&l, json!(["1", "a", [true]])));
        let o = cmp("eq", json!({"a": 1, "b": [2]}));
        assert!(on(&o, json!({"b": [2.0], "a": 1})));
        assert!(!on(&o, json!({"a": 1})));
    }

    #[test]
    fn neq_is_the_negation_of_eq() {
        let c = cmp("neq", json!(17));
        assert!(!on(&c, json!(17)));
        assert!(!on(&c, json!("17")));
        assert!(on(&c, json!(18)));
        assert!(on(&c, json!("forty")));
        assert!(on(&c, json!([17])));
        assert!(on(&c, Value::Null));
        assert!(missing(&c));
        assert!(on(&cmp("neq", json!("a")), json!({"a": 1})));
        assert!(!on(&cmp("neq", json!(false)), json!(false)));
    }

    #[test]
    fn ordering_with_numbers() {
        let cases = [
            ("gt", [false, false, true]),
            ("gte", [false, true, true]),
            ("lt", [true, false, false]),
            ("lte", [true, true, false]),
        ];
        for (op, expect) in cases {
            let c = cmp(op, json!(18));
            for (target, want) in [17, 18, 19].into_iter().zip(expect) {
                assert_eq!(on(&c, json!(target)), want, "{op} {target}");
                assert_eq!(on(&c, json!(target.to_string())), want, "{op} \"{target}\"");
            }
            assert!(!on(&c, json!("forty")), "{op}");
            assert!(!on(&c, json!(" 17")), "{op}");
            assert!(!on(&c, json!([1])), "{op}");
            assert!(!on(&c, json!(true)), "{op}");
            assert!(!on(&c, json!({})), "{op}");
            assert!(!on(&c, Value::Null), "{op}");
            assert!(!missing(&c), "{op}");
        }
        assert!(on(&cmp("lt", json!(18)), json!("17")));
        assert!(on(&cmp("gt", json!(-1.5)), json!(-1.25)));
    }

    #[test]
    fn ordering_with_strings_is_bytewise() {
        assert!(on(&cmp("gt", json!("apple")), json!("banana")));
        assert!(!on(&cmp("gt", json!("banana")), json!("apple")));
        assert!(
            on(&cmp("lt", json!("a")), json!("B")),
            "uppercase sorts first"
        );
        assert!(on(&cmp("lt", json!("9")), json!("10")), "text, not numbers");
        assert!(on(&cmp("gte", json!("abc")), json!("abc")));
        assert!(!on(&cmp("gt", json!("abc")), json!("abc")));
        assert!(on(&cmp("lte", json!("abc")), json!("ab")));
        assert!(
            on(&cmp("gt", json!("z")), json!("é")),
            "multi-byte after ascii"
        );
        assert!(
            !on(&cmp("gt", json!("a")), json!(5)),
            "number target vs string value"
        );
        assert!(!on(&cmp("lt", json!("a")), json!(["0"])));
    }

    #[test]
    fn between_is_inclusive() {
        let c = cmp("between", json!([10, 20]));
        assert!(on(&c, json!(10)));
        assert!(on(&c, json!(20)));
        assert!(on(&c, json!(15.5)));
        assert!(on(&c, json!("10")));
        assert!(!on(&c, json!(9.999)));
        assert!(!on(&c, json!(20.001)));
        assert!(!on(&c, json!("fifteen")));
        assert!(!on(&c, json!([15])));
        assert!(!missing(&c));
        let s = cmp("between", json!(["b", "d"]));
        assert!(on(&s, json!("b")));
        assert!(on(&s, json!("c")));
        assert!(on(&s, json!("d")));
        assert!(!on(&s, json!("da")));
        assert!(!on(&s, json!("a")));
        assert!(!on(&s, json!(3)));
        let empty = cmp("between", json!([20, 10]));
        assert!(!on(&empty, json!(15)), "lo > hi matches nothing");
    }

    #[test]
    fn in_and_not_in_use_typed_equality() {
        let c = cmp("in", json!([1, "pro", true, [1]]));
        assert!(on(&c, json!(1.0)));
        assert!(on(&c, json!("1")), "numeric string equals number element");
        assert!(on(&c, json!("pro")));
        assert!(on(&c, json!(true)));
        assert!(on(&c, json!([1.0])));
        assert!(!on(&c, json!("Pro")));
        assert!(!on(&c, json!(false)));
        assert!(!on(&c, json!(2)));
        assert!(!on(&c, json!({})));
        assert!(!missing(&c));
        let n = cmp("not_in", json!([1, "pro"]));
        assert!(!on(&n, json!(1)));
        assert!(!on(&n, json!("pro")));
        assert!(on(&n, json!(2)));
        assert!(on(&n, json!({})));
        assert!(on(&n, Value::Null));
        assert!(missing(&n));
        assert!(!on(&cmp("in", json!([])), json!(1)));
        assert!(on(&cmp("not_in", json!([])), json!(1)));
    }

    #[test]
    fn contains_on_lists_and_strings() {
        let s = cmp("contains", json!("ell"));
        assert!(on(&s, json!("hello")));
        assert!(!on(&s, json!("HELLO")));
        assert!(on(&s, json!(["x", "ell"])));
        assert!(
            !on(&s, json!(["hello"])),
            "list elements compare by equality"
        );
        assert!(!on(&s, json!(12)));
        assert!(!on(&s, json!({"ell": 1})));
        assert!(on(&cmp("contains", json!("")), json!("anything")));
        let n = cmp("contains", json!(17));
        assert!(on(&n, json!([1, 17.0])));
        assert!(on(&n, json!(["17"])));
        assert!(!on(&n, json!([18])));
        assert!(!on(&n, json!("a17b")), "a number is not a substring");
        let l = cmp("contains", json!([1, 2]));
        assert!(on(&l, json!([[1, 2], 3])));
        assert!(!on(&l, json!([1, 2])));
        let b = cmp("contains", json!(true));
        assert!(on(&b, json!([false, true])));
        let nc = cmp("not_contains", json!("ell"));
        assert!(!on(&nc, json!("hello")));
        assert!(on(&nc, json!("world")));
        assert!(!on(&nc, json!(["ell"])));
        assert!(on(&nc, json!(["hello"])));
        assert!(on(&nc, json!(5)));
        assert!(on(&nc, Value::Null));
        assert!(missing(&nc));
    }

    #[test]
    fn starts_and_ends_with() {
        let s = cmp("starts_with", json!("user_"));
        assert!(on(&s, json!("user_42")));
        assert!(on(&s, json!("user_")));
        assert!(!on(&s, json!("User_42")));
        assert!(!on(&s, json!("x_user_")));
        assert!(!on(&s, json!(["user_1"])));
        let e = cmp("ends_with", json!(".com"));
        assert!(on(&e, json!("a@b.com")));
        assert!(!on(&e, json!("a@b.com.au")));
        assert!(!on(&e, json!(5)));
        assert!(!missing(&e));
        assert!(on(&cmp("ends_with", json!("7")), json!("17")));
        assert!(!on(&cmp("ends_with", json!("7")), json!(17)));
    }

    #[test]
    fn exists_and_not_exists() {
        let e = cmp_no_value("exists");
        let n = cmp_no_value("not_exists");
        for present in [
            json!(0),
            json!(false),
            json!(""),
            json!([]),
            json!({}),
            json!("x"),
        ] {
            assert!(on(&e, present.clone()), "{present}");
            assert!(!on(&n, present.clone()), "{present}");
        }
        assert!(!on(&e, Value::Null));
        assert!(on(&n, Value::Null));
        assert!(!missing(&e));
        assert!(missing(&n));
        assert_eq!(e.operand, Operand::None);
    }

    #[test]
    fn before_and_after() {
        let b = cmp("before", json!("2026-12-03T10:15:00Z"));
        assert!(on(&b, json!("2026-12-03T10:14:59.999Z")));
        assert!(!on(&b, json!("2026-12-03T10:15:00Z")), "strict");
        assert!(on(&b, json!("2026-12-03T15:44:59+05:30")));
        assert!(on(&b, json!("2026-12-03")), "date is midnight UTC");
        assert!(!on(&b, json!("2026-12-04")));
        assert!(!on(&b, json!("yesterday")));
        assert!(!on(&b, json!(0)), "numbers are not instants");
        assert!(!on(&b, json!("2026-12-03T10:14:59")), "no offset");
        assert!(!missing(&b));
        let a = cmp("after", json!("2026-12-03"));
        assert!(on(&a, json!("2026-12-03T00:00:00.001Z")));
        assert!(!on(&a, json!("2026-12-03T00:00:00Z")), "strict");
        assert!(!on(&a, json!("2026-12-02T23:59:59Z")));
        assert!(on(&a, json!("2026-12-04")));
        assert!(!on(&a, json!(["2026-12-04"])));
        assert_eq!(
            a.operand,
            Operand::Instant(NOW - (10 * 3600 + 15 * 60) * 1000)
        );
    }

    #[test]
    fn within_last_edges() {
        for (window, ms) in [
            (json!({"days": 7}), 7 * MS_PER_DAY),
            (json!({"hours": 3}), 3 * MS_PER_HOUR),
            (json!({"minutes": 90}), 90 * MS_PER_MINUTE),
        ] {
            let w = cmp("within_last", window.clone());
            let nw = cmp("not_within_last", window.clone());
            assert_eq!(w.operand, Operand::Window(Window::Duration { ms }));
            for (t, inside) in [
                (NOW - ms, false),
                (NOW - ms + 1, true),
                (NOW - 1, true),
                (NOW, true),
                (NOW + 1, false),
                (NOW - ms - 1, false),
            ] {
                assert_eq!(on(&w, at(t)), inside, "{window} {}", format_ms(t));
                assert_eq!(on(&nw, at(t)), !inside, "{window} {}", format_ms(t));
            }
            for bad in [json!("soon"), json!(5), json!([]), Value::Null] {
                assert!(!on(&w, bad.clone()), "{bad}");
                assert!(!on(&nw, bad.clone()), "{bad}");
            }
            assert!(!missing(&w));
            assert!(!missing(&nw));
        }
        let day = cmp("within_last", json!({"days": 1}));
        assert!(on(&day, json!("2026-12-03")), "date targets work");
        assert!(!on(&day, json!("2026-12-02")), "exactly 1 day + 10h15 ago");
        let zero = cmp("within_last", json!({"days": 0}));
        assert!(!on(&zero, at(NOW)), "an empty window holds nothing");
        assert!(on(&cmp("not_within_last", json!({"days": 0})), at(NOW)));
    }

    #[test]
    fn since_windows() {
        let since = NOW - 5 * MS_PER_DAY;
        let w = cmp("within_last", json!({"since": format_ms(since)}));
        assert_eq!(w.operand, Operand::Window(Window::Since { ms: since }));
        assert!(on(&w, at(since)), "inclusive start");
        assert!(!on(&w, at(since - 1)));
        assert!(on(&w, at(NOW)));
        assert!(!on(&w, at(NOW + 1)));
        let nw = cmp("not_within_last", json!({"since": format_ms(since)}));
        assert!(!on(&nw, at(since)));
        assert!(on(&nw, at(since - 1)));
        assert!(on(&nw, at(NOW + 1)));
        assert!(!on(&nw, json!("text")));
        let d = cmp("within_last", json!({"since": "2026-12-01"}));
        assert!(on(&d, json!("2026-12-01T00:00:00Z")));
        assert!(!on(&d, json!("2026-11-30T23:59:59.999Z")));
        let future = cmp("within_last", json!({"since": "2027-01-01"}));
        assert!(!on(&future, at(NOW)));
    }

    #[test]
    fn missing_null_and_incomparable_targets() {
        // (op, value, an incomparable present target)
        let cases = [
            ("eq", json!("a"), json!({"a": 1})),
            ("eq", json!(5), json!("forty")),
            ("neq", json!(5), json!([5])),
            ("gt", json!(5), json!([6])),
            ("gte", json!("a"), json!(5)),
            ("lt", json!(5), json!(true)),
            ("lte", json!(5), json!({})),
            ("between", json!([1, 2]), json!("x")),
            ("in", json!([1, 2]), json!({})),
            ("not_in", json!(["a"]), json!([])),
            ("contains", json!("a"), json!(5)),
            ("not_contains", json!(5), json!("5")),
            ("starts_with", json!("a"), json!(5)),
            ("ends_with", json!("a"), json!(["a"])),
            ("before", json!("2026-01-01"), json!("yesterday")),
            ("after", json!("2026-01-01"), json!(1_800_000_000_000_i64)),
            ("within_last", json!({"days": 1}), json!("text")),
            ("not_within_last", json!({"days": 1}), json!("text")),
        ];
        for (op, value, incomparable) in cases {
            let c = cmp(op, value.clone());
            let want = c.op.is_negative();
            assert_eq!(missing(&c), want, "{op} missing");
            assert_eq!(on(&c, Value::Null), want, "{op} null");
            assert_eq!(on(&c, incomparable.clone()), want, "{op} {incomparable}");
        }
    }

    #[test]
    fn evaluates_other_value_types() {
        let props = Mini::Obj(vec![
            ("age", Mini::Text("17")),
            ("tags", Mini::List(vec![Mini::Text("vip"), Mini::Int(3)])),
            ("seen", Mini::Text("2026-12-03T09:00:00Z")),
            ("nil", Mini::Null),
            ("flag", Mini::Bool(true)),
            ("geo", Mini::Obj(vec![("city", Mini::Text("Oslo"))])),
        ]);
        let check = |json: Value| {
            PropertyCondition::parse(&json, "c")
                .unwrap()
                .matches(Some(&props), NOW)
        };
        assert!(check(json!({"property": "age", "op": "lt", "value": 18})));
        assert!(check(
            json!({"property": "tags", "op": "contains", "value": "vip"})
        ));
        assert!(check(
            json!({"property": "tags", "op": "contains", "value": 3.0})
        ));
        assert!(check(
            json!({"property": "seen", "op": "within_last", "value": {"hours": 2}})
        ));
        assert!(check(json!({"property": "nil", "op": "not_exists"})));
        assert!(check(
            json!({"property": "flag", "op": "eq", "value": true})
        ));
        assert!(check(
            json!({"property": "geo.city", "op": "eq", "value": "Oslo"})
        ));
        assert!(check(
            json!({"property": "geo", "op": "eq", "value": {"city": "Oslo"}})
        ));
        assert!(!check(json!({"property": "geo.zip", "op": "exists"})));
    }

    #[test]
    fn property_conditions_look_up_paths() {
        let props = json!({
            "address": {"city": "Oslo"},
            "address.city": "Bergen",
            r"a\b": 1,
        });
        let c = |json: Value| PropertyCondition::parse(&json, "c").unwrap();
        let nested = c(json!({"property": "address.city", "op": "eq", "value": "Oslo"}));
        assert!(nested.matches(Some(&props), NOW));
        let dotted = c(json!({"property": r"address\.city", "op": "eq", "value": "Bergen"}));
        assert_eq!(dotted.path, Path::single("address.city"));
        assert!(dotted.matches(Some(&props), NOW));
        let slash = c(json!({"property": r"a\\b", "op": "eq", "value": 1}));
        assert!(slash.matches(Some(&props), NOW));
        let gone = c(json!({"property": "address.zip", "op": "neq", "value": "0150"}));
        assert!(gone.matches(Some(&props), NOW));
        assert!(gone.matches::<Value>(None, NOW), "no properties at all");
        assert!(!nested.matches::<Value>(None, NOW));
        assert!(!nested.matches(Some(&json!("not an object")), NOW));
    }

    #[test]
    fn parses_condition_lists() {
        let list = json!([
            {"property": "plan", "op": "eq", "value": "pro"},
            {"op": "exists", "property": "email"},
            {"property": "age", "op": "between", "value": [18, 65]},
        ]);
        let conds = parse_conditions(&list, "where").unwrap();
        assert_eq!(conds.len(), 3);
        assert_eq!(conds[1].cmp.op, Op::Exists);
        assert_eq!(conds[2].cmp.operand, Operand::NumberRange(18.0, 65.0));
        assert_eq!(parse_conditions(&json!([]), "where").unwrap(), vec![]);
        let e = parse_conditions(
            &json!([
                {"property": "a", "op": "eq", "value": 1},
                {"property": "b", "op": "eq", "value": 1},
                {"property": "c", "op": "equals", "value": 1},
            ]),
            "where",
        )
        .unwrap_err();
        assert_err(
            &e,
            "where[2].op",
            &[r#"unknown operator "equals""#, "eq, neq, gt"],
        );
        assert_eq!(e.to_string(), format!("where[2].op: {}", e.message));
        let e = parse_conditions(&json!({"property": "a"}), "where").unwrap_err();
        assert_err(&e, "where", &[r#"{"property":"a"}"#]);
        let e = parse_conditions(&json!([5]), "where").unwrap_err();
        assert_err(&e, "where[0]", &["5", "must be an object"]);
    }

    #[test]
    fn condition_object_errors() {
        let e = |v: Value| PropertyCondition::parse(&v, "where[0]").unwrap_err();
        assert_err(
            &e(json!({"property": "a", "op": "eq", "value": 1, "values": 2})),
            "where[0].values",
            &[r#"unknown key "values""#],
        );
        assert_err(
            &e(json!({"property": "a", "op": "exists", "weird key": 2})),
            r#"where[0]["weird key"]"#,
            &[r#""weird key""#],
        );
        assert_err(
            &e(json!({"op": "eq", "value": 1})),
            "where[0].property",
            &[r#"missing "property""#],
        );
        assert_err(
            &e(json!({"property": 5, "op": "eq", "value": 1})),
            "where[0].property",
            &["5"],
        );
        for bad in ["a..b", "a.", "", r"a\b", ".a"] {
            assert_err(
                &e(json!({"property": bad, "op": "exists"})),
                "where[0].property",
                &[&json!(bad).to_string(), "invalid path"],
            );
        }
    }

    #[test]
    fn op_errors() {
        assert_err(
            &err(None, Some(json!(1))),
            "where[2].op",
            &[r#"missing "op""#, "eq, neq"],
        );
        assert_err(
            &err(Some(json!("equals")), Some(json!(1))),
            "where[2].op",
            &[r#""equals""#, "expected one of eq, neq, gt, gte"],
        );
        assert_err(
            &err(Some(json!("EQ")), Some(json!(1))),
            "where[2].op",
            &[r#""EQ""#],
        );
        assert_err(
            &err(Some(json!(3)), Some(json!(1))),
            "where[2].op",
            &["got 3"],
        );
    }

    #[test]
    fn value_errors() {
        let cases: &[(&str, Option<Value>, &str, &[&str])] = &[
            ("eq", None, "where[2].value", &[r#""eq" needs a "value""#]),
            ("within_last", None, "where[2].value", &["within_last"]),
            (
                "exists",
                Some(json!(true)),
                "where[2].value",
                &["takes no", "true"],
            ),
            (
                "not_exists",
                Some(Value::Null),
                "where[2].value",
                &["not_exists", "null"],
            ),
            (
                "eq",
                Some(Value::Null),
                "where[2].value",
                &["null", "exists"],
            ),
            ("neq", Some(Value::Null), "where[2].value", &["null"]),
            (
                "between",
                Some(json!([1])),
                "where[2].value",
                &["[1]", "[lo, hi]"],
            ),
            (
                "between",
                Some(json!([1, 2, 3])),
                "where[2].value",
                &["[1,2,3]"],
            ),
            (
                "between",
                Some(json!([1, "a"])),
                "where[2].value",
                &[r#"[1,"a"]"#],
            ),
            (
                "between",
                Some(json!([true, false])),
                "where[2].value",
                &["[true,false]"],
            ),
            (
                "between",
                Some(json!("1..2")),
                "where[2].value",
                &[r#""1..2""#],
            ),
            (
                "in",
                Some(json!("a")),
                "where[2].value",
                &[r#""a""#, "list"],
            ),
            (
                "not_in",
                Some(json!({"a": 1})),
                "where[2].value",
                &[r#"{"a":1}"#],
            ),
            ("in", Some(json!([1, null])), "where[2].value[1]", &["null"]),
            (
                "gt",
                Some(json!(true)),
                "where[2].value",
                &["true", "number or a string"],
            ),
            ("lte", Some(json!([1])), "where[2].value", &["[1]"]),
            (
                "starts_with",
                Some(json!(5)),
                "where[2].value",
                &["5", "a string"],
            ),
            (
                "ends_with",
                Some(json!(["a"])),
                "where[2].value",
                &[r#"["a"]"#],
            ),
            (
                "before",
                Some(json!("yesterday")),
                "where[2].value",
                &[r#""yesterday""#, "RFC 3339"],
            ),
            (
                "after",
                Some(json!("2026-02-30")),
                "where[2].value",
                &[r#""2026-02-30""#],
            ),
            (
                "after",
                Some(json!("2026-12-03T10:15:00")),
                "where[2].value",
                &["2026-12-03T10:15:00"],
            ),
            (
                "before",
                Some(json!(1_700_000_000)),
                "where[2].value",
                &["1700000000"],
            ),
            (
                "within_last",
                Some(json!(7)),
                "where[2].value",
                &["got 7", r#"{"days": N}"#],
            ),
            ("within_last", Some(json!({})), "where[2].value", &["{}"]),
            (
                "within_last",
                Some(json!({"days": 1, "hours": 2})),
                "where[2].value",
                &[r#"{"days":1,"hours":2}"#],
            ),
            (
                "within_last",
                Some(json!({"weeks": 1})),
                "where[2].value.weeks",
                &[r#""weeks""#],
            ),
            (
                "within_last",
                Some(json!({"days": -1})),
                "where[2].value.days",
                &["-1", "non-negative integer"],
            ),
            (
                "within_last",
                Some(json!({"hours": 1.5})),
                "where[2].value.hours",
                &["1.5"],
            ),
            (
                "within_last",
                Some(json!({"minutes": "5"})),
                "where[2].value.minutes",
                &[r#""5""#],
            ),
            (
                "within_last",
                Some(json!({"days": u64::MAX})),
                "where[2].value.days",
                &["18446744073709551615", "too large"],
            ),
            (
                "not_within_last",
                Some(json!({"since": "last week"})),
                "where[2].value.since",
                &[r#""last week""#],
            ),
            (
                "not_within_last",
                Some(json!({"since": 5})),
                "where[2].value.since",
                &["got 5"],
            ),
        ];
        for (op, value, path, fragments) in cases {
            let e = err(Some(json!(op)), value.clone());
            assert_err(&e, path, fragments);
        }
    }

    #[test]
    fn accepted_value_shapes() {
        assert_eq!(cmp("gt", json!(5)).operand, Operand::Number(5.0));
        assert_eq!(cmp("gt", json!("m")).operand, Operand::Str("m".into()));
        assert_eq!(
            cmp("between", json!(["a", "b"])).operand,
            Operand::StrRange("a".into(), "b".into())
        );
        assert_eq!(
            cmp("in", json!([1, "a", false])).operand,
            Operand::List(vec![
                Operand::Number(1.0),
                Operand::Str("a".into()),
                Operand::Json(json!(false)),
            ])
        );
        assert_eq!(
            cmp("contains", json!({"a": 1})).operand,
            Operand::Json(json!({"a": 1}))
        );
        assert_eq!(
            cmp("within_last", json!({"days": 0})).operand,
            Operand::Window(Window::Duration { ms: 0 })
        );
        assert_eq!(
            Window::parse(&json!({"since": "2026-12-03T10:15:00.123+00:00"}), "w"),
            Ok(Window::Since { ms: NOW + 123 })
        );
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let long: Vec<u32> = (0..1000).collect();
        let e = err(Some(json!("gt")), Some(json!(long)));
        assert!(e.message.contains("[0,1,2,3"), "{e}");
        assert!(e.message.contains('…'));
        assert!(e.message.len() < 300, "{}", e.message.len());
        assert_eq!(
            show(&json!("é".repeat(100))).chars().count(),
            SHOWN_MAX_CHARS + 1
        );
    }
}
