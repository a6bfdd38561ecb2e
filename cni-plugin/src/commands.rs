//! The verbs: ADD, CHECK, DEL, STATUS, GC (VERSION is answered in `main`).

use std::{
    collections::HashSet,
    fs::File,
    net::IpAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use weir_proto::{
    agent::v1::{
        ActivateEndpointRequest, AllocateEndpointRequest, Attachment, CheckEndpointRequest,
        GarbageCollectRequest, PodRef, ReleaseEndpointRequest, StatusRequest,
    },
    gateway::pod_gateway,
    naming,
};

use crate::{
    agent::{self, Client, request},
    config::{Env, NetConf},
    error::PluginError,
    netlink,
    result::{self, CniResult, Wired},
};

const RPC_TIMEOUT: Duration = Duration::from_secs(10);
const ACTIVATE_TIMEOUT: Duration = Duration::from_secs(30);

fn runtime() -> Result<tokio::runtime::Runtime, PluginError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| PluginError::Io {
            what: "starting the plugin's runtime".into(),
            source,
        })
}

fn open_netns(path: &str) -> Result<OwnedFd, PluginError> {
    File::open(path)
        .map(OwnedFd::from)
        .map_err(|e| PluginError::InvalidEnv {
            var: "CNI_NETNS",
            reason: format!("cannot open {path}: {e}"),
        })
}

fn attachment(env: &Env) -> Option<Attachment> {
    Some(Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    })
}

/// One address the agent handed out: the address, its prefix length and its gateway.
fn parse_ip(address: &str, gateway: &str) -> Result<(IpAddr, u8, IpAddr), PluginError> {
    let bad = |what: &str| PluginError::AgentFailed {
        rpc: "AllocateEndpoint",
        code: tonic::Code::Internal,
        message: format!("the agent returned {what}"),
    };
    let (addr, prefix) = address
        .split_once('/')
        .ok_or_else(|| bad(&format!("an address without prefix: {address:?}")))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| bad(&format!("a malformed address {address:?}")))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| bad(&format!("a malformed prefix in {address:?}")))?;
    let gateway: IpAddr = match gateway {
        "" => pod_gateway(&addr),
        g => g
            .parse()
            .map_err(|_| bad(&format!("a malformed gateway {g:?}")))?,
    };
    Ok((addr, prefix, gateway))
}

