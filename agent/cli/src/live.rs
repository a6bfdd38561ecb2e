//! Commands that ask a running agent, over its local gRPC API on a unix socket (the read-only
//! Inspect service). Each answer has a serde view: its JSON/YAML form is the stable interface.

use std::{collections::BTreeMap, io::Write as _, path::Path, time::Duration};

use serde::Serialize;
use tonic::transport::Channel;
use weir_policy::explain::{Explanation, PortProto};
use weir_proto::{
    agent::v1::{
        ExplainRequest, FlowsRequest, ListEndpointsRequest, ListIdentitiesRequest, OverviewRequest,
        PodPolicyRequest, inspect_client::InspectClient,
    },
    local_socket,
};

use crate::{
    error::CliError,
    explain,
    output::{Format, Style, encode, table},
};

/// How long any one call may take (not a followed stream).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a live command on a small runtime of its own.
pub fn block_on<T>(f: impl Future<Output = Result<T, CliError>>) -> Result<T, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Encode(format!("cannot start the async runtime: {e}")))?
        .block_on(f)
}

/// A client of the agent's Inspect service; connects once up front so that a missing agent is
/// reported with the socket and the OS error. `timeout` bounds each call (None: a stream that
/// may run as long as the user wants).
async fn client(
    socket: &Path,
    timeout: Option<Duration>,
) -> Result<InspectClient<Channel>, CliError> {
    let channel =
        local_socket::connect(socket, timeout)
            .await
            .map_err(|e| CliError::Unreachable {
                socket: socket.to_owned(),
                reason: e.to_string(),
            })?;
    Ok(InspectClient::new(channel))
}

fn render<T: Serialize>(
    format: Format,
    view: &T,
    table: impl FnOnce(&T, Style) -> String,
) -> Result<String, CliError> {
    match format {
        Format::Table => Ok(table(view, Style::detect())),
        _ => encode(format, view),
    }
}

// --- weir status -------------------------------------------------------------------------------

#[derive(Serialize)]
pub struct StatusView {
    pub node: String,
    /// enforcing, starting or degraded
    pub enforcement: String,
    pub reason: String,
    /// The config generation last written to the datapath.
    pub generation: u32,
    /// The cluster state last written: its generation and the source's fingerprint of it.
    pub applied_generation: u64,
    pub applied_fingerprint: String,
    pub endpoints: u32,
    pub policies: u32,
    pub policies_enforced: u32,
    pub rejected: Vec<RejectedView>,
    pub maps: Vec<MapView>,
    pub events_lost: u64,
    pub packets: Vec<PacketsView>,
    /// "gateway" or "node"; empty without a mesh role.
    pub mesh_role: String,
    pub mesh_peers: Vec<MeshPeerView>,
}

#[derive(Serialize)]
pub struct MeshPeerView {
    pub peer: String,
    pub connected: bool,
    pub synced: bool,
    pub imported_identities: u64,
    pub imported_endpoints: u64,
    /// Refusals by reason.
    pub refusals: std::collections::BTreeMap<String, u64>,
}

#[derive(Serialize)]
pub struct RejectedView {
    pub policy: String,
    pub field: String,
    pub reason: String,
}

#[derive(Serialize)]
pub struct MapView {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Serialize)]
pub struct PacketsView {
    pub reason: String,
    pub verdict: String,
    pub packets: u64,
}

