//! The NetworkPolicy cases ([`crate::netpol_cases`]) on a real lab: one two-node lab per test
//! process (weir-lab's [`SharedLab`]) holding the nine pods, the real `weir-agent` on each node
//! and the real `weir-cni`; each case starts from no policy and the original labels, and each
//! truth table is probed once both agents have applied the manifests directory.

use weir_lab::lab::shared::{Case, SharedLab};
use weir_lab::lab::{LabSpec, Manifest, Proto};

use crate::applied::wait_lab_applied;
use crate::netpol_cases::{self, Cluster, Reach, cluster_yaml};

/// The lab of this test process: the nine pods spread round robin over two nodes (x/a, x/c,
/// y/b, z/a, z/c on node1; x/b, y/a, y/c, z/b on node2), so every case exercises enforcement
/// on both sides of a node boundary.
static LAB: SharedLab = SharedLab::new(
    "np",
    |name| LabSpec::new(name, 2).manifest(Manifest::Yaml(cluster_yaml())),
    wait_lab_applied,
);

/// The lab, held for case `what`, from a clean slate: every pod reaches every pod again on the
/// ports and protocols the cases probe.
pub fn lab_case(what: &str) -> Case {
    let case = LAB.case(what);
    for (port, proto) in [
        (80, Proto::Tcp),
        (81, Proto::Tcp),
        (80, Proto::Udp),
        (81, Proto::Udp),
    ] {
        case.check(
            port,
            proto,
            &Reach::new().expectations(port, proto),
            "resetting to no policy",
        );
    }
    case
}

/// Runs the shared case `name` on the lab.
pub fn run(name: &str) {
    let case = netpol_cases::case(name);
    let mut lab = lab_case(case.upstream);
    case.run(&mut lab);
}

impl Cluster for Case {
    fn apply(&mut self, yaml: &str) {
        self.apply_yaml(yaml);
    }

    fn delete_policies(&mut self) {
        self.lab_mut()
            .delete_kind("NetworkPolicy")
            .expect("deleting policies");
    }

    fn pod_ip(&self, key: &str) -> String {
        self.lab().pod_ip(key).expect("pod address").to_string()
    }

    fn add_pod_labels(&mut self, ns: &str, name: &str, labels: &[(&str, &str)]) {
        self.add_labels("Pod", Some(ns), name, labels);
    }

    fn add_namespace_label(&mut self, ns: &str, key: &str, value: &str) {
        self.add_labels("Namespace", None, ns, &[(key, value)]);
    }

    fn validate(&mut self, port: u16, proto: Proto, reach: &Reach) {
        let what = self.name().to_owned();
        self.check(port, proto, &reach.expectations(port, proto), &what);
    }
}
