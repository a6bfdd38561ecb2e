//! Fragmented UDP between pod namespaces through the standalone contract (issue 11, section 3):
//! the real agent with a manifests directory whose NetworkPolicy admits UDP 5353 from pod a to
//! pod b, pods wired by the real `weir-cni` (MTU 1500), dual-stack. An 8,000-byte datagram from a
//! to b:5353 is delivered over IPv4 and IPv6 (the kernel sends it in six fragments, of which only
//! the first has ports); the same to b:5354, which the policy does not admit, is not, and every
//! one of its fragments is a drop in flows.jsonl. A lone later fragment is dropped and explained
//! as such. Root only; never skipped.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use weir_tests::{
    agent::{Agent, AgentDirs, flows},
    cni::{Plugin, PodRef, addresses},
    netns::{Netns, spawn_in},
};

const NODE: &str = "n1";
const NS: &str = "frag";
/// The port the policy admits, and one it does not (b serves both).
const ADMITTED: u16 = 5353;
const REFUSED: u16 = 5354;
/// Larger than the pods' MTU (1500): sent in six fragments over either family.
const LARGE: usize = 8000;
/// The fragments of a LARGE datagram: 8,008 bytes of UDP in pieces of at most 1,480 (IPv4) or
/// 1,448 (IPv6) bytes.
const LARGE_FRAGMENTS: usize = 6;
/// How long a datagram exchange or a flow record may take to show.
const PATIENCE: Duration = Duration::from_secs(10);

const MANIFESTS: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: frag}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: frag, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: frag, labels: {app: b}}
spec:
  nodeName: n1
  containers:
  - name: dns
    ports: [{containerPort: 5353, protocol: UDP, name: dns}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-dns-from-a, namespace: frag}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: UDP, port: 5353}]
"#;

/// What b's servers received: datagram sizes per port.
type Received = Arc<Mutex<BTreeMap<u16, Vec<usize>>>>;

/// UDP servers in `pod` on `ip` at both ports, answering every datagram with its size.
fn serve(pod: &Netns, ip: IpAddr, received: &Received) {
    for port in [ADMITTED, REFUSED] {
        let socket = spawn_in(pod.path(), move || UdpSocket::bind((ip, port)))
            .join()
            .expect("bind thread")
            .unwrap_or_else(|e| panic!("binding {ip}:{port} in the pod: {e}"));
        let received = received.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                received.lock().unwrap().entry(port).or_default().push(n);
                let _ = socket.send_to(n.to_string().as_bytes(), peer);
            }
        });
    }
}

/// Sends one datagram of `len` bytes from `from` (source port `sport`, 0 for any) to `to` and
/// waits briefly for the answer: the size the server received.
fn exchange(from: &Netns, sport: u16, to: SocketAddr, len: usize) -> Option<usize> {
    spawn_in(from.path(), move || {
        let local: SocketAddr = if to.is_ipv4() {
            (IpAddr::from([0u8; 4]), sport).into()
        } else {
            (IpAddr::from([0u16; 8]), sport).into()
        };
        let socket = UdpSocket::bind(local).expect("binding the client");
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        socket.send_to(&vec![0x42; len], to).ok()?;
        let mut buf = [0u8; 32];
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        std::str::from_utf8(&buf[..n]).ok()?.parse().ok()
    })
    .join()
    .expect("client thread")
}

/// Exchanges until an answer comes (the first ones may meet a policy still on its way).
fn delivered(from: &Netns, to: SocketAddr, len: usize) -> Option<usize> {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if let Some(n) = exchange(from, 0, to, len) {
            return Some(n);
        }
    }
    None
}

/// Waits until flows.jsonl holds at least `count` records that `matches`; returns them.
fn wait_for_flows(
    state: &Path,
    count: usize,
    what: &str,
    agent: &Agent,
    matches: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found: Vec<Value> = flows(state).into_iter().filter(|r| matches(r)).collect();
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {count} flow records after {PATIENCE:?}; flows:\n{}\nagent log:\n{}",
            found.len(),
            flows(state)
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends from inside `pod` a lone later fragment (offset 1,480 bytes, more to come) of a UDP
/// datagram to `dst`, through a raw socket: what a lost or reordered first fragment leaves.
fn send_lone_later_fragment(pod: &Netns, src: IpAddr, dst: IpAddr, id: u32) {
    spawn_in(pod.path(), move || {
        let data = [0x55u8; 64];
        let offset_units: u16 = 1480 / 8;
        let (family, socket_proto, packet, sockaddr_len) = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                // The whole IPv4 header is ours (IPPROTO_RAW); the kernel fills in the length
                // and the checksum.
                let packet = weir_tests::packet::ipv4_fragment(
                    s.octets(),
                    d.octets(),
                    libc::IPPROTO_UDP as u8,
                    id as u16,
                    offset_units,
                    true,
                    &data,
                );
                (
                    libc::AF_INET,
                    libc::IPPROTO_RAW,
                    packet,
                    size_of::<libc::sockaddr_in>(),
                )
            }
            (IpAddr::V6(_), IpAddr::V6(_)) => {
                // The kernel writes the IPv6 header with next header "fragment"; the Fragment
                // header and the data are ours.
                let mut packet = vec![libc::IPPROTO_UDP as u8, 0];
                packet.extend_from_slice(&((offset_units << 3) | 1).to_be_bytes());
                packet.extend_from_slice(&id.to_be_bytes());
                packet.extend_from_slice(&data);
                (
                    libc::AF_INET6,
                    libc::IPPROTO_FRAGMENT,
                    packet,
                    size_of::<libc::sockaddr_in6>(),
                )
            }
            _ => panic!("mixed address families"),
        };
        // SAFETY: plain socket calls on a socket this thread owns; the address structures are
        // zeroed and filled field by field, and live across the call.
        unsafe {
            let fd = libc::socket(family, libc::SOCK_RAW, socket_proto);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let mut storage: libc::sockaddr_storage = std::mem::zeroed();
            match dst {
                IpAddr::V4(d) => {
                    let sin = &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in);
                    sin.sin_family = libc::AF_INET as libc::sa_family_t;
                    sin.sin_addr.s_addr = u32::from_ne_bytes(d.octets());
                }
                IpAddr::V6(d) => {
                    let sin6 = &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6);
                    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                    sin6.sin6_addr.s6_addr = d.octets();
                }
            }
            let sent = libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                &storage as *const _ as *const libc::sockaddr,
                sockaddr_len as libc::socklen_t,
            );
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            assert!(sent >= 0, "sending the fragment: {error}");
        }
    })
    .join()
    .expect("raw sender thread");
}

