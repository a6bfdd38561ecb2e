//! Pod address management for this node: one address per configured family (the node's pod
//! CIDRs), keyed by attachment (container id, interface name).
//!
//! Every change is saved to `<state_dir>/ipam.jsonl` (a `persist::SnapshotLog`) under the lock,
//! before it is acknowledged, so a crash of the agent or of a plugin in the middle of an ADD never
//! hands the same address out twice. (No fsync: see `persist`.) Allocations whose host veth
//! vanished while the agent was down are released by [`Ipam::reconcile`] at start-up.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use weir_policy::model::ObjectKey;

use crate::persist::SnapshotLog;

/// The file name under the state directory.
pub const STATE_FILE: &str = "ipam.jsonl";
/// Where versions before the snapshot log kept the state (moved into `STATE_FILE` at start-up).
const LEGACY_STATE_FILE: &str = "ipam.json";

const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "no pod CIDR configured: IPAM needs at least one (--pod-cidr or the Node's spec.podCIDRs)"
    )]
    NoPodCidr,
    #[error("two pod CIDRs of the same family ({first} and {second}); one per family is supported")]
    DuplicateFamily { first: IpNet, second: IpNet },
    #[error("pod CIDR {cidr} is exhausted: all {capacity} usable addresses are allocated")]
    Exhausted { cidr: IpNet, capacity: u128 },
    #[error(
        "attachment {container_id}/{ifname} already holds {addresses:?} on {host_ifname}; it needs a release (CNI DEL) before it is allocated again"
    )]
    AlreadyAllocated {
        container_id: String,
        ifname: String,
        addresses: Vec<IpAddr>,
        host_ifname: String,
    },
    #[error("creating the IPAM state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the IPAM state: {0} (moving it aside starts afresh, but addresses in use may then be handed out again)"
    )]
    Open(#[source] crate::persist::PersistError),
    #[error("saving the IPAM state: {0}")]
    Write(#[from] crate::persist::PersistError),
    #[error("the IPAM state lock was poisoned by a panic")]
    Poisoned,
    #[error("listing the node's network interfaces")]
    ListLinks(#[source] nix::Error),
}

/// The Weir host veths (`weir_proto::naming::is_host_veth_name`) in the calling thread's
/// network namespace (the node's), for [`Ipam::reconcile`] at start-up.
pub fn existing_host_veths() -> Result<HashSet<String>, IpamError> {
    let links = nix::net::if_::if_nameindex().map_err(IpamError::ListLinks)?;
    Ok(links
        .iter()
        .filter_map(|l| l.name().to_str().ok().map(str::to_owned))
        .filter(|name| weir_proto::naming::is_host_veth_name(name))
        .collect())
}

/// One attachment's addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub container_id: String,
    pub ifname: String,
    pub pod: ObjectKey,
    /// The host-side veth (`weir_proto::naming::host_veth_name`).
    pub host_ifname: String,
    /// One per family, in the order of the pod CIDRs.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    version: u32,
    /// Where the next search starts, per pool (index into the pool's usable range), so that a
    /// released address is not handed out again at once.
    cursors: BTreeMap<String, u128>,
    allocations: Vec<Allocation>,
}

/// How full one pod CIDR is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    pub cidr: IpNet,
    /// Usable addresses (network and broadcast excluded, see [`Pool::new`]).
    pub usable: u128,
    pub allocated: u128,
}

impl PoolUsage {
    pub fn exhausted(&self) -> bool {
        self.allocated >= self.usable
    }
}

/// One pod CIDR and its usable range `[first, first + capacity)` as offsets from the network.
#[derive(Debug, Clone, Copy)]
struct Pool {
    cidr: IpNet,
    first: u128,
    capacity: u128,
}

impl Pool {
    fn new(cidr: IpNet) -> Self {
        let cidr = cidr.trunc();
        let (host_bits, is_v4) = match cidr {
            IpNet::V4(n) => (32 - u32::from(n.prefix_len()), true),
            IpNet::V6(n) => (128 - u32::from(n.prefix_len()), false),
        };
        let size: u128 = if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        // v4: skip the network and broadcast addresses; v6: skip the subnet-router anycast
        // (first) address. Tiny pools (/31, /32, /127, /128) use every address.
        let (first, capacity) = match (is_v4, size) {
            (_, 0..=2) => (0, size),
            (true, _) => (1, size - 2),
            (false, _) => (1, size - 1),
        };
        Pool {
            cidr,
            first,
            capacity,
        }
    }

