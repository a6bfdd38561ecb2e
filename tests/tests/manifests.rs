//! The install manifests against the Kubernetes API schemas (k8s-openapi's types) and the
//! invariants the agent depends on: privileged, hostNetwork, the host paths, probes on the health
//! port, tolerations for every node, the node name from the downward API, least-privilege RBAC,
//! settings the agent actually understands, and the deny list mounted where the agent reads it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every document of every manifest, with where it came from.
fn documents() -> Vec<(String, Value)> {
    let dir = repo().join("manifests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, doc) in yaml_serde::Deserializer::from_str(&text).enumerate() {
            let value: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} document {i}: {e}", file.display()));
            if !value.is_null() {
                out.push((format!("{} document {i}", file.display()), value));
            }
        }
    }
    out
}

/// Every field of `original` must survive a round trip through the typed object: a field the
/// schema does not have (a typo, a wrong level) is dropped by the typed deserializer, and that
/// is caught here. Scalars must come back equal.
fn assert_known_fields(path: &str, original: &Value, typed: &Value, origin: &str) {
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                let Some(tv) = t.get(k) else {
                    panic!("{origin}: unknown field {path}.{k} (not in the Kubernetes API schema)");
                };
                assert_known_fields(&format!("{path}.{k}"), v, tv, origin);
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            assert_eq!(o.len(), t.len(), "{origin}: {path} changed length");
            for (i, (v, tv)) in o.iter().zip(t).enumerate() {
                assert_known_fields(&format!("{path}[{i}]"), v, tv, origin);
            }
        }
        (o, t) => assert_eq!(o, t, "{origin}: {path} does not have the schema's type"),
    }
}

fn typed<T: DeserializeOwned + Serialize>(origin: &str, value: &Value) -> T {
    let object: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{origin}: does not match the API schema: {e}"));
    let back = serde_json::to_value(&object).unwrap();
    assert_known_fields("", value, &back, origin);
    object
}

/// The manifests, checked against their schemas and sorted by kind.
#[derive(Default)]
struct Install {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: BTreeMap<String, ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    crds: Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>,
}

fn install() -> Install {
    let mut install = Install::default();
    for (origin, value) in documents() {
        let kind = (
            value["apiVersion"].as_str().unwrap_or_default().to_owned(),
            value["kind"].as_str().unwrap_or_default().to_owned(),
        );
        match (kind.0.as_str(), kind.1.as_str()) {
            ("v1", "Namespace") => install.namespaces.push(typed(&origin, &value)),
            ("v1", "ServiceAccount") => install.service_accounts.push(typed(&origin, &value)),
            ("v1", "ConfigMap") => {
                let cm: ConfigMap = typed(&origin, &value);
                install
                    .config_maps
                    .insert(cm.metadata.name.clone().unwrap(), cm);
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                install.cluster_roles.push(typed(&origin, &value))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                install.bindings.push(typed(&origin, &value))
            }
            ("apps/v1", "DaemonSet") => install.daemon_sets.push(typed(&origin, &value)),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                install.crds.push(typed(&origin, &value))
            }
            other => panic!("{origin}: unexpected kind {other:?}"),
        }
    }
    install
}

const NAMESPACE: &str = "weir-system";

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("a container named agent")
}

fn env_of<'a>(install: &'a Install, ds: &DaemonSet) -> BTreeMap<&'a str, &'a str> {
    let agent = agent_container(ds);
    let mut env = BTreeMap::new();
    for source in agent.env_from.iter().flatten() {
        let name = source.config_map_ref.as_ref().unwrap().name.as_str();
        let cm = install
            .config_maps
            .get(name)
            .unwrap_or_else(|| panic!("envFrom names ConfigMap {name}, which is not installed"));
        for (k, v) in cm.data.iter().flatten() {
            env.insert(k.as_str(), v.as_str());
        }
    }
    env
}

#[test]
fn every_manifest_matches_the_api_schema_and_lives_in_weir_system() {
    let install = install();
    assert_eq!(install.namespaces.len(), 1);
    assert_eq!(
        install.namespaces[0].metadata.name.as_deref(),
        Some(NAMESPACE)
    );
    assert_eq!(install.daemon_sets.len(), 1);
    assert_eq!(install.service_accounts.len(), 1);
    for ns in install
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(install.config_maps.values().map(|o| &o.metadata))
        .chain(install.daemon_sets.iter().map(|o| &o.metadata))
    {
        assert_eq!(
            ns.namespace.as_deref(),
            Some(NAMESPACE),
            "{:?} is not in {NAMESPACE}",
            ns.name
        );
    }
}

#[test]
fn unknown_fields_are_caught() {
    let value = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [],
            "hostNetwrok": true}}}
    });
    let result = std::panic::catch_unwind(|| typed::<DaemonSet>("test", &value));
    let message = *result
        .expect_err("a misspelt field must fail")
        .downcast::<String>()
        .unwrap();
    assert!(
        message.contains("spec.template.spec.hostNetwrok"),
        "{message}"
    );
}

