//! The XDP early filter on a node's uplink, end to end: two node namespaces on one underlay veth,
//! an agent each (native routing), pods wired by the plugin. The server's node drops a
//! cross-node connection its policy denies at XDP and explains it in flows.jsonl, lets allowed
//! traffic and the replies of connections its pods opened through, drops the operator's deny
//! list (a followed file) there too, keeps all of it while its agent is down, swaps a restarted
//! agent's program in, and `weir-agent uninstall` takes it off. Root only; never skipped.

use std::{net::IpAddr, time::Duration};

use weir_tests::tcp::{PORT, connects, eventually_connects, serve};
use weir_tests::{
    agent::{Agent, bin, flows},
    netns::Netns,
    nodes::TwoNodes,
    wait::eventually,
};

/// The id of the XDP program on `dev` in `netns`, if any (`ip -d link` prints `prog/xdp id N`).
fn xdp_program(netns: &Netns, dev: &str) -> Option<u32> {
    let out = netns.ip(&["-d", "link", "show", "dev", dev]);
    let rest = out.split("prog/xdp id ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The mode of the XDP program on `dev` in `netns`, as `ip link` names it after the MTU: `xdp`
/// (native), `xdpgeneric`, or none.
fn xdp_mode(netns: &Netns, dev: &str) -> Option<String> {
    let out = netns.ip(&["link", "show", "dev", dev]);
    let word = out.split("mtu ").nth(1)?.split_whitespace().nth(1)?;
    word.starts_with("xdp").then(|| word.to_owned())
}

#[test]
fn cross_node_traffic_denied_by_policy_or_the_deny_list_is_dropped_at_xdp() {
    let two = TwoNodes::new("xdp", "192.168.78", "10.152");
    let (n1, n2, d1, d2) = (&two.n1, &two.n2, &two.d1, &two.d2);
    let m = two.manifests();
    let pods = [
        ("client", "n1", "client"),
        ("intruder", "n1", "intruder"),
        ("server", "n2", "server"),
    ];
    two.declare_pods(&pods);
    // n2's deny list: empty at first, with a comment.
    let deny = d2.root.join("prefilter");
    std::fs::write(&deny, "# weir-prefilter\n").unwrap();
    let deny_arg = deny.to_str().unwrap().to_owned();
    let n2_args = ["--prefilter-file", deny_arg.as_str()];
    let a1 = Agent::start(n1, "n1", d1, &[]);
    let a2 = Agent::start(n2, "n2", d2, &n2_args);
    // The uplink was found from the Node's InternalIP.
    let first_program = xdp_program(n2, "eth0").expect("no XDP program on n2's uplink");
    assert!(
        xdp_program(n1, "eth0").is_some(),
        "no XDP program on n1's uplink"
    );
    // The uplink is a veth: `--xdp-mode auto` runs the filter in generic mode there, so the
    // other end keeps its segmentation offloads.
    assert_eq!(xdp_mode(n2, "eth0").as_deref(), Some("xdpgeneric"));

    let started = two.start_pods(&pods);
    let netns: Vec<&Netns> = started.iter().map(|p| &p.netns).collect();
    let ips: Vec<IpAddr> = started.iter().map(|p| p.ip).collect();
    let (client_ip, intruder_ip, server_ip) = (ips[0], ips[1], ips[2]);
    serve(netns[2], server_ip);
    serve(netns[1], intruder_ip);
    assert!(
        eventually_connects(netns[0], server_ip),
        "the client reaches the server on the other node"
    );

    let server_admits = |apps: &[&str]| {
        let from: Vec<String> = apps
            .iter()
            .map(|app| format!("{{podSelector: {{matchLabels: {{app: {app}}}}}}}"))
            .collect();
        std::fs::write(
            m.join("policy.yaml"),
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: default}}\n\
                 spec: {{podSelector: {{matchLabels: {{app: server}}}}, ingress: [{{from: [{}]}}]}}\n",
                from.join(", ")
            ),
        )
        .unwrap();
    };
    server_admits(&["client"]);
    eventually(
        "the intruder is denied across nodes",
        Duration::from_secs(10),
        || !connects(netns[1], server_ip),
    );
    assert!(
        eventually_connects(netns[0], server_ip),
        "the client is still allowed"
    );
    // The drop happened at XDP on n2's uplink, and is explained.
    let intruder = intruder_ip.to_string();
    eventually(
        "the XDP drop is in n2's flows.jsonl",
        Duration::from_secs(10),
        || {
            flows(&d2.state)
                .iter()
                .any(|f| f["reason"] == "xdp-policy-denied" && f["src"] == intruder.as_str())
        },
    );
    let records = flows(&d2.state);
    let record = records
        .iter()
        .find(|f| f["reason"] == "xdp-policy-denied" && f["src"] == intruder.as_str())
        .unwrap();
    assert_eq!(record["verdict"], "drop");
    assert_eq!(record["direction"], "ingress");
    assert_eq!(record["endpoint"], "default/server");
    assert_eq!(record["dport"], PORT);
    assert_eq!(record["policies"], serde_json::json!(["default/server"]));
    // The tc program never saw the intruder's connection attempts: XDP dropped them first.
    assert!(
        !records
            .iter()
            .any(|f| f["reason"] == "policy-denied" && f["src"] == intruder.as_str()),
        "a tc drop of the intruder: {records:?}"
    );
    // XDP remembers the denial of the intruder's connections, but not past a policy change: once
    // the server admits it too, it gets in; when that rule goes, it is denied again.
    server_admits(&["client", "intruder"]);
    assert!(
        eventually_connects(netns[1], server_ip),
        "a denial XDP remembered outlived the policy that admits the intruder"
    );
    server_admits(&["client"]);
    eventually(
        "the intruder is denied again",
        Duration::from_secs(10),
        || !connects(netns[1], server_ip),
    );

    // The server may open connections to the intruder: their replies pass n2's XDP although the
    // server's ingress denies the intruder.
    assert!(
        eventually_connects(netns[2], intruder_ip),
        "the reply of a connection the server opened was dropped"
    );

    // The operator's deny list: the client's address goes on it, and comes off again.
    std::fs::write(&deny, format!("# weir-prefilter\n\n{client_ip}/32\n")).unwrap();
    eventually(
        "the deny list drops the client",
        Duration::from_secs(10),
        || !connects(netns[0], server_ip),
    );
    let client = client_ip.to_string();
    eventually(
        "the deny list drop is explained",
        Duration::from_secs(10),
        || {
            flows(&d2.state).iter().any(|f| {
                f["reason"] == "prefilter-denied"
                    && f["src"] == client.as_str()
                    && f["rule"] == "prefilter line 3"
            })
        },
    );
    // A file that does not parse keeps the applied list.
    std::fs::write(&deny, "not-a-cidr\n").unwrap();
    eventually("the bad file is reported", Duration::from_secs(10), || {
        a2.log_text()
            .contains("line 1: \"not-a-cidr\" is not a CIDR")
    });
    assert!(
        !connects(netns[0], server_ip),
        "a bad deny list file opened traffic"
    );
    std::fs::write(&deny, "").unwrap();
    assert!(
        eventually_connects(netns[0], server_ip),
        "the client is let through again"
    );

    // The intruder stays out and the client gets in, as before the step named by `after`.
    let filters_as_before = |after: &str| {
        assert!(
            !connects(netns[1], server_ip),
            "the intruder got in {after}"
        );
        assert!(
            eventually_connects(netns[0], server_ip),
            "the client is denied {after}"
        );
    };

    // Restart safety: with n2's agent dead, the filter stays and still drops; a new agent swaps
    // its program into the pinned link.
    drop(a2);
    assert_eq!(xdp_program(n2, "eth0"), Some(first_program));
    assert!(
        !connects(netns[1], server_ip),
        "the intruder got in while the agent was down"
    );
    let a2 = Agent::start(n2, "n2", d2, &n2_args);
    assert!(
        a2.log_text().contains("attached=Replaced"),
        "{}",
        a2.log_text()
    );
    let second_program = xdp_program(n2, "eth0").expect("the restart left the uplink without XDP");
    assert_ne!(
        second_program, first_program,
        "the restarted agent's program was not swapped in"
    );
    filters_as_before("after the restart");

    // Another mode asked for: the pinned link is replaced by one in that mode, which filters as
    // the other did.
    drop(a2);
    let native_args = [n2_args[0], n2_args[1], "--xdp-mode", "native"];
    let a2 = Agent::start(n2, "n2", d2, &native_args);
    assert!(
        a2.log_text().contains("attached=Native"),
        "{}",
        a2.log_text()
    );
    assert_eq!(xdp_mode(n2, "eth0").as_deref(), Some("xdp"));
    filters_as_before("after the change of mode");

    // Uninstall takes the filter off.
    drop((a1, a2));
    let out = n2
        .command(bin("weir-agent").to_str().unwrap())
        .args(["uninstall", "--node-name", "n2", "--bpffs-dir"])
        .arg(&d2.bpffs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("took Weir's XDP filter off [\"eth0\"]"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        xdp_program(n2, "eth0"),
        None,
        "uninstall left the XDP program"
    );
}

