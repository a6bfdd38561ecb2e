//! What the mesh role is doing, per peer, for `/metrics` and `weir status`: whether a session is
//! up and synced, what is imported, and what the peer sent that was refused, by reason.

use std::sync::atomic::Ordering;

use prometheus_client::{
    collector::Collector,
    encoding::DescriptorEncoder,
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use weir_mesh::confine::RefusalCounters;

use crate::mesh::{Gateway, Mesh, MeshNode};

/// One peer as this node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    pub peer: String,
    /// On a gateway: a session with the peer is up. On a node: its watch of a gateway is up.
    pub connected: bool,
    /// The import holds exactly what was exported (a Synced since the session came up).
    pub synced: bool,
    /// On a gateway: the peer's gateways a session is up with. On a node: this cluster's
    /// gateways that are up and ready (the next hops of its ECMP route to the peer).
    pub gateways_up: u64,
    pub imported_identities: u64,
    pub imported_endpoints: u64,
    /// Refusals by reason (`confine::Refusal` names), non-zero ones only.
    pub refusals: Vec<(&'static str, u64)>,
    /// Packets through the Tunnel (gateways only).
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
    /// Sessions ended because a gateway of the peer went silent (gateways only).
    pub silent_sessions: u64,
}

/// The mesh role's state at one scrape.
#[derive(Clone, Debug, Default)]
pub struct MeshStatus {
    /// "gateway" or "node".
    pub role: &'static str,
    pub peers: Vec<PeerStatus>,
    /// Certificate rotations applied and refused (gateways only).
    pub rotations: Option<(u64, u64)>,
    /// Packets the gateway did not send, by reason.
    pub unsent: Vec<(&'static str, u64)>,
}

fn refusals(counters: &RefusalCounters) -> Vec<(&'static str, u64)> {
    counters
        .snapshot()
        .into_iter()
        .map(|(r, n)| (r.as_str(), n))
        .collect()
}

impl Mesh {
    pub fn status(&self) -> MeshStatus {
        match self {
            Mesh::Gateway(g) => gateway_status(g),
            Mesh::Node(n) => node_status(n),
        }
    }
}

fn gateway_status(g: &Gateway) -> MeshStatus {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let peers = g
        .link()
        .peers()
        .iter()
        .map(|p| {
            let view = p.view();
            PeerStatus {
                peer: view.cluster.clone(),
                connected: p.is_connected(),
                synced: p.is_synced(),
                gateways_up: p.gateways_up() as u64,
                imported_identities: view.identities.len() as u64,
                imported_endpoints: view.endpoints.len() as u64,
                refusals: refusals(&p.refusals),
                rx_packets: load(&p.tunnel.rx_packets),
                tx_packets: load(&p.tunnel.tx_packets),
                tx_dropped: load(&p.tunnel.tx_queue_full),
                silent_sessions: load(&p.tunnel.silent_sessions),
            }
        })
        .collect();
    let c = &g.counters;
    MeshStatus {
        role: "gateway",
        peers,
        rotations: Some(g.rotations()),
        unsent: vec![
            ("unexported_source", load(&c.unexported_source)),
            ("no_peer", load(&c.no_peer)),
            ("malformed", load(&c.malformed)),
        ],
    }
}

fn node_status(n: &MeshNode) -> MeshStatus {
    let watcher = n.watcher();
    let (connected, synced) = (watcher.is_connected(), watcher.is_synced());
    let gateways_up = watcher.live_gateways().borrow().len() as u64;
    let mut peers: Vec<PeerStatus> = watcher
        .views()
        .iter()
        .map(|v| PeerStatus {
            peer: v.cluster.clone(),
            connected,
            synced,
            gateways_up,
            imported_identities: v.identities.len() as u64,
            imported_endpoints: v.endpoints.len() as u64,
            ..PeerStatus::default()
        })
        .collect();
    for name in watcher.peer_names() {
        if !peers.iter().any(|p| p.peer == name) {
            peers.push(PeerStatus {
                peer: name,
                connected,
                synced,
                gateways_up,
                ..PeerStatus::default()
            });
        }
    }
    for (peer, counters) in watcher.refusals() {
        let refused = refusals(&counters);
        match peers.iter_mut().find(|p| p.peer == peer) {
            Some(p) => p.refusals = refused,
            None => peers.push(PeerStatus {
                peer,
                connected,
                synced,
                gateways_up,
                refusals: refused,
                ..PeerStatus::default()
            }),
        }
    }
    peers.sort_by(|a, b| a.peer.cmp(&b.peer));
    MeshStatus {
        role: "node",
        peers,
        rotations: None,
        unsent: Vec::new(),
    }
}

/// `/metrics` samples of a [`MeshStatus`].
#[derive(Debug)]
pub struct MeshCollector(pub MeshStatus);

type Labels = Vec<(&'static str, String)>;

fn family<M: prometheus_client::encoding::EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: Vec<(Labels, M)>,
) -> std::fmt::Result {
    let mut metric = e.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn peer(name: &str) -> Labels {
    vec![("peer", name.to_owned())]
}

impl Collector for MeshCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let gauge = |f: fn(&PeerStatus) -> i64| -> Vec<(Labels, ConstGauge)> {
            s.peers
                .iter()
                .map(|p| (peer(&p.peer), ConstGauge::new(f(p))))
                .collect()
        };
        family(
            &mut e,
            "weir_mesh_peer_connected",
            "1 while a mesh session with the peer is up (on other nodes than gateways: while the watch of a gateway's import is up)",
            MetricType::Gauge,
            gauge(|p| i64::from(p.connected)),
        )?;
        family(
            &mut e,
            "weir_mesh_peer_synced",
            "1 once the import of the peer holds exactly what it exports (Synced received in the current session)",
            MetricType::Gauge,
            gauge(|p| i64::from(p.synced)),
        )?;
        family(
            &mut e,
            "weir_mesh_gateways_up",
            "On a gateway: the peer's gateways a mesh session is up with. On other nodes: this cluster's gateways that are up and ready, the next hops of the route to the peer",
            MetricType::Gauge,
            gauge(|p| i64::try_from(p.gateways_up).unwrap_or(i64::MAX)),
        )?;
        family(
            &mut e,
            "weir_mesh_imported_endpoints",
            "Pod addresses imported from the peer",
            MetricType::Gauge,
            gauge(|p| i64::try_from(p.imported_endpoints).unwrap_or(i64::MAX)),
        )?;
        family(
            &mut e,
            "weir_mesh_imported_identities",
            "Label sets imported from the peer",
            MetricType::Gauge,
            gauge(|p| i64::try_from(p.imported_identities).unwrap_or(i64::MAX)),
        )?;
        family(
            &mut e,
            "weir_mesh_refusals",
            "What a peer sent that was refused, by reason (an export or delta: NACK and the session ends; a packet: dropped)",
            MetricType::Counter,
            s.peers
                .iter()
                .flat_map(|p| {
                    p.refusals.iter().map(|(reason, n)| {
                        let mut labels = peer(&p.peer);
                        labels.push(("reason", (*reason).to_owned()));
                        (labels, ConstCounter::new(*n))
                    })
                })
                .collect(),
        )?;
        if s.role == "gateway" {
            family(
                &mut e,
                "weir_mesh_tunnel_packets",
                "Packets through the mesh link, by peer and direction (rx: received and delivered, tx: queued towards the peer)",
                MetricType::Counter,
                s.peers
                    .iter()
                    .flat_map(|p| {
                        [("rx", p.rx_packets), ("tx", p.tx_packets)].map(|(dir, n)| {
                            let mut labels = peer(&p.peer);
                            labels.push(("direction", dir.to_owned()));
                            (labels, ConstCounter::new(n))
                        })
                    })
                    .collect(),
            )?;
            family(
                &mut e,
                "weir_mesh_tunnel_dropped_packets",
                "Packets dropped because the queue towards or from the peer was full",
                MetricType::Counter,
                s.peers
                    .iter()
                    .map(|p| (peer(&p.peer), ConstCounter::new(p.tx_dropped)))
                    .collect(),
            )?;
            family(
                &mut e,
                "weir_mesh_silent_sessions",
                "Sessions with a gateway of the peer ended because nothing came from it for the silence timeout (its gateway left the set that carries traffic)",
                MetricType::Counter,
                s.peers
                    .iter()
                    .map(|p| (peer(&p.peer), ConstCounter::new(p.silent_sessions)))
                    .collect(),
            )?;
            family(
                &mut e,
                "weir_mesh_unsent_packets",
                "Packets from the mesh TUN the gateway did not send, by reason",
                MetricType::Counter,
                s.unsent
                    .iter()
                    .map(|(reason, n)| {
                        (
                            vec![("reason", (*reason).to_owned())],
                            ConstCounter::new(*n),
                        )
                    })
                    .collect(),
            )?;
        }
        if let Some((applied, refused)) = s.rotations {
            family(
                &mut e,
                "weir_mesh_certificate_rotations",
                "Rotations of this gateway's mesh certificate: applied, or refused (another cluster's name, or not chaining to --mesh-ca; the previous certificate stays)",
                MetricType::Counter,
                vec![
                    (
                        vec![("result", "applied".to_owned())],
                        ConstCounter::new(applied),
                    ),
                    (
                        vec![("result", "refused".to_owned())],
                        ConstCounter::new(refused),
                    ),
                ],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    fn encode(status: MeshStatus) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(MeshCollector(status)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn refusals_and_peer_state_are_exported_by_peer() {
        let text = encode(MeshStatus {
            role: "gateway",
            peers: vec![PeerStatus {
                peer: "east".into(),
                connected: true,
                synced: false,
                gateways_up: 2,
                imported_identities: 2,
                imported_endpoints: 5,
                refusals: vec![("address_ours", 3), ("identity_mismatch", 1)],
                rx_packets: 7,
                tx_packets: 9,
                tx_dropped: 0,
                silent_sessions: 1,
            }],
            rotations: Some((1, 2)),
            unsent: vec![("no_peer", 4)],
        });
        for line in [
            "weir_mesh_peer_connected{peer=\"east\"} 1",
            "weir_mesh_gateways_up{peer=\"east\"} 2",
            "weir_mesh_peer_synced{peer=\"east\"} 0",
            "weir_mesh_imported_identities{peer=\"east\"} 2",
            "weir_mesh_imported_endpoints{peer=\"east\"} 5",
            "weir_mesh_refusals_total{peer=\"east\",reason=\"address_ours\"} 3",
            "weir_mesh_refusals_total{peer=\"east\",reason=\"identity_mismatch\"} 1",
            "weir_mesh_tunnel_packets_total{peer=\"east\",direction=\"rx\"} 7",
            "weir_mesh_tunnel_packets_total{peer=\"east\",direction=\"tx\"} 9",
            "weir_mesh_unsent_packets_total{reason=\"no_peer\"} 4",
            "weir_mesh_silent_sessions_total{peer=\"east\"} 1",
            "weir_mesh_certificate_rotations_total{result=\"refused\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
    }

    #[test]
    fn a_node_exports_no_gateway_counters() {
        let text = encode(MeshStatus {
            role: "node",
            peers: vec![PeerStatus {
                peer: "east".into(),
                ..PeerStatus::default()
            }],
            rotations: None,
            unsent: Vec::new(),
        });
        assert!(
            text.contains("weir_mesh_peer_connected{peer=\"east\"} 0"),
            "{text}"
        );
        assert!(!text.contains("weir_mesh_tunnel_packets"), "{text}");
        assert!(!text.contains("weir_mesh_certificate_rotations"), "{text}");
    }
}
