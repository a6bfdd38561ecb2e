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
            Object::NetworkPolicy(p) => p.spec.policy_types.clone().unwrap(),
            _ => panic!("policy"),
        }
    };
    assert_eq!(types("{podSelector: {}}"), vec!["Ingress"]);
    // An empty list is defaulted too (the API server checks `len(policyTypes) == 0`).
    assert_eq!(
        types("{podSelector: {}, policyTypes: [], egress: [{}]}"),
        vec!["Ingress", "Egress"]
    );
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

fn one(text: &str) -> Vec<Result<Object, ParseError>> {
    parse_documents(text, "v.yaml")
}

fn invalid_at(text: &str, field: &str, reason_has: &str) {
    let r = one(text);
    let e = r
        .iter()
        .find_map(|r| r.as_ref().err())
        .unwrap_or_else(|| panic!("rejected: {text}"));
    assert!(
        matches!(e, ParseError::Invalid(i) if i.field == field && i.reason.contains(reason_has)),
        "expected {field} ({reason_has}), got {e}"
    );
}

#[test]
fn names_and_labels_as_the_api_server_checks_them() {
    invalid_at(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: Web_1}\n",
        "metadata.name",
        "DNS-1123 subdomain",
    );
    invalid_at(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: a.b}\n",
        "metadata.namespace",
        "DNS-1123 label",
    );
    invalid_at(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}\n",
        "metadata.name",
        "DNS-1123 label",
    );
    invalid_at(
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\n",
            "n".repeat(254)
        ),
        "metadata.name",
        "at most 253",
    );
    invalid_at(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {'app/x/y': a}}\n",
        "metadata.labels",
        "label key",
    );
    invalid_at(
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {zone: 'not ok'}}\n",
        "metadata.labels",
        "value of label `zone`",
    );
    // Valid ones pass: prefixed keys, empty values, names with dots.
    assert!(
        one("apiVersion: v1\nkind: Pod\nmetadata: {name: web.v1, namespace: a-1, labels: {example.com/app: '', A_b: C.d}}\n")[0]
            .is_ok()
    );
    // The NetworkPolicy `UPPER_case!` still parses: validation rejects it and keeps it
    // isolating (tests/validation.rs), so it never opens traffic.
    let r = one(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: UPPER_case!}\nspec: {podSelector: {}, ingress: [{}]}\n",
    );
    assert!(matches!(&r[0], Ok(Object::NetworkPolicy(p)) if p.metadata.name == "UPPER_case!"));
}

#[test]
fn api_versions_as_served() {
    let r = one("apiVersion: v2\nkind: Pod\nmetadata: {name: p}\n");
    assert!(
        matches!(&r[0], Err(ParseError::ApiVersion { expected: "v1", .. })),
        "{r:?}"
    );
    let r = one("apiVersion: apps/v1\nkind: Namespace\nmetadata: {name: p}\n");
    assert!(r[0].as_ref().unwrap_err().to_string().contains("use `v1`"));
    // A NetworkPolicy of another version is kept to be rejected (and fail closed).
    let r = one(
        "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {podSelector: {}}\n",
    );
    let Ok(Object::NetworkPolicy(p)) = &r[0] else {
        panic!("{r:?}")
    };
    assert_eq!(p.problems[0].field, "apiVersion");
    assert!(p.problems[0].reason.contains("networking.k8s.io/v1"));
}

#[test]
fn size_limits() {
    // A 20 MB label value: the file is refused before it is parsed.
    let huge = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: big\n  labels:\n    x: {}\n",
        "v".repeat(20_000_000)
    );
    let r = one(&huge);
    assert_eq!(r.len(), 1);
    assert!(
        matches!(&r[0], Err(ParseError::FileTooLarge { bytes, .. }) if *bytes > 20_000_000),
        "{r:?}"
    );
    // A 2 MB label value in a file under the file limit: the object is refused, and the
    // Namespace is kept without labels, marked rejected (see semantics.rs for why).
    let big = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: big\n  labels:\n    x: {}\n",
        "v".repeat(2_000_000)
    );
    let r = one(&big);
    assert_eq!(r.len(), 2);
    let e = r[0].as_ref().unwrap_err();
    assert!(matches!(e, ParseError::ObjectTooLarge { .. }), "{e}");
    assert!(e.to_string().contains("Namespace `big`"), "{e}");
    let Ok(Object::Namespace(ns)) = &r[1] else {
        panic!("{r:?}")
    };
    assert!(ns.rejected.is_some());
    assert_eq!(
        ns.metadata.labels.len(),
        1,
        "only kubernetes.io/metadata.name"
    );
    // A too large Pod is dropped.
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels:\n    x: {}\n",
        "v".repeat(2_000_000)
    );
    let r = one(&pod);
    assert_eq!(r.len(), 1);
    assert!(matches!(&r[0], Err(ParseError::ObjectTooLarge { .. })));
    // A long invalid name is shown cut in the error.
    let r = one(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}}}\n",
        "p".repeat(100_000)
    ));
    let e = r[0].as_ref().unwrap_err().to_string();
    assert!(e.len() < 1000 && e.contains("(100000 bytes)"), "{e}");
}

#[test]
fn hostile_input_is_rejected_cleanly() {
    // Garbage bytes.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let text = String::from_utf8_lossy(&garbage);
    assert!(one(&text).iter().all(Result::is_err));
    // Billion laughs: aliases that expand exponentially.
    let mut laughs = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let mut prev = 'a';
    for name in 'b'..='j' {
        laughs.push_str(&format!(
            "{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
        prev = name;
    }
    laughs.push_str("kind: Namespace\napiVersion: v1\nmetadata: {name: lol}\n");
    let r = one(&laughs);
    assert_eq!(r.len(), 1);
    assert!(matches!(&r[0], Err(ParseError::Syntax { .. })), "{r:?}");
    // 20,000-deep nesting, as YAML flow and as JSON.
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let deep = format!("{}1{}", open.repeat(20_000), close.repeat(20_000));
        let r = one(&deep);
        assert_eq!(r.len(), 1);
        assert!(matches!(&r[0], Err(ParseError::Syntax { .. })), "{r:?}");
    }
    let deep = format!(
        "{}1\n",
        (0..20_000)
            .map(|i| format!("{}- ", " ".repeat(i.min(1))))
            .collect::<String>()
    );
    assert!(one(&deep).iter().all(Result::is_err));
}