/// The same filter on nodes joined by the VXLAN overlay: the intruder's packets reach n2's uplink
/// inside tunnel packets addressed to n2 itself, and `weir_xdp` decides on the pod packet inside
/// them. The drop is explained in n2's flows.jsonl with the pods' addresses, the tc program never
/// sees the intruder's connection, and the replies of a connection the server opens come back
/// through the tunnel and pass.
#[test]
fn cross_node_traffic_over_the_vxlan_overlay_is_dropped_at_xdp_inside_the_tunnel() {
    let two = TwoNodes::new("xvx", "192.168.79", "10.153");
    let (n1, n2, d1, d2) = (&two.n1, &two.n2, &two.d1, &two.d2);
    let pods = [
        ("client", "n1", "client"),
        ("intruder", "n1", "intruder"),
        ("server", "n2", "server"),
    ];
    two.declare_pods(&pods);
    let overlay = ["--overlay", "vxlan"];
    let _a1 = Agent::start(n1, "n1", d1, &overlay);
    let _a2 = Agent::start(n2, "n2", d2, &overlay);
    assert!(
        xdp_program(n2, "eth0").is_some(),
        "no XDP program on n2's uplink"
    );
    let started = two.start_pods(&pods);
    let netns: Vec<&Netns> = started.iter().map(|p| &p.netns).collect();
    let ips: Vec<IpAddr> = started.iter().map(|p| p.ip).collect();
    let (intruder_ip, server_ip) = (ips[1], ips[2]);
    serve(netns[2], server_ip);
    serve(netns[1], intruder_ip);
    eventually(
        "the client reaches the server through the overlay",
        Duration::from_secs(10),
        || connects(netns[0], server_ip),
    );

    std::fs::write(
        two.manifests().join("policy.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\n\
         spec: {podSelector: {matchLabels: {app: server}}, ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]}\n",
    )
    .unwrap();
    eventually(
        "the intruder is denied across nodes",
        Duration::from_secs(10),
        || !connects(netns[1], server_ip),
    );
    assert!(connects(netns[0], server_ip), "the client is still allowed");
    // The traffic really crossed in the tunnel.
    assert!(
        n2.ip(&["-s", "link", "show", "weir-vxlan"])
            .lines()
            .nth(3)
            .and_then(|rx| rx.split_whitespace().nth(1)?.parse::<u64>().ok())
            .is_some_and(|packets| packets > 0),
        "nothing came out of n2's tunnel device:\n{}",
        n2.ip(&["-s", "link", "show", "weir-vxlan"])
    );
    let intruder = intruder_ip.to_string();
    eventually(
        "the XDP drop inside the tunnel is in n2's flows.jsonl",
        Duration::from_secs(10),
        || {
            flows(&d2.state)
                .iter()
                .any(|f| f["reason"] == "xdp-policy-denied" && f["src"] == intruder.as_str())
        },
    );
    let records = flows(&d2.state);
    let record = records
        .iter()
        .find(|f| f["reason"] == "xdp-policy-denied" && f["src"] == intruder.as_str())
        .unwrap();
    assert_eq!(record["verdict"], "drop");
    assert_eq!(record["direction"], "ingress");
    assert_eq!(record["dst"], server_ip.to_string().as_str());
    assert_eq!(record["endpoint"], "default/server");
    assert_eq!(record["dport"], PORT);
    assert_eq!(record["policies"], serde_json::json!(["default/server"]));
    assert!(
        !records
            .iter()
            .any(|f| f["reason"] == "policy-denied" && f["src"] == intruder.as_str()),
        "a tc drop of the intruder: XDP did not drop it inside the tunnel: {records:?}"
    );
    // Replies of a connection the server opened come back through the tunnel and pass.
    assert!(
        connects(netns[2], intruder_ip),
        "the reply of a connection the server opened was dropped"
    );
}
