//! Validated label selectors and how they match.

use std::collections::{BTreeMap, BTreeSet};

/// One requirement of a validated selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A validated `LabelSelector`: all requirements must hold (an empty selector matches all).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches everything.
    pub fn all() -> Self {
        Self::default()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators() {
        let l = BTreeMap::from([("a".to_owned(), "1".to_owned())]);
        let s = |r: Requirement| Selector {
            requirements: vec![r],
        };
        let set = |v: &str| BTreeSet::from([v.to_owned()]);
        assert!(Selector::all().matches(&l));
        assert!(s(Requirement::In("a".into(), set("1"))).matches(&l));
        assert!(!s(Requirement::In("b".into(), set("1"))).matches(&l));
        assert!(!s(Requirement::NotIn("a".into(), set("1"))).matches(&l));
        assert!(s(Requirement::NotIn("b".into(), set("1"))).matches(&l));
        assert!(s(Requirement::Exists("a".into())).matches(&l));
        assert!(!s(Requirement::DoesNotExist("a".into())).matches(&l));
        assert!(s(Requirement::DoesNotExist("b".into())).matches(&l));
    }
}