    fn key(&self) -> String {
        self.cidr.to_string()
    }

    fn addr(&self, index: u128) -> IpAddr {
        let offset = self.first + index;
        match self.cidr {
            IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(
                u32::from(n.network()).wrapping_add(offset as u32),
            )),
            IpNet::V6(n) => {
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_add(offset)))
            }
        }
    }

    fn same_family(&self, addr: &IpAddr) -> bool {
        matches!(
            (self.cidr, addr),
            (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_))
        )
    }
}

/// The node's IPAM. Cheap to share behind an `Arc`; all methods take `&self`. Changes are made
/// and saved under one lock, so concurrent callers never pick the same address.
#[derive(Debug)]
pub struct Ipam {
    pools: Vec<Pool>,
    store: Mutex<Store>,
}

/// The state and the log it is saved to, under one lock.
#[derive(Debug)]
struct Store {
    state: State,
    log: SnapshotLog,
}

impl Ipam {
    /// Opens (or creates) the state under `state_dir` for the node's pod CIDRs (at most one per
    /// family). Allocations made from CIDRs no longer configured are kept until released.
    pub fn open(state_dir: &Path, pod_cidrs: &[IpNet]) -> Result<Ipam, IpamError> {
        if pod_cidrs.is_empty() {
            return Err(IpamError::NoPodCidr);
        }
        let mut pools: Vec<Pool> = Vec::new();
        for cidr in pod_cidrs {
            let pool = Pool::new(*cidr);
            if let Some(other) = pools.iter().find(|p| p.same_family(&pool.cidr.network())) {
                return Err(IpamError::DuplicateFamily {
                    first: other.cidr,
                    second: pool.cidr,
                });
            }
            pools.push(pool);
        }
        fs::create_dir_all(state_dir).map_err(|source| IpamError::CreateDir {
            path: state_dir.to_owned(),
            source,
        })?;
        let (log, state) = SnapshotLog::open::<State>(
            &state_dir.join(STATE_FILE),
            &state_dir.join(LEGACY_STATE_FILE),
        )
        .map_err(IpamError::Open)?;
        let state = state.unwrap_or(State {
            version: STATE_VERSION,
            ..State::default()
        });
        Ok(Ipam {
            pools,
            store: Mutex::new(Store { state, log }),
        })
    }

