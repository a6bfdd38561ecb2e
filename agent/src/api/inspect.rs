//! The `weir.agent.v1.Inspect` service: read-only views of the runtime for the `weir` CLI.
//! Every call copies what it needs on the reconcile task (between two rounds) and builds its
//! answer outside it.

use std::{collections::BTreeMap, net::IpAddr, pin::Pin, sync::Arc};

use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use weir_common::{
    COUNTER_EVENTS_LOST, DIR_EGRESS, DIR_INGRESS, FIRST_COUNTER_SLOT, IDENTITY_FIRST_CIDR,
    IDENTITY_FIRST_POD, IDENTITY_LOCAL_MASK,
};
use weir_policy::{
    explain::{ExplainError, PortProto, Scenario, explain_side, identity_name, rule_ref},
    model::ObjectKey,
    output::Compiled,
};
use weir_proto::agent::v1::{
    DirectionPolicy, EndpointInfo, EnforcedRule, ExplainReply, ExplainRequest, FlowRecord,
    FlowsRequest, IdentityInfo, ListEndpointsReply, ListEndpointsRequest, ListIdentitiesReply,
    ListIdentitiesRequest, MapUsage, OverviewReply, OverviewRequest, PodPolicyReply,
    PodPolicyRequest, ReasonCount, RejectedPolicy, inspect_server::Inspect,
};

use crate::{
    flows::{self, reason_name},
    runtime::{Runtime, RuntimeView, Stopped},
};

pub struct InspectService {
    runtime: Arc<Runtime>,
    mesh: Option<Arc<crate::mesh::Mesh>>,
}

impl InspectService {
    pub fn new(runtime: Arc<Runtime>) -> Self {
        Self {
            runtime,
            mesh: None,
        }
    }

    /// Overview shows the mesh role's peers too.
    pub fn with_mesh(mut self, mesh: Arc<crate::mesh::Mesh>) -> Self {
        self.mesh = Some(mesh);
        self
    }
}

/// Local pods by key, with their enforced identity.
fn local_pods(c: &Compiled) -> BTreeMap<&ObjectKey, u32> {
    c.local_addresses
        .values()
        .map(|(key, id)| (key, *id))
        .collect()
}

fn stopped(e: Stopped) -> Status {
    Status::unavailable(e.to_string())
}

fn not_ready(view: &RuntimeView<'_>) -> Result<(), Status> {
    if view.cluster_read {
        Ok(())
    } else {
        Err(Status::unavailable(
            "the agent has not read the cluster state yet; try again in a moment",
        ))
    }
}

fn explain_status(e: ExplainError) -> Status {
    match e {
        ExplainError::UnknownPod { .. }
        | ExplainError::HostNetwork { .. }
        | ExplainError::Terminated { .. } => Status::not_found(e.to_string()),
        ExplainError::Compile(_) => Status::internal(e.to_string()),
        ExplainError::NotAPodName { .. } | ExplainError::NoCommonFamily { .. } => {
            Status::invalid_argument(e.to_string())
        }
    }
}

fn flow_message(r: flows::FlowRecord) -> FlowRecord {
    FlowRecord {
        time_ms: r.time_ms,
        verdict: r.verdict,
        reason: r.reason,
        direction: r.direction,
        endpoint: r.endpoint.unwrap_or_default(),
        src: r.src.to_string(),
        dst: r.dst.to_string(),
        sport: u32::from(r.sport),
        dport: u32::from(r.dport),
        proto: r.proto,
        peer: r.peer,
        policies: r.policies,
        rule: r.rule.unwrap_or_default(),
    }
}

/// Which flow records a request wants.
struct FlowFilter {
    pod: String,
    namespace: String,
    verdict: String,
    since_ms: u64,
}

impl FlowFilter {
    fn new(req: &FlowsRequest) -> Result<Self, Status> {
        if !matches!(req.verdict.as_str(), "" | "allow" | "drop") {
            return Err(Status::invalid_argument(format!(
                "verdict {:?}: use allow or drop (or leave it empty for both)",
                req.verdict
            )));
        }
        Ok(Self {
            pod: req.pod.clone(),
            namespace: req.namespace.clone(),
            verdict: req.verdict.clone(),
            since_ms: req.since_ms,
        })
    }