pub async fn status(socket: &Path, format: Format) -> Result<String, CliError> {
    let r = client(socket, Some(CALL_TIMEOUT))
        .await?
        .overview(OverviewRequest {})
        .await?
        .into_inner();
    let view = StatusView {
        node: r.node_name,
        enforcement: r.enforcement,
        reason: r.reason,
        generation: r.generation,
        applied_generation: r.applied_generation,
        applied_fingerprint: r.applied_fingerprint,
        endpoints: r.endpoints,
        policies: r.policies,
        policies_enforced: r.policies_enforced,
        rejected: r
            .rejected
            .into_iter()
            .map(|x| RejectedView {
                policy: x.policy,
                field: x.field,
                reason: x.reason,
            })
            .collect(),
        maps: r
            .maps
            .into_iter()
            .map(|m| MapView {
                name: m.name,
                entries: m.entries,
                capacity: m.capacity,
            })
            .collect(),
        events_lost: r.events_lost,
        packets: r
            .packets
            .into_iter()
            .map(|p| PacketsView {
                reason: p.reason,
                verdict: p.verdict,
                packets: p.packets,
            })
            .collect(),
        mesh_role: r.mesh_role,
        mesh_peers: r
            .mesh_peers
            .into_iter()
            .map(|p| MeshPeerView {
                peer: p.peer,
                connected: p.connected,
                synced: p.synced,
                imported_identities: p.imported_identities,
                imported_endpoints: p.imported_endpoints,
                refusals: p
                    .refusals
                    .into_iter()
                    .map(|r| (r.reason, r.count))
                    .collect(),
            })
            .collect(),
    };
    render(format, &view, |v, style| {
        let state = match v.enforcement.as_str() {
            "enforcing" => style.good("enforcing"),
            other => style.bad(other),
        };
        let mut out = format!("node {}: {state} (generation {})\n", v.node, v.generation);
        if !v.reason.is_empty() {
            out.push_str(&format!("  {}\n", v.reason));
        }
        out.push_str(&format!(
            "applied cluster state: generation {}",
            v.applied_generation
        ));
        if !v.applied_fingerprint.is_empty() {
            out.push_str(&format!(" (source fingerprint {})", v.applied_fingerprint));
        }
        out.push('\n');
        out.push_str(&format!(
            "endpoints: {}\npolicies: {} ({} enforced, {} rejected)\n",
            v.endpoints,
            v.policies,
            v.policies_enforced,
            v.policies - v.policies_enforced.min(v.policies)
        ));
        for r in &v.rejected {
            out.push_str(&format!(
                "  {} {} {}: {}\n",
                style.bad("rejected"),
                r.policy,
                r.field,
                r.reason
            ));
        }
        let rows: Vec<Vec<String>> = v
            .maps
            .iter()
            .map(|m| {
                let pct = if m.capacity == 0 {
                    0.0
                } else {
                    m.entries as f64 * 100.0 / m.capacity as f64
                };
                vec![
                    m.name.clone(),
                    m.entries.to_string(),
                    m.capacity.to_string(),
                    format!("{pct:.1}%"),
                ]
            })
            .collect();
        out.push_str("\nmaps:\n");
        out.push_str(&indent(&table(
            &["MAP", "ENTRIES", "CAPACITY", "USED"],
            &rows,
        )));
        out.push_str(&format!(
            "\nevents lost (ring buffer full): {}\n",
            v.events_lost
        ));
        if !v.packets.is_empty() {
            let rows: Vec<Vec<String>> = v
                .packets
                .iter()
                .map(|p| vec![p.verdict.clone(), p.reason.clone(), p.packets.to_string()])
                .collect();
            out.push_str("packets judged:\n");
            out.push_str(&indent(&table(&["VERDICT", "REASON", "PACKETS"], &rows)));
        }
        if !v.mesh_peers.is_empty() {
            let yes_no = |b: bool| {
                if b {
                    style.good("yes")
                } else {
                    style.bad("no")
                }
            };
            let rows: Vec<Vec<String>> = v
                .mesh_peers
                .iter()
                .map(|p| {
                    let refusals = if p.refusals.is_empty() {
                        "-".to_owned()
                    } else {
                        p.refusals
                            .iter()
                            .map(|(reason, n)| format!("{reason}={n}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    vec![
                        p.peer.clone(),
                        yes_no(p.connected),
                        yes_no(p.synced),
                        p.imported_identities.to_string(),
                        p.imported_endpoints.to_string(),
                        refusals,
                    ]
                })
                .collect();
            out.push_str(&format!("mesh peers ({}):\n", v.mesh_role));
            out.push_str(&indent(&table(
                &[
                    "PEER",
                    "CONNECTED",
                    "SYNCED",
                    "IDENTITIES",
                    "ENDPOINTS",
                    "REFUSALS",
                ],
                &rows,
            )));
        }
        out
    })
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

// --- weir endpoints ----------------------------------------------------------------------------

#[derive(Serialize)]
pub struct EndpointView {
    pub pod: String,
    pub addresses: Vec<String>,
    pub identity: u32,
    pub identity_name: String,
    pub labels: BTreeMap<String, String>,
    pub host_ifname: String,
    pub container_id: String,
    pub ifname: String,
}

pub async fn endpoints(socket: &Path, format: Format) -> Result<String, CliError> {
    let r = client(socket, Some(CALL_TIMEOUT))
        .await?
        .list_endpoints(ListEndpointsRequest {})
        .await?
        .into_inner();
    let view: Vec<EndpointView> = r
        .endpoints
        .into_iter()
        .map(|e| EndpointView {
            pod: e.pod,
            addresses: e.addresses,
            identity: e.identity,
            identity_name: e.identity_name,
            labels: e.labels.into_iter().collect(),
            host_ifname: e.host_ifname,
            container_id: e.container_id,
            ifname: e.ifname,
        })
        .collect();
    render(format, &view, |v, _| {
        let rows: Vec<Vec<String>> = v
            .iter()
            .map(|e| {
                vec![
                    e.pod.clone(),
                    e.addresses.join(","),
                    if e.identity == 0 {
                        "-".to_owned()
                    } else {
                        e.identity.to_string()
                    },
                    e.host_ifname.clone(),
                    labels(&e.labels),
                ]
            })
            .collect();
        table(&["POD", "ADDRESSES", "IDENTITY", "VETH", "LABELS"], &rows)
    })
}

fn labels(l: &BTreeMap<String, String>) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

// --- weir identities ---------------------------------------------------------------------------

#[derive(Serialize)]
pub struct IdentityView {
    pub id: u32,
    pub kind: String,
    pub name: String,
    pub local_pods: Vec<String>,
    pub addresses: Vec<String>,
}

pub async fn identities(socket: &Path, format: Format) -> Result<String, CliError> {
    let r = client(socket, Some(CALL_TIMEOUT))
        .await?
        .list_identities(ListIdentitiesRequest {})
        .await?
        .into_inner();
    let view: Vec<IdentityView> = r
        .identities
        .into_iter()
        .map(|i| IdentityView {
            id: i.id,
            kind: i.kind,
            name: i.name,
            local_pods: i.local_pods,
            addresses: i.addresses,
        })
        .collect();
    render(format, &view, |v, _| {
        let rows: Vec<Vec<String>> = v
            .iter()
            .map(|i| {
                vec![
                    i.id.to_string(),
                    i.kind.clone(),
                    i.name.clone(),
                    i.local_pods.join(","),
                    i.addresses.join(","),
                ]
            })
            .collect();
        table(&["ID", "KIND", "NAME", "LOCAL PODS", "ADDRESSES"], &rows)
    })
}

// --- weir policy POD ---------------------------------------------------------------------------

#[derive(Serialize)]
pub struct PodPolicyView {
    pub pod: String,
    pub identity: u32,
    pub identity_name: String,
    pub ingress: DirectionView,
    pub egress: DirectionView,
}

#[derive(Serialize)]
pub struct DirectionView {
    pub isolated: bool,
    pub selected_by: Vec<String>,
    pub rules: Vec<RuleView>,
}

#[derive(Serialize)]
pub struct RuleView {
    pub rule: String,
    pub id: u32,
    pub peer: String,
    pub ports: String,
}

pub async fn policy(socket: &Path, pod: &str, format: Format) -> Result<String, CliError> {
    let r = client(socket, Some(CALL_TIMEOUT))
        .await?
        .pod_policy(PodPolicyRequest {
            pod: pod.to_owned(),
        })
        .await?
        .into_inner();
    let direction = |d: Option<weir_proto::agent::v1::DirectionPolicy>| {
        let d = d.unwrap_or_default();
        DirectionView {
            isolated: d.isolated,
            selected_by: d.selected_by,
            rules: d
                .rules
                .into_iter()
                .map(|r| RuleView {
                    rule: r.rule,
                    id: r.id,
                    peer: r.peer,
                    ports: r.ports,
                })
                .collect(),
        }
    };
    let view = PodPolicyView {
        pod: r.pod,
        identity: r.identity,
        identity_name: r.identity_name,
        ingress: direction(r.ingress),
        egress: direction(r.egress),
    };
    render(format, &view, |v, style| {
        let mut out = format!(
            "{} (identity {} {})\n",
            style.bold(&v.pod),
            v.identity,
            v.identity_name
        );
        for (name, d) in [("ingress", &v.ingress), ("egress", &v.egress)] {
            if !d.isolated {
                out.push_str(&format!(
                    "{name}: not isolated (no policy selects it): everything allowed\n"
                ));
                continue;
            }
            out.push_str(&format!(
                "{name}: isolated by {}; allowed only by:\n",
                d.selected_by.join(", ")
            ));
            if d.rules.is_empty() {
                out.push_str("  (no rule: everything denied)\n");
                continue;
            }
            let rows: Vec<Vec<String>> = d
                .rules
                .iter()
                .map(|r| vec![r.rule.clone(), r.peer.clone(), r.ports.clone()])
                .collect();
            out.push_str(&indent(&table(&["RULE", "PEER", "PORTS"], &rows)));
        }
        out
    })
}

// --- weir explain (live) -----------------------------------------------------------------------

pub async fn explain(
    socket: &Path,
    source: &str,
    destination: &str,
    port: &str,
    format: Format,
) -> Result<String, CliError> {
    let port: PortProto = port.parse()?;
    let r = client(socket, Some(CALL_TIMEOUT))
        .await?
        .explain(ExplainRequest {
            source: source.to_owned(),
            destination: destination.to_owned(),
            port: u32::from(port.port),
            protocol: port.protocol.to_string(),
        })
        .await?
        .into_inner();
    let e: Explanation = serde_json::from_str(&r.explanation_json)
        .map_err(|e| CliError::Encode(format!("the agent's explanation does not parse: {e}")))?;
    explain::render(&e, format)
}

// --- weir flows --------------------------------------------------------------------------------

/// `weir flows` as scripts see it: one object per line with `-o json`.
#[derive(Serialize)]
pub struct FlowView {
    pub time_ms: u64,
    pub verdict: String,
    pub reason: String,
    pub direction: String,
    pub endpoint: String,
    pub src: String,
    pub dst: String,
    pub sport: u32,
    pub dport: u32,
    pub proto: String,
    pub peer: String,
    pub policies: Vec<String>,
    pub rule: String,
}

/// What `weir flows` asks for.
pub struct FlowQuery {
    pub follow: bool,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub verdict: Option<String>,
    pub since: Option<Duration>,
}

/// Parses `--since`: a duration like `30s`, `5m`, `2h`, `1d`.
pub fn parse_since(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write it like 30s, 5m, 2h or 1d"))?;
    let secs = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use s, m, h or d (30s, 5m, 2h, 1d)"
            ));
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// Streams flows to stdout as they arrive (not buffered: `--follow` runs until interrupted).
pub async fn flows(socket: &Path, q: FlowQuery, format: Format) -> Result<String, CliError> {
    let since_ms = q.since.map_or(0, |d| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.saturating_sub(d).as_millis() as u64
    });
    let mut stream = client(socket, if q.follow { None } else { Some(CALL_TIMEOUT) })
        .await?
        .flows(FlowsRequest {
            follow: q.follow,
            pod: q.pod.unwrap_or_default(),
            namespace: q.namespace.unwrap_or_default(),
            verdict: q.verdict.unwrap_or_default(),
            since_ms,
        })
        .await?
        .into_inner();
    let style = Style::detect();
    let mut stdout = std::io::stdout();
    let mut first = true;
    while let Some(r) = stream.message().await? {
        let v = FlowView {
            time_ms: r.time_ms,
            verdict: r.verdict,
            reason: r.reason,
            direction: r.direction,
            endpoint: r.endpoint,
            src: r.src,
            dst: r.dst,
            sport: r.sport,
            dport: r.dport,
            proto: r.proto,
            peer: r.peer,
            policies: r.policies,
            rule: r.rule,
        };
        let text = match format {
            Format::Json => serde_json::to_string(&v)
                .map(|s| s + "\n")
                .map_err(|e| CliError::Encode(e.to_string()))?,
            Format::Yaml => format!("---\n{}", encode(Format::Yaml, &v)?),
            Format::Table => {
                let mut line = String::new();
                if first {
                    line.push_str("TIME (UTC)    VERDICT  DIRECTION  ENDPOINT  CONNECTION  WHY\n");
                }
                line.push_str(&describe_flow(&v, style));
                line
            }
        };
        first = false;
        let written = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush());
        if written.is_err() {
            // The reader went away (`weir flows | head`): stop quietly.
            break;
        }
    }
    Ok(String::new())
}

fn describe_flow(v: &FlowView, style: Style) -> String {
    let secs = v.time_ms / 1000;
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        v.time_ms % 1000
    );
    let verdict = if v.verdict == "drop" {
        style.bad("drop ")
    } else {
        style.good("allow")
    };
    let why = match v.reason.as_str() {
        "rule" => format!("allowed by {}", v.rule),
        "policy-denied" => format!("isolated by {}; no rule allows it", v.policies.join(", ")),
        other => other.to_owned(),
    };
    format!(
        "{time}  {verdict}    {:<9}  {}  {}:{} -> {}:{} {} (peer {})  {why}\n",
        v.direction,
        if v.endpoint.is_empty() {
            "?"
        } else {
            &v.endpoint
        },
        v.src,
        v.sport,
        v.dst,
        v.dport,
        v.proto,
        v.peer
    )
}