    /// The configured pod CIDRs.
    pub fn pod_cidrs(&self) -> Vec<IpNet> {
        self.pools.iter().map(|p| p.cidr).collect()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Store>, IpamError> {
        self.store.lock().map_err(|_| IpamError::Poisoned)
    }

    /// How full each pod CIDR is (allocations from CIDRs no longer configured are not counted).
    pub fn usage(&self) -> Result<Vec<PoolUsage>, IpamError> {
        let store = self.lock()?;
        let addresses: Vec<IpAddr> = store
            .state
            .allocations
            .iter()
            .flat_map(|a| a.addresses.iter().copied())
            .collect();
        Ok(self
            .pools
            .iter()
            .map(|pool| PoolUsage {
                cidr: pool.cidr,
                usable: pool.capacity,
                allocated: addresses.iter().filter(|a| pool.cidr.contains(*a)).count() as u128,
            })
            .collect())
    }

    /// Reserves one address per pool for the attachment and saves the reservation before
    /// returning it. An attachment that already has addresses keeps them and gets
    /// [`IpamError::AlreadyAllocated`]: a second CNI ADD without a DEL must fail without touching
    /// the first.
    pub fn allocate(
        &self,
        container_id: &str,
        ifname: &str,
        pod: &ObjectKey,
        host_ifname: &str,
    ) -> Result<Allocation, IpamError> {
        let mut store = self.lock()?;
        let Store { state, log } = &mut *store;
        if let Some(existing) = state
            .allocations
            .iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
        {
            return Err(IpamError::AlreadyAllocated {
                container_id: container_id.to_owned(),
                ifname: ifname.to_owned(),
                addresses: existing.addresses.clone(),
                host_ifname: existing.host_ifname.clone(),
            });
        }
        let cursors = state.cursors.clone();
        let allocation = self.pick(state, container_id, ifname, pod, host_ifname)?;
        if let Err(e) = log.save(state) {
            // Not saved: take it back, so the address is not handed out as if it were.
            state.allocations.retain(|a| a != &allocation);
            state.cursors = cursors;
            return Err(e.into());
        }
        Ok(allocation)
    }

    /// Chooses the addresses and records the allocation in `state` (in memory).
    fn pick(
        &self,
        state: &mut State,
        container_id: &str,
        ifname: &str,
        pod: &ObjectKey,
        host_ifname: &str,
    ) -> Result<Allocation, IpamError> {
        let used: HashSet<IpAddr> = state
            .allocations
            .iter()
            .flat_map(|a| a.addresses.iter().copied())
            .collect();
        let mut addresses = Vec::with_capacity(self.pools.len());
        let mut cursors = Vec::with_capacity(self.pools.len());
        for pool in &self.pools {
            let in_pool = used.iter().filter(|a| pool.cidr.contains(*a)).count() as u128;
            if in_pool >= pool.capacity {
                return Err(IpamError::Exhausted {
                    cidr: pool.cidr,
                    capacity: pool.capacity,
                });
            }
            let start = state.cursors.get(&pool.key()).copied().unwrap_or(0) % pool.capacity;
            // At most `in_pool` addresses are taken, so a free one is within `in_pool + 1` steps.
            let mut found = None;
            for step in 0..=in_pool {
                let index = (start + step) % pool.capacity;
                let addr = pool.addr(index);
                if !used.contains(&addr) {
                    found = Some((index, addr));
                    break;
                }
            }
            let Some((index, addr)) = found else {
                return Err(IpamError::Exhausted {
                    cidr: pool.cidr,
                    capacity: pool.capacity,
                });
            };
            addresses.push(addr);
            cursors.push((pool.key(), (index + 1) % pool.capacity));
        }
        let allocation = Allocation {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
            pod: pod.clone(),
            host_ifname: host_ifname.to_owned(),
            addresses,
        };
        state.allocations.push(allocation.clone());
        state.cursors.extend(cursors);
        Ok(allocation)
    }

    /// The attachment's allocation, if any.
    pub fn get(&self, container_id: &str, ifname: &str) -> Result<Option<Allocation>, IpamError> {
        Ok(self
            .lock()?
            .state
            .allocations
            .iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
            .cloned())
    }

    /// Frees the attachment's addresses; `None` when it had none (not an error). When this
    /// returns `Ok`, the release is on disk.
    pub fn release(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Allocation>, IpamError> {
        self.release_where(|a| a.container_id == container_id && a.ifname == ifname)
            .map(|mut released| released.pop())
    }

    /// Every current allocation.
    pub fn allocations(&self) -> Result<Vec<Allocation>, IpamError> {
        Ok(self.lock()?.state.allocations.clone())
    }

    /// Start-up reconciliation: releases every allocation whose host veth is not in
    /// `existing_host_veths` (its pod was deleted, or its ADD died, while the agent was down).
    /// Returns what was released, whose enforcement state the caller removes too
    /// (`EndpointBackend::deactivate`). Call it before serving the API, in the node's network
    /// namespace: `ipam.reconcile(&ipam::existing_host_veths()?)`.
    pub fn reconcile(
        &self,
        existing_host_veths: &HashSet<String>,
    ) -> Result<Vec<Allocation>, IpamError> {
        self.release_where(|a| !existing_host_veths.contains(&a.host_ifname))
    }

    /// Releases every allocation for which `stale` holds, saving once; returns them. When the
    /// save fails nothing is released (the caller's DEL is retried).
    pub fn release_where(
        &self,
        mut stale: impl FnMut(&Allocation) -> bool,
    ) -> Result<Vec<Allocation>, IpamError> {
        let mut store = self.lock()?;
        let Store { state, log } = &mut *store;
        let (released, kept): (Vec<_>, Vec<_>) =
            state.allocations.iter().cloned().partition(|a| stale(a));
        if released.is_empty() {
            return Ok(released);
        }
        let before = std::mem::replace(&mut state.allocations, kept);
        if let Err(e) = log.save(state) {
            state.allocations = before;
            return Err(e.into());
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "weir-ipam-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn skips_network_and_broadcast_and_exhausts_clearly() {
        let dir = tempdir("small");
        let ipam = Ipam::open(&dir, &["10.0.0.0/30".parse().unwrap()]).unwrap();
        let a = ipam.allocate("c1", "eth0", &pod("a"), "h1").unwrap();
        let b = ipam.allocate("c2", "eth0", &pod("b"), "h2").unwrap();
        let got: HashSet<_> = [a.addresses[0], b.addresses[0]].into();
        let want: HashSet<IpAddr> =
            ["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()].into();
        assert_eq!(got, want);
        let err = ipam.allocate("c3", "eth0", &pod("c"), "h3").unwrap_err();
        assert_eq!(
            err.to_string(),
            "pod CIDR 10.0.0.0/30 is exhausted: all 2 usable addresses are allocated"
        );
        // A second allocation of the same attachment fails and keeps the first.
        assert!(matches!(
            ipam.allocate("c1", "eth0", &pod("a"), "h1").unwrap_err(),
            IpamError::AlreadyAllocated { addresses, .. } if addresses == a.addresses
        ));
        assert_eq!(ipam.get("c1", "eth0").unwrap().unwrap(), a);
        let usage = ipam.usage().unwrap();
        assert_eq!((usage[0].usable, usage[0].allocated), (2, 2));
        assert!(usage[0].exhausted());
        ipam.release("c1", "eth0").unwrap().unwrap();
        assert!(ipam.release("c1", "eth0").unwrap().is_none());
        assert!(!ipam.usage().unwrap()[0].exhausted());
        let c = ipam.allocate("c3", "eth0", &pod("c"), "h3").unwrap();
        assert_eq!(c.addresses, a.addresses);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dual_stack_persists_and_reconciles() {
        let dir = tempdir("dual");
        let cidrs: Vec<IpNet> = vec![
            "10.1.0.0/24".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ];
        let first = {
            let ipam = Ipam::open(&dir, &cidrs).unwrap();
            let a = ipam.allocate("c1", "eth0", &pod("a"), "h1").unwrap();
            assert_eq!(a.addresses.len(), 2);
            assert_eq!(a.addresses[0], "10.1.0.1".parse::<IpAddr>().unwrap());
            assert_eq!(a.addresses[1], "fd00:1::1".parse::<IpAddr>().unwrap());
            ipam.allocate("c2", "eth0", &pod("b"), "h2").unwrap();
            a
        };
        let ipam = Ipam::open(&dir, &cidrs).unwrap();
        assert_eq!(ipam.allocations().unwrap().len(), 2);
        assert_eq!(ipam.get("c1", "eth0").unwrap().unwrap(), first);
        let third = ipam.allocate("c3", "eth0", &pod("c"), "h3").unwrap();
        assert!(!third.addresses.contains(&first.addresses[0]));
        let released = ipam.reconcile(&["h1".to_string()].into()).unwrap();
        let names: HashSet<_> = released.iter().map(|a| a.container_id.as_str()).collect();
        assert_eq!(names, ["c2", "c3"].into());
        let reopened = Ipam::open(&dir, &cidrs).unwrap();
        assert_eq!(reopened.allocations().unwrap(), vec![first]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_state_of_an_earlier_version_is_adopted() {
        let dir = tempdir("legacy");
        let cidrs: Vec<IpNet> = vec!["10.3.0.0/24".parse().unwrap()];
        let earlier = Allocation {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            pod: pod("a"),
            host_ifname: "h1".into(),
            addresses: vec!["10.3.0.1".parse().unwrap()],
        };
        let state = State {
            version: STATE_VERSION,
            cursors: [("10.3.0.0/24".to_string(), 1)].into(),
            allocations: vec![earlier.clone()],
        };
        crate::persist::write_json(&dir.join(LEGACY_STATE_FILE), &state).unwrap();
        let ipam = Ipam::open(&dir, &cidrs).unwrap();
        assert_eq!(ipam.allocations().unwrap(), vec![earlier]);
        assert!(!dir.join(LEGACY_STATE_FILE).exists());
        let next = ipam.allocate("c2", "eth0", &pod("b"), "h2").unwrap();
        assert_eq!(next.addresses, vec!["10.3.0.2".parse::<IpAddr>().unwrap()]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parallel_allocations_are_distinct() {
        let dir = tempdir("par");
        let ipam =
            std::sync::Arc::new(Ipam::open(&dir, &["10.2.0.0/24".parse().unwrap()]).unwrap());
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let ipam = ipam.clone();
                std::thread::spawn(move || {
                    ipam.allocate(&format!("c{i}"), "eth0", &pod("p"), "h")
                        .unwrap()
                        .addresses[0]
                })
            })
            .collect();
        let addrs: HashSet<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(addrs.len(), 50);
        // Every returned address is on disk (saved before it was returned).
        let reopened = Ipam::open(&dir, &["10.2.0.0/24".parse().unwrap()]).unwrap();
        let on_disk: HashSet<_> = reopened
            .allocations()
            .unwrap()
            .into_iter()
            .map(|a| a.addresses[0])
            .collect();
        assert_eq!(on_disk, addrs);
        fs::remove_dir_all(&dir).unwrap();
    }
}
