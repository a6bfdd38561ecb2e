//! The mesh gateway's data path between its TUN device and the link: packets the kernel routed
//! into the TUN are read straight into the batch they are sent in, tagged with the identity we
//! export for their source, hashed by flow onto one of [`FLOW_SLOTS`] slots (each slot goes to
//! one of the peer's live gateways, rendezvous-hashed, so a flow keeps its order and a gateway
//! that leaves moves only its own slots), put on a lane of that gateway (the latency lane for
//! flows that send little, else the slot's bulk lane; `weir_mesh::lanes`), and batched per slot
//! and lane until the TUN has nothing more to read (no timer, so a lone request goes out at
//! once); packets the link received and checked are written back into the TUN, with their
//! offload fields when the device has offload.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Instant,
};

use bytes::Bytes;
use clap::Args;
use weir_mesh::{
    codec::{MAX_PACKET_LEN, Offload, RECORD_HEADER_LEN, VNET_HDR_LEN, VNET_HDR_OFFSET},
    confine::packet_addresses,
    lanes::{Lane, LaneSelector, flow_hash},
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
    /// Mesh gateways: a latency lane besides the bulk lanes, for flows that send little
    /// (requests, responses, ACK streams), so they never queue behind a transfer's batches.
    /// On by default: a request/response flow's p99 while a transfer runs is what it improves
    /// (`cargo xtask bench mesh`, step "+latency lane"), at no cost to the transfer.
    #[arg(long, env = "WEIR_MESH_LATENCY_LANE", default_value_t = true, action = clap::ArgAction::Set)]
    pub mesh_latency_lane: bool,
    /// The CPU slice, in µs, every thread of the agent's runtime asks the scheduler for (Linux
    /// 6.12 or later; 100 is the kernel's minimum): a thread woken by a packet then preempts a
    /// CPU-bound task instead of waiting for the scheduler's next tick, which delays each
    /// packet through a mesh gateway by up to 4 ms on a busy node. 0 keeps the kernel's
    /// default slice. The threads' share of the CPU does not change.
    #[arg(long, env = "WEIR_SCHED_SLICE_US", default_value_t = 100)]
    pub sched_slice_us: u64,
    /// Mesh gateways: the largest HTTP/2 frame the mesh connections accept, in bytes (16384 to
    /// 16777215; HTTP/2's own default is 16384). Larger frames carry a batch in fewer frames.
    #[arg(long, env = "WEIR_MESH_H2_FRAME_BYTES", default_value_t = weir_mesh::transport::DEFAULT_MAX_FRAME_SIZE)]
    pub mesh_h2_frame_bytes: u32,
    /// Mesh gateways: run the whole gateway (TUN reader, lanes, sessions) on one thread of its
    /// own with a single-threaded runtime, so a packet crosses it without waking other threads
    /// (`crate::mesh_thread`), or on the agent's shared runtime, which spreads the lanes over
    /// the node's cores. `auto` (the default) takes the own thread on a node with at most
    /// `OWN_THREAD_MAX_CPUS` CPUs for the agent, where the shared runtime has no core to spread
    /// over (see the constant and the README's `mesh` bench).
    #[arg(long, env = "WEIR_MESH_OWN_THREAD", value_enum, default_value_t = OwnThread::Auto)]
    pub mesh_own_thread: OwnThread,
    /// Mesh gateways: queues of the TUN device (1 to 16), each read by a reader of its own. The
    /// kernel puts each flow on one queue, so several flows can be read at once on a gateway
    /// with cores to spare (`cargo xtask bench mesh` found none on a 2-core machine); one flow
    /// always stays on one queue and one reader.
    #[arg(long, env = "WEIR_MESH_TUN_QUEUES", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=crate::mesh_tun::MAX_TUN_QUEUES as i64))]
    pub mesh_tun_queues: u8,
}

/// `--mesh-own-thread`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnThread {
    /// The own thread on a node with at most `OWN_THREAD_MAX_CPUS` CPUs, else the shared runtime.
    Auto,
    True,
    False,
}

/// The most CPUs the agent may run on for `--mesh-own-thread auto` to take the own thread. On the
/// bench's 2-core machines the own thread had the lower request/response latency and the higher
/// single-stream throughput in every round of every quiet run, and kept the throughput and CPU
/// gain under other load (where its idle latency was not better). With more cores the shared
/// runtime can put the lanes on cores of their own, as the lanes are meant to run.
pub const OWN_THREAD_MAX_CPUS: usize = 2;

