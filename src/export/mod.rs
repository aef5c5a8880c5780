//! Export and import formats: which columns a profile export has, how a profile becomes a
//! CSV row or a JSONL line (with the spreadsheet formula guard), and how import rows
//! (CSV or JSONL) become identities and traits.
//!
//! Owns the formats only. Streaming from the shards, and applying imported rows, belong to
//! the grid (`grid::export`); this module must not touch actors or storage.

pub mod import;

use serde_json::{Map, Value as Json};

use crate::domain::identity::{IdType, valid_type_name};
use crate::domain::profile::Profile;
use crate::domain::value::{Value, trait_keys};
use crate::segment::path::Path;
use crate::segment::value_view::lookup;

/// One column of an export.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// The profile id.
    Id,
    /// Every identity of a type (`user_id`, `email`, `identity:crm.id`, ...).
    Identity(IdType),
    /// A trait path (`traits.address.city`; `\.` is a dot inside a key).
    Trait(Path),
}

impl Field {
    /// Parses one `fields` entry (also a CSV header cell of an import).
    pub fn parse(s: &str) -> Result<Field, String> {
        match s {
            "id" => return Ok(Field::Id),
            "user_id" => return Ok(Field::Identity(IdType::USER_ID)),
            "anonymous_id" => return Ok(Field::Identity(IdType::ANONYMOUS_ID)),
            "email" => return Ok(Field::Identity(IdType::EMAIL)),
            "phone" => return Ok(Field::Identity(IdType::PHONE)),
            _ => {}
        }
        if let Some(ty) = s.strip_prefix("identity:") {
            if valid_type_name(ty) {
                return Ok(Field::Identity(IdType::named(ty)));
            }
            return Err(format!(
                "{s:?}: an identity type must match [a-z0-9_.]{{1,64}} and not be \"id\""
            ));
        }
        if let Some(p) = s.strip_prefix("traits.") {
            return Path::parse(p)
                .map(Field::Trait)
                .map_err(|e| format!("{s:?}: {e}"));
        }
        Err(format!(
            "unknown field {s:?}; fields are id, user_id, email, phone, anonymous_id, identity:<type> and traits.<path>"
        ))
    }

    /// The column name (as `fields` spells it).
    pub fn name(&self) -> String {
        match self {
            Field::Id => "id".into(),
            Field::Identity(ty) => match ty.builtin_name() {
                Some(n) => n.to_owned(),
                None => format!("identity:{}", ty.name()),
            },
            Field::Trait(p) => format!("traits.{p}"),
        }
    }
}

/// The default CSV columns: id, the built-in identities, the custom identity types
/// (sorted), then every leaf trait path of the catalog (sorted, escaped).
pub fn default_columns(custom_types: &[String], trait_paths: &[String]) -> Vec<Field> {
    let mut cols = vec![
        Field::Id,
        Field::Identity(IdType::USER_ID),
        Field::Identity(IdType::EMAIL),
        Field::Identity(IdType::PHONE),
        Field::Identity(IdType::ANONYMOUS_ID),
    ];
    let mut types: Vec<&String> = custom_types.iter().collect();
    types.sort();
    cols.extend(types.into_iter().map(|t| Field::Identity(IdType::named(t))));
    let mut paths: Vec<&String> = trait_paths.iter().collect();
    paths.sort();
    cols.extend(
        paths
            .into_iter()
            .filter_map(|p| Path::parse(p).ok().map(Field::Trait)),
    );
    cols
}

/// A trait's value at a path of the profile.
fn trait_at<'a>(p: &'a Profile, path: &Path) -> Option<&'a Value> {
    let segs = path.segments();
    let key = trait_keys().lookup(&segs[0])?;
    let top = p.trait_value(key)?;
    if segs.len() == 1 {
        return Some(top);
    }
    lookup(top, &Path::from_segments(segs[1..].to_vec()))
}

/// The identities of a type, in the order the profile holds them.
fn identities_of(p: &Profile, ty: IdType) -> Vec<&str> {
    p.identities
        .iter()
        .filter(|h| h.identity.ty == ty)
        .map(|h| &*h.identity.value)
        .collect()
}

/// Prefixes `'` to text a spreadsheet would run as a formula.
pub fn guard(text: String) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text
    }
}

/// One CSV cell: text guarded, numbers and booleans as written, null and missing empty,
/// lists and objects as JSON text.
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::Str(s)) => guard(s.to_string()),
        Some(Value::Bool(b)) => b.to_string(),
        Some(other) => other.to_json().to_string(),
    }
}

