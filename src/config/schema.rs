//! The keys [`RawSettings`] accepts, read from its serde definition, so that "did you mean"
//! only ever suggests a key that exists, whatever the files (`default.toml` included) say.
//!
//! The keys are found by deserializing `RawSettings` from a probe that answers every request
//! with a placeholder and, for each struct, records the field names serde asks for. Free-form
//! tables (`retry.steps`, `schedules`) are probed with one entry named [`ANY_KEY`].

use std::sync::LazyLock;

use serde::Deserialize;
use serde::de::value::{Error, StrDeserializer};
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use toml::{Table, Value};

use super::settings::RawSettings;

/// Stands for any entry of a free-form table.
pub(super) const ANY_KEY: &str = "*";

/// Every key `RawSettings` accepts: a table per table of the configuration, `true` for a
/// value, `*` for the entries of a free-form table.
pub(super) static KNOWN_KEYS: LazyLock<Table> = LazyLock::new(|| {
    let mut keys = Table::new();
    // A probe that fails part way still recorded the keys it reached; the tests make sure it
    // reaches them all.
    let _ = RawSettings::deserialize(Probe { keys: &mut keys });
    keys
});

/// A deserializer that records the keys asked for below one table.
struct Probe<'a> {
    keys: &'a mut Table,
}

/// Answers the primitive requests with a placeholder value.
macro_rules! placeholder {
    ($($method:ident => $visit:ident($value:expr)),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                visitor.$visit($value)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = Error;

    placeholder! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i64(0),
        deserialize_i16 => visit_i64(0),
        deserialize_i32 => visit_i64(0),
        deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u64(0),
        deserialize_u16 => visit_u64(0),
        deserialize_u32 => visit_u64(0),
        deserialize_u64 => visit_u64(0),
        deserialize_f32 => visit_f64(0.0),
        deserialize_f64 => visit_f64(0.0),
        deserialize_char => visit_char('x'),
        deserialize_str => visit_str(""),
        deserialize_string => visit_str(""),
        deserialize_bytes => visit_bytes(&[]),
        deserialize_byte_buf => visit_bytes(&[]),
        deserialize_identifier => visit_str(""),
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Error> {
        Err(de::Error::custom(
            "the configuration types say what they expect",
        ))
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // `Some`, so that the keys of an optional table are recorded too.
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(NoElements)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_seq(NoElements)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_seq(NoElements)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(Entries::new(self.keys, &[ANY_KEY]))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_map(Entries::new(self.keys, fields))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Error> {
        Err(de::Error::custom(
            "no configuration key takes an enum; add probing for it here",
        ))
    }
}

/// The entries of one table: each key, then a probe for its value.
struct Entries<'a> {
    keys: &'a mut Table,
    names: std::slice::Iter<'a, &'a str>,
    current: Option<&'a str>,
}

impl<'a> Entries<'a> {
    fn new(keys: &'a mut Table, names: &'a [&'a str]) -> Entries<'a> {
        Entries {
            keys,
            names: names.iter(),
            current: None,
        }
    }
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(name) = self.names.next() else {
            return Ok(None);
        };
        self.current = Some(name);
        let key: StrDeserializer<'_, Error> = name.into_deserializer();
        seed.deserialize(key).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let name = self.current.take().unwrap_or_default();
        let mut below = Table::new();
        let value = seed.deserialize(Probe { keys: &mut below });
        // A value with keys below it is a table; anything else is a plain key.
        let entry = if below.is_empty() {
            Value::Boolean(true)
        } else {
            Value::Table(below)
        };
        self.keys.insert(name.to_string(), entry);
        value
    }
}

/// An empty array.
struct NoElements;

impl<'de> SeqAccess<'de> for NoElements {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        _seed: T,
    ) -> Result<Option<T::Value>, Error> {
        Ok(None)
    }
}