pub fn add(conf: &NetConf, env: &Env) -> Result<CniResult, PluginError> {
    let namespace = env
        .args
        .pod_namespace
        .clone()
        .ok_or(PluginError::InvalidEnv {
            var: "CNI_ARGS",
            reason: "K8S_POD_NAMESPACE is required".into(),
        })?;
    let name = env.args.pod_name.clone().ok_or(PluginError::InvalidEnv {
        var: "CNI_ARGS",
        reason: "K8S_POD_NAME is required".into(),
    })?;
    let pod = PodRef {
        namespace,
        name,
        uid: env.args.pod_uid.clone().unwrap_or_default(),
    };
    let netns = open_netns(&env.netns)?;
    let host_ifname = naming::host_veth_name(&env.container_id, &env.ifname);
    let rt = runtime()?;
    rt.block_on(async {
        let handle = netlink::connect()?;
        let wait = conf.pod_wait();
        // The agent's allocation and the veth pair (its name is deterministic) at the same time.
        // The agent refuses an attachment it already holds, and the kernel refuses a veth whose
        // name exists on either side, so a second ADD of a live attachment changes nothing.
        let allocation = async {
            // Allocation waits for the Pod; activation gets the usual limit after it.
            let limit = wait + ACTIVATE_TIMEOUT + agent::CALL_LIMIT;
            let mut client = agent::connect(&conf.agent_socket(), limit).await?;
            let reply = client
                .allocate_endpoint(request(
                    AllocateEndpointRequest {
                        attachment: attachment(env),
                        pod: Some(pod.clone()),
                        netns: env.netns.clone(),
                        pod_wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
                    },
                    wait + RPC_TIMEOUT,
                ))
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::AlreadyExists => already_exists(env, s.message().to_owned()),
                    _ => PluginError::from_status("AllocateEndpoint", s),
                })?
                .into_inner();
            crate::log::mark("allocate");
            Ok::<_, PluginError>((client, reply))
        };
        let veth = async {
            let link =
                netlink::create_veth(&handle, &host_ifname, &env.ifname, &netns, conf.mtu())
                    .await;
            crate::log::mark("veth");
            link
        };
        let (allocation, veth) = tokio::join!(allocation, veth);
        let (mut client, allocated) = match allocation {
            Ok(a) => a,
            Err(e) => {
                // Only a veth this ADD created goes; a failed creation touched nothing.
                if veth.is_ok() {
                    let _ = netlink::delete_link(&handle, &host_ifname).await;
                }
                return Err(e);
            }
        };
        let outcome = async {
            let host = match veth {
                Ok(host) => host,
                Err(e) if e.errno() == Some(libc::EEXIST) => {
                    replace_leftover_veth(conf, env, &handle, &netns, &host_ifname).await?
                }
                Err(e) => return Err(e),
            };
            if allocated.host_ifname != host_ifname {
                return Err(PluginError::AgentFailed {
                    rpc: "AllocateEndpoint",
                    code: tonic::Code::Internal,
                    message: format!(
                        "the agent named the host veth {}, the plugin {host_ifname}: versions differ?",
                        allocated.host_ifname
                    ),
                });
            }
            let ips = allocated
                .ips
                .iter()
                .map(|ip| parse_ip(&ip.address, &ip.gateway))
                .collect::<Result<Vec<_>, _>>()?;
            wire(env, &mut client, &handle, &netns, &pod, &host, &host_ifname, &ips).await
        }
        .await;
        match outcome {
            Ok(wired) => Ok(result::build(
                conf.cni_version(),
                &wired,
                conf.prev_result.as_ref(),
            )),
            Err(e) => {
                // Undo: the allocation is this ADD's own (the agent refuses a second one), and
                // so is a veth of this name unless the pod's interface was already there.
                if !matches!(e, PluginError::AlreadyExists { .. }) {
                    let _ = netlink::delete_link(&handle, &host_ifname).await;
                }
                let _ = client
                    .release_endpoint(request(
                        ReleaseEndpointRequest {
                            attachment: attachment(env),
                        },
                        RPC_TIMEOUT,
                    ))
                    .await;
                Err(e)
            }
        }
    })
}

fn already_exists(env: &Env, what: String) -> PluginError {
    PluginError::AlreadyExists {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        what,
    }
}

/// The veth could not be created because a name is taken. An interface of the pod's name in the
/// pod is an error (SPEC 1.1: "If an interface of the requested name already exists in the
/// container, the CNI plugin MUST return with an error"). Otherwise the host veth is a leftover:
/// the agent held no allocation for this attachment, so it belongs to no live attachment (an
/// ADD killed before it registered, whose pod went elsewhere); it is replaced.
async fn replace_leftover_veth(
    conf: &NetConf,
    env: &Env,
    handle: &rtnetlink::Handle,
    netns: &OwnedFd,
    host_ifname: &str,
) -> Result<netlink::Link, PluginError> {
    let in_pod = netlink::connect_in(netns.as_fd())?;
    if netlink::link_by_name(&in_pod, &env.ifname).await?.is_some() {
        return Err(already_exists(
            env,
            format!(
                "an interface named {} already exists in the container's network namespace {}",
                env.ifname, env.netns
            ),
        ));
    }
    netlink::delete_link(handle, host_ifname).await?;
    netlink::create_veth(handle, host_ifname, &env.ifname, netns, conf.mtu()).await
}

