//! Validated label selectors and how they match.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{CLUSTER_LABEL, LabelSelector};

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

    /// Whether any requirement is about `key`.
    pub fn mentions(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| match r {
            Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k == key,
        })
    }

    /// Whether a namespace selector of a policy peer may match a namespace with `labels`.
    /// Namespaces imported from a mesh peer carry `weir.io/cluster`; a selector that does not
    /// mention that label matches only the local cluster (as Cilium 1.19 defaults to), so an
    /// existing policy never admits pods of another cluster by accident.
    pub fn matches_namespace(&self, labels: &BTreeMap<String, String>) -> bool {
        if labels.contains_key(CLUSTER_LABEL) && !self.mentions(CLUSTER_LABEL) {
            return false;
        }
        self.matches(labels)
    }

    /// A selector from a `LabelSelector` outside a NetworkPolicy (e.g. a MeshPeer's export
    /// selector), or why it is invalid.
    pub fn from_label_selector(s: &LabelSelector) -> Result<Self, String> {
        let mut requirements: Vec<Requirement> = s
            .match_labels
            .iter()
            .map(|(k, v)| Requirement::In(k.clone(), BTreeSet::from([v.clone()])))
            .collect();
        for (i, e) in s.match_expressions.iter().enumerate() {
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let bad = |why: &str| format!("matchExpressions[{i}]: {why}");
            if e.key.is_empty() {
                return Err(bad("key must not be empty"));
            }
            requirements.push(match (e.operator.as_str(), values.is_empty()) {
                ("In", false) => Requirement::In(e.key.clone(), values),
                ("NotIn", false) => Requirement::NotIn(e.key.clone(), values),
                ("Exists", true) => Requirement::Exists(e.key.clone()),
                ("DoesNotExist", true) => Requirement::DoesNotExist(e.key.clone()),
                ("In" | "NotIn", true) => return Err(bad("In and NotIn need values")),
                ("Exists" | "DoesNotExist", false) => {
                    return Err(bad("Exists and DoesNotExist take no values"));
                }
                (op, _) => return Err(bad(&format!("unknown operator {op:?}"))),
            });
        }
        Ok(Self { requirements })
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
    use crate::model::Labels;

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

    #[test]
    fn namespace_selectors_match_other_clusters_only_when_they_say_so() {
        let local = BTreeMap::from([("team".to_owned(), "pay".to_owned())]);
        let mut remote = local.clone();
        remote.insert(CLUSTER_LABEL.to_owned(), "east".to_owned());
        let team = Selector::from_label_selector(&LabelSelector {
            match_labels: Labels::from([("team".to_owned(), "pay".to_owned())]),
            ..LabelSelector::default()
        })
        .unwrap();
        assert!(team.matches_namespace(&local));
        assert!(
            !team.matches_namespace(&remote),
            "no weir.io/cluster: local only"
        );
        assert!(
            !Selector::all().matches_namespace(&remote),
            "{{}} is local only"
        );
        let east_team = Selector::from_label_selector(&LabelSelector {
            match_labels: Labels::from([
                ("team".to_owned(), "pay".to_owned()),
                (CLUSTER_LABEL.to_owned(), "east".to_owned()),
            ]),
            ..LabelSelector::default()
        })
        .unwrap();
        assert!(east_team.matches_namespace(&remote));
        assert!(!east_team.matches_namespace(&local));
        let any_peer = Selector {
            requirements: vec![Requirement::Exists(CLUSTER_LABEL.to_owned())],
        };
        assert!(any_peer.matches_namespace(&remote));
        assert!(!any_peer.matches_namespace(&local));
    }
}
