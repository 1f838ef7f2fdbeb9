//! Every key of the configuration structs appears in
//! `docs/configuration.md`, in the section of its table.
//!
//! The key list comes from the code, not from a hand list: a tracing
//! deserializer walks `Config`'s `Deserialize` impls (which carry each
//! struct's field names, `deny_unknown_fields` or not) and records every
//! table and its keys, so a key added anywhere under `Config` is checked
//! without touching this file.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use breakglass_server::config::Config;
use serde::de::value::StrDeserializer;
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

/// What the tracer learnt: for each table (by its TOML heading), its keys
/// and which of them are tables themselves.
#[derive(Default, Debug)]
struct Tables {
    /// Heading (`[server]`, `[[targets]]`, `[targets.roles.NAME]`) → keys.
    keys: BTreeMap<String, BTreeSet<String>>,
    /// Heading → keys that are sub-tables (documented in their own section).
    sub: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug)]
struct TraceError(String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TraceError {}

impl de::Error for TraceError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        TraceError(msg.to_string())
    }
}

/// Where a value sits: the dotted path of the table it would be, whether it
/// is reached through an array (`[[...]]`), and the table and key that hold
/// it.
#[derive(Clone)]
struct Place {
    path: String,
    array: bool,
    parent: Option<(String, String)>,
}

impl Place {
    fn heading(&self) -> String {
        if self.array {
            format!("[[{}]]", self.path)
        } else {
            format!("[{}]", self.path)
        }
    }
}

struct Tracer<'a> {
    tables: &'a RefCell<Tables>,
    place: Place,
}

impl<'a> Tracer<'a> {
    fn with(&self, place: Place) -> Tracer<'a> {
        Tracer {
            tables: self.tables,
            place,
        }
    }
}

macro_rules! leaf {
    ($($method:ident => $visit:ident($($value:expr)?)),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
            visitor.$visit($($value)?)
        })*
    };
}

impl<'de> Deserializer<'de> for Tracer<'_> {
    type Error = TraceError;

    leaf! {
        deserialize_any => visit_str("x"),
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i64(1),
        deserialize_i16 => visit_i64(1),
        deserialize_i32 => visit_i64(1),
        deserialize_i64 => visit_i64(1),
        deserialize_u8 => visit_u64(1),
        deserialize_u16 => visit_u64(1),
        deserialize_u32 => visit_u64(1),
        deserialize_u64 => visit_u64(1),
        deserialize_f32 => visit_f64(1.0),
        deserialize_f64 => visit_f64(1.0),
        deserialize_char => visit_char('x'),
        deserialize_str => visit_str("x"),
        deserialize_string => visit_str("x"),
        deserialize_bytes => visit_bytes(b"x"),
        deserialize_byte_buf => visit_bytes(b"x"),
        deserialize_unit => visit_unit(),
        deserialize_identifier => visit_str("x"),
        deserialize_ignored_any => visit_unit(),
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        visitor.visit_some(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        // One element; a struct element makes this an array of tables.
        let mut place = self.place.clone();
        place.array = true;
        visitor.visit_seq(Seq {
            tracer: self.with(place),
            left: 1,
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        visitor.visit_seq(Seq {
            tracer: self,
            left: len,
        })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        visitor.visit_seq(Seq {
            tracer: self,
            left: len,
        })
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        // One entry named NAME: `[targets.roles.NAME]`.
        let mut place = self.place.clone();
        place.path = format!("{}.NAME", place.path);
        place.array = false;
        visitor.visit_map(Map {
            tracer: self.with(place),
            keys: vec!["NAME"],
            values: Vec::new(),
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let heading = self.place.heading();
        {
            let mut t = self.tables.borrow_mut();
            if let Some((table, key)) = &self.place.parent {
                t.sub.entry(table.clone()).or_default().insert(key.clone());
            }
            t.keys
                .entry(heading.clone())
                .or_default()
                .extend(fields.iter().map(|f| f.to_string()));
        }
        let values = fields
            .iter()
            .map(|f| Place {
                path: if self.place.path.is_empty() {
                    f.to_string()
                } else {
                    format!("{}.{f}", self.place.path)
                },
                array: false,
                parent: Some((heading.clone(), f.to_string())),
            })
            .collect();
        visitor.visit_map(Map {
            tracer: self,
            keys: fields.to_vec(),
            values,
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let variant = variants
            .first()
            .copied()
            .ok_or_else(|| TraceError("enum without variants".into()))?;
        visitor.visit_enum(Enum {
            tracer: self,
            variant,
        })
    }

    fn is_human_readable(&self) -> bool {
        // Addresses and similar types then take their compact forms, which
        // need no parseable sample text.
        false
    }
}

struct Seq<'a> {
    tracer: Tracer<'a>,
    left: usize,
}

impl<'de> SeqAccess<'de> for Seq<'_> {
    type Error = TraceError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, TraceError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(self.tracer.with(self.tracer.place.clone()))
            .map(Some)
    }
}

/// A struct's fields (with one place per field) or a map's one entry.
struct Map<'a> {
    tracer: Tracer<'a>,
    keys: Vec<&'static str>,
    values: Vec<Place>,
}

impl<'de> MapAccess<'de> for Map<'_> {
    type Error = TraceError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, TraceError> {
        let Some(key) = self.keys.first().copied() else {
            return Ok(None);
        };
        let de: StrDeserializer<'_, TraceError> = key.into_deserializer();
        seed.deserialize(de).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, TraceError> {
        self.keys.remove(0);
        let place = if self.values.is_empty() {
            // A map's value: the map's own place.
            self.tracer.place.clone()
        } else {
            self.values.remove(0)
        };
        seed.deserialize(self.tracer.with(place))
    }
}

struct Enum<'a> {
    tracer: Tracer<'a>,
    variant: &'static str,
}

impl<'de, 'a> EnumAccess<'de> for Enum<'a> {
    type Error = TraceError;
    type Variant = Tracer<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Tracer<'a>), TraceError> {
        let de: StrDeserializer<'_, TraceError> = self.variant.into_deserializer();
        Ok((seed.deserialize(de)?, self.tracer))
    }
}

