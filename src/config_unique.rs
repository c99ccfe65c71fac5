//! A key named twice in one object of config.json is refused where the daemon reads or edits:
//! serde_json keeps the last of the two, the config editor edits the first, so a credential
//! written back would land where the next read does not look. Sections the daemon does not
//! read (CrossWatch's `pairs`, `sync`, …) are not looked at.

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::collections::HashSet;
use std::fmt;

/// Check `text`, whose top-level sections named by `known` are the daemon's.
pub fn check(text: &str, known: &dyn Fn(&str) -> bool) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(TopLevel(known))
}

struct TopLevel<'a>(&'a dyn Fn(&str) -> bool);

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if (self.0)(&key) {
                if !seen.insert(key.clone()) {
                    return Err(de::Error::custom(format!("the section {key:?} appears twice")));
                }
                map.next_value::<Unique>()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// Any JSON value in which no object names a key twice.
struct Unique;

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Unique;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("the key {key:?} appears twice in one object")));
            }
            map.next_value::<Unique>()?;
        }
        Ok(Unique)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
        while seq.next_element::<Unique>()?.is_some() {}
        Ok(Unique)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_unit<E>(self) -> Result<Unique, E> {
        Ok(Unique)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(key: &str) -> bool {
        ["trakt", "authkeeper"].contains(&key)
    }

    #[test]
    fn a_key_twice_in_a_section_the_daemon_reads_is_refused_where_it_is() {
        let twice = "{\"trakt\": {\"client_id\": \"a\"},\n \"trakt\": {}}";
        let e = check(twice, &ours).unwrap_err();
        assert!(e.to_string().contains("\"trakt\" appears twice"), "{e}");
        assert_eq!(e.line(), 2);
        let nested = r#"{"trakt": {"instances": {"TRAKT-P01": {}, "TRAKT-P01": {"access_token": "x"}}}}"#;
        assert!(check(nested, &ours).unwrap_err().to_string().contains("\"TRAKT-P01\" appears twice"));
        let listed = r#"{"authkeeper": {"schedules": [{"a": 1}, {"a": 2}]}}"#;
        assert!(check(listed, &ours).is_ok(), "the same key in two objects is fine");
    }

    #[test]
    fn sections_the_daemon_does_not_read_are_left_alone() {
        assert!(check(r#"{"sync": {"a": 1, "a": 2}, "sync": null, "trakt": {}}"#, &ours).is_ok());
    }
}
