//! The `weir.agent.v1.Agent` service: IPAM plus the runtime's [`EndpointBackend`].

use std::{collections::HashSet, net::IpAddr, sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use weir_policy::model::ObjectKey;
use weir_proto::{
    agent::v1::{
        ActivateEndpointReply, ActivateEndpointRequest, AllocateEndpointReply,
        AllocateEndpointRequest, Attachment, CheckEndpointReply, CheckEndpointRequest,
        GarbageCollectReply, GarbageCollectRequest, IpConfig, PodCidrUsage, PodRef,
        ReleaseEndpointReply, ReleaseEndpointRequest, ReleasedEndpoint, StatusReply, StatusRequest,
        agent_server::Agent,
    },
    gateway::pod_gateway,
    naming,
};

use super::{ApiConfig, MAX_POD_WAIT};
use crate::{
    endpoints::{EndpointBackend, EndpointError, LocalEndpoint},
    ipam::{Allocation, Ipam, IpamError},
};

/// The gRPC service. Construct it through [`super::serve`] or, for embedding in another tonic
/// server, [`AgentService::new`].
pub struct AgentService {
    config: ApiConfig,
    backend: Arc<dyn EndpointBackend>,
    ipam: Arc<Ipam>,
}

impl AgentService {
    pub fn new(config: ApiConfig, backend: Arc<dyn EndpointBackend>, ipam: Arc<Ipam>) -> Self {
        AgentService {
            config,
            backend,
            ipam,
        }
    }

    async fn ipam<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ipam) -> Result<T, IpamError> + Send + 'static,
    ) -> Result<T, Status> {
        let ipam = self.ipam.clone();
        tokio::task::spawn_blocking(move || f(&ipam))
            .await
            .map_err(|e| Status::internal(format!("the IPAM task failed: {e}")))?
            .map_err(ipam_status)
    }
}

fn endpoint_status(e: EndpointError) -> Status {
    let msg = e.to_string();
    match e {
        EndpointError::PodUnknown { .. } | EndpointError::NotReady(_) => Status::unavailable(msg),
        EndpointError::Datapath { .. } => Status::internal(msg),
    }
}