#[allow(clippy::too_many_arguments)]
async fn wire(
    env: &Env,
    client: &mut Client,
    handle: &rtnetlink::Handle,
    netns: &OwnedFd,
    pod: &PodRef,
    host: &netlink::Link,
    host_ifname: &str,
    ips: &[(IpAddr, u8, IpAddr)],
) -> Result<Wired, PluginError> {
    let pod_ifname = &env.ifname;
    let in_pod = netlink::connect_in(netns.as_fd())?;
    // The pod side and the enforcement at the same time: the pod's interface has no carrier
    // until the host veth is set up below, after both.
    let pod_side = async {
        let link = netlink::link_by_name(&in_pod, pod_ifname)
            .await?
            .ok_or_else(|| {
                PluginError::CheckFailed(format!("{pod_ifname} did not appear in the pod"))
            })?;
        // The runtime usually brings lo up itself; a link change costs the kernel, skip it then.
        if let Some(lo) = netlink::link_by_name(&in_pod, "lo").await?
            && !lo.up
        {
            netlink::set_up(&in_pod, lo.index, "lo").await?;
        }
        for (addr, prefix, _) in ips {
            netlink::add_address(&in_pod, link.index, *addr, *prefix, pod_ifname).await?;
        }
        netlink::set_veth_up(&in_pod, link.index, pod_ifname).await?;
        let mut gateways: Vec<IpAddr> = ips.iter().map(|(_, _, g)| *g).collect();
        gateways.dedup();
        let mut priorities = Vec::new();
        for gw in gateways {
            // The gateway is the host veth: no ARP/NDP, no proxy ARP needed.
            netlink::add_neighbour(&in_pod, link.index, gw, &host.mac, pod_ifname).await?;
            let default: IpAddr = if gw.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            };
            let priority = default_route_priority(&in_pod, gw.is_ipv6(), link.index).await?;
            netlink::add_route(
                &in_pod,
                link.index,
                default,
                0,
                Some(gw),
                priority,
                pod_ifname,
            )
            .await?;
            priorities.push((gw.is_ipv6(), priority));
        }
        crate::log::mark("pod");
        Ok::<_, PluginError>((link, priorities))
    };

    // Enforcement into the datapath before the host side comes up, so the pod's first packet
    // meets its policy.
    let activate = async {
        client
            .activate_endpoint(request(
                ActivateEndpointRequest {
                    attachment: attachment(env),
                    pod: Some(pod.clone()),
                    host_ifname: host_ifname.to_owned(),
                    addresses: ips.iter().map(|(a, _, _)| a.to_string()).collect(),
                },
                ACTIVATE_TIMEOUT,
            ))
            .await
            .map_err(|s| PluginError::from_status("ActivateEndpoint", s))?;
        crate::log::mark("activate");
        Ok::<_, PluginError>(())
    };
    let (pod_side, activated) = tokio::join!(pod_side, activate);
    activated?;
    let (pod_link, priorities) = pod_side?;

    netlink::set_veth_up(handle, host.index, host_ifname).await?;
    let mut gateways: Vec<IpAddr> = ips.iter().map(|(_, _, g)| *g).collect();
    gateways.dedup();
    for gw in gateways {
        netlink::add_gateway_address(handle, host.index, gw, host_ifname).await?;
    }
    for (addr, _, _) in ips {
        let full = if addr.is_ipv4() { 32 } else { 128 };
        netlink::add_route(handle, host.index, *addr, full, None, None, host_ifname).await?;
        netlink::add_neighbour(handle, host.index, *addr, &pod_link.mac, host_ifname).await?;
    }
    crate::log::mark("host");
    Ok(Wired {
        host_ifname: host_ifname.to_owned(),
        host_mac: netlink::format_mac(&host.mac),
        pod_ifname: env.ifname.clone(),
        pod_mac: netlink::format_mac(&pod_link.mac),
        netns: env.netns.clone(),
        mtu: host.mtu,
        ips: ips.to_vec(),
        default_route_priorities: priorities,
    })
}

/// The metric for this interface's default route of one family: the kernel's default when the
/// pod has none, else one above every other interface's, so that a second interface (eth1)
/// never takes the default route from the first and its DEL removes only its own.
async fn default_route_priority(
    in_pod: &rtnetlink::Handle,
    v6: bool,
    index: u32,
) -> Result<Option<u32>, PluginError> {
    let others = netlink::routes(in_pod, v6)
        .await?
        .into_iter()
        .filter(|r| r.prefix == 0 && r.oif != Some(index))
        .map(|r| r.metric())
        .max();
    Ok(others.map(|m| m.saturating_add(1)))
}