/// A profile's CSV cells for `cols`.
pub fn csv_cells(p: &Profile, cols: &[Field]) -> Vec<String> {
    cols.iter()
        .map(|c| match c {
            Field::Id => p.id.to_string(),
            Field::Identity(ty) => guard(identities_of(p, *ty).join(";")),
            Field::Trait(path) => cell(trait_at(p, path)),
        })
        .collect()
}

/// A profile's JSONL line for `fields`: a flat object keyed by the field names (identity
/// fields as lists of strings, traits as their values or null).
pub fn jsonl_fields(p: &Profile, fields: &[Field]) -> String {
    let mut m = Map::new();
    for f in fields {
        let v = match f {
            Field::Id => Json::String(p.id.to_string()),
            Field::Identity(ty) => Json::Array(
                identities_of(p, *ty)
                    .into_iter()
                    .map(|s| Json::String(s.to_owned()))
                    .collect(),
            ),
            Field::Trait(path) => trait_at(p, path).map_or(Json::Null, Value::to_json),
        };
        m.insert(f.name(), v);
    }
    // A map would sort the keys: keep the order of `fields`.
    let mut out = String::from("{");
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let name = f.name();
        out.push_str(&Json::String(name.clone()).to_string());
        out.push(':');
        out.push_str(&m[&name].to_string());
    }
    out.push('}');
    out
}

/// Parses the `fields` query parameter (a comma list). An empty entry or a field named
/// twice is an error: a JSONL line is an object keyed by the names, where a repeated key
/// would be lost.
pub fn parse_fields(s: &str) -> Result<Vec<Field>, String> {
    let mut out: Vec<Field> = Vec::new();
    for (i, f) in s.split(',').map(str::trim).enumerate() {
        if f.is_empty() {
            return Err(format!("entry {} of {s:?} is empty", i + 1));
        }
        let field = Field::parse(f)?;
        if out.contains(&field) {
            return Err(format!("{f:?} is listed twice in {s:?}"));
        }
        out.push(field);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::ProfileId;
    use crate::domain::profile::{TraitLimits, TraitTime};

    fn profile(traits: Json) -> Profile {
        let mut p = Profile::new(ProfileId::new(1_800_000_000_000, 0, 7), 1);
        let limits = TraitLimits {
            max_keys: 100,
            max_bytes: 10_000,
            same_time_ms: 0,
        };
        let plan = p
            .plan_traits(traits.as_object().unwrap(), TraitTime::Now(1), limits)
            .unwrap();
        p.commit_traits(plan, 1);
        p
    }

    #[test]
    fn fields_parse_and_print_back() {
        for f in [
            "id",
            "user_id",
            "email",
            "phone",
            "anonymous_id",
            "identity:crm.id",
            "traits.plan",
            "traits.address.city",
            "traits.address\\.city",
        ] {
            assert_eq!(Field::parse(f).unwrap().name(), f);
        }
        assert!(Field::parse("plan").is_err());
        assert!(Field::parse("identity:Bad").is_err());
        assert!(Field::parse("traits.").is_err());
    }

    #[test]
    fn cells_guard_formulas_and_keep_types() {
        let p = profile(serde_json::json!({
            "name": "=HYPERLINK(1)", "company": "+1", "note": "@SUM", "city": "-2+3",
            "bio": "\tTab", "title": "\rCR", "ok": "plain", "balance": -5, "vip": true,
            "tags": ["a"], "address": {"city": "Paris"}, "address.city": "Lyon", "none": null
        }));
        let cols: Vec<Field> = [
            "traits.name",
            "traits.company",
            "traits.note",
            "traits.city",
            "traits.bio",
            "traits.title",
            "traits.ok",
            "traits.balance",
            "traits.vip",
            "traits.tags",
            "traits.address.city",
            "traits.address\\.city",
            "traits.missing",
        ]
        .iter()
        .map(|f| Field::parse(f).unwrap())
        .collect();
        assert_eq!(
            csv_cells(&p, &cols),
            vec![
                "'=HYPERLINK(1)",
                "'+1",
                "'@SUM",
                "'-2+3",
                "'\tTab",
                "'\rCR",
                "plain",
                "-5",
                "true",
                "[\"a\"]",
                "Paris",
                "Lyon",
                ""
            ]
        );
        let line = jsonl_fields(&p, &cols[6..9]);
        assert_eq!(
            line,
            r#"{"traits.ok":"plain","traits.balance":-5,"traits.vip":true}"#
        );
    }
}
