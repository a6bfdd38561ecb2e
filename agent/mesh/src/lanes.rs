//! Which lane a packet takes towards a peer.
//!
//! Flows are hashed onto the bulk lanes by their addresses, protocol and ports, so each flow
//! keeps its order. Besides them, a peer has a **latency lane**: a lane whose queue, HTTP/2
//! stream and TCP connection no bulk flow's batches wait in, so a request does not queue behind
//! megabytes of someone else's transfer. A flow uses it while it sends little: a meter of the
//! bytes each flow sent in the current window moves a flow that exceeds its budget onto its bulk
//! lane. The meter is a fixed table indexed by flow hash (no allocation per flow, no per-flow
//! state that matters for correctness: a gateway that loses it only re-learns priorities, and
//! two flows that share a slot are both treated as the busier one).
//!
//! **Order.** A flow changes lane in only two ways: from the latency lane to its bulk lane when
//! it exceeds its budget (its earlier packets are on the faster lane, ahead of it), and back
//! only after [`DEMOTE_IDLE`] without a single packet, far longer than a bounded lane queue
//! takes to drain, so its earlier packets have left the bulk lane before the first one takes
//! the latency lane.

use std::time::{Duration, Instant};

/// Where a packet goes towards a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Flows that send little: requests and responses, pings, the ACK streams of transfers.
    Latency,
    /// Bulk lane `n` (below the lanes per peer).
    Bulk(usize),
}

impl Lane {
    /// The `weir-lane` request metadata naming the latency lane (bulk lanes are numbers).
    pub const LATENCY_NAME: &'static str = "latency";
}

/// Slots of the flow meter.
pub const METER_SLOTS: usize = 4096;
/// The meter's window.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Bytes a flow may send in one window and stay on the latency lane (about 10 Mbit/s: far
/// above a request/response exchange or a transfer's ACK stream, far below a transfer).
pub const LATENCY_BUDGET: u64 = 128 * 1024;
/// How long a flow on its bulk lane must send nothing before it may use the latency lane again.
pub const DEMOTE_IDLE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// Start of the current window, in µs since the selector's start.
    window_start: u64,
    /// Bytes sent in the current window.
    bytes: u64,
    /// Last packet, in µs since the selector's start.
    last: u64,
    bulk: bool,
}

/// Chooses each packet's lane; one per reader of the TUN.
pub struct LaneSelector {
    lanes: usize,
    latency: bool,
    start: Instant,
    slots: Box<[Slot]>,
}

impl LaneSelector {
    /// For `lanes` bulk lanes per peer; without `latency`, every flow takes its bulk lane.
    pub fn new(lanes: usize, latency: bool) -> Self {
        Self {
            lanes: lanes.max(1),
            latency,
            start: Instant::now(),
            slots: vec![Slot::default(); METER_SLOTS].into_boxed_slice(),
        }
    }

    /// The bulk lane of `packet`'s flow.
    pub fn bulk_lane(&self, packet: &[u8]) -> Lane {
        Lane::Bulk(flow_hash(packet) as usize % self.lanes)
    }

    /// The lane of `packet`, read at `now`, counting it against its flow's budget.
    pub fn select(&mut self, packet: &[u8], now: Instant) -> Lane {
        let hash = flow_hash(packet);
        let bulk = Lane::Bulk(hash as usize % self.lanes);
        if !self.latency {
            return bulk;
        }
        let now = now.saturating_duration_since(self.start).as_micros() as u64;
        // Other bits of the hash than the lane's, so the flows of one lane spread over slots.
        let slot = &mut self.slots[(hash >> 32) as usize % METER_SLOTS];
        if slot.bulk && now.saturating_sub(slot.last) >= DEMOTE_IDLE.as_micros() as u64 {
            *slot = Slot::default();
        }
        if now.saturating_sub(slot.window_start) >= WINDOW.as_micros() as u64 {
            slot.window_start = now;
            slot.bytes = 0;
        }
        slot.bytes += packet.len() as u64;
        slot.last = now;
        if slot.bytes > LATENCY_BUDGET {
            slot.bulk = true;
        }
        if slot.bulk { bulk } else { Lane::Latency }
    }
}

