//! Manifests text → objects: documents, JSON, Lists, defaulting, errors.

use weir_policy::model::{Object, ParseError, parse_documents};

fn ok(text: &str) -> Vec<Object> {
    parse_documents(text, "f.yaml")
        .into_iter()
        .map(|r| r.expect("parses"))
        .collect()
}

#[test]
fn several_documents_and_empty_ones() {
    let objs = ok(r#"
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: a}}
---
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec:
  nodeName: n1
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}]
status: {podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 80}]}]
"#);
    assert_eq!(objs.len(), 3);
    let Object::Namespace(ns) = &objs[0] else {
        panic!("namespace")
    };
    assert_eq!(
        ns.metadata
            .labels
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("prod")
    );
    assert_eq!(
        ns.metadata.labels.get("team").map(String::as_str),
        Some("a")
    );
    let Object::Pod(pod) = &objs[1] else {
        panic!("pod")
    };
    assert_eq!(pod.spec.containers[0].ports[0].protocol, "TCP");
    assert_eq!(pod.status.pod_ips.len(), 2);
    let Object::NetworkPolicy(p) = &objs[2] else {
        panic!("policy")
    };
    assert_eq!(p.spec.policy_types, Some(vec!["Ingress".to_owned()]));
    assert_eq!(p.spec.ingress.as_ref().unwrap()[0].ports[0].protocol, "TCP");
}

#[test]
fn policy_types_defaulting() {
    let types = |spec: &str| {
        let text = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p}}\nspec: {spec}\n"
        );
        match ok(&text).remove(0) {
            Object::NetworkPolicy(p) => p.spec.policy_types.unwrap(),
            _ => panic!("policy"),
        }
    };
    assert_eq!(types("{podSelector: {}}"), vec!["Ingress"]);
    assert_eq!(types("{podSelector: {}, egress: []}"), vec!["Ingress"]);
    assert_eq!(
        types("{podSelector: {}, egress: [{}]}"),
        vec!["Ingress", "Egress"]
    );
    assert_eq!(
        types("{podSelector: {}, policyTypes: [Egress]}"),
        vec!["Egress"]
    );
}

#[test]
fn json_and_lists() {
    let objs = ok(r#"{"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
         "spec": {"podCIDRs": ["10.0.0.0/24"]},
         "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}
    ]}"#);
    assert_eq!(objs.len(), 2);
    assert!(matches!(&objs[1], Object::Node(n) if n.spec.pod_cidrs == ["10.0.0.0/24"]));
}

#[test]
fn yaml_1_2_scalars_stay_strings() {
    let objs = ok(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels: {x: on, y: no, z: y}\n",
    );
    let Object::Namespace(ns) = &objs[0] else {
        panic!()
    };
    assert_eq!(ns.metadata.labels["x"], "on");
    assert_eq!(ns.metadata.labels["y"], "no");
    assert_eq!(ns.metadata.labels["z"], "y");
}

#[test]
fn errors_name_file_document_and_problem() {
    let r = parse_documents(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 7}\n",
        "dir/x.yaml",
    );
    assert_eq!(r.len(), 3);
    assert!(r[0].is_ok());
    let e = r[1].as_ref().unwrap_err().to_string();
    assert!(
        e.contains("dir/x.yaml") && e.contains("document 1") && e.contains("Deployment"),
        "{e}"
    );
    assert!(matches!(r[1], Err(ParseError::UnknownKind { .. })));
    let e = r[2].as_ref().unwrap_err().to_string();
    assert!(e.contains("document 2") && e.contains("Pod `p`"), "{e}");

    let r = parse_documents(
        "{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [{\"kind\": \"Secret\", \"apiVersion\": \"v1\"}]}",
        "l.json",
    );
    let e = r[0].as_ref().unwrap_err().to_string();
    assert!(
        e.contains("l.json") && e.contains("item 0") && e.contains("Secret"),
        "{e}"
    );

    let r = parse_documents("a: [unclosed", "bad.yaml");
    assert!(matches!(&r[0], Err(ParseError::Syntax { origin, .. }) if origin == "bad.yaml"));

    let r = parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {}\n", "n.yaml");
    assert!(matches!(&r[0], Err(ParseError::MissingName { .. })));

    let r = parse_documents("- 1\n- 2\n", "s.yaml");
    assert!(matches!(&r[0], Err(ParseError::NotAnObject { .. })));
    let r = parse_documents("metadata: {name: x}\n", "k.yaml");
    assert!(matches!(&r[0], Err(ParseError::MissingKind { .. })));
}