/// DEL: idempotent; the veth goes by its deterministic name even when the agent is down (the
/// agent then releases the address when it starts and finds the veth gone).
pub fn del(conf: &NetConf, env: &Env) -> Result<Option<String>, PluginError> {
    let host_ifname = naming::host_veth_name(&env.container_id, &env.ifname);
    let rt = runtime()?;
    rt.block_on(async {
        let handle = netlink::connect()?;
        let socket = conf.agent_socket();
        // The veth and the agent's release at the same time: the agent deactivates the endpoint
        // before it frees the address, so the order here does not matter for safety.
        let release = async {
            let mut client = agent::connect(&socket, agent::CALL_LIMIT).await?;
            client
                .release_endpoint(request(
                    ReleaseEndpointRequest {
                        attachment: attachment(env),
                    },
                    RPC_TIMEOUT,
                ))
                .await
                .map_err(|s| PluginError::from_status("ReleaseEndpoint", s))?;
            crate::log::mark("release");
            Ok::<_, PluginError>(())
        };
        let delete = async {
            let deleted = netlink::delete_link(&handle, &host_ifname).await;
            crate::log::mark("delete-veth");
            deleted
        };
        let (released, deleted) = tokio::join!(release, delete);
        deleted?;
        match released {
            Ok(()) => Ok(None),
            // With the veth gone, the agent releases the address when it starts (reconcile).
            Err(e @ PluginError::AgentUnreachable { .. }) => Ok(Some(format!(
                "veth removed; address release deferred to the agent's start-up: {e}"
            ))),
            Err(e) => Err(e),
        }
    })
}