#[test]
fn large_udp_datagrams_follow_the_port_rule_over_both_families() {
    let node = Netns::new("frag");
    let dirs = AgentDirs::new("frag", NODE);
    std::fs::write(dirs.manifests.join("frag.yaml"), MANIFESTS).unwrap();
    let agent = Agent::start(
        &node,
        NODE,
        &dirs,
        &[
            "--pod-cidr",
            "10.212.1.0/24,fd00:212:1::/64",
            "--pod-wait-seconds",
            "5",
        ],
    );
    let plugin = Plugin::new(&node.name, &dirs.socket, &dirs.root.join("cni.log"));
    let pod_a = Netns::new("fraga");
    let pod_b = Netns::new("fragb");
    let mut ips = BTreeMap::new();
    for (name, netns) in [("a", &pod_a), ("b", &pod_b)] {
        let id = format!("ctr-frag-{name}");
        let (out, _) = plugin.ok(
            "ADD",
            &PodRef {
                container_id: &id,
                namespace: NS,
                name,
                netns: &netns.name,
            },
        );
        let addrs = addresses(&out).unwrap();
        assert_eq!(addrs.len(), 2, "dual-stack pod {name}: {out}");
        ips.insert(name, addrs);
        let link = netns.ip(&["link", "show", "eth0"]);
        assert!(link.contains("mtu 1500"), "pod {name}'s MTU: {link}");
    }
    let received = Received::default();
    for &ip in &ips["b"] {
        serve(&pod_b, ip, &received);
    }

    for (family, index, sport) in [("IPv4", 0, 47004), ("IPv6", 1, 47006)] {
        let (a, b) = (ips["a"][index], ips["b"][index]);
        let admitted = SocketAddr::new(b, ADMITTED);
        let refused = SocketAddr::new(b, REFUSED);
        // Small datagrams: the policy is in place (admitted answers, refused does not).
        assert_eq!(
            delivered(&pod_a, admitted, 100),
            Some(100),
            "{family}: a small datagram to b:{ADMITTED}; agent log:\n{}",
            agent.log_text()
        );
        // The large one to the admitted port arrives whole.
        assert_eq!(
            delivered(&pod_a, admitted, LARGE),
            Some(LARGE),
            "{family}: {LARGE} bytes to b:{ADMITTED} (fragmented) must be delivered; agent log:\n{}",
            agent.log_text()
        );
        // The large one to the refused port: every fragment is dropped at b, with the
        // datagram's ports, as the policy's denial. The fragments' drops are one kind of drop:
        // the first is reported, the others counted (`weir_events_throttled_total`).
        assert_eq!(exchange(&pod_a, sport, refused, LARGE), None, "{family}");
        let drops = wait_for_flows(
            &dirs.state,
            1,
            &format!("{family}: the fragments of the refused datagram"),
            &agent,
            |r| {
                r["verdict"] == "drop"
                    && r["src"] == a.to_string()
                    && r["dst"] == b.to_string()
                    && r["sport"] == sport
                    && r["dport"] == REFUSED
                    && r["proto"] == "UDP"
            },
        );
        for r in &drops {
            assert_eq!(r["reason"], "policy-denied", "{family}: {r}");
            assert_eq!(r["direction"], "ingress", "{family}: {r}");
            assert_eq!(r["endpoint"], "frag/b", "{family}: {r}");
        }
        assert!(
            drops.len() <= LARGE_FRAGMENTS,
            "{family}: at most one report per fragment: {drops:?}"
        );
        // Nothing of it reached b: the admitted port has answered since, the refused one never
        // got a large datagram.
        assert_eq!(delivered(&pod_a, admitted, LARGE), Some(LARGE), "{family}");
        let got = received
            .lock()
            .unwrap()
            .get(&REFUSED)
            .cloned()
            .unwrap_or_default();
        assert!(
            !got.contains(&LARGE),
            "{family}: b:{REFUSED} received a refused datagram: {got:?}"
        );

        // A later fragment whose first fragment never came: dropped where it enters (a's hook)
        // and explained.
        send_lone_later_fragment(&pod_a, a, b, 0x7a7a);
        let lone = wait_for_flows(
            &dirs.state,
            1,
            &format!("{family}: a lone later fragment"),
            &agent,
            |r| r["reason"] == "fragment-without-first" && r["src"] == a.to_string(),
        );
        assert_eq!(lone[0]["verdict"], "drop", "{family}");
        assert_eq!(lone[0]["direction"], "egress", "{family}");
        assert_eq!(lone[0]["endpoint"], "frag/a", "{family}");
        assert_eq!(lone[0]["dst"], b.to_string(), "{family}");
        assert_eq!(lone[0]["proto"], "UDP", "{family}");
    }
    assert!(
        agent
            .log_text()
            .contains("whose first fragment (the one with the ports) was not seen here"),
        "the agent's log explains the lone fragment's drop"
    );
}
