//! The CNI plugin driven exactly as a runtime drives it (CNI_* environment, config on stdin, run
//! inside the node's network namespace), against the agent's real gRPC API (`api::serve`) and
//! IPAM, with a recording `EndpointBackend` standing in for the datapath. Root only.

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
    sync::{Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weir_agent::endpoints::EndpointBackend;
use weir_policy::model::ObjectKey;
use weir_proto::naming::host_veth_name;
use weir_tests::{
    agent::{Agent, AgentDirs},
    cni::{Plugin, PodRef},
    cni_bench::{Harness, Out, ip_json, ipv6_addresses, percentile},
    cpu::CpuTime,
    netns::Netns,
    ping::{ping, ping_until_answered},
};

#[test]
fn version_reports_supported_versions() {
    let h = Harness::new("ver", &["10.210.0.0/24"]);
    let out = h.cni("VERSION", &[], br#"{"cniVersion":"1.0.0"}"#);
    let v = out.expect_ok();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    // With no input the latest version is reported.
    let out = h.cni("VERSION", &[], b"");
    assert_eq!(out.expect_ok()["cniVersion"], "1.1.0");
}

#[test]
fn add_wires_the_pod_check_verifies_and_del_is_idempotent() {
    let h = Harness::new("add", &["10.211.0.0/24"]);
    let pod = Netns::new("cni-add-pod");
    let added = h.add("c-add-1", &pod);
    let result = added.expect_ok().clone();

    // The result schema (SPEC 1.1 "Success").
    let host = host_veth_name("c-add-1", "eth0");
    assert_eq!(result["cniVersion"], "1.1.0");
    let interfaces = result["interfaces"].as_array().unwrap();
    assert_eq!(interfaces.len(), 2);
    assert_eq!(interfaces[0]["name"], host.as_str());
    assert!(interfaces[0]["sandbox"].is_null());
    assert_eq!(interfaces[1]["name"], "eth0");
    assert_eq!(interfaces[1]["sandbox"], pod.path());
    for i in interfaces {
        assert_eq!(i["mac"].as_str().unwrap().len(), 17, "mac of {i}");
        assert_eq!(i["mtu"], 1400, "mtu of {i}");
    }
    let ips = result["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 1);
    let address = ips[0]["address"].as_str().unwrap();
    assert!(
        address.starts_with("10.211.0.") && address.ends_with("/32"),
        "{address}"
    );
    assert_eq!(ips[0]["gateway"], "169.254.1.1");
    assert_eq!(ips[0]["interface"], 1);
    assert_eq!(
        result["routes"],
        json!([{ "dst": "0.0.0.0/0", "gw": "169.254.1.1" }])
    );
    assert_eq!(result["dns"], json!({}));
    let pod_ip = address.trim_end_matches("/32");

    // Inside the pod: eth0 up with the /32, MTU, lo up, the default route and gateway neighbour.
    let link = &ip_json(&pod, &["addr", "show", "eth0"])[0];
    assert_eq!(link["mtu"], 1400);
    assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    assert_eq!(link["address"], interfaces[1]["mac"]);
    let addrs: Vec<String> = link["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(addrs, vec![address.to_string()]);
    let lo = &ip_json(&pod, &["link", "show", "lo"])[0];
    assert!(lo["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    let routes = ip_json(&pod, &["route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "169.254.1.1");
    assert_eq!(routes[0]["dev"], "eth0");
    let neigh = ip_json(&pod, &["neigh", "show", "169.254.1.1"]);
    assert_eq!(neigh[0]["lladdr"], interfaces[0]["mac"]);
    assert!(
        neigh[0]["state"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "PERMANENT")
    );

    // On the node: the host veth is up with the route to the pod.
    let host_link = &ip_json(&h.node, &["link", "show", &host])[0];
    assert!(
        host_link["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP")
    );
    assert_eq!(host_link["mtu"], 1400);
    let host_routes = ip_json(&h.node, &["route", "show", pod_ip]);
    assert_eq!(host_routes[0]["dev"], host.as_str());
    // The gateway is the node's, on the host veth, with scope host (never a source address).
    let gateway = &ip_json(&h.node, &["-4", "addr", "show", "dev", &host])[0]["addr_info"];
    assert_eq!(gateway[0]["local"], "169.254.1.1", "{gateway}");
    assert_eq!(gateway[0]["prefixlen"], 32);
    assert_eq!(gateway[0]["scope"], "host");

    // No IPv6 link-local address on either end (an IPv4 pod has no IPv6 address at all): none is
    // needed with permanent neighbours, and without one no duplicate address detection probe or
    // router solicitation crosses the pod's policy.
    assert_eq!(ipv6_addresses(&pod, "eth0"), Vec::<String>::new());
    assert_eq!(ipv6_addresses(&h.node, &host), Vec::<String>::new());

    // Enforcement was put in place while the host veth was still down (no unenforced window).
    {
        let activated = h.backend.activated.lock().unwrap();
        assert_eq!(activated.len(), 1);
        let (endpoint, host_up) = &activated[0];
        assert!(
            !host_up,
            "the host veth was up before enforcement was in place"
        );
        assert_eq!(endpoint.host_ifname, host);
        assert_eq!(endpoint.pod, ObjectKey::new("default", "pod-c-add-1"));
        assert_eq!(
            endpoint.addresses,
            vec![pod_ip.parse::<std::net::IpAddr>().unwrap()]
        );
    }

    // CHECK passes; then fails once something is broken.
    h.check("c-add-1", &pod, &result).expect_ok();
    pod.ip(&["route", "del", "default"]);
    let broken = h.check("c-add-1", &pod, &result);
    assert_eq!(broken.code(), 103, "{}", broken.stdout);
    assert!(
        broken.json["msg"]
            .as_str()
            .unwrap()
            .contains("default route"),
        "{}",
        broken.stdout
    );
    // Not enforced → CHECK fails too.
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "onlink",
    ]);
    h.check("c-add-1", &pod, &result).expect_ok();
    h.backend.enforced.lock().unwrap().clear();
    let unenforced = h.check("c-add-1", &pod, &result);
    assert_eq!(unenforced.code(), 103);
    assert!(
        unenforced.stdout.contains("enforcement"),
        "{}",
        unenforced.stdout
    );
    // CHECK of an unknown container: code 3.
    assert_eq!(h.check("c-nobody", &pod, &result).code(), 3);

    // DEL twice.
    h.del("c-add-1", Some(&pod)).expect_ok();
    assert!(h.host_veths().is_empty(), "the host veth survived DEL");
    assert!(
        ip_json(&pod, &["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["ifname"] != "eth0")
    );
    assert!(h.ipam().allocations().unwrap().is_empty());
    assert!(
        h.backend
            .deactivated
            .lock()
            .unwrap()
            .contains(&("c-add-1".into(), "eth0".into()))
    );
    h.del("c-add-1", Some(&pod)).expect_ok();

    // The log file has one line per call.
    let log = std::fs::read_to_string(h.dir.join("cni.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("ADD container=c-add-1") && l.ends_with(" ok")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("CHECK") && l.contains("code=103")),
        "{log}"
    );
}

#[test]
fn del_of_unknown_container_and_of_a_gone_netns_succeed() {
    let h = Harness::new("delgone", &["10.212.0.0/24"]);
    h.del("never-added", None).expect_ok();
    let pod = Netns::new("cni-delgone-pod");
    h.del("never-added", Some(&pod)).expect_ok();

    h.add("c-gone", &pod).expect_ok();
    let path = pod.path();
    drop(pod); // The runtime tore the sandbox down first: the veth went with it.
    let out = h.cni(
        "DEL",
        &[
            ("CNI_CONTAINERID", "c-gone"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", &path),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-c-gone",
            ),
        ],
        h.conf().to_string().as_bytes(),
    );
    out.expect_ok();
    assert!(h.ipam().allocations().unwrap().is_empty());
    assert!(h.host_veths().is_empty());
}

#[test]
fn del_with_the_agent_down_releases_when_it_is_back() {
    let mut h = Harness::new("deldown", &["10.213.0.0/24"]);
    let pod = Netns::new("cni-deldown-pod");
    let keep = Netns::new("cni-deldown-keep");
    h.add("c-down", &pod).expect_ok();
    h.add("c-keep", &keep).expect_ok();
    h.stop_agent();
    h.del("c-down", Some(&pod)).expect_ok();
    assert_eq!(h.host_veths(), vec![host_veth_name("c-keep", "eth0")]);
    // The agent comes back, reconciles against the host veths: c-down's address is free.
    h.start_agent();
    let left: Vec<String> = h
        .ipam()
        .allocations()
        .unwrap()
        .into_iter()
        .map(|a| a.container_id)
        .collect();
    assert_eq!(left, vec!["c-keep".to_string()]);
    h.del("c-keep", Some(&keep)).expect_ok();
}

#[test]
fn errors_carry_the_spec_codes() {
    let mut h = Harness::new("err", &["10.214.0.0/24"]);
    let pod = Netns::new("cni-err-pod");
    let conf = h.conf().to_string();
    let env = |args: &'static str| {
        vec![
            ("CNI_CONTAINERID", "c-err"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", Box::leak(pod.path().into_boxed_str()) as &str),
            ("CNI_ARGS", args),
        ]
    };
    // Missing K8S_POD_NAME → 4.
    let out = h.cni("ADD", &env("K8S_POD_NAMESPACE=default"), conf.as_bytes());
    assert_eq!(out.code(), 4, "{}", out.stdout);
    assert!(out.stdout.contains("K8S_POD_NAME"));
    // Missing CNI_CONTAINERID → 4.
    let out = h.cni("ADD", &[("CNI_IFNAME", "eth0")], conf.as_bytes());
    assert_eq!(out.code(), 4);
    // Undecodable config → 6.
    let out = h.cni(
        "ADD",
        &env("K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
        b"{not json",
    );
    assert_eq!(out.code(), 6);
    // Unsupported version → 1.
    let mut old = h.conf();
    old["cniVersion"] = json!("0.3.1");
    let out = h.cni(
        "ADD",
        &env("K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
        old.to_string().as_bytes(),
    );
    assert_eq!(out.code(), 1);
    // An ipam section (Weir does its own) → 2.
    let mut ipam = h.conf();
    ipam["ipam"] = json!({"type": "host-local"});
    let out = h.cni(
        "ADD",
        &env("K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
        ipam.to_string().as_bytes(),
    );
    assert_eq!(out.code(), 2);
    // Invalid config value → 7.
    let mut mtu = h.conf();
    mtu["mtu"] = json!(10);
    let out = h.cni(
        "ADD",
        &env("K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
        mtu.to_string().as_bytes(),
    );
    assert_eq!(out.code(), 7);
    // The Pod is unknown after the bounded wait → 11, nothing left behind.
    *h.backend.known_pods.lock().unwrap() = Some(HashSet::new());
    let mut quick = h.conf();
    quick["podWaitSeconds"] = json!(1);
    let out = h.cni(
        "ADD",
        &env("K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
        quick.to_string().as_bytes(),
    );
    assert_eq!(out.code(), 11, "{}", out.stdout);
    assert!(out.took >= Duration::from_secs(1));
    assert!(out.stdout.contains("default/p"), "{}", out.stdout);
    assert!(h.ipam().allocations().unwrap().is_empty());
    *h.backend.known_pods.lock().unwrap() = None;
    // Enforcement fails → the ADD fails and undoes everything.
    h.backend.fail_activate.store(true, Ordering::SeqCst);
    let out = h.add("c-err", &pod);
    assert_eq!(out.code(), 100, "{}", out.stdout);
    assert!(h.host_veths().is_empty());
    assert!(h.ipam().allocations().unwrap().is_empty());
    h.backend.fail_activate.store(false, Ordering::SeqCst);
    // No agent → 11 with a reason.
    h.stop_agent();
    let out = h.add("c-err", &pod);
    assert_eq!(out.code(), 11, "{}", out.stdout);
    let msg = out.json["msg"].as_str().unwrap();
    assert!(
        msg.contains("cannot reach the weir agent") && msg.contains(h.socket.to_str().unwrap()),
        "{msg}"
    );
    assert!(h.host_veths().is_empty());
}

#[test]
fn status_reports_readiness() {
    let mut h = Harness::new("status", &["10.215.0.0/24"]);
    let conf = h.conf().to_string();
    let out = h.cni("STATUS", &[], conf.as_bytes());
    assert!(out.ok && out.stdout.is_empty(), "{}", out.stdout);
    *h.backend.not_ready.lock().unwrap() = Some("datapath not loaded".into());
    let out = h.cni("STATUS", &[], conf.as_bytes());
    assert_eq!(out.code(), 50);
    assert!(out.stdout.contains("datapath not loaded"));
    *h.backend.not_ready.lock().unwrap() = None;
    h.stop_agent();
    let out = h.cni("STATUS", &[], conf.as_bytes());
    assert_eq!(out.code(), 50);
    assert!(
        out.stdout.contains("cannot reach the weir agent"),
        "{}",
        out.stdout
    );
}

#[test]
fn gc_releases_every_attachment_not_listed() {
    let h = Harness::new("gc", &["10.216.0.0/24"]);
    let pods: Vec<Netns> = (0..3)
        .map(|i| Netns::new(&format!("cni-gc-p{i}")))
        .collect();
    for (i, pod) in pods.iter().enumerate() {
        h.add(&format!("c-gc-{i}"), pod).expect_ok();
    }
    // A veth left by an ADD killed before it registered anything.
    h.node.ip(&[
        "link",
        "add",
        &host_veth_name("c-killed", "eth0"),
        "type",
        "veth",
        "peer",
        "name",
        "tmp-peer",
    ]);
    let mut conf = h.conf();
    conf["cni.dev/valid-attachments"] = json!([{ "containerID": "c-gc-0", "ifname": "eth0" }]);
    h.cni("GC", &[], conf.to_string().as_bytes()).expect_ok();
    let left: Vec<String> = h
        .ipam()
        .allocations()
        .unwrap()
        .into_iter()
        .map(|a| a.container_id)
        .collect();
    assert_eq!(left, vec!["c-gc-0".to_string()]);
    assert_eq!(h.host_veths(), vec![host_veth_name("c-gc-0", "eth0")]);
    let deactivated: BTreeSet<String> = h
        .backend
        .deactivated
        .lock()
        .unwrap()
        .iter()
        .map(|(c, _)| c.clone())
        .collect();
    assert_eq!(
        deactivated,
        ["c-gc-1".to_string(), "c-gc-2".to_string()].into()
    );
    h.del("c-gc-0", Some(&pods[0])).expect_ok();
}

#[test]
fn chained_prev_result_passes_through() {
    let h = Harness::new("chain", &["10.217.0.0/24"]);
    let pod = Netns::new("cni-chain-pod");
    let prev = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{ "name": "other0", "mac": "02:00:00:00:00:01" }],
        "ips": [{ "address": "192.0.2.10/24", "interface": 0 }],
        "routes": [{ "dst": "198.51.100.0/24" }],
        "dns": { "nameservers": ["192.0.2.53"] },
    });
    let mut conf = h.conf();
    conf["prevResult"] = prev.clone();
    let result = h
        .run_verb("ADD", "c-chain", Some(&pod), &conf)
        .expect_ok()
        .clone();
    let interfaces = result["interfaces"].as_array().unwrap();
    assert_eq!(interfaces[0], prev["interfaces"][0]);
    assert_eq!(interfaces[2]["name"], "eth0");
    let ips = result["ips"].as_array().unwrap();
    assert_eq!(ips[0], prev["ips"][0]);
    assert_eq!(ips[1]["interface"], 2);
    assert_eq!(result["routes"][0], prev["routes"][0]);
    assert_eq!(result["dns"], prev["dns"]);
    // A later plugin's CHECK/DEL hand the full result back as prevResult.
    h.check("c-chain", &pod, &result).expect_ok();
    let mut del = h.conf();
    del["prevResult"] = result;
    h.run_verb("DEL", "c-chain", Some(&pod), &del).expect_ok();
    assert!(h.ipam().allocations().unwrap().is_empty());
}

#[test]
fn dual_stack_and_legacy_result() {
    let h = Harness::new("dual", &["10.218.0.0/24", "fd00:218::/64"]);
    let pod = Netns::new("cni-dual-pod");
    let mut conf = h.conf();
    conf["cniVersion"] = json!("0.4.0");
    let result = h
        .run_verb("ADD", "c-dual", Some(&pod), &conf)
        .expect_ok()
        .clone();
    assert_eq!(result["cniVersion"], "0.4.0");
    let ips = result["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 2);
    assert_eq!(ips[0]["version"], "4");
    assert_eq!(ips[1]["version"], "6");
    assert_eq!(ips[1]["gateway"], "fe80::1");
    let v6 = ips[1]["address"].as_str().unwrap();
    assert!(v6.starts_with("fd00:218::") && v6.ends_with("/128"), "{v6}");
    let routes = ip_json(&pod, &["-6", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "fe80::1");
    let host = host_veth_name("c-dual", "eth0");
    let host_routes = ip_json(
        &h.node,
        &["-6", "route", "show", v6.trim_end_matches("/128")],
    );
    assert_eq!(host_routes[0]["dev"], host.as_str());
    // The v6 address is usable at once (no duplicate address detection pending).
    let addrs = ip_json(
        &pod,
        &["-6", "addr", "show", "dev", "eth0", "scope", "global"],
    );
    let info = &addrs[0]["addr_info"][0];
    assert_eq!(info["local"], v6.trim_end_matches("/128"));
    assert!(info.get("tentative").is_none(), "{info}");
    // Only the addresses the plugin assigned: no generated link-local on either end.
    assert_eq!(ipv6_addresses(&pod, "eth0"), vec![v6.to_string()]);
    assert_eq!(
        ipv6_addresses(&h.node, &host),
        vec!["fe80::1/64".to_string()]
    );
    let mut check = conf.clone();
    check["prevResult"] = result;
    h.run_verb("CHECK", "c-dual", Some(&pod), &check)
        .expect_ok();
    h.run_verb("DEL", "c-dual", Some(&pod), &conf).expect_ok();
    assert!(h.ipam().allocations().unwrap().is_empty());
}

#[test]
fn fifty_parallel_adds_get_distinct_addresses_and_del_frees_them() {
    const N: usize = 50;
    let h = Harness::new("par", &["10.219.0.0/24"]);
    let pods: Vec<Netns> = (0..N)
        .map(|i| Netns::new(&format!("cni-par-{i}")))
        .collect();
    let results: Vec<Out> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let h = &h;
                s.spawn(move || h.add(&format!("c-par-{i}"), pod))
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let addresses: HashSet<String> = results
        .iter()
        .map(|o| {
            o.expect_ok()["ips"][0]["address"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(addresses.len(), N, "duplicate addresses handed out");
    assert_eq!(h.host_veths().len(), N);
    let mut add_times: Vec<Duration> = results.iter().map(|o| o.took).collect();
    add_times.sort();

    let dels: Vec<Out> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let h = &h;
                s.spawn(move || h.del(&format!("c-par-{i}"), Some(pod)))
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for d in &dels {
        d.expect_ok();
    }
    let mut del_times: Vec<Duration> = dels.iter().map(|o| o.took).collect();
    del_times.sort();
    assert!(h.ipam().allocations().unwrap().is_empty());
    assert!(h.host_veths().is_empty());
    eprintln!(
        "{N} parallel: ADD p50 {:?} p99 {:?}; DEL p50 {:?} p99 {:?}",
        percentile(&add_times, 0.5),
        percentile(&add_times, 0.99),
        percentile(&del_times, 0.5),
        percentile(&del_times, 0.99)
    );
}

/// A quick measurement, not a benchmark (`cargo xtask bench` is): ADD and DEL one at a time and
/// 16 at once, as seen by the runtime (process spawn and nsenter included) and by the plugin.
#[test]
fn add_del_latency() {
    const N: usize = 16;
    const ROUNDS: usize = 4;
    let h = Harness::new("lat", &["10.220.0.0/24"]);
    h.backend.probe_host_veth.store(false, Ordering::SeqCst);
    let pods: Vec<Netns> = (0..N)
        .map(|i| Netns::new(&format!("cni-lat-{i}")))
        .collect();
    let report = |what: &str, mut add: Vec<Duration>, mut del: Vec<Duration>| {
        add.sort();
        del.sort();
        eprintln!(
            "{what}: ADD p50 {:?} p99 {:?}; DEL p50 {:?} p99 {:?} (spawn + nsenter included)",
            percentile(&add, 0.5),
            percentile(&add, 0.99),
            percentile(&del, 0.5),
            percentile(&del, 0.99)
        );
    };
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for (i, pod) in pods.iter().enumerate() {
            let c = format!("c-lat-{round}-{i}");
            add.push(h.add(&c, pod).expect_ok_took());
            del.push(h.del(&c, Some(pod)).expect_ok_took());
        }
    }
    report("one at a time", add, del);
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let run = |verb: &str| -> Vec<Duration> {
            std::thread::scope(|s| {
                let handles: Vec<_> = pods
                    .iter()
                    .enumerate()
                    .map(|(i, pod)| {
                        let (h, c) = (&h, format!("c-latp-{round}-{i}"));
                        s.spawn(move || match verb {
                            "ADD" => h.add(&c, pod).expect_ok_took(),
                            _ => h.del(&c, Some(pod)).expect_ok_took(),
                        })
                    })
                    .collect();
                handles.into_iter().map(|t| t.join().unwrap()).collect()
            })
        };
        add.extend(run("ADD"));
        del.extend(run("DEL"));
    }
    report(&format!("{N} at once"), add, del);
    // CPU time of the plugin processes (user + system), per call: on 2 cores this bounds what 16
    // concurrent ADDs can achieve.
    let cpu = CpuTime::children().total();
    eprintln!(
        "plugin CPU per call (ADD and DEL, all children of this test process): {:?}",
        cpu / (4 * N * ROUNDS) as u32
    );
    assert!(h.ipam().allocations().unwrap().is_empty());
    // The plugin's own time (from its log), without process spawn and nsenter, and its phases.
    let log = std::fs::read_to_string(h.dir.join("cni.log")).unwrap();
    for verb in ["ADD", "DEL"] {
        let mut took: Vec<Duration> = log
            .lines()
            .filter(|l| l.contains(&format!(" {verb} ")))
            .filter_map(|l| {
                l.split(" took=")
                    .nth(1)?
                    .split("ms")
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .collect();
        took.sort();
        eprintln!(
            "{verb} in the plugin (all runs): p50 {:?} p99 {:?}; e.g. {}",
            percentile(&took, 0.5),
            percentile(&took, 0.99),
            log.lines()
                .rev()
                .find(|l| l.contains(&format!(" {verb} ")))
                .unwrap_or_default()
        );
    }
}

/// Churn: 500 ADD/DEL, some plugin processes SIGKILLed in the middle of their ADD (their
/// sandboxes left as they were, as after a runtime crash). Afterwards a GC with no valid
/// attachments leaves no address, no host veth and no enforced endpoint behind, and no two
/// completed ADDs ever held the same address at once.
#[test]
fn churn_with_killed_adds_leaves_nothing_after_gc() {
    const TOTAL: usize = 500;
    const WORKERS: usize = 4;
    let h = Harness::new("churn", &["10.221.0.0/24"]);
    h.backend.probe_host_veth.store(false, Ordering::SeqCst);
    let held: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
    let killed_sandboxes: Mutex<Vec<Netns>> = Mutex::new(Vec::new());
    let killed = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for w in 0..WORKERS {
            let (h, held, killed_sandboxes, killed) = (&h, &held, &killed_sandboxes, &killed);
            s.spawn(move || {
                let mut pod = Netns::new(&format!("cni-churn-w{w}"));
                for i in (w..TOTAL).step_by(WORKERS) {
                    let c = format!("c-churn-{i}");
                    if i % 10 == 3 {
                        // Kill the plugin somewhere in its ADD.
                        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{c}");
                        let path = pod.path();
                        let mut child = h.spawn_cni(
                            "ADD",
                            &[
                                ("CNI_CONTAINERID", &c),
                                ("CNI_IFNAME", "eth0"),
                                ("CNI_NETNS", &path),
                                ("CNI_ARGS", &args),
                            ],
                            h.conf().to_string().as_bytes(),
                        );
                        std::thread::sleep(Duration::from_micros(((i * 7919) % 25_000) as u64));
                        let _ = child.kill();
                        let out = child.wait_with_output().unwrap();
                        if out.status.success() {
                            // It finished first: a normal ADD, then DEL.
                            h.del(&c, Some(&pod)).expect_ok();
                        } else {
                            killed.fetch_add(1, Ordering::SeqCst);
                            // The sandbox stays as the killed plugin left it; a new one is used.
                            let fresh = Netns::new(&format!("cni-churn-w{w}-{i}"));
                            killed_sandboxes
                                .lock()
                                .unwrap()
                                .push(std::mem::replace(&mut pod, fresh));
                        }
                        continue;
                    }
                    let out = h.add(&c, &pod);
                    let address = out.expect_ok()["ips"][0]["address"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    assert!(
                        held.lock().unwrap().insert(address.clone()),
                        "{address} handed out twice"
                    );
                    h.del(&c, Some(&pod)).expect_ok();
                    held.lock().unwrap().remove(&address);
                }
            });
        }
    });
    let leftover = h.ipam().allocations().unwrap().len();
    eprintln!(
        "churn: {TOTAL} ADDs, {} killed mid-ADD; before GC {leftover} allocations, {} host veths",
        killed.load(Ordering::SeqCst),
        h.host_veths().len()
    );
    let mut conf = h.conf();
    conf["cni.dev/valid-attachments"] = json!([]);
    h.cni("GC", &[], conf.to_string().as_bytes()).expect_ok();
    assert!(h.ipam().allocations().unwrap().is_empty());
    assert!(h.host_veths().is_empty(), "{:?}", h.host_veths());
    assert!(h.backend.enforced.lock().unwrap().is_empty());
    drop(killed_sandboxes);
}

// ---------------------------------------------------------------------------------------------
// SPEC 1.1 to the letter: a second ADD, a second interface, STATUS and the required keys.

/// Everything ADD wired for one attachment, as `ip -j` prints it: the pod's interface, its
/// addresses, routes and neighbours, and the host veth with its addresses and routes. Two
/// snapshots are equal only if nothing was rebuilt (ifindexes and MACs included).
fn wiring(h: &Harness, pod: &Netns, ifname: &str, host: &str) -> Vec<Value> {
    vec![
        ip_json(pod, &["addr", "show", "dev", ifname]),
        ip_json(pod, &["-4", "route", "show"]),
        ip_json(pod, &["-6", "route", "show"]),
        ip_json(pod, &["neigh", "show", "dev", ifname]),
        ip_json(&h.node, &["addr", "show", "dev", host]),
        ip_json(&h.node, &["-4", "route", "show", "dev", host]),
        ip_json(&h.node, &["-6", "route", "show", "dev", host]),
        ip_json(&h.node, &["neigh", "show", "dev", host]),
    ]
}

/// `(dev, metric)` of the pod's default routes of one family.
fn default_routes(pod: &Netns, family: &str) -> Vec<(String, u64)> {
    ip_json(pod, &[family, "route", "show", "default"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["dev"].as_str().unwrap().to_owned(),
                r["metric"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn a_second_add_fails_and_leaves_the_first_attachment_as_it_was() {
    let h = Harness::new("dup", &["10.222.0.0/24", "fd00:222::/64"]);
    let pod = Netns::new("cni-dup-pod");
    let host = host_veth_name("c-dup", "eth0");
    let first = h.add("c-dup", &pod).expect_ok().clone();
    let before = wiring(&h, &pod, "eth0", &host);
    let allocations = h.ipam().allocations().unwrap();

    // SPEC 1.1 ADD: "If an interface of the requested name already exists in the container,
    // the CNI plugin MUST return with an error." Code 4 names the variables.
    let again = h.add("c-dup", &pod);
    assert_eq!(again.code(), 4, "{}", again.stdout);
    let msg = again.json["msg"].as_str().unwrap();
    assert!(
        msg.contains("CNI_CONTAINERID=c-dup") && msg.contains("CNI_IFNAME=eth0"),
        "{msg}"
    );
    assert!(msg.contains("already holds"), "{msg}");
    // Nothing of the first was rebuilt, released or deactivated.
    assert_eq!(wiring(&h, &pod, "eth0", &host), before);
    assert_eq!(h.ipam().allocations().unwrap(), allocations);
    assert!(h.backend.deactivated.lock().unwrap().is_empty());
    assert_eq!(h.backend.activated.lock().unwrap().len(), 1);
    assert!(futures::executor::block_on(
        h.backend.is_enforced("c-dup", "eth0")
    ));
    h.check("c-dup", &pod, &first).expect_ok();

    // Another container ID asking for the same interface in the same namespace: the interface
    // exists. Its own fresh allocation is undone; the first attachment is untouched.
    let other = h.add("c-other", &pod);
    assert_eq!(other.code(), 4, "{}", other.stdout);
    assert!(
        other.stdout.contains("already exists in the container"),
        "{}",
        other.stdout
    );
    assert_eq!(wiring(&h, &pod, "eth0", &host), before);
    assert_eq!(h.ipam().allocations().unwrap(), allocations);
    assert_eq!(h.host_veths(), vec![host.clone()]);
    assert!(
        !h.backend
            .deactivated
            .lock()
            .unwrap()
            .contains(&("c-dup".into(), "eth0".into()))
    );
    h.check("c-dup", &pod, &first).expect_ok();

    // After its DEL, the attachment can be added again.
    h.del("c-dup", Some(&pod)).expect_ok();
    h.add("c-dup", &pod).expect_ok();
    h.del("c-dup", Some(&pod)).expect_ok();
    assert!(h.ipam().allocations().unwrap().is_empty());
    assert!(h.host_veths().is_empty());
}

#[test]
fn a_second_interface_leaves_the_first_ones_default_route() {
    let h = Harness::new("eth1", &["10.223.0.0/24", "fd00:223::/64"]);
    let pod = Netns::new("cni-eth1-pod");
    let conf = h.conf();
    let first = h.add("c-multi", &pod).expect_ok().clone();
    let eth0 = wiring(&h, &pod, "eth0", &host_veth_name("c-multi", "eth0"));
    let second = h
        .run_verb_on("ADD", "c-multi", "eth1", Some(&pod), &conf)
        .expect_ok()
        .clone();
    // eth1's default routes come after eth0's (IPv4 metric 0, IPv6 1024), and say so.
    assert_eq!(
        default_routes(&pod, "-4"),
        vec![("eth0".into(), 0), ("eth1".into(), 1)]
    );
    assert_eq!(
        default_routes(&pod, "-6"),
        vec![("eth0".into(), 1024), ("eth1".into(), 1025)]
    );
    assert_eq!(
        second["routes"],
        json!([
            {"dst": "0.0.0.0/0", "gw": "169.254.1.1", "priority": 1},
            {"dst": "::/0", "gw": "fe80::1", "priority": 1025},
        ])
    );
    let out = ip_json(&pod, &["route", "get", "192.0.2.1"]);
    assert_eq!(out[0]["dev"], "eth0", "{out}");
    let check_eth1 = |prev: &Value| {
        let mut c = h.conf();
        c["prevResult"] = prev.clone();
        h.run_verb_on("CHECK", "c-multi", "eth1", Some(&pod), &c)
    };
    h.check("c-multi", &pod, &first).expect_ok();
    check_eth1(&second).expect_ok();

    // DEL of eth1 removes only what eth1 added.
    h.run_verb_on("DEL", "c-multi", "eth1", Some(&pod), &conf)
        .expect_ok();
    assert_eq!(default_routes(&pod, "-4"), vec![("eth0".into(), 0)]);
    assert_eq!(default_routes(&pod, "-6"), vec![("eth0".into(), 1024)]);
    assert_eq!(
        wiring(&h, &pod, "eth0", &host_veth_name("c-multi", "eth0")),
        eth0
    );
    h.check("c-multi", &pod, &first).expect_ok();

    // And the other way round: with eth0 gone, eth1's default route still carries the pod.
    let second = h
        .run_verb_on("ADD", "c-multi", "eth1", Some(&pod), &conf)
        .expect_ok()
        .clone();
    h.del("c-multi", Some(&pod)).expect_ok();
    assert_eq!(default_routes(&pod, "-4"), vec![("eth1".into(), 1)]);
    check_eth1(&second).expect_ok();
    h.run_verb_on("DEL", "c-multi", "eth1", Some(&pod), &conf)
        .expect_ok();
    assert!(h.ipam().allocations().unwrap().is_empty());
}

#[test]
fn the_required_keys_of_a_configuration_are_checked() {
    let h = Harness::new("keys", &["10.224.0.0/24"]);
    let pod = Netns::new("cni-keys-pod");
    let env = [
        ("CNI_CONTAINERID", "c-keys"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", &pod.path()),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
    ];
    let with = |key: &str, value: Value| {
        let mut conf = h.conf();
        match value {
            Value::Null => conf.as_object_mut().unwrap().remove(key),
            v => conf.as_object_mut().unwrap().insert(key.to_owned(), v),
        };
        conf.to_string()
    };
    // SPEC 1.1 section 3: the runtime always inserts `cniVersion` and the network's `name`;
    // section 1 requires `type`. Missing or malformed → 7 (invalid network config), an unknown
    // version → 1, a value of the wrong JSON type → 6 (failed to decode).
    for (verb, key, value, code, names) in [
        ("ADD", "name", Value::Null, 7, "\"name\""),
        ("ADD", "name", json!(""), 7, "\"name\""),
        ("ADD", "name", json!("bad/name"), 7, "bad/name"),
        ("DEL", "name", Value::Null, 7, "\"name\""),
        ("STATUS", "name", Value::Null, 7, "\"name\""),
        ("GC", "name", Value::Null, 7, "\"name\""),
        ("ADD", "type", Value::Null, 7, "\"type\""),
        ("ADD", "type", json!("../weir-cni"), 7, "../weir-cni"),
        ("ADD", "cniVersion", Value::Null, 7, "\"cniVersion\""),
        ("ADD", "cniVersion", json!("2.0.0"), 1, "2.0.0"),
        ("ADD", "name", json!(42), 6, "network configuration"),
    ] {
        let out = h.cni(verb, &env, with(key, value.clone()).as_bytes());
        assert_eq!(
            out.code(),
            code,
            "{verb} with {key}={value}: {}",
            out.stdout
        );
        let msg = out.json["msg"].as_str().unwrap();
        assert!(msg.contains(names), "{verb} with {key}={value}: {msg}");
    }
    assert!(h.ipam().allocations().unwrap().is_empty());
    assert!(h.host_veths().is_empty());
    h.add("c-keys", &pod).expect_ok();
    h.del("c-keys", Some(&pod)).expect_ok();
}

// ---------------------------------------------------------------------------------------------
// Against the real agent: datapath, IPAM and the manifests directory, as the README documents.

/// One node: its namespace, a real `weir-agent` on a manifests directory, and the plugin.
struct RealNode {
    plugin: Plugin,
    agent: Agent,
    dirs: AgentDirs,
    node: Netns,
}

impl RealNode {
    /// Pods named in `pods` (namespace `gw`, label app=<name>) and `extra` manifests are written
    /// before the agent starts, so its first cluster state has them.
    fn start(tag: &str, pod_cidrs: &str, pods: &[&str], extra: &[(&str, &str)]) -> Self {
        let node = Netns::new(tag);
        let dirs = AgentDirs::new(tag, "n1");
        let write =
            |file: &str, text: &str| std::fs::write(dirs.manifests.join(file), text).unwrap();
        write(
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: gw}\n",
        );
        for name in pods {
            write(
                &format!("pod-{name}.yaml"),
                &format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: gw, labels: {{app: {name}}}}}\n\
                     spec: {{nodeName: n1, containers: [{{name: c}}]}}\n"
                ),
            );
        }
        for (file, text) in extra {
            write(file, text);
        }
        let agent = Agent::start(
            &node,
            "n1",
            &dirs,
            &["--pod-cidr", pod_cidrs, "--pod-wait-seconds", "5"],
        );
        let plugin = Plugin::new(&node.name, &dirs.socket, &dirs.root.join("cni.log"));
        Self {
            plugin,
            agent,
            dirs,
            node,
        }
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.dirs.manifests.join(file), text).unwrap();
    }

    /// Runs `verb` for pod `name`'s `ifname` (container id `ctr-<name>`); the parsed output.
    fn run(&self, verb: &str, name: &str, pod: &Netns, ifname: &str, prev: Option<&Value>) -> Out {
        let container_id = format!("ctr-{name}");
        let pod_ref = PodRef {
            container_id: &container_id,
            namespace: "gw",
            name,
            netns: &pod.name,
        };
        let (out, took) = self.plugin.run_on(verb, &pod_ref, ifname, prev);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        Out {
            ok: out.status.success(),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stdout,
            took,
        }
    }

    fn ok(&self, verb: &str, name: &str, pod: &Netns, ifname: &str, prev: Option<&Value>) -> Value {
        let out = self.run(verb, name, pod, ifname, prev);
        assert!(
            out.ok,
            "{verb} {name}/{ifname} failed: {}\nagent log:\n{}",
            out.stdout,
            self.agent.log_text()
        );
        out.json
    }

    fn status(&self) -> Out {
        self.run("STATUS", "status", &self.node, "eth0", None)
    }
}

/// The pod addresses an ADD result lists, in order.
fn addresses(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| {
            let cidr = ip["address"].as_str().unwrap();
            cidr.split('/').next().unwrap().parse().unwrap()
        })
        .collect()
}

const V4_GATEWAY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 1, 1));
const V6_GATEWAY: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1));

/// Long enough for any reply on a loaded machine; a ping that must fail waits `DENIED` only.
const ANSWERED_WITHIN: Duration = Duration::from_secs(10);
const DENIED: Duration = Duration::from_secs(1);

fn answers(from: &Netns, dst: IpAddr) -> bool {
    ping_until_answered(from, dst, "eth0", Instant::now() + ANSWERED_WITHIN)
}

/// The pod's gateway is the node: it answers ping on both families (as Cilium's does), and the
/// pod's egress policy applies to it as to any other destination (as Cilium's and Calico's
/// does): an egress-isolated pod reaches it only where a rule allows it, and allowing it opens
/// nothing else. The node's own traffic to a pod keeps the node's address (kubelet's probes
/// still pass the host allowance). A second ADD of a live attachment fails and leaves it
/// working; a second interface and its DEL leave the first one's routes.
#[test]
fn the_gateway_answers_ping_and_the_pods_egress_policy_applies_to_it() {
    let isolate = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                   metadata: {name: iso-isolated, namespace: gw}\n\
                   spec: {podSelector: {matchLabels: {app: iso}}, policyTypes: [Ingress, Egress]}\n";
    let node_object = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n\
                       status: {addresses: [{type: InternalIP, address: 192.168.77.1}]}\n";
    let n = RealNode::start(
        "cni-gw",
        "10.225.1.0/24,fd00:225:1::/64",
        &["a", "b", "iso"],
        &[("isolate.yaml", isolate), ("node.yaml", node_object)],
    );
    // The node's own address, where a real node has it.
    n.node.ip(&["addr", "add", "192.168.77.1/32", "dev", "lo"]);
    let (a, b, iso) = (
        Netns::new("cni-gw-a"),
        Netns::new("cni-gw-b"),
        Netns::new("cni-gw-iso"),
    );
    let a_result = n.ok("ADD", "a", &a, "eth0", None);
    let b_ips = addresses(&n.ok("ADD", "b", &b, "eth0", None));
    let iso_ips = addresses(&n.ok("ADD", "iso", &iso, "eth0", None));

    // The gateway answers, over IPv4 and IPv6; the pods reach each other.
    assert!(answers(&a, V4_GATEWAY), "{}", n.agent.log_text());
    assert!(answers(&a, V6_GATEWAY), "{}", n.agent.log_text());
    assert!(answers(&a, b_ips[0]) && answers(&a, b_ips[1]));

    // An egress-isolated pod does not reach it: it is a destination like any other.
    assert!(!ping(&iso, V4_GATEWAY, "eth0", DENIED));
    assert!(!ping(&iso, V6_GATEWAY, "eth0", DENIED));
    // The node reaches the isolated pod from its own address, which policy knows as the host,
    // never from the gateway address, which it does not.
    let route = ip_json(&n.node, &["route", "get", &iso_ips[0].to_string()]);
    assert_eq!(route[0]["prefsrc"], "192.168.77.1", "{route}");
    assert!(answers(&n.node, iso_ips[0]), "{}", n.agent.log_text());
    // A rule allowing the gateway opens the gateway, and nothing else.
    n.write(
        "iso-gateway.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: iso-to-gateway, namespace: gw}\n\
         spec:\n  podSelector: {matchLabels: {app: iso}}\n  policyTypes: [Egress]\n  egress:\n\
         \x20 - to: [{ipBlock: {cidr: 169.254.1.1/32}}, {ipBlock: {cidr: 'fe80::1/128'}}]\n",
    );
    assert!(answers(&iso, V4_GATEWAY), "{}", n.agent.log_text());
    assert!(answers(&iso, V6_GATEWAY), "{}", n.agent.log_text());
    assert!(!ping(&iso, b_ips[0], "eth0", DENIED));
    assert!(!ping(&iso, b_ips[1], "eth0", DENIED));

    // A second ADD of a's live attachment fails (code 4) and leaves it as it was: same MAC,
    // still enforced (the agent's CHECK), still reaching the gateway and b.
    let a_mac = ip_json(&a, &["link", "show", "eth0"])[0]["address"].clone();
    let again = n.run("ADD", "a", &a, "eth0", None);
    assert!(!again.ok);
    assert_eq!(again.json["code"], 4, "{}", again.stdout);
    assert_eq!(ip_json(&a, &["link", "show", "eth0"])[0]["address"], a_mac);
    n.ok("CHECK", "a", &a, "eth0", Some(&a_result));
    assert!(answers(&a, V4_GATEWAY) && answers(&a, b_ips[0]));

    // A second interface keeps the first one's default routes; its DEL removes only its own.
    let eth1_result = n.ok("ADD", "a", &a, "eth1", None);
    let via = ip_json(&a, &["route", "get", &b_ips[0].to_string()]);
    assert_eq!(via[0]["dev"], "eth0", "{via}");
    n.ok("CHECK", "a", &a, "eth0", Some(&a_result));
    n.ok("CHECK", "a", &a, "eth1", Some(&eth1_result));
    n.ok("DEL", "a", &a, "eth1", Some(&eth1_result));
    n.ok("CHECK", "a", &a, "eth0", Some(&a_result));
    assert!(answers(&a, b_ips[0]) && answers(&a, b_ips[1]));

    // The gateway address lives on every host veth; b's going leaves it on a's.
    n.ok("DEL", "b", &b, "eth0", None);
    assert!(answers(&a, V4_GATEWAY) && answers(&a, V6_GATEWAY));
    n.ok("DEL", "a", &a, "eth0", None);
    n.ok("DEL", "iso", &iso, "eth0", None);
}

#[test]
fn status_fails_while_the_pool_is_exhausted_and_recovers() {
    // A /30: two usable addresses.
    let n = RealNode::start("cni-full", "10.226.1.0/30", &["p1", "p2", "p3"], &[]);
    let pods: Vec<Netns> = (1..=3)
        .map(|i| Netns::new(&format!("cni-full-p{i}")))
        .collect();
    n.status().expect_ok();
    n.ok("ADD", "p1", &pods[0], "eth0", None);
    n.status().expect_ok();
    n.ok("ADD", "p2", &pods[1], "eth0", None);

    // SPEC 1.1 STATUS: "if a plugin has a limited number of resources (e.g. IP addresses ...),
    // it should return an error if those resources are exhausted". 50, not 51: existing pods
    // keep their connectivity.
    let full = n.status();
    assert_eq!(full.code(), 50, "{}", full.stdout);
    let msg = full.json["msg"].as_str().unwrap();
    assert!(msg.contains("10.226.1.0/30") && msg.contains('2'), "{msg}");
    let refused = n.run("ADD", "p3", &pods[2], "eth0", None);
    assert_eq!(refused.code(), 101, "{}", refused.stdout);

    n.ok("DEL", "p2", &pods[1], "eth0", None);
    n.status().expect_ok();
    n.ok("ADD", "p3", &pods[2], "eth0", None);
    assert_eq!(n.status().code(), 50);
    n.ok("DEL", "p1", &pods[0], "eth0", None);
    n.ok("DEL", "p3", &pods[2], "eth0", None);
    n.status().expect_ok();
}
