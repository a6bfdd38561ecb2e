//! The verbs: ADD, CHECK, DEL, STATUS, GC (VERSION is answered in `main`).

use std::{
    collections::HashSet,
    fs::File,
    net::IpAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use serde_json::Value;
use weir_proto::{
    agent::v1::{
        ActivateEndpointRequest, AllocateEndpointRequest, Attachment, CheckEndpointRequest,
        GarbageCollectRequest, PodRef, ReleaseEndpointRequest, StatusRequest,
    },
    naming,
};

use crate::{
    agent::{self, Client, request},
    config::{Env, NetConf},
    error::PluginError,
    netlink::{self, GATEWAY_V4, GATEWAY_V6},
    result::{self, Wired},
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
        "" if addr.is_ipv4() => GATEWAY_V4.into(),
        "" => GATEWAY_V6.into(),
        g => g
            .parse()
            .map_err(|_| bad(&format!("a malformed gateway {g:?}")))?,
    };
    Ok((addr, prefix, gateway))
}

pub fn add(conf: &NetConf, env: &Env) -> Result<Value, PluginError> {
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
                .map_err(|s| PluginError::from_status("AllocateEndpoint", s))?
                .into_inner();
            crate::log::mark("allocate");
            Ok::<_, PluginError>((client, reply))
        };
        let veth = async {
            // A veth of this name is left over from an ADD that died: it is ours, replace it.
            netlink::delete_link(&handle, &host_ifname).await?;
            let link =
                netlink::create_veth(&handle, &host_ifname, &env.ifname, &netns, conf.mtu())
                    .await?;
            crate::log::mark("veth");
            Ok::<_, PluginError>(link)
        };
        let (allocation, veth) = tokio::join!(allocation, veth);
        let (mut client, allocated) = match allocation {
            Ok(a) => a,
            Err(e) => {
                if veth.is_ok() {
                    let _ = netlink::delete_link(&handle, &host_ifname).await;
                }
                return Err(e);
            }
        };
        let outcome = async {
            let host = veth?;
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
                &conf.cni_version,
                &wired,
                conf.prev_result.as_ref(),
            )),
            Err(e) => {
                // Undo: no veth, no address left behind by a failed ADD.
                let _ = netlink::delete_link(&handle, &host_ifname).await;
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
        for gw in gateways {
            // The gateway is the host veth: no ARP/NDP, no proxy ARP needed.
            netlink::add_neighbour(&in_pod, link.index, gw, &host.mac, pod_ifname).await?;
            let default: IpAddr = if gw.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            };
            netlink::add_route(&in_pod, link.index, default, 0, Some(gw), pod_ifname).await?;
        }
        crate::log::mark("pod");
        Ok::<_, PluginError>(link)
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
    let (pod_link, activated) = tokio::join!(pod_side, activate);
    activated?;
    let pod_link = pod_link?;

    netlink::set_veth_up(handle, host.index, host_ifname).await?;
    if ips.iter().any(|(a, _, _)| a.is_ipv6()) {
        netlink::add_address(handle, host.index, GATEWAY_V6.into(), 64, host_ifname).await?;
    }
    for (addr, _, _) in ips {
        let full = if addr.is_ipv4() { 32 } else { 128 };
        netlink::add_route(handle, host.index, *addr, full, None, host_ifname).await?;
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
    })
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

/// STATUS: success when the agent is reachable and ready to serve ADD.
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
        if reply.ready {
            Ok(())
        } else {
            Err(PluginError::NotReady {
                reason: reply.reason,
            })
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