    fn matches(&self, r: &flows::FlowRecord) -> bool {
        let endpoint = r.endpoint.as_deref().unwrap_or("");
        (self.pod.is_empty() || endpoint == self.pod)
            && (self.namespace.is_empty()
                || endpoint
                    .split_once('/')
                    .is_some_and(|(ns, _)| ns == self.namespace))
            && (self.verdict.is_empty() || r.verdict == self.verdict)
            && r.time_ms >= self.since_ms
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<FlowRecord, Status>> + Send>>;

#[tonic::async_trait]
impl Inspect for InspectService {
    async fn overview(
        &self,
        _request: Request<OverviewRequest>,
    ) -> Result<Response<OverviewReply>, Status> {
        let mut reply = self
            .runtime
            .view(move |v| {
                let (enforcement, reason) = match (v.cluster_read, v.degraded) {
                    (false, _) => ("starting", "the cluster state has not been read yet"),
                    (true, Some(why)) => ("degraded", why),
                    (true, None) => ("enforcing", ""),
                };
                let rejected_policies: std::collections::BTreeSet<&ObjectKey> =
                    v.compiled.rejections.iter().map(|r| &r.policy).collect();
                let policies = v.input.state.policies.len();
                let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                let packets = v
                    .counters
                    .iter()
                    .enumerate()
                    .filter(|(slot, n)| {
                        // Reasons only: the slots above them count paths, lost and throttled
                        // events.
                        **n > 0 && (*slot as u32) < FIRST_COUNTER_SLOT
                    })
                    .map(|(slot, n)| {
                        let reason = slot as u8;
                        ReasonCount {
                            reason: reason_name(reason).to_owned(),
                            verdict: if reason >= weir_common::REASON_POLICY_DENIED {
                                "drop"
                            } else {
                                "allow"
                            }
                            .to_owned(),
                            packets: *n,
                        }
                    })
                    .collect();
                OverviewReply {
                    node_name: v.node_name.to_owned(),
                    enforcement: enforcement.to_owned(),
                    reason: reason.to_owned(),
                    generation: v.generation,
                    applied_generation: v.applied.generation,
                    applied_fingerprint: v.applied.fingerprint.clone(),
                    endpoints: count(v.endpoints.len()),
                    policies: count(policies),
                    policies_enforced: count(policies.saturating_sub(rejected_policies.len())),
                    rejected: v
                        .compiled
                        .rejections
                        .iter()
                        .map(|r| RejectedPolicy {
                            policy: r.policy.to_string(),
                            field: r.field.clone(),
                            reason: r.reason.clone(),
                        })
                        .collect(),
                    maps: v
                        .map_usage
                        .iter()
                        .map(|(name, entries, capacity)| MapUsage {
                            name: (*name).to_owned(),
                            entries: *entries,
                            capacity: *capacity,
                        })
                        .collect(),
                    events_lost: v
                        .counters
                        .get(COUNTER_EVENTS_LOST as usize)
                        .copied()
                        .unwrap_or(0),
                    packets,
                    mesh_role: String::new(),
                    mesh_peers: Vec::new(),
                }
            })
            .await
            .map_err(stopped)?;
        if let Some(mesh) = &self.mesh {
            let status = mesh.status();
            reply.mesh_role = status.role.to_owned();
            reply.mesh_peers = status
                .peers
                .into_iter()
                .map(|p| weir_proto::agent::v1::MeshPeerStatus {
                    peer: p.peer,
                    connected: p.connected,
                    synced: p.synced,
                    imported_identities: p.imported_identities,
                    imported_endpoints: p.imported_endpoints,
                    refusals: p
                        .refusals
                        .into_iter()
                        .map(|(reason, count)| weir_proto::agent::v1::MeshRefusal {
                            reason: reason.to_owned(),
                            count,
                        })
                        .collect(),
                })
                .collect();
        }
        Ok(Response::new(reply))
    }

    async fn list_endpoints(
        &self,
        _request: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsReply>, Status> {
        let endpoints = self
            .runtime
            .view(move |v| {
                let mut out: Vec<EndpointInfo> = v
                    .endpoints
                    .iter()
                    .map(|e| {
                        let identity = e
                            .addresses
                            .iter()
                            .find_map(|a| v.compiled.local_addresses.get(a))
                            .map_or(0, |(_, id)| *id);
                        EndpointInfo {
                            pod: e.pod.to_string(),
                            container_id: e.container_id.clone(),
                            ifname: e.ifname.clone(),
                            host_ifname: e.host_ifname.clone(),
                            addresses: e.addresses.iter().map(ToString::to_string).collect(),
                            identity,
                            identity_name: if identity == 0 {
                                String::new()
                            } else {
                                identity_name(v.compiled, identity)
                            },
                            labels: v
                                .input
                                .state
                                .pods
                                .get(&e.pod)
                                .map(|p| p.metadata.labels.clone().into_iter().collect())
                                .unwrap_or_default(),
                        }
                    })
                    .collect();
                out.sort_by(|a, b| (&a.pod, &a.ifname).cmp(&(&b.pod, &b.ifname)));
                out
            })
            .await
            .map_err(stopped)?;
        Ok(Response::new(ListEndpointsReply { endpoints }))
    }

    async fn list_identities(
        &self,
        _request: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesReply>, Status> {
        let identities = self
            .runtime
            .view(move |v| {
                let c = v.compiled;
                let mut local: BTreeMap<u32, Vec<String>> = BTreeMap::new();
                for (key, id) in local_pods(c) {
                    local.entry(id).or_default().push(key.to_string());
                }
                let mut addresses: BTreeMap<u32, Vec<String>> = BTreeMap::new();
                for (net, id) in c.ipcache.iter().chain(c.cidr_identities.iter()) {
                    let text = if net.prefix_len() == net.max_prefix_len() {
                        net.addr().to_string()
                    } else {
                        net.to_string()
                    };
                    addresses.entry(*id).or_default().push(text);
                }
                c.identity_names
                    .iter()
                    .map(|(id, name)| {
                        let local_id = id & IDENTITY_LOCAL_MASK;
                        let kind = if local_id < IDENTITY_FIRST_POD {
                            "reserved"
                        } else if local_id >= IDENTITY_FIRST_CIDR {
                            "cidr"
                        } else {
                            "pod"
                        };
                        IdentityInfo {
                            id: *id,
                            kind: kind.to_owned(),
                            name: name.clone(),
                            local_pods: local.remove(id).unwrap_or_default(),
                            addresses: addresses.remove(id).unwrap_or_default(),
                        }
                    })
                    .collect()
            })
            .await
            .map_err(stopped)?;
        Ok(Response::new(ListIdentitiesReply { identities }))
    }

    async fn pod_policy(
        &self,
        request: Request<PodPolicyRequest>,
    ) -> Result<Response<PodPolicyReply>, Status> {
        let pod = request.into_inner().pod;
        let (ns, name) = pod.split_once('/').ok_or_else(|| {
            Status::invalid_argument(format!("{pod:?} is not a pod; write it as namespace/name"))
        })?;
        let key = ObjectKey::new(ns, name);
        let reply = self.runtime.view(move |v| {
            not_ready(v)?;
            let c = v.compiled;
            let locals = local_pods(c);
            let Some(&identity) = locals.get(&key) else {
                let known: Vec<String> = locals.keys().map(|k| k.to_string()).collect();
                let elsewhere = v.input.state.pods.get(&key).map(|p| {
                    p.spec.node_name.clone().unwrap_or_else(|| "no node yet".to_owned())
                });
                return Err(Status::not_found(match elsewhere {
                    Some(node) => format!(
                        "pod {key} is not enforced on node {} (its spec.nodeName: {node}); ask that node's agent. Pods enforced here: {}",
                        v.node_name,
                        known.join(", ")
                    ),
                    None => format!(
                        "no pod {key}; pods enforced on node {}: {}",
                        v.node_name,
                        known.join(", ")
                    ),
                }));
            };
            let rules = c.subjects.get(&identity);
            let direction = |dir: u8| {
                let name = if dir == DIR_EGRESS { "egress" } else { "ingress" };
                let (isolated, selected_by) = match rules {
                    Some(r) if dir == DIR_EGRESS => (r.isolated_egress, &r.selected_by_egress),
                    Some(r) => (r.isolated_ingress, &r.selected_by_ingress),
                    None => return DirectionPolicy {
                        direction: name.to_owned(),
                        ..Default::default()
                    },
                };
                DirectionPolicy {
                    direction: name.to_owned(),
                    isolated,
                    selected_by: selected_by.iter().map(ToString::to_string).collect(),
                    rules: rules
                        .into_iter()
                        .flat_map(|r| r.rules.iter())
                        .filter(|(m, _)| m.direction == dir)
                        .map(|(m, id)| {
                            let r = rule_ref(c, m, *id);
                            EnforcedRule {
                                rule: r.name,
                                id: r.id,
                                peer: r.peer,
                                ports: r.ports,
                            }
                        })
                        .collect(),
                }
            };
            Ok(PodPolicyReply {
                pod: key.to_string(),
                identity,
                identity_name: identity_name(c, identity),
                ingress: Some(direction(DIR_INGRESS)),
                egress: Some(direction(DIR_EGRESS)),
            })
        })
        .await
        .map_err(stopped)??;
        Ok(Response::new(reply))
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainReply>, Status> {
        let req = request.into_inner();
        let port: PortProto = format!("{}/{}", req.port, req.protocol).parse().map_err(
            |e: weir_policy::explain::PortProtoError| Status::invalid_argument(e.to_string()),
        )?;
        // Copy the inputs under the lock; compile the scenario outside it.
        let (state, known, identities, compiled, node) = self
            .runtime
            .view(move |v| {
                not_ready(v)?;
                Ok::<_, Status>((
                    v.input.state.clone(),
                    v.input.local_endpoints.clone(),
                    v.identities.clone(),
                    v.compiled.clone(),
                    v.node_name.to_owned(),
                ))
            })
            .await
            .map_err(stopped)??;
        let reply = tokio::task::spawn_blocking(move || {
            let scenario = Scenario::with(state, &known, identities).map_err(explain_status)?;
            let mut e = scenario
                .explain(&req.source, &req.destination, port)
                .map_err(explain_status)?;
            let locals = local_pods(&compiled);
            let enforced = |pod: &str| {
                let (ns, name) = pod.split_once('/')?;
                locals.get(&ObjectKey::new(ns, name)).copied()
            };
            let elsewhere = "compiled on this node for the pod's own node (the pod runs elsewhere)";
            let here = format!("enforced on node {node}");
            let (src_addr, dst_addr): (IpAddr, IpAddr) = (e.source.address, e.destination.address);
            e.egress = match enforced(&e.source.pod) {
                Some(id) => explain_side(&compiled, &e.source.pod, id, DIR_EGRESS, dst_addr, port),
                None => e.egress,
            };
            e.egress.basis = Some(if enforced(&e.source.pod).is_some() {
                here.clone()
            } else {
                elsewhere.to_owned()
            });
            e.ingress = match enforced(&e.destination.pod) {
                Some(id) => explain_side(
                    &compiled,
                    &e.destination.pod,
                    id,
                    DIR_INGRESS,
                    src_addr,
                    port,
                ),
                None => e.ingress,
            };
            e.ingress.basis = Some(if enforced(&e.destination.pod).is_some() {
                here
            } else {
                elsewhere.to_owned()
            });
            e.verdict = weir_policy::explain::Verdict::from_allowed(
                e.egress.verdict.allowed() && e.ingress.verdict.allowed(),
            );
            serde_json::to_string(&e)
                .map(|explanation_json| ExplainReply { explanation_json })
                .map_err(|err| Status::internal(format!("encoding the explanation: {err}")))
        })
        .await
        .map_err(|e| Status::internal(format!("the explain task failed: {e}")))??;
        Ok(Response::new(reply))
    }

    type FlowsStream = FlowStream;

    async fn flows(
        &self,
        request: Request<FlowsRequest>,
    ) -> Result<Response<Self::FlowsStream>, Status> {
        let req = request.into_inner();
        let filter = FlowFilter::new(&req)?;
        // Subscribe before reading the history, so nothing falls between the two; what lands
        // in both is sent once.
        let mut live = req.follow.then(|| self.runtime.flow_log().subscribe());
        let log = self.runtime.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let history = tokio::task::spawn_blocking(move || log.flow_log().history())
                .await
                .unwrap_or_default();
            let last_ms = history.last().map_or(0, |r| r.time_ms);
            let tail: Vec<flows::FlowRecord> = history
                .iter()
                .filter(|r| r.time_ms == last_ms)
                .cloned()
                .collect();
            for r in history.into_iter().filter(|r| filter.matches(r)) {
                if tx.send(Ok(flow_message(r))).await.is_err() {
                    return;
                }
            }
            let Some(live) = live.as_mut() else { return };
            loop {
                match live.recv().await {
                    Ok(r) => {
                        if r.time_ms < last_ms || (r.time_ms == last_ms && tail.contains(&r)) {
                            continue;
                        }
                        if filter.matches(&r) && tx.send(Ok(flow_message(r))).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        let lost = Status::data_loss(format!(
                            "{n} flow records were skipped: this follower fell behind; narrow it with --pod, --namespace or --verdict"
                        ));
                        let _ = tx.send(Err(lost)).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