#[test]
fn the_daemonset_runs_privileged_on_the_host_network_on_every_node() {
    let install = install();
    let ds = &install.daemon_sets[0];
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();

    assert_eq!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    let tolerations = pod.tolerations.as_ref().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "the agent must tolerate every taint: {tolerations:?}"
    );
    // The selector selects the template.
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    for (k, v) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the selector does not match the template"
        );
    }
    // The service account is the one the RBAC binds.
    assert_eq!(
        pod.service_account_name.as_deref(),
        install.service_accounts[0].metadata.name.as_deref()
    );

    let agent = agent_container(ds);
    let security = agent.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(true));
    assert_eq!(
        agent.command.as_deref(),
        Some(&["/usr/local/bin/weir-agent".to_owned()][..])
    );
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "WEIR_NODE_NAME")
        .expect("WEIR_NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName"),
        "the node name comes from the downward API"
    );

    // Host paths, mounted where the agent's defaults expect them.
    let volumes: BTreeMap<&str, &str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    for path in [
        "/sys/fs/bpf",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/var/lib/weir",
        "/run/weir",
    ] {
        assert!(
            volumes.values().any(|p| *p == path),
            "no hostPath volume for {path}: {volumes:?}"
        );
    }
    let mounts: BTreeMap<&str, &str> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    for path in ["/sys/fs/bpf", "/var/lib/weir", "/run/weir"] {
        let volume = mounts
            .get(path)
            .unwrap_or_else(|| panic!("the agent does not mount {path}"));
        assert_eq!(volumes.get(volume), Some(&path), "{path} is not the host's");
    }
    let bpffs = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .unwrap();
    assert_eq!(
        bpffs.mount_propagation.as_deref(),
        Some("Bidirectional"),
        "a bpffs the agent mounts must reach the host, or the pins die with the container"
    );
}

#[test]
fn the_init_container_installs_the_plugin_and_its_conflist() {
    let install = install();
    let ds = &install.daemon_sets[0];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let init = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "install-cni")
        .expect("an install-cni init container");
    let script = init.command.as_ref().unwrap().join(" ");
    let volumes: BTreeMap<&str, &k8s_openapi::api::core::v1::Volume> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mounts: BTreeMap<&str, &str> = init
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    let host_mount = |host: &str| -> &str {
        mounts
            .iter()
            .find(|(name, _)| {
                volumes[*name]
                    .host_path
                    .as_ref()
                    .is_some_and(|h| h.path == host)
            })
            .map(|(_, path)| *path)
            .unwrap_or_else(|| panic!("the init container does not mount the host's {host}"))
    };
    let bin = host_mount("/opt/cni/bin");
    let conf = host_mount("/etc/cni/net.d");
    assert!(script.contains("/usr/local/bin/weir-cni"), "{script}");
    assert!(script.contains(&format!("{bin}/weir-cni")), "{script}");
    assert!(
        script.contains(&format!("{conf}/10-weir.conflist")),
        "{script}"
    );
    assert_eq!(init.image, agent_container(ds).image, "one image for both");

    // The conflist it copies comes from the ConfigMap and names the agent's socket.
    let config_volume = mounts
        .iter()
        .filter(|(name, _)| volumes[*name].config_map.is_some())
        .find(|(_, path)| script.contains(&format!("{path}/10-weir.conflist")))
        .map(|(name, _)| volumes[*name])
        .expect("the conflist's source is mounted");
    let cm_name = &config_volume.config_map.as_ref().unwrap().name;
    let conflist =
        &install.config_maps[cm_name.as_str()].data.as_ref().unwrap()["10-weir.conflist"];
    let conflist: Value = serde_json::from_str(conflist).expect("the conflist is JSON");
    assert_eq!(conflist["cniVersion"], "1.1.0");
    let plugin = &conflist["plugins"][0];
    assert_eq!(plugin["type"], "weir-cni");
    let env = env_of(&install, ds);
    assert_eq!(
        plugin["agentSocket"].as_str(),
        env.get("WEIR_SOCKET").copied(),
        "the plugin must talk to the socket the agent serves"
    );
    assert!(
        env["WEIR_SOCKET"].starts_with("/run/weir/"),
        "the socket must be on the shared /run/weir host path"
    );
}

#[test]
fn probes_hit_the_health_endpoint_on_the_health_port() {
    let install = install();
    let ds = &install.daemon_sets[0];
    let agent = agent_container(ds);
    let env = env_of(&install, ds);
    let addr: std::net::SocketAddr = env["WEIR_HEALTH_ADDR"].parse().unwrap();
    assert!(
        addr.ip().is_unspecified(),
        "with hostNetwork kubelet probes the node's address, so listen on 0.0.0.0"
    );
    let port = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("health"))
        .expect("a port named health");
    assert_eq!(port.container_port, i32::from(addr.port()));
    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/healthz"),
        (agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert!(
            get.port == IntOrString::String("health".into())
                || get.port == IntOrString::Int(i32::from(addr.port())),
            "{path} probes {:?}",
            get.port
        );
    }
}

