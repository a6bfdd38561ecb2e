//! The `BPF_PROG_TEST_RUN` harness of the datapath tests: the real kernel object loaded unpinned,
//! its maps seeded from user space with the shared types (as the agent writes them), packets run
//! through either program, verdicts, conntrack, fragment records, counters and events read back.
//!
//! Root only (loading programs needs CAP_BPF and CAP_NET_ADMIN).

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use weir_common::{
    AddrKey, Config, CtKey, CtValue, DropKind, EndpointInfo, EndpointKey, FragKey, FragValue,
    IPV4_MAPPED_PREFIX_BITS, IdentityValue, MAP_CIDR_IDENTITIES, MAP_CONFIG, MAP_CONNTRACK,
    MAP_COUNTERS, MAP_ENDPOINTS, MAP_EVENTS, MAP_FRAGMENTS, MAP_IPCACHE, MAP_POLICY, MAP_PREFILTER,
    MAP_SUBJECTS, MAP_XDP_DENIALS, MAP_XDP_DENIALS_GENERATION, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, PROG_FROM_POD, PROG_TO_POD, PROG_XDP, PolicyKey,
    PolicyValue, PrefilterValue, REASON_COUNT, SubjectKey, SubjectPolicy, VerdictEvent, XdpDenial,
    ports::port_range_blocks,
};

use crate::packet::{TCP_ACK, TCP_SYN, addr, tcp};

pub const OK: u32 = 0; // TC_ACT_OK
pub const SHOT: u32 = 2; // TC_ACT_SHOT
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// `skb->ifindex` as `BPF_PROG_TEST_RUN` presents it without a `__sk_buff` context: the
/// loopback device. `spoofed_source_drops` checks this.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// Two local pods, a remote pod, an address nobody knows.
pub const POD_A: &str = "10.1.0.1";
pub const POD_B: &str = "10.1.0.2";
pub const POD_C: &str = "10.1.0.3";
pub const REMOTE: &str = "10.2.0.9";
pub const WORLD: &str = "192.0.2.10";
pub const ID_A: u32 = 300;
pub const ID_B: u32 = 301;
pub const ID_C: u32 = 302;
pub const ID_REMOTE: u32 = 400;

