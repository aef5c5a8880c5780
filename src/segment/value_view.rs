//! A borrowed, type-agnostic view of JSON-like values, so the condition
//! evaluator runs unchanged over `serde_json::Value` and the project's own
//! value types; also path lookup and cross-type JSON equality.

use serde_json::Value;

use super::path::Path;

/// A borrowed look at a JSON-like value.
pub enum View<'a, V: JsonView> {
    /// JSON `null`.
    Null,
    /// JSON `true` / `false`.
    Bool(bool),
    /// Any JSON number, as the evaluator compares it (64-bit float).
    Number(f64),
    /// A JSON string.
    Str(&'a str),
    /// A JSON array's elements.
    Array(&'a [V]),
    /// A JSON object; read its members through the [`JsonView`] object methods.
    Object(&'a V),
}

impl<V: JsonView> Clone for View<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V: JsonView> Copy for View<'_, V> {}

/// Implemented by value types the evaluator can read.
pub trait JsonView: Sized {
    /// Iterator over an object's members, so objects compare without allocating.
    type Members<'a>: Iterator<Item = (&'a str, &'a Self)>
    where
        Self: 'a;

    /// Classifies the value so the evaluator can branch on its JSON type.
    fn view(&self) -> View<'_, Self>;

    /// Member of an object (None if not an object or no such key).
    fn get(&self, key: &str) -> Option<&Self>;

    /// Number of members of an object (0 if not an object), for equality checks.
    fn object_len(&self) -> usize;

    /// The members of an object (empty if not an object), for equality checks.
    fn members(&self) -> Self::Members<'_>;
}

/// Members of a `serde_json` object, as [`JsonView::members`] yields them.
pub struct ValueMembers<'a>(Option<serde_json::map::Iter<'a>>);

impl<'a> Iterator for ValueMembers<'a> {
    type Item = (&'a str, &'a Value);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.as_mut()?.next().map(|(k, v)| (k.as_str(), v))
    }
}

impl JsonView for Value {
    type Members<'a> = ValueMembers<'a>;

    fn view(&self) -> View<'_, Self> {
        match self {
            Value::Null => View::Null,
            Value::Bool(b) => View::Bool(*b),
            // `as_f64` is only None with serde_json's arbitrary_precision;
            // NaN then compares unequal to everything.
            Value::Number(n) => View::Number(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => View::Str(s),
            Value::Array(items) => View::Array(items),
            Value::Object(_) => View::Object(self),
        }
    }

    fn get(&self, key: &str) -> Option<&Self> {
        self.as_object()?.get(key)
    }

    fn object_len(&self) -> usize {
        self.as_object().map_or(0, serde_json::Map::len)
    }

    fn members(&self) -> ValueMembers<'_> {
        ValueMembers(self.as_object().map(serde_json::Map::iter))
    }
}

/// Follows a Path from a root value.
pub fn lookup<'a, V: JsonView>(root: &'a V, path: &Path) -> Option<&'a V> {
    path.segments()
        .iter()
        .try_fold(root, |value, key| value.get(key))
}

/// JSON equality between two views of possibly different types (numbers as f64; objects: same key set and equal members).
pub fn json_eq<A: JsonView, B: JsonView>(a: &A, b: &B) -> bool {
    match (a.view(), b.view()) {
        (View::Null, View::Null) => true,
        (View::Bool(x), View::Bool(y)) => x == y,
        (View::Number(x), View::Number(y)) => x == y,
        (View::Str(x), View::Str(y)) => x == y,
        (View::Array(xs), View::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| json_eq(x, y))
        }
        (View::Object(x), View::Object(y)) => {
            x.object_len() == y.object_len()
                && x.members()
                    .all(|(key, xv)| y.get(key).is_some_and(|yv| json_eq(xv, yv)))
        }
        _ => false,
    }
}

/// A tiny second value type, so tests prove the evaluator is not tied to serde_json.
#[cfg(test)]
pub(crate) mod mini {
    use super::{JsonView, View};