/// CHECK: the agent's view (known and enforced), then the pod's interface, addresses and
/// routes, then the host veth and its routes.
pub fn check(conf: &NetConf, env: &Env) -> Result<(), PluginError> {
    let netns = open_netns(&env.netns)?;
    let rt = runtime()?;
    rt.block_on(async {
        let mut client = agent::connect(&conf.agent_socket(), agent::CALL_LIMIT).await?;
        let reply = client
            .check_endpoint(request(
                CheckEndpointRequest {
                    attachment: attachment(env),
                },
                RPC_TIMEOUT,
            ))
            .await
            .map_err(|s| PluginError::from_status("CheckEndpoint", s))?
            .into_inner();
        if !reply.known {
            return Err(PluginError::UnknownContainer {
                container_id: env.container_id.clone(),
                ifname: env.ifname.clone(),
            });
        }
        if !reply.enforced {
            return Err(PluginError::CheckFailed(format!(
                "the endpoint's enforcement is not in the datapath (pod {}, host veth {})",
                reply
                    .pod
                    .as_ref()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .unwrap_or_default(),
                reply.host_ifname
            )));
        }
        let ips = reply
            .ips
            .iter()
            .map(|ip| parse_ip(&ip.address, &ip.gateway))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(prev) = &conf.prev_result {
            let mut listed = result::prev_addresses(prev, &env.ifname);
            let mut want: Vec<String> = reply.ips.iter().map(|i| i.address.clone()).collect();
            listed.sort();
            want.sort();
            if listed != want {
                return Err(PluginError::CheckFailed(format!(
                    "prevResult lists {listed:?} for {}, the agent holds {want:?}",
                    env.ifname
                )));
            }
        }
        let mut problems = Vec::new();

        let host_ifname = naming::host_veth_name(&env.container_id, &env.ifname);
        let handle = netlink::connect()?;
        match netlink::link_by_name(&handle, &host_ifname).await? {
            None => problems.push(format!("host veth {host_ifname} is missing")),
            Some(host) => {
                if !host.up {
                    problems.push(format!("host veth {host_ifname} is down"));
                }
                for (addr, _, _) in &ips {
                    let full = if addr.is_ipv4() { 32 } else { 128 };
                    let routes = netlink::routes(&handle, addr.is_ipv6()).await?;
                    if !routes
                        .iter()
                        .any(|r| r.dst == *addr && r.prefix == full && r.oif == Some(host.index))
                    {
                        problems.push(format!(
                            "host route {addr}/{full} dev {host_ifname} is missing"
                        ));
                    }
                }
            }
        }

        let ifname = &env.ifname;
        let in_pod = netlink::connect_in(netns.as_fd())?;
        match netlink::link_by_name(&in_pod, ifname).await? {
            None => problems.push(format!("{ifname} is missing in the pod's namespace")),
            Some(link) => {
                if !link.up {
                    problems.push(format!("{ifname} is down"));
                }
                let have = netlink::addresses(&in_pod, link.index).await?;
                for (addr, prefix, gw) in &ips {
                    if !have.contains(&(*addr, *prefix)) {
                        problems.push(format!("{ifname} lacks {addr}/{prefix}"));
                    }
                    let routes = netlink::routes(&in_pod, addr.is_ipv6()).await?;
                    if !routes.iter().any(|r| {
                        r.prefix == 0 && r.gateway == Some(*gw) && r.oif == Some(link.index)
                    }) {
                        problems.push(format!("default route via {gw} dev {ifname} is missing"));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PluginError::CheckFailed(problems.join("; ")))
        }
    })
}

/// STATUS: success when the agent is reachable, ready to serve ADD, and every pod CIDR has a free
/// address (SPEC 1.1: "if a plugin has a limited number of resources (e.g. IP addresses ...), it
/// should return an error if those resources are exhausted and no new ADD requests can be
/// serviced").
pub fn status(conf: &NetConf) -> Result<(), PluginError> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut client = agent::connect(&conf.agent_socket(), agent::CALL_LIMIT)
            .await
            .map_err(|e| PluginError::NotReady {
                reason: e.to_string(),
            })?;
        let reply = client
            .status(request(StatusRequest {}, RPC_TIMEOUT))
            .await
            .map_err(|s| PluginError::NotReady {
                reason: format!("Status failed: {}", s.message()),
            })?
            .into_inner();
        if !reply.ready {
            return Err(PluginError::NotReady {
                reason: reply.reason,
            });
        }
        match reply.pod_cidrs.iter().find(|p| p.allocated >= p.usable) {
            Some(full) => Err(PluginError::PoolExhausted {
                cidr: full.cidr.clone(),
                usable: full.usable,
            }),
            None => Ok(()),
        }
    })
}

/// GC: the agent releases every attachment not listed; here, every Weir host veth that does not
/// belong to a listed attachment is deleted (including those of ADDs killed halfway).
pub fn gc(conf: &NetConf) -> Result<String, PluginError> {
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let keep: HashSet<String> = valid
        .iter()
        .map(|a| naming::host_veth_name(&a.container_id, &a.ifname))
        .collect();
    let rt = runtime()?;
    rt.block_on(async {
        let handle = netlink::connect()?;
        let mut deleted = Vec::new();
        for name in netlink::link_names(&handle).await? {
            if naming::is_host_veth_name(&name)
                && !keep.contains(&name)
                && netlink::delete_link(&handle, &name).await?
            {
                deleted.push(name);
            }
        }
        let socket: &Path = &conf.agent_socket();
        let mut client = agent::connect(socket, agent::CALL_LIMIT).await?;
        let reply = client
            .garbage_collect(request(
                GarbageCollectRequest {
                    valid_attachments: valid
                        .iter()
                        .map(|a| Attachment {
                            container_id: a.container_id.clone(),
                            ifname: a.ifname.clone(),
                        })
                        .collect(),
                },
                RPC_TIMEOUT,
            ))
            .await
            .map_err(|s| PluginError::from_status("GarbageCollect", s))?
            .into_inner();
        Ok(format!(
            "released {} attachment(s), deleted veths {deleted:?}",
            reply.released.len()
        ))
    })
}