impl OwnThread {
    /// Whether the gateway takes a thread of its own on a node where the agent may run on
    /// `cpus` CPUs.
    pub fn resolve(self, cpus: usize) -> bool {
        match self {
            OwnThread::True => true,
            OwnThread::False => false,
            OwnThread::Auto => cpus <= OWN_THREAD_MAX_CPUS,
        }
    }
}

impl DataPlaneArgs {
    pub fn data_plane(&self) -> DataPlane {
        DataPlane {
            lanes: self.mesh_lanes,
            queue: self.mesh_queue,
            latency_lane: self.mesh_latency_lane,
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

/// Reads one queue of the TUN and sends what it reads to the peers.
pub struct Forwarder {
    pub tun: Arc<Tun>,
    /// The TUN queue this forwarder reads.
    pub queue: usize,
    pub link: Arc<Link>,
    /// Per peer: our exported address → id (the sending gateway tags records with it).
    pub exported: Arc<Mutex<HashMap<String, HashMap<IpAddr, u32>>>>,
    pub counters: Arc<GatewayCounters>,
    pub batching: bool,
}

/// Flows are hashed onto this many slots per peer; a slot is the unit the link places on one of
/// the peer's gateways and one bulk lane (enough to spread over 16 lanes and a few gateways).
pub const FLOW_SLOTS: u64 = 16;

/// The batch being built towards one peer for one flow slot on one lane (the latency lane, or
/// the slot's bulk lane).
struct LaneBatch {
    peer: Arc<Peer>,
    slot: u64,
    lane: Lane,
    builder: BatchBuilder,
}

/// Reads between two flushes of the latency lanes' batches while the TUN stays busy: a
/// latency packet waits for at most this many reads of other packets.
const LATENCY_FLUSH_READS: usize = 8;

/// The batches being built, and which one the next packet is read into: the one the previous
/// packet went to, usually the same flow's, so the packet lands in place and is never copied.
/// Only a packet that belongs to another batch is copied over.
struct Batches {
    lanes: Vec<LaneBatch>,
    /// Where the next packet is read while no batch exists yet.
    scratch: BatchBuilder,
    reading: Option<usize>,
}

impl Batches {
    fn reader(&mut self) -> &mut BatchBuilder {
        match self.reading {
            Some(i) => &mut self.lanes[i].builder,
            None => &mut self.scratch,
        }
    }
}
impl Forwarder {
    /// Packets from the TUN to peers until the TUN fails.
    pub async fn run(self) {
        let data_plane = self.link.data_plane();
        let mut selector = LaneSelector::new(data_plane.lanes, data_plane.latency_lane);
        let mut batches = Batches {
            lanes: Vec::new(),
            scratch: BatchBuilder::default(),
            reading: None,
        };
        // With offload the virtio header is read where the record header's offload fields go.
        let headroom = if self.tun.offload() {
            VNET_HDR_OFFSET
        } else {
            RECORD_HEADER_LEN
        };
        loop {
            let reader = batches.reader();
            let start = reader.pending();
            if let Err(e) = self
                .tun
                .recv_into(self.queue, reader.spare(headroom + TUN_READ_BUF), headroom)
                .await
            {
                tracing::error!(error = %e, "reading the mesh TUN failed; the gateway stops forwarding");
                return;
            }
            self.route(start, &mut batches, &mut selector);
            if self.batching {
                // Flush when the TUN has nothing more (a full batch goes at once): no timer.
                let mut reads = 1;
                loop {
                    let reader = batches.reader();
                    let start = reader.pending();
                    if self
                        .tun
                        .try_recv_into(self.queue, reader.spare(headroom + TUN_READ_BUF), headroom)
                        .is_err()
                    {
                        break;
                    }
                    self.route(start, &mut batches, &mut selector);
                    reads += 1;
                    if reads % LATENCY_FLUSH_READS == 0 {
                        self.flush(&mut batches, |lane| lane == Lane::Latency);
                    }
                }
            }
            self.flush(&mut batches, |_| true);
        }
    }

    /// Sends the non-empty batches whose lane passes `which`.
    fn flush(&self, batches: &mut Batches, which: impl Fn(Lane) -> bool) {
        for b in &mut batches.lanes {
            if !b.builder.is_empty() && which(b.lane) {
                let (bytes, packets) = b.builder.take();
                self.link
                    .send_flow_batch_on(&b.peer, b.slot, b.lane, bytes, packets);
            }
        }
    }

    /// Takes the packet just read into the reading batch at `start` (header room, then the
    /// packet behind its virtio header with offload): seals it there, moves it to its own
    /// peer's and lane's batch, or drops it (counted).
    fn route(&self, start: usize, batches: &mut Batches, selector: &mut LaneSelector) {
        let Some((peer, id, offload, slot, lane)) = self.classify(start, batches, selector) else {
            batches.reader().discard(start);
            return;
        };
        let target = match batches
            .lanes
            .iter()
            .position(|b| b.slot == slot && b.lane == lane && Arc::ptr_eq(&b.peer, &peer))
        {
            Some(t) => t,
            None => {
                batches.lanes.push(LaneBatch {
                    peer,
                    slot,
                    lane,
                    builder: BatchBuilder::default(),
                });
                batches.lanes.len() - 1
            }
        };
        match batches.reading {
            Some(r) if r == target => batches.lanes[r].builder.seal(start, id, &offload),
            Some(r) => {
                let (from, to) = two_mut(&mut batches.lanes, r, target);
                let packet = &from.builder.bytes()[start + RECORD_HEADER_LEN..];
                to.builder.push(id, &offload, packet);
                from.builder.discard(start);
            }
            None if batches.lanes[target].builder.is_empty() => {
                // The first packet: the scratch buffer becomes its batch.
                let mut builder = std::mem::take(&mut batches.scratch);
                builder.seal(start, id, &offload);
                batches.lanes[target].builder = builder;
            }
            None => {
                let packet = &batches.scratch.bytes()[start + RECORD_HEADER_LEN..];
                batches.lanes[target].builder.push(id, &offload, packet);
                batches.scratch.discard(start);
            }
        }
        batches.reading = Some(target);
        let b = &mut batches.lanes[target];
        if b.builder.is_full() || !self.batching {
            let (bytes, packets) = b.builder.take();
            self.link
                .send_flow_batch_on(&b.peer, b.slot, b.lane, bytes, packets);
        }
    }

    /// The peer, exported id, offload fields, flow slot and lane of the packet read at `start`;
    /// `None`
    /// (counted) when it is not to be sent.
    fn classify(
        &self,
        start: usize,
        batches: &mut Batches,
        selector: &mut LaneSelector,
    ) -> Option<(Arc<Peer>, u32, Offload, u64, Lane)> {
        let record = &batches.reader().bytes()[start..];
        let offload = if self.tun.offload() {
            let Some(hdr) = record
                .get(VNET_HDR_OFFSET..RECORD_HEADER_LEN)
                .and_then(|h| <&[u8; VNET_HDR_LEN]>::try_from(h).ok())
            else {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            Offload::from_vnet(hdr)
        } else {
            Offload::NONE
        };
        let packet = record.get(RECORD_HEADER_LEN..).unwrap_or_default();
        if packet.len() > MAX_PACKET_LEN {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let Some((src, dst)) = packet_addresses(packet) else {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let Some(peer) = self.link.peer_for(&dst) else {
            self.counters.no_peer.fetch_add(1, Ordering::Relaxed);
            return None;
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
            return None;
        };
        // The gateway is the slot's (the link picks it when the batch is sent); the lane is
        // the selector's choice: latency, or the slot's bulk lane (so a flow's bulk packets and
        // its latency packets' fallback, while that gateway serves no latency lane, share one).
        let slot = flow_hash(packet) % FLOW_SLOTS;
        let lane = match selector.select(packet, Instant::now()) {
            Lane::Latency => Lane::Latency,
            Lane::Bulk(_) => Lane::Bulk(slot as usize),
        };
        Some((peer, id, offload, slot, lane))
    }
}

/// Two distinct elements of a slice, mutably.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b);
    if a < b {
        let (left, right) = v.split_at_mut(b);
        (&mut left[a], &mut right[0])
    } else {
        let (left, right) = v.split_at_mut(a);
        (&mut right[0], &mut left[b])
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        data_plane: DataPlaneArgs,
    }

    #[test]
    fn the_own_thread_is_auto_by_default_and_auto_takes_it_on_small_nodes_only() {
        let default = Cli::try_parse_from(["weir-agent"]).unwrap();
        assert_eq!(default.data_plane.mesh_own_thread, OwnThread::Auto);
        assert!(OwnThread::Auto.resolve(1));
        assert!(OwnThread::Auto.resolve(OWN_THREAD_MAX_CPUS));
        assert!(!OwnThread::Auto.resolve(OWN_THREAD_MAX_CPUS + 1));
        for (arg, own_thread) in [("true", true), ("false", false)] {
            let cli = Cli::try_parse_from(["weir-agent", "--mesh-own-thread", arg]).unwrap();
            // Whatever the node's CPUs.
            assert_eq!(cli.data_plane.mesh_own_thread.resolve(1), own_thread);
            assert_eq!(cli.data_plane.mesh_own_thread.resolve(64), own_thread);
        }
        assert!(Cli::try_parse_from(["weir-agent", "--mesh-own-thread", "yes"]).is_err());
    }
}
