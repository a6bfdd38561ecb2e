//! A label map held compactly. A cluster's objects carry hundreds of thousands of small label
//! maps (every selector's `matchLabels`); a `BTreeMap` allocates a node of eleven slots for
//! each, where most hold one or two pairs. [`Labels`] keeps the pairs sorted by key in one
//! boxed slice of exactly their number, and reads, compares and (de)serializes like the map.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Label pairs sorted by key, each key once (the last value given for a key wins, as when a
/// map is built from the pairs).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(Box<[(String, String)]>);

impl Labels {
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pairs as a map.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.iter().cloned().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(map.into_iter().collect())
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        pairs.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_like_the_map_built_from_the_same_pairs() {
        let given = pairs(&[("tier", "db"), ("app", "a"), ("tier", "web")]);
        let labels: Labels = given.iter().cloned().collect();
        let map: BTreeMap<String, String> = given.into_iter().collect();
        assert_eq!(labels.len(), 2);
        assert_eq!(labels.get("tier").map(String::as_str), Some("web"));
        assert_eq!(labels.get("app").map(String::as_str), Some("a"));
        assert_eq!(labels.get("zone"), None);
        assert!(labels.contains_key("app") && !labels.contains_key("ap"));
        assert!(labels.iter().eq(map.iter()));
        assert_eq!(labels.to_map(), map);
        assert!(Labels::default().is_empty());
    }

    #[test]
    fn equality_and_order_are_the_maps() {
        let a: Labels = pairs(&[("b", "1"), ("a", "2")]).into_iter().collect();
        let b: Labels = pairs(&[("a", "2"), ("b", "1")]).into_iter().collect();
        let c: Labels = pairs(&[("a", "3")]).into_iter().collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.cmp(&c), a.to_map().cmp(&c.to_map()));
        assert_eq!(c.cmp(&a), c.to_map().cmp(&a.to_map()));
    }

    #[test]
    fn serializes_as_a_map_and_holds_no_spare_capacity() {
        let labels: Labels = serde_json::from_str(r#"{"tier": "db", "app": "a"}"#).unwrap();
        assert_eq!(labels.0.len(), 2);
        assert_eq!(
            serde_json::to_string(&labels).unwrap(),
            r#"{"app":"a","tier":"db"}"#
        );
        let empty: Labels = serde_json::from_str("{}").unwrap();
        assert!(empty.is_empty());
    }
}
