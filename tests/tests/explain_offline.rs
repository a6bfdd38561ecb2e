//! The upstream NetworkPolicy truth-table cases (`weir_tests::netpol_cases`, the same table the
//! lab runs in netpol.rs) against the compiler alone: for every case and every step, the verdicts
//! that `weir explain --manifests` computes (weir_policy::explain::Scenario, the datapath's
//! lookup on the compiled maps) equal upstream's expected truth table. No root, no kernel.

use std::collections::BTreeMap;

use weir_lab::lab::Proto;
use weir_policy::{
    explain::{PortProto, Protocol, Scenario},
    model::{ClusterState, ObjectKey, parse_documents},
};
use weir_tests::netpol_cases::{CASES, Cluster, Reach, cluster_yaml};

/// The cluster as manifests, changed in memory; every validate compiles it afresh.
struct Offline {
    case: &'static str,
    state: ClusterState,
    /// Truth tables checked, to prove each case asserted something.
    validated: usize,
}

impl Offline {
    fn new(case: &'static str) -> Self {
        let mut o = Offline {
            case,
            state: ClusterState::default(),
            validated: 0,
        };
        o.apply(&cluster_yaml());
        o
    }

    fn scenario(&self) -> Scenario {
        Scenario::new(self.state.clone()).expect("the scenario compiles")
    }
}

impl Cluster for Offline {
    fn apply(&mut self, yaml: &str) {
        for object in parse_documents(yaml, "case.yaml") {
            self.state.apply(object.expect("case YAML parses"));
        }
    }

    fn delete_policies(&mut self) {
        self.state.policies.clear();
    }

    fn pod_ip(&self, key: &str) -> String {
        let scenario = self.scenario();
        let (_, pod) = scenario.pod(key).expect("a pod of the case");
        pod.addresses[0].to_string()
    }

    fn add_pod_labels(&mut self, ns: &str, name: &str, labels: &[(&str, &str)]) {
        let pod = std::sync::Arc::make_mut(
            self.state
                .pods
                .get_mut(&ObjectKey::new(ns, name))
                .expect("a pod of the case"),
        );
        for (k, v) in labels {
            pod.metadata.labels.insert(k.to_string(), v.to_string());
        }
    }

    fn add_namespace_label(&mut self, ns: &str, key: &str, value: &str) {
        let namespace =
            std::sync::Arc::make_mut(self.state.namespaces.get_mut(ns).expect("a namespace"));
        namespace
            .metadata
            .labels
            .insert(key.to_string(), value.to_string());
    }

    fn validate(&mut self, port: u16, proto: Proto, reach: &Reach) {
        let scenario = self.scenario();
        let protocol = match proto {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
        };
        let port = PortProto { port, protocol };
        let mut wrong: BTreeMap<(String, String), String> = BTreeMap::new();
        for ((from, to), &want) in &reach.cells {
            if from == to {
                continue;
            }
            let e = scenario.explain(from, to, port).expect("explains");
            if e.verdict.allowed() != want {
                wrong.insert(
                    (from.clone(), to.clone()),
                    format!(
                        "expected {}, compiled {}: egress {:?} {:?}, ingress {:?} {:?}",
                        if want { "ALLOW" } else { "DENY" },
                        e.verdict,
                        e.egress.reason,
                        e.egress.rule.map(|r| r.name),
                        e.ingress.reason,
                        e.ingress.rule.map(|r| r.name),
                    ),
                );
            }
        }
        assert!(
            wrong.is_empty(),
            "{}: {port}: compiled verdicts differ from upstream's truth table:\n{}",
            self.case,
            wrong
                .iter()
                .map(|((f, t), w)| format!("  {f} -> {t}: {w}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        self.validated += 1;
    }
}

#[test]
fn compiled_verdicts_equal_every_upstream_truth_table() {
    assert!(CASES.len() >= 40, "the shared case table is there");
    for case in CASES {
        let mut cluster = Offline::new(case.name);
        case.run(&mut cluster);
        assert!(
            cluster.validated > 0,
            "{} checked no truth table",
            case.name
        );
    }
}