/// A hash of a packet's flow: addresses, protocol and, for TCP and UDP (not a later fragment),
/// ports. Every packet of a flow gets the same hash.
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

    fn tcp4(src_port: u16, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(40)];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 1, 0, 1]);
        p[20..22].copy_from_slice(&src_port.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p
    }

    fn slot_of(packet: &[u8]) -> usize {
        (flow_hash(packet) >> 32) as usize % METER_SLOTS
    }

    #[test]
    fn a_flow_always_hashes_alike_and_flows_spread() {
        assert_eq!(flow_hash(&tcp4(40_000, 40)), flow_hash(&tcp4(40_000, 40)));
        let lanes: std::collections::BTreeSet<u64> = (40_000..40_064)
            .map(|p| flow_hash(&tcp4(p, 40)) % 4)
            .collect();
        assert_eq!(lanes.len(), 4, "64 flows use every one of 4 lanes");
        // A later fragment has no ports; it still hashes (by addresses and protocol).
        let mut frag = tcp4(40_000, 40);
        frag[7] = 1;
        let _ = flow_hash(&frag);
        assert_eq!(flow_hash(&[0x45]), 0);
    }

    /// Every lane change of one flow over `sends` (packet length, µs since the previous one):
    /// the lanes it took, in order.
    fn lanes_taken(
        selector: &mut LaneSelector,
        now: &mut Instant,
        port: u16,
        sends: &[(usize, u64)],
    ) -> Vec<Lane> {
        let mut taken: Vec<Lane> = Vec::new();
        for &(len, gap) in sends {
            *now += Duration::from_micros(gap);
            let lane = selector.select(&tcp4(port, len), *now);
            if taken.last() != Some(&lane) {
                taken.push(lane);
            }
        }
        taken
    }

    #[test]
    fn a_flow_moves_to_its_bulk_lane_once_and_back_only_after_an_idle_second() {
        let mut selector = LaneSelector::new(2, true);
        let bulk = selector.bulk_lane(&tcp4(40_000, 40));
        let mut now = selector.start;
        // Requests: 200 small packets, 1 ms apart, stay on the latency lane.
        let requests = vec![(100, 1_000); 200];
        assert_eq!(
            lanes_taken(&mut selector, &mut now, 40_000, &requests),
            [Lane::Latency]
        );
        // A transfer of super-packets: on its bulk lane from the packet that exceeds the
        // budget, and there it stays, even for small packets right after (no reordering).
        let mut transfer = vec![(65_000, 50); 100];
        transfer.extend(vec![(60, 10_000); 200]);
        assert_eq!(
            lanes_taken(&mut selector, &mut now, 40_000, &transfer),
            [Lane::Latency, bulk]
        );
        // Quiet for less than DEMOTE_IDLE: still bulk. Quiet for DEMOTE_IDLE: latency again.
        let almost = DEMOTE_IDLE.as_micros() as u64 - 1;
        assert_eq!(
            lanes_taken(&mut selector, &mut now, 40_000, &[(60, almost)]),
            [bulk]
        );
        let idle = DEMOTE_IDLE.as_micros() as u64;
        assert_eq!(
            lanes_taken(&mut selector, &mut now, 40_000, &[(60, almost + idle)]),
            [Lane::Latency]
        );
    }

    #[test]
    fn a_transfer_does_not_move_other_flows_off_the_latency_lane() {
        let mut selector = LaneSelector::new(2, true);
        let transfer = tcp4(40_000, 65_000);
        let request = (40_001..50_000)
            .map(|p| tcp4(p, 100))
            .find(|r| slot_of(r) != slot_of(&transfer))
            .expect("a flow in another slot");
        let mut now = selector.start;
        for i in 0..1_000 {
            now += Duration::from_micros(100);
            // Its first two super-packets are within the budget; every later one is bulk.
            let lane = selector.select(&transfer, now);
            assert_eq!(lane == Lane::Latency, i < 2, "packet {i} took {lane:?}");
            assert_eq!(selector.select(&request, now), Lane::Latency);
        }
    }

    #[test]
    fn without_the_latency_lane_every_flow_takes_its_bulk_lane() {
        let mut selector = LaneSelector::new(3, false);
        let now = Instant::now();
        for port in 40_000..40_100 {
            let p = tcp4(port, 100);
            assert_eq!(selector.select(&p, now), selector.bulk_lane(&p));
        }
    }
}