#[test]
fn the_agent_understands_every_setting() {
    let install = install();
    let ds = &install.daemon_sets[0];
    let env = env_of(&install, ds);
    let command = weir_agent::config::Cli::command();
    let known: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    for key in env.keys() {
        assert!(
            *key == "RUST_LOG" || known.contains(*key),
            "ConfigMap sets {key}, which weir-agent does not read (it reads {known:?})"
        );
    }
    assert_eq!(env["WEIR_KUBERNETES"], "true");
    assert!(
        !env.contains_key("WEIR_NODE_NAME"),
        "the node name comes from the downward API"
    );
    // The settings parse as the agent would parse them.
    let mut args = vec!["weir-agent".to_owned()];
    for (k, v) in &env {
        if let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == *k))
        {
            args.push(format!("--{}={v}", arg.get_long().unwrap()));
        }
    }
    args.push("--node-name=n1".to_owned());
    <weir_agent::config::Cli as clap::Parser>::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("the agent rejects {args:?}: {e}"));
}

#[test]
fn the_deny_list_configmap_is_mounted_where_the_agent_reads_it_and_parses() {
    let install = install();
    let ds = &install.daemon_sets[0];
    let env = env_of(&install, ds);
    let file = Path::new(
        env.get("WEIR_PREFILTER_FILE")
            .copied()
            .expect("weir-agent-env sets WEIR_PREFILTER_FILE"),
    );
    let (dir, key) = (
        file.parent().unwrap().to_str().unwrap(),
        file.file_name().unwrap().to_str().unwrap(),
    );
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let mount = agent_container(ds)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("the agent container mounts nothing at {dir}"));
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {}", mount.name));
    let cm_name = &volume
        .config_map
        .as_ref()
        .unwrap_or_else(|| panic!("{dir} is not a ConfigMap volume"))
        .name;
    let cm = install
        .config_maps
        .get(cm_name)
        .unwrap_or_else(|| panic!("the volume names ConfigMap {cm_name}, which is not installed"));
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} has no key {key}"));
    let entries = weir_agent::prefilter::parse(file, text)
        .unwrap_or_else(|e| panic!("the shipped deny list does not parse: {e}"));
    assert!(
        entries.is_empty(),
        "the shipped deny list drops nothing until the operator fills it: {entries:?}"
    );
}

#[test]
fn rbac_is_least_privilege() {
    let install = install();
    assert_eq!(install.cluster_roles.len(), 1);
    let role = &install.cluster_roles[0];
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "unexpected rule shape {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "no wildcard verbs");
                    assert_ne!(resource, "*", "no wildcard resources");
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "nodes"),
        ("networking.k8s.io", "networkpolicies"),
        ("weir.io", "meshpeers"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
    }
    for verb in ["create", "patch"] {
        expected.insert(("".to_owned(), "events".to_owned(), verb.to_owned()));
    }
    assert_eq!(granted, expected);

    assert_eq!(install.bindings.len(), 1);
    let binding = &install.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_ref().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(
        Some(&subjects[0].name),
        install.service_accounts[0].metadata.name.as_ref()
    );
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn the_containerfile_ships_the_binaries_where_the_daemonset_runs_them() {
    let text = std::fs::read_to_string(repo().join("Containerfile")).unwrap();
    assert!(
        text.contains("cargo xtask setup"),
        "the build stage sets up the eBPF toolchain"
    );
    // `cargo xtask build` builds them all, weir-cni statically (it runs on the node, not in the
    // image); `weir` is there for `kubectl exec ... weir status`, next to the agent's socket.
    assert!(
        text.contains("cargo xtask build --release --locked"),
        "the binaries are built as xtask ships them"
    );
    for bin in ["weir-agent", "weir-cni", "weir"] {
        assert!(
            text.contains(&format!("target/release/{bin} /out/{bin}")),
            "{bin} is not copied"
        );
    }
    assert!(text.contains("/usr/local/bin/"));
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(stages, 2, "multi-stage: build, then a small runtime image");
}

#[test]
fn the_meshpeer_crd_is_the_kind_the_agent_reads() {
    let install = install();
    assert_eq!(install.crds.len(), 1);
    let crd = &install.crds[0];
    assert_eq!(crd.spec.names.kind, "MeshPeer");
    assert_eq!(crd.spec.group, "weir.io");
    assert_eq!(crd.spec.scope, "Cluster");
    assert!(
        crd.spec
            .versions
            .iter()
            .any(|v| v.name == "v1alpha1" && v.served && v.storage),
        "weir.io/v1alpha1 is served and stored"
    );
}
