//! A key named twice in one object of config.json is refused where the daemon reads or edits:
//! serde_json keeps the last of the two, the config editor edits the first, so a credential
//! written back would land where the next read does not look. Sections the daemon does not
//! read (CrossWatch's `pairs`, `sync`, …) are not looked at.

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

/// An object's key, borrowed from the text unless it has escapes: a profile list of 100,000
/// instances is 100,000 keys, read without a copy each.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
pub struct Key<'a>(#[serde(borrow)] pub Cow<'a, str>);

/// An object's entries in the order written, each value left as text.
pub struct Entries<'de>(pub Vec<(Key<'de>, &'de RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EntriesVisitor)
    }
}

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Entries<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Entries(entries))
    }
}

/// The keys of one object met so far. While they come in increasing order (as a file written
/// from a sorted map has them) none can repeat an earlier one, so they are only kept; the first
/// key out of order puts them all in a hash set, which checks every key after it.
#[derive(Default)]
struct Seen<'de> {
    in_order: Vec<Key<'de>>,
    hashed: Option<HashSet<Key<'de>, foldhash::fast::RandomState>>,
}

impl<'de> Seen<'de> {
    /// False if `key` was met before.
    fn insert(&mut self, key: Key<'de>) -> bool {
        if let Some(hashed) = &mut self.hashed {
            return hashed.insert(key);
        }
        match self.in_order.last() {
            Some(last) if *last >= key => {
                let mut hashed: HashSet<_, _> = self.in_order.drain(..).collect();
                let new = hashed.insert(key);
                self.hashed = Some(hashed);
                new
            }
            _ => {
                self.in_order.push(key);
                true
            }
        }
    }
}

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
        let mut seen = Seen::default();
        while let Some(key) = map.next_key::<Key>()? {
            if (self.0)(&key.0) {
                if !seen.insert(key.clone()) {
                    return Err(de::Error::custom(format!("the section {:?} appears twice", key.0)));
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
        let mut seen = Seen::default();
        while let Some(key) = map.next_key::<Key>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("the key {:?} appears twice in one object", key.0)));
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
        for (keys, twice) in [
            ("\"P1\": 1, \"P2\": 2, \"P2\": 3", Some("P2")),
            ("\"P2\": 1, \"P1\": 2, \"P3\": 3, \"P2\": 4", Some("P2")),
            ("\"P1\": 1, \"P3\": 2, \"P1\": 3", Some("P1")),
            ("\"P1\": 1, \"P2\": 2, \"P3\": 3", None),
            ("\"P3\": 1, \"P2\": 2, \"P1\": 3", None),
        ] {
            let text = format!("{{\"trakt\": {{\"instances\": {{{keys}}}}}}}");
            match (check(&text, &ours), twice) {
                (Ok(()), None) => {}
                (Err(e), Some(key)) => {
                    assert!(e.to_string().contains(&format!("\"{key}\" appears twice")), "{text}: {e}")
                }
                (got, _) => panic!("{text}: {got:?}"),
            }
        }
        let listed = r#"{"authkeeper": {"schedules": [{"a": 1}, {"a": 2}]}}"#;
        assert!(check(listed, &ours).is_ok(), "the same key in two objects is fine");
    }

    #[test]
    fn instances_are_read_as_written_escaped_or_not_and_each_must_be_an_object() {
        use crate::config::Config;
        use authkeeper_state::ConnKey;
        let Entries(entries) = serde_json::from_str(r#"{"TRAKT-P02": {}, "TRAKT\u002dP01": { }, "x": [1]}"#).unwrap();
        let keys: Vec<_> = entries.iter().map(|(k, v)| (k.0.as_ref(), v.get())).collect();
        assert_eq!(keys, [("TRAKT-P02", "{}"), ("TRAKT-P01", "{ }"), ("x", "[1]")], "in file order, unescaped");
        assert!(matches!(entries[0].0.0, Cow::Borrowed(_)) && matches!(entries[1].0.0, Cow::Owned(_)));

        let text = r#"{"trakt": {"client_id": "c", "client_secret": "s", "instances":
            {"TRAKT-P03": {"client_id": "d"}, "TRAKT\u002dP01": { }, "TRAKT-P02": {}}}}"#;
        let cfg = Config::parse(text).unwrap();
        let ids: Vec<_> = cfg.profiles.keys().filter(|k| k.provider == "trakt").map(|k| k.profile.as_str()).collect();
        assert_eq!(ids, ["TRAKT-P01", "TRAKT-P02", "TRAKT-P03", "default"], "in key order");
        let p = |id: &str| cfg.profile(&ConnKey::new("trakt", id)).unwrap().block["client_id"].clone();
        assert_eq!((p("TRAKT-P01"), p("TRAKT-P03")), (serde_json::json!("c"), serde_json::json!("d")));

        let e = Config::parse(r#"{"trakt": {"instances": {"TRAKT-P01": 5}}}"#).unwrap_err();
        assert!(e.to_string().contains("trakt.instances.TRAKT-P01 must be an object"), "{e}");
        let e = Config::parse(r#"{"trakt": {"instances": [1]}}"#).unwrap_err();
        assert!(e.to_string().contains("trakt.instances must be an object"), "{e}");
        let e = Config::parse("{\"trakt\": {\"instances\": {\"TRAKT-P01\": {\n \"client_id\": 5}}}}").unwrap_err();
        assert_eq!(e.position(), Some((2, 15)), "{e}");
        assert!(Config::parse(r#"{"trakt": {"client_id": "c", "client_secret": "s", "instances": null}}"#).is_ok());
    }

    #[test]
    fn sections_the_daemon_does_not_read_are_left_alone() {
        assert!(check(r#"{"sync": {"a": 1, "a": 2}, "sync": null, "trakt": {}}"#, &ours).is_ok());
    }
}