pub fn ip_of(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// LPM prefix length of `ip/len` in the 16-byte form.
pub fn prefix_bits(ip: IpAddr, len: u32) -> u32 {
    if ip.is_ipv4() {
        IPV4_MAPPED_PREFIX_BITS + len
    } else {
        len
    }
}

/// Which ports a rule allows.
#[derive(Clone, Copy)]
pub enum Ports {
    Any,
    One(u16),
    Range(u16, u16),
}

/// A loaded object and helpers to seed and inspect its maps.
pub struct Datapath {
    pub ebpf: Ebpf,
}

impl Datapath {
    /// Loads the object; config generation 1, no flags.
    #[expect(
        clippy::new_without_default,
        reason = "loading a kernel object is not a default value"
    )]
    pub fn new() -> Self {
        let ebpf = weir_agent::datapath::loader::load(None)
            .expect("loading the kernel object (needs root; verifier log in the error)");
        Self::with_generation_one(ebpf)
    }

    /// Loads another build's kernel object (a benchmark's previous build); config generation 1,
    /// no flags.
    pub fn from_object(object: &[u8]) -> anyhow::Result<Self> {
        let ebpf = weir_agent::datapath::loader::load_object(object, None, false)?;
        Ok(Self::with_generation_one(ebpf))
    }

    fn with_generation_one(ebpf: Ebpf) -> Self {
        let mut dp = Self { ebpf };
        dp.config(1, 0);
        dp
    }

    /// Loads the object with pods A, B and C as local endpoints on the test-run interface and
    /// the three pods plus the remote pod in the ipcache.
    pub fn with_pods() -> Self {
        let mut dp = Self::new();
        dp.endpoint(POD_A, TEST_RUN_IFINDEX, ID_A);
        dp.endpoint(POD_B, TEST_RUN_IFINDEX, ID_B);
        dp.endpoint(POD_C, TEST_RUN_IFINDEX, ID_C);
        dp.ipcache(POD_A, 32, ID_A);
        dp.ipcache(POD_B, 32, ID_B);
        dp.ipcache(POD_C, 32, ID_C);
        dp.ipcache(REMOTE, 32, ID_REMOTE);
        dp
    }

    pub fn config(&mut self, generation: u32, flags: u32) {
        let mut m: Array<_, Config> =
            Array::try_from(self.ebpf.map_mut(MAP_CONFIG).unwrap()).unwrap();
        m.set(0, Config { generation, flags }, 0).unwrap();
    }

    pub fn endpoint(&mut self, ip: &str, ifindex: u32, identity: u32) {
        let mut m: HashMap<_, EndpointKey, EndpointInfo> =
            HashMap::try_from(self.ebpf.map_mut(MAP_ENDPOINTS).unwrap()).unwrap();
        let info = EndpointInfo {
            ifindex,
            identity,
            ..Default::default()
        };
        m.insert(
            EndpointKey {
                addr: addr(ip_of(ip)),
            },
            info,
            0,
        )
        .unwrap();
    }

    pub fn lpm_insert(&mut self, map: &str, ip: &str, len: u32, identity: u32) {
        let mut m: LpmTrie<_, AddrKey, IdentityValue> =
            LpmTrie::try_from(self.ebpf.map_mut(map).unwrap()).unwrap();
        let ip = ip_of(ip);
        let key = Key::new(prefix_bits(ip, len), AddrKey { addr: addr(ip) });
        m.insert(
            &key,
            IdentityValue {
                identity,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    }

    /// Puts `ip/len` on the operator's deny list, as listed on `line` of the prefilter file.
    pub fn prefilter(&mut self, ip: &str, len: u32, line: u32) {
        let mut m: LpmTrie<_, AddrKey, PrefilterValue> =
            LpmTrie::try_from(self.ebpf.map_mut(MAP_PREFILTER).unwrap()).unwrap();
        let ip = ip_of(ip);
        let key = Key::new(prefix_bits(ip, len), AddrKey { addr: addr(ip) });
        let value = PrefilterValue {
            entry: line,
            ..Default::default()
        };
        m.insert(&key, value, 0).unwrap();
    }

    pub fn ipcache(&mut self, ip: &str, len: u32, identity: u32) {
        self.lpm_insert(MAP_IPCACHE, ip, len, identity);
    }

    pub fn cidr(&mut self, ip: &str, len: u32, identity: u32) {
        self.lpm_insert(MAP_CIDR_IDENTITIES, ip, len, identity);
    }

    pub fn subject(&mut self, identity: u32, version: u32, flags: u32) {
        let mut m: HashMap<_, SubjectKey, SubjectPolicy> =
            HashMap::try_from(self.ebpf.map_mut(MAP_SUBJECTS).unwrap()).unwrap();
        m.insert(SubjectKey { identity }, SubjectPolicy { version, flags }, 0)
            .unwrap();
    }

    /// The LPM keys of one rule, as the agent writes them.
    pub fn rule_keys(
        subject: u32,
        version: u32,
        direction: u8,
        peer: u32,
        proto: Option<u8>,
        ports: Ports,
    ) -> Vec<Key<PolicyKey>> {
        let key = |prefix: u32, proto: u8, port: u16| {
            Key::new(
                prefix,
                PolicyKey {
                    subject: subject.to_be(),
                    version: version.to_be(),
                    peer: peer.to_be(),
                    direction,
                    proto,
                    port: port.to_be(),
                },
            )
        };
        match (proto, ports) {
            (None, _) => vec![key(POLICY_PREFIX_ANY_PROTO, 0, 0)],
            (Some(p), Ports::Any) => vec![key(POLICY_PREFIX_ANY_PORT, p, 0)],
            (Some(p), Ports::One(port)) => vec![key(POLICY_PREFIX_FULL, p, port)],
            (Some(p), Ports::Range(start, end)) => {
                let (blocks, n) = port_range_blocks(start, end);
                blocks[..n]
                    .iter()
                    .map(|&(first, bits)| key(POLICY_PREFIX_ANY_PORT + bits as u32, p, first))
                    .collect()
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn allow(
        &mut self,
        subject: u32,
        version: u32,
        direction: u8,
        peer: u32,
        proto: Option<u8>,
        ports: Ports,
        rule: u32,
    ) {
        let mut m: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.ebpf.map_mut(MAP_POLICY).unwrap()).unwrap();
        for key in Self::rule_keys(subject, version, direction, peer, proto, ports) {
            m.insert(
                &key,
                PolicyValue {
                    rule,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        }
    }

    pub fn revoke(
        &mut self,
        subject: u32,
        version: u32,
        direction: u8,
        peer: u32,
        proto: Option<u8>,
        ports: Ports,
    ) {
        let mut m: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.ebpf.map_mut(MAP_POLICY).unwrap()).unwrap();
        for key in Self::rule_keys(subject, version, direction, peer, proto, ports) {
            m.remove(&key).unwrap();
        }
    }

    pub fn run(&self, program: &str, frame: &[u8]) -> u32 {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .expect("program in object")
            .try_into()
            .expect("a classifier");
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        };
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    /// Runs `program` and returns its verdict and the packet as it left (rewritten or not).
    pub fn run_out(&self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .expect("program in object")
            .try_into()
            .expect("a classifier");
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// A packet the pod sends (tc ingress of its host-side veth).
    pub fn from_pod(&self, frame: &[u8]) -> u32 {
        self.run(PROG_FROM_POD, frame)
    }

    /// A packet delivered to the pod (tc egress of its host-side veth).
    pub fn to_pod(&self, frame: &[u8]) -> u32 {
        self.run(PROG_TO_POD, frame)
    }

    /// A frame arriving on the node's uplink (`weir_xdp`).
    pub fn xdp(&self, frame: &[u8]) -> u32 {
        let prog: &Xdp = self
            .ebpf
            .program(PROG_XDP)
            .expect("program in object")
            .try_into()
            .expect("an XDP program");
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        };
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    /// A counter slot that is not a reason (`COUNTER_*`).
    pub fn counter_slot(&self, slot: u32) -> u64 {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_COUNTERS).unwrap()).unwrap();
        m.get(&slot, 0).unwrap().iter().sum()
    }

    pub fn counter(&self, reason: u8) -> u64 {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_COUNTERS).unwrap()).unwrap();
        m.get(&(reason as u32), 0).unwrap().iter().sum()
    }

    /// All counters, indexed by reason.
    pub fn counters(&self) -> Vec<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_COUNTERS).unwrap()).unwrap();
        (0..REASON_COUNT)
            .map(|i| m.get(&i, 0).unwrap().iter().sum())
            .collect()
    }

    pub fn ct(&self, key: &CtKey) -> Option<CtValue> {
        let m: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map(MAP_CONNTRACK).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    /// Writes a conntrack entry as the programs (or an earlier agent's table) would have.
    pub fn ct_insert(&mut self, key: &CtKey, value: CtValue) {
        let mut m: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map_mut(MAP_CONNTRACK).unwrap()).unwrap();
        m.insert(key, value, 0).unwrap();
    }

    pub fn remove_endpoint(&mut self, ip: &str) {
        let mut m: HashMap<_, EndpointKey, EndpointInfo> =
            HashMap::try_from(self.ebpf.map_mut(MAP_ENDPOINTS).unwrap()).unwrap();
        m.remove(&EndpointKey {
            addr: addr(ip_of(ip)),
        })
        .unwrap();
    }

    pub fn ct_len(&self) -> usize {
        let m: HashMap<_, CtKey, CtValue> =
            HashMap::try_from(self.ebpf.map(MAP_CONNTRACK).unwrap()).unwrap();
        m.keys().count()
    }

    /// The policy denials `weir_xdp` remembers.
    pub fn xdp_denials(&self) -> Vec<(DropKind, XdpDenial)> {
        let m: HashMap<_, DropKind, XdpDenial> =
            HashMap::try_from(self.ebpf.map(MAP_XDP_DENIALS).unwrap()).unwrap();
        m.iter().map(Result::unwrap).collect()
    }

    /// The config generation of the newest denial `weir_xdp` remembered (0: none yet).
    pub fn xdp_denials_generation(&self) -> u32 {
        let m: Array<_, u32> =
            Array::try_from(self.ebpf.map(MAP_XDP_DENIALS_GENERATION).unwrap()).unwrap();
        m.get(&0, 0).unwrap()
    }

    /// The fragment record of a datagram at one hook.
    pub fn fragment(&self, key: &FragKey) -> Option<FragValue> {
        let m: HashMap<_, FragKey, FragValue> =
            HashMap::try_from(self.ebpf.map(MAP_FRAGMENTS).unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    pub fn fragments_len(&self) -> usize {
        let m: HashMap<_, FragKey, FragValue> =
            HashMap::try_from(self.ebpf.map(MAP_FRAGMENTS).unwrap()).unwrap();
        m.keys().count()
    }

    pub fn events(&mut self) -> Vec<VerdictEvent> {
        let mut ring = RingBuf::try_from(self.ebpf.map_mut(MAP_EVENTS).unwrap()).unwrap();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), size_of::<VerdictEvent>());
            // SAFETY: the kernel wrote a whole VerdictEvent, a plain-integer repr(C) struct.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) });
        }
        out
    }
}

pub fn ct_key(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: addr(ip_of(src)),
        daddr: addr(ip_of(dst)),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

pub fn syn(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    tcp(ip_of(src), sport, ip_of(dst), dport, TCP_SYN)
}

pub fn ack(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    tcp(ip_of(src), sport, ip_of(dst), dport, TCP_ACK)
}

/// `bpf_ktime_get_coarse_ns` as user space reads it (`CLOCK_MONOTONIC_COARSE`): the clock of the
/// programs' coarse timestamps (next-hop checks, drop-report throttling).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How many drop-report intervals (`DROP_REPORT_INTERVAL_NS`) a stretch of time from `start`
/// (`coarse_now_ns`) until now touches: the most reports one kind of drop can get in it.
pub fn report_intervals_since(start: u64) -> usize {
    ((coarse_now_ns() - start) / weir_common::DROP_REPORT_INTERVAL_NS + 1) as usize
}