impl<'de> VariantAccess<'de> for Tracer<'_> {
    type Error = TraceError;

    fn unit_variant(self) -> Result<(), TraceError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, TraceError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        visitor.visit_seq(Seq {
            tracer: self,
            left: len,
        })
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.deserialize_struct("", fields, visitor)
    }
}

/// Every table of `Config` with the keys documented in its own section.
fn config_tables() -> BTreeMap<String, BTreeSet<String>> {
    let tables = RefCell::new(Tables::default());
    let tracer = Tracer {
        tables: &tables,
        place: Place {
            path: String::new(),
            array: false,
            parent: None,
        },
    };
    // Only the walk matters; the sample values may not validate.
    let _ = <Config as serde::Deserialize>::deserialize(tracer);
    let tables = tables.into_inner();
    tables
        .keys
        .into_iter()
        .map(|(heading, keys)| {
            let sub = tables.sub.get(&heading).cloned().unwrap_or_default();
            let leaves = keys.difference(&sub).cloned().collect();
            (heading, leaves)
        })
        .collect()
}

/// The lines of `doc` from the heading that names `heading` (in backticks)
/// to the next heading that names a table.
fn section<'a>(doc: &'a str, heading: &str) -> Option<Vec<&'a str>> {
    let marker = format!("`{heading}`");
    let mut lines = doc.lines();
    lines.find(|l| l.starts_with('#') && l.contains(&marker))?;
    Some(
        lines
            .take_while(|l| !(l.starts_with('#') && l.contains("`[")))
            .collect(),
    )
}

#[test]
fn every_config_key_is_in_the_reference() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
    let doc = std::fs::read_to_string(path).expect("docs/configuration.md");
    let tables = config_tables();
    // The walk itself must have worked: these are known to exist.
    for (heading, key) in [
        ("[server]", "listen"),
        ("[[targets]]", "upstream"),
        ("[targets.roles.NAME]", "password_file"),
        ("[gateway.postgres]", "message_len_max"),
    ] {
        assert!(
            tables.get(heading).is_some_and(|k| k.contains(key)),
            "the trace lost {heading} {key}: {tables:#?}"
        );
    }
    let mut missing = Vec::new();
    for (heading, keys) in &tables {
        if heading == "[]" {
            // The top level holds only tables.
            assert!(keys.is_empty(), "top-level keys {keys:?}: document them");
            continue;
        }
        if keys.is_empty() {
            // Only sub-tables (`[gateway]`): each has its own section.
            continue;
        }
        let Some(lines) = section(&doc, heading) else {
            missing.push(format!("no section for `{heading}`"));
            continue;
        };
        for key in keys {
            let named = format!("`{key}`");
            if !lines.iter().any(|l| l.contains(&named)) {
                missing.push(format!("`{key}` in `{heading}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md lacks:\n  {}",
        missing.join("\n  ")
    );
}
