//! The mesh gateway's data path between its TUN device and the link: packets the kernel routed
//! into the TUN are tagged with the identity we export for their source, hashed by flow onto one
//! of [`FLOW_SLOTS`] slots (each slot goes to one of the peer's live gateways and one lane, so a
//! flow keeps its order and a gateway that leaves moves only its own slots), and batched per slot
//! until the TUN has nothing more to read (no timer, so a lone
//! request goes out at once); packets the link received and checked are written back into the
//! TUN, with their offload fields when the device has offload.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, atomic::Ordering},
};

use bytes::Bytes;
use clap::Args;
use weir_mesh::{
    codec::{MAX_PACKET_LEN, Offload, VNET_HDR_LEN},
    confine::packet_addresses,
    link::{BatchBuilder, DataPlane, Deliver, Link, Peer},
};

use crate::{
    mesh::GatewayCounters,
    mesh_tun::{TUN_READ_BUF, Tun},
};

/// Flags of the gateway's data plane (the defaults are the fast path; the others exist to
/// measure each step, `cargo xtask bench mesh`).
#[derive(Args, Debug, Clone)]
pub struct DataPlaneArgs {
    /// Mesh gateways: lanes per peer, each its own TCP+TLS+HTTP/2 connection; flows are hashed
    /// onto them by their addresses and ports, so each flow keeps its order.
    #[arg(long, env = "WEIR_MESH_LANES", default_value_t = 2)]
    pub mesh_lanes: usize,
    /// Mesh gateways: the TUN takes TSO/USO super-packets of up to 64 KiB (IFF_VNET_HDR,
    /// TUNSETOFFLOAD), which cross as one record. Every gateway of the mesh must agree: a
    /// gateway without it drops the super-packets it receives.
    #[arg(long, env = "WEIR_MESH_OFFLOAD", default_value_t = true, action = clap::ArgAction::Set)]
    pub mesh_offload: bool,
    /// Mesh gateways: batch the packets read together into one message (flushed when the TUN
    /// has nothing more to read); false sends one packet per message.
    #[arg(long, env = "WEIR_MESH_BATCHING", default_value_t = true, action = clap::ArgAction::Set)]
    pub mesh_batching: bool,
    /// Mesh gateways: batches queued per lane before further ones are dropped and counted.
    #[arg(long, env = "WEIR_MESH_QUEUE", default_value_t = 8)]
    pub mesh_queue: usize,
}

impl DataPlaneArgs {
    pub fn data_plane(&self) -> DataPlane {
        DataPlane {
            lanes: self.mesh_lanes,
            queue: self.mesh_queue,
        }
    }
}

/// Received, checked packets into the TUN, written by the lane that received them.
pub struct TunDeliver(pub Arc<Tun>);

impl Deliver for TunDeliver {
    fn deliver(&self, offload: &Offload, packet: Bytes) -> bool {
        if !self.0.offload() && (offload.is_gso() || offload.needs_csum()) {
            return false;
        }
        match self.0.try_send(&offload.to_vnet(), &packet) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "writing a packet into the mesh TUN failed");
                false
            }
        }
    }
}

/// Reads the TUN and sends what it reads to the peers.
pub struct Forwarder {
    pub tun: Arc<Tun>,
    pub link: Arc<Link>,
    /// Per peer: our exported address → id (the sending gateway tags records with it).
    pub exported: Arc<Mutex<HashMap<String, HashMap<IpAddr, u32>>>>,
    pub counters: Arc<GatewayCounters>,
    pub batching: bool,
}

/// Flows are hashed onto this many slots per peer; a slot is the unit the link places on one of
/// the peer's gateways and one lane (enough to spread over 16 lanes and a few gateways).
pub const FLOW_SLOTS: u64 = 16;

/// Batches being built, per peer and flow slot.
type Batches = HashMap<(String, u64), (Arc<Peer>, u64, BatchBuilder)>;

impl Forwarder {
    /// Packets from the TUN to peers until the TUN fails.
    pub async fn run(self) {
        let mut buf = vec![0u8; TUN_READ_BUF];
        let mut batches = Batches::new();
        loop {
            let n = match self.tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "reading the mesh TUN failed; the gateway stops forwarding");
                    return;
                }
            };
            self.route(&buf[..n], &mut batches);
            if self.batching {
                // Flush when the TUN has nothing more (a full batch goes at once): no timer.
                while let Ok(n) = self.tun.try_recv(&mut buf) {
                    self.route(&buf[..n], &mut batches);
                }
            }
            for (peer, slot, batch) in batches.values_mut() {
                if !batch.is_empty() {
                    let (bytes, packets) = batch.take();
                    self.link.send_flow_batch(peer, *slot, bytes, packets);
                }
            }
        }
    }

    fn route(&self, read: &[u8], batches: &mut Batches) {
        let (offload, packet) = if self.tun.offload() {
            let Some((hdr, packet)) = read.split_first_chunk::<VNET_HDR_LEN>() else {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            (Offload::from_vnet(hdr), packet)
        } else {
            (Offload::NONE, read)
        };
        if packet.len() > MAX_PACKET_LEN {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some((src, dst)) = packet_addresses(packet) else {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(peer) = self.link.peer_for(&dst) else {
            self.counters.no_peer.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let name = peer.name();
        let id = self
            .exported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .and_then(|m| m.get(&src).copied());
        let Some(id) = id else {
            self.counters
                .unexported_source
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%src, %dst, peer = %name, "not sent to the mesh peer: the source is not exported to it");
            return;
        };
        let slot = flow_hash(packet) % FLOW_SLOTS;
        let (peer, slot, batch) = batches
            .entry((name, slot))
            .or_insert_with(|| (peer, slot, BatchBuilder::default()));
        batch.push(id, &offload, packet);
        if batch.is_full() {
            let (bytes, packets) = batch.take();
            self.link.send_flow_batch(peer, *slot, bytes, packets);
        }
    }
}

/// A hash of a packet's flow: addresses, protocol and, for TCP and UDP (not a later fragment),
/// ports. Every packet of a flow gets the same lane, so the flow keeps its order.
pub fn flow_hash(packet: &[u8]) -> u64 {
    let (addrs, protocol, l4): (&[u8], u8, Option<usize>) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let later_fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff != 0;
            (&packet[12..20], packet[9], (!later_fragment).then_some(ihl))
        }
        Some(6) if packet.len() >= 40 => (&packet[8..40], packet[6], Some(40)),
        _ => return 0,
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    addrs.iter().for_each(|&b| mix(b));
    mix(protocol);
    if matches!(protocol, 6 | 17)
        && let Some(ports) = l4.and_then(|o| packet.get(o..o + 4))
    {
        ports.iter().for_each(|&b| mix(b));
    }
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4(src_port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 1, 0, 1]);
        p[20..22].copy_from_slice(&src_port.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p
    }

    #[test]
    fn a_flow_always_hashes_alike_and_flows_spread() {
        assert_eq!(flow_hash(&tcp4(40_000)), flow_hash(&tcp4(40_000)));
        let lanes: std::collections::BTreeSet<u64> =
            (40_000..40_064).map(|p| flow_hash(&tcp4(p)) % 4).collect();
        assert_eq!(lanes.len(), 4, "64 flows use every one of 4 lanes");
        // A later fragment has no ports; it still hashes (by addresses and protocol).
        let mut frag = tcp4(40_000);
        frag[7] = 1;
        let _ = flow_hash(&frag);
        assert_eq!(flow_hash(&[0x45]), 0);
    }
}