    /// Test value: integers only, static strings, vectors for lists and objects.
    pub(crate) enum Mini {
        Null,
        Bool(bool),
        Int(i64),
        Text(&'static str),
        List(Vec<Mini>),
        Obj(Vec<(&'static str, Mini)>),
    }

    type Entry = (&'static str, Mini);

    fn entry(e: &Entry) -> (&str, &Mini) {
        (e.0, &e.1)
    }

    impl JsonView for Mini {
        type Members<'a> = std::iter::Map<std::slice::Iter<'a, Entry>, fn(&Entry) -> (&str, &Mini)>;

        fn view(&self) -> View<'_, Self> {
            match self {
                Mini::Null => View::Null,
                Mini::Bool(b) => View::Bool(*b),
                #[allow(clippy::cast_precision_loss)]
                Mini::Int(i) => View::Number(*i as f64),
                Mini::Text(s) => View::Str(s),
                Mini::List(items) => View::Array(items),
                Mini::Obj(_) => View::Object(self),
            }
        }

        fn get(&self, key: &str) -> Option<&Self> {
            match self {
                Mini::Obj(entries) => entries.iter().find(|(k, _)| *k == key).map(|(_, v)| v),
                _ => None,
            }
        }

        fn object_len(&self) -> usize {
            match self {
                Mini::Obj(entries) => entries.len(),
                _ => 0,
            }
        }

        fn members(&self) -> Self::Members<'_> {
            let entries: &[Entry] = match self {
                Mini::Obj(entries) => entries,
                _ => &[],
            };
            entries.iter().map(entry as fn(&Entry) -> (&str, &Mini))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mini::Mini;
    use super::*;
    use serde_json::json;

    fn at<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
        lookup(root, &Path::parse(path).unwrap())
    }

    #[test]
    fn lookup_follows_keys() {
        let root = json!({
            "plan": "pro",
            "address": {"city": "Oslo", "geo": {"lat": 59.9}},
            "address.city": "Bergen",
            "list": [{"a": 1}],
            "nil": null,
        });
        assert_eq!(at(&root, "plan"), Some(&json!("pro")));
        assert_eq!(at(&root, "address.city"), Some(&json!("Oslo")));
        assert_eq!(at(&root, r"address\.city"), Some(&json!("Bergen")));
        assert_eq!(at(&root, "address.geo.lat"), Some(&json!(59.9)));
        assert_eq!(at(&root, "nil"), Some(&Value::Null));
        assert_eq!(at(&root, "missing"), None);
        assert_eq!(at(&root, "plan.x"), None, "not an object");
        assert_eq!(at(&root, "list.0"), None, "no array indexing");
        assert_eq!(at(&root, "address.zip"), None);
        assert_eq!(lookup(&json!(5), &Path::single("a")), None);
    }

    #[test]
    fn equality_of_scalars() {
        assert!(json_eq(&json!(null), &json!(null)));
        assert!(json_eq(&json!(true), &json!(true)));
        assert!(!json_eq(&json!(true), &json!(false)));
        assert!(json_eq(&json!(1), &json!(1.0)));
        assert!(json_eq(&json!(-0.0), &json!(0)));
        assert!(!json_eq(&json!(1), &json!(1.5)));
        assert!(!json_eq(&json!(1), &json!("1")));
        assert!(!json_eq(&json!(1), &json!(true)));
        assert!(!json_eq(&json!(0), &json!(null)));
        assert!(json_eq(&json!("a"), &json!("a")));
        assert!(!json_eq(&json!("a"), &json!("A")));
    }

    #[test]
    fn equality_of_containers() {
        assert!(json_eq(
            &json!([1, "a", [true]]),
            &json!([1.0, "a", [true]])
        ));
        assert!(!json_eq(&json!([1, 2]), &json!([2, 1])), "order matters");
        assert!(!json_eq(&json!([1, 2]), &json!([1, 2, 3])));
        assert!(json_eq(&json!([]), &json!([])));
        assert!(!json_eq(&json!([]), &json!({})));
        assert!(json_eq(
            &json!({"a": 1, "b": {"c": [1]}}),
            &json!({"b": {"c": [1.0]}, "a": 1.0})
        ));
        assert!(!json_eq(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!json_eq(&json!({"a": 1, "b": 2}), &json!({"a": 1})));
        assert!(!json_eq(&json!({"a": 1}), &json!({"b": 1})));
        assert!(!json_eq(&json!({"a": null}), &json!({"b": null})));
        assert!(json_eq(&json!({}), &json!({})));
    }

    #[test]
    fn equality_across_value_types() {
        let mini = Mini::Obj(vec![
            ("n", Mini::Int(1)),
            ("s", Mini::Text("x")),
            ("l", Mini::List(vec![Mini::Bool(true), Mini::Null])),
        ]);
        assert!(json_eq(
            &mini,
            &json!({"n": 1.0, "s": "x", "l": [true, null]})
        ));
        assert!(json_eq(
            &json!({"n": 1.0, "s": "x", "l": [true, null]}),
            &mini
        ));
        assert!(!json_eq(&mini, &json!({"n": 1, "s": "x"})));
        assert!(!json_eq(
            &mini,
            &json!({"n": 2, "s": "x", "l": [true, null]})
        ));
        assert!(!json_eq(&Mini::Obj(vec![]), &Mini::List(vec![])));
        let path = Path::parse("l").unwrap();
        assert!(
            matches!(lookup(&mini, &path).map(JsonView::view), Some(View::Array(items)) if items.len() == 2)
        );
    }
}