fn ipam_status(e: IpamError) -> Status {
    let msg = error_chain(&e);
    match e {
        IpamError::Exhausted { .. } => Status::resource_exhausted(msg),
        IpamError::AlreadyAllocated { .. } => Status::already_exists(msg),
        _ => Status::internal(msg),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn attachment(a: Option<&Attachment>) -> Result<(String, String), Status> {
    let a = a.ok_or_else(|| Status::invalid_argument("attachment is required"))?;
    if a.container_id.is_empty() || a.ifname.is_empty() {
        return Err(Status::invalid_argument(
            "attachment needs a container_id and an ifname",
        ));
    }
    Ok((a.container_id.clone(), a.ifname.clone()))
}

fn pod_key(p: Option<&PodRef>) -> Result<ObjectKey, Status> {
    let p = p.ok_or_else(|| Status::invalid_argument("pod is required"))?;
    if p.namespace.is_empty() || p.name.is_empty() {
        return Err(Status::invalid_argument("pod needs a namespace and a name"));
    }
    Ok(ObjectKey {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
    })
}

fn ip_configs(addresses: &[IpAddr]) -> Vec<IpConfig> {
    addresses
        .iter()
        .map(|a| IpConfig {
            address: format!("{a}/{}", if a.is_ipv4() { 32 } else { 128 }),
            gateway: pod_gateway(a).to_string(),
        })
        .collect()
}

fn released(a: Allocation) -> ReleasedEndpoint {
    ReleasedEndpoint {
        attachment: Some(Attachment {
            container_id: a.container_id,
            ifname: a.ifname,
        }),
        host_ifname: a.host_ifname,
        addresses: a.addresses.iter().map(ToString::to_string).collect(),
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let (ready, reason) = match self.backend.readiness() {
            Ok(()) => (true, String::new()),
            Err(reason) => (false, reason),
        };
        let pod_cidrs = self
            .ipam(|ipam| ipam.usage())
            .await?
            .into_iter()
            .map(|u| PodCidrUsage {
                cidr: u.cidr.to_string(),
                usable: u64::try_from(u.usable).unwrap_or(u64::MAX),
                allocated: u64::try_from(u.allocated).unwrap_or(u64::MAX),
            })
            .collect();
        Ok(Response::new(StatusReply {
            ready,
            reason,
            node_name: self.config.node_name.clone(),
            pod_cidrs,
        }))
    }

    async fn allocate_endpoint(
        &self,
        request: Request<AllocateEndpointRequest>,
    ) -> Result<Response<AllocateEndpointReply>, Status> {
        let req = request.into_inner();
        let (container_id, ifname) = attachment(req.attachment.as_ref())?;
        crate::metrics::metrics().add_started(&container_id, &ifname);
        let pod = pod_key(req.pod.as_ref())?;
        let wait = match req.pod_wait_ms {
            0 => self.config.default_pod_wait,
            ms => Duration::from_millis(ms.into()).min(MAX_POD_WAIT),
        };
        // A second ADD of a live attachment fails at once, before any wait, and changes nothing.
        let (cid, ifn) = (container_id.clone(), ifname.clone());
        if let Some(a) = self.ipam(move |ipam| ipam.get(&cid, &ifn)).await? {
            return Err(ipam_status(IpamError::AlreadyAllocated {
                container_id,
                ifname,
                addresses: a.addresses,
                host_ifname: a.host_ifname,
            }));
        }
        self.backend
            .readiness()
            .map_err(EndpointError::NotReady)
            .map_err(endpoint_status)?;
        self.backend
            .wait_for_pod(&pod, wait)
            .await
            .map_err(endpoint_status)?;
        let host_ifname = naming::host_veth_name(&container_id, &ifname);
        let (cid, ifn, host) = (container_id.clone(), ifname.clone(), host_ifname.clone());
        let allocation = self
            .ipam(move |ipam| ipam.allocate(&cid, &ifn, &pod, &host))
            .await?;
        tracing::info!(
            container_id, ifname, pod = %allocation.pod, addresses = ?allocation.addresses,
            netns = req.netns, "endpoint allocated"
        );
        Ok(Response::new(AllocateEndpointReply {
            ips: ip_configs(&allocation.addresses),
            host_ifname,
        }))
    }

    async fn activate_endpoint(
        &self,
        request: Request<ActivateEndpointRequest>,
    ) -> Result<Response<ActivateEndpointReply>, Status> {
        let req = request.into_inner();
        let (container_id, ifname) = attachment(req.attachment.as_ref())?;
        let pod = pod_key(req.pod.as_ref())?;
        let addresses = req
            .addresses
            .iter()
            .map(|a| {
                a.parse::<IpAddr>()
                    .map_err(|e| Status::invalid_argument(format!("address {a:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (cid, ifn) = (container_id.clone(), ifname.clone());
        let allocation = self.ipam(move |ipam| ipam.get(&cid, &ifn)).await?;
        // The allocation must still be there (a restarted agent may have reconciled it away
        // while the plugin was wiring); otherwise the addresses may belong to someone else.
        match allocation {
            Some(a) if a.addresses == addresses && a.host_ifname == req.host_ifname => {}
            Some(a) => {
                return Err(Status::failed_precondition(format!(
                    "attachment {container_id}/{ifname} holds {:?} on {}, not {addresses:?} on {}; redo the ADD",
                    a.addresses, a.host_ifname, req.host_ifname
                )));
            }
            None => {
                return Err(Status::failed_precondition(format!(
                    "attachment {container_id}/{ifname} has no allocation (released meanwhile); redo the ADD"
                )));
            }
        }
        let endpoint = LocalEndpoint {
            container_id,
            ifname,
            pod,
            host_ifname: req.host_ifname,
            addresses,
        };
        tracing::info!(?endpoint, "activating endpoint");
        let (cid, ifn) = (endpoint.container_id.clone(), endpoint.ifname.clone());
        self.backend
            .activate(endpoint)
            .await
            .map_err(endpoint_status)?;
        crate::metrics::metrics().add_finished(&cid, &ifn);
        Ok(Response::new(ActivateEndpointReply {}))
    }

    async fn release_endpoint(
        &self,
        request: Request<ReleaseEndpointRequest>,
    ) -> Result<Response<ReleaseEndpointReply>, Status> {
        let started = std::time::Instant::now();
        let (container_id, ifname) = attachment(request.get_ref().attachment.as_ref())?;
        // Enforcement first: an address is never free while the datapath still names it.
        self.backend
            .deactivate(&container_id, &ifname)
            .await
            .map_err(endpoint_status)?;
        let (cid, ifn) = (container_id.clone(), ifname.clone());
        let removed = self.ipam(move |ipam| ipam.release(&cid, &ifn)).await?;
        crate::metrics::metrics().del_finished(
            &container_id,
            &ifname,
            started.elapsed().as_secs_f64(),
        );
        tracing::info!(container_id, ifname, released = ?removed.as_ref().map(|a| &a.addresses), "endpoint released");
        Ok(Response::new(ReleaseEndpointReply {
            released: removed.is_some(),
            addresses: removed
                .map(|a| a.addresses.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
        }))
    }

    async fn garbage_collect(
        &self,
        request: Request<GarbageCollectRequest>,
    ) -> Result<Response<GarbageCollectReply>, Status> {
        let valid: HashSet<(String, String)> = request
            .into_inner()
            .valid_attachments
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect();
        let allocations = self.ipam(|ipam| ipam.allocations()).await?;
        let mut out = Vec::new();
        for a in allocations {
            if valid.contains(&(a.container_id.clone(), a.ifname.clone())) {
                continue;
            }
            self.backend
                .deactivate(&a.container_id, &a.ifname)
                .await
                .map_err(endpoint_status)?;
            let (cid, ifn) = (a.container_id.clone(), a.ifname.clone());
            if let Some(removed) = self.ipam(move |ipam| ipam.release(&cid, &ifn)).await? {
                tracing::info!(container_id = removed.container_id, ifname = removed.ifname,
                    addresses = ?removed.addresses, "garbage-collected endpoint");
                out.push(released(removed));
            }
        }
        Ok(Response::new(GarbageCollectReply { released: out }))
    }

    async fn check_endpoint(
        &self,
        request: Request<CheckEndpointRequest>,
    ) -> Result<Response<CheckEndpointReply>, Status> {
        let (container_id, ifname) = attachment(request.get_ref().attachment.as_ref())?;
        let (cid, ifn) = (container_id.clone(), ifname.clone());
        let Some(a) = self.ipam(move |ipam| ipam.get(&cid, &ifn)).await? else {
            return Ok(Response::new(CheckEndpointReply::default()));
        };
        Ok(Response::new(CheckEndpointReply {
            known: true,
            enforced: self.backend.is_enforced(&container_id, &ifname).await,
            ips: ip_configs(&a.addresses),
            host_ifname: a.host_ifname,
            pod: Some(PodRef {
                namespace: a.pod.namespace,
                name: a.pod.name,
                uid: String::new(),
            }),
        }))
    }
}
