//! NetworkPolicy validation: the raw object → a checked, normalised policy, or the reasons it is
//! rejected. A rejected policy is dropped whole; the others keep being enforced.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use ipnet::{IpNet, Ipv6Net};
use weir_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::{
    model::{IntOrString, IpBlock, LabelSelector, NetworkPolicy, ObjectKey, Peer, PolicyPort},
    output::Rejection,
    selector::{Requirement, Selector},
};

/// An ipBlock after validation: the label of CIDR identities.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct IpBlockLabel {
    pub cidr: IpNet,
    pub except: BTreeSet<IpNet>,
}

impl IpBlockLabel {
    /// Whether `addr` is in the block: inside `cidr` and in none of `except`.
    pub fn contains(&self, addr: &IpAddr) -> bool {
        self.cidr.contains(addr) && !self.except.iter().any(|e| e.contains(addr))
    }
}

impl std::fmt::Display for IpBlockLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.cidr)?;
        if !self.except.is_empty() {
            let e: Vec<String> = self.except.iter().map(ToString::to_string).collect();
            write!(f, " except {}", e.join(","))?;
        }
        Ok(())
    }
}

/// A validated peer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ValidPeer {
    /// Pods matching `pods` in namespaces matching `namespaces`; `namespaces: None` is the
    /// policy's own namespace.
    Pods {
        namespaces: Option<Selector>,
        pods: Selector,
    },
    IpBlock(Arc<IpBlockLabel>),
}

/// A validated port entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ValidPort {
    /// Every port of the protocol.
    AnyPort(u8),
    /// `[first, last]` of the protocol.
    Range(u8, u16, u16),
    /// A named container port, resolved on the destination pod.
    Named(u8, String),
}

/// A validated rule; empty `peers` = any peer, empty `ports` = any protocol and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidRule {
    pub index: u32,
    pub peers: Vec<ValidPeer>,
    pub ports: Vec<ValidPort>,
}

/// A validated NetworkPolicy. `ingress: None` means the policy does not isolate ingress;
/// `Some(vec![])` isolates with no rule (deny all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidPolicy {
    pub key: ObjectKey,
    pub subjects: Selector,
    pub ingress: Option<Vec<ValidRule>>,
    pub egress: Option<Vec<ValidRule>>,
}

struct Checker<'a> {
    key: &'a ObjectKey,
    rejections: Vec<Rejection>,
}

impl Checker<'_> {
    fn reject(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.rejections.push(Rejection {
            policy: self.key.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn selector(&mut self, field: &str, s: &LabelSelector) -> Selector {
        let mut requirements = Vec::new();
        for (k, v) in &s.match_labels {
            requirements.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for (i, e) in s.match_expressions.iter().enumerate() {
            let path = format!("{field}.matchExpressions[{i}]");
            if e.key.is_empty() {
                self.reject(format!("{path}.key"), "key must not be empty");
                continue;
            }
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            match e.operator.as_str() {
                "In" | "NotIn" => {
                    if values.is_empty() {
                        self.reject(
                            format!("{path}.values"),
                            format!(
                                "operator {} needs at least one value; list the label values to match",
                                e.operator
                            ),
                        );
                        continue;
                    }
                    requirements.push(if e.operator == "In" {
                        Requirement::In(e.key.clone(), values)
                    } else {
                        Requirement::NotIn(e.key.clone(), values)
                    });
                }
                "Exists" | "DoesNotExist" => {
                    if e.values.as_ref().is_some_and(|v| !v.is_empty()) {
                        self.reject(
                            format!("{path}.values"),
                            format!(
                                "operator {} takes no values; remove `values` or use In/NotIn",
                                e.operator
                            ),
                        );
                        continue;
                    }
                    requirements.push(if e.operator == "Exists" {
                        Requirement::Exists(e.key.clone())
                    } else {
                        Requirement::DoesNotExist(e.key.clone())
                    });
                }
                other => self.reject(
                    format!("{path}.operator"),
                    format!(
                        "unknown operator `{other}`; use one of In, NotIn, Exists, DoesNotExist"
                    ),
                ),
            }
        }
        requirements.sort();
        requirements.dedup();
        Selector { requirements }
    }

    fn cidr(&mut self, field: &str, text: &str) -> Option<IpNet> {
        match text.trim().parse::<IpNet>() {
            Ok(net) => {
                if let IpNet::V6(v6) = net
                    && v6.prefix_len() >= 96
                    && mapped_v4_range().contains(&v6)
                {
                    self.reject(
                        field,
                        format!(
                            "`{text}` is an IPv4-mapped IPv6 prefix; write the IPv4 form (e.g. 10.0.0.0/8) instead"
                        ),
                    );
                    return None;
                }
                Some(net.trunc())
            }
            Err(_) => {
                self.reject(
                    field,
                    format!(
                        "`{text}` is not a CIDR; write an address with a prefix length, e.g. 10.0.0.0/8 or fd00::/64"
                    ),
                );
                None
            }
        }
    }

    fn ip_block(&mut self, field: &str, b: &IpBlock) -> Option<IpBlockLabel> {
        let cidr = self.cidr(&format!("{field}.cidr"), &b.cidr)?;
        let mut except = BTreeSet::new();
        let mut ok = true;
        for (i, e) in b.except.iter().enumerate() {
            let path = format!("{field}.except[{i}]");
            let Some(net) = self.cidr(&path, e) else {
                ok = false;
                continue;
            };
            if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
                self.reject(
                    path,
                    format!(
                        "except `{e}` is not strictly inside cidr `{}`; every except must be a smaller block within the cidr (and of the same address family)",
                        b.cidr
                    ),
                );
                ok = false;
                continue;
            }
            except.insert(net);
        }
        ok.then_some(IpBlockLabel { cidr, except })
    }

    fn peer(&mut self, field: &str, p: &Peer) -> Option<ValidPeer> {
        match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
            (Some(b), None, None) => Some(ValidPeer::IpBlock(Arc::new(
                self.ip_block(&format!("{field}.ipBlock"), b)?,
            ))),
            (Some(_), _, _) => {
                self.reject(
                    field,
                    "a peer may have ipBlock or podSelector/namespaceSelector, not both; split it into two peers",
                );
                None
            }
            (None, None, None) => {
                self.reject(
                    field,
                    "a peer needs podSelector, namespaceSelector or ipBlock; to allow any peer leave the whole list empty",
                );
                None
            }
            (None, pods, namespaces) => {
                let n = self.rejections.len();
                let pods = match pods {
                    Some(s) => self.selector(&format!("{field}.podSelector"), s),
                    None => Selector::all(),
                };
                let namespaces = namespaces
                    .as_ref()
                    .map(|s| self.selector(&format!("{field}.namespaceSelector"), s));
                (self.rejections.len() == n).then_some(ValidPeer::Pods { namespaces, pods })
            }
        }
    }

    fn port(&mut self, field: &str, p: &PolicyPort) -> Option<ValidPort> {
        let proto = match p.protocol.as_str() {
            "TCP" => PROTO_TCP,
            "UDP" => PROTO_UDP,
            // No SCTP on this kernel does not matter: the datapath only compares the protocol
            // number, so SCTP rules are enforced like any other (see the crate docs).
            "SCTP" => PROTO_SCTP,
            other => {
                self.reject(
                    format!("{field}.protocol"),
                    format!("unsupported protocol `{other}`; use TCP, UDP or SCTP (uppercase)"),
                );
                return None;
            }
        };
        match (&p.port, p.end_port) {
            (None, None) => Some(ValidPort::AnyPort(proto)),
            (None, Some(_)) => {
                self.reject(
                    format!("{field}.endPort"),
                    "endPort needs a numeric port as the start of the range",
                );
                None
            }
            (Some(IntOrString::Int(n)), end) => {
                if !(1..=65535).contains(n) {
                    self.reject(
                        format!("{field}.port"),
                        format!("port {n} is out of range; use 1-65535"),
                    );
                    return None;
                }
                let first = *n as u16;
                let last = match end {
                    None => first,
                    Some(e) if !(1..=65535).contains(&e) => {
                        self.reject(
                            format!("{field}.endPort"),
                            format!("endPort {e} is out of range; use 1-65535"),
                        );
                        return None;
                    }
                    Some(e) if e < *n => {
                        self.reject(
                            format!("{field}.endPort"),
                            format!("endPort {e} is below port {n}; endPort must be >= port"),
                        );
                        return None;
                    }
                    Some(e) => e as u16,
                };
                Some(ValidPort::Range(proto, first, last))
            }
            (Some(IntOrString::String(name)), end) => {
                if end.is_some() {
                    self.reject(
                        format!("{field}.endPort"),
                        format!(
                            "endPort cannot be used with the named port `{name}`; use a numeric port range"
                        ),
                    );
                    return None;
                }
                if !valid_port_name(name) {
                    self.reject(
                        format!("{field}.port"),
                        format!(
                            "`{name}` is not a valid port name (1-15 lowercase letters, digits and single inner '-', at least one letter)"
                        ),
                    );
                    return None;
                }
                Some(ValidPort::Named(proto, name.clone()))
            }
        }
    }

    fn rule(
        &mut self,
        field: &str,
        peer_list: &str,
        index: usize,
        peers: &[Peer],
        ports: &[PolicyPort],
        egress: bool,
    ) -> ValidRule {
        let peers: Vec<ValidPeer> = peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| self.peer(&format!("{field}.{peer_list}[{i}]"), p))
            .collect();
        let ports: Vec<ValidPort> = ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| self.port(&format!("{field}.ports[{i}]"), p))
            .collect();
        if egress && ports.iter().any(|p| matches!(p, ValidPort::Named(..))) {
            for (i, p) in peers.iter().enumerate() {
                if matches!(p, ValidPeer::IpBlock(_)) {
                    self.reject(
                        format!("{field}.{peer_list}[{i}].ipBlock"),
                        "an egress rule with a named port cannot have an ipBlock peer: the datapath cannot tie the name to pods inside the block; use numeric ports or put the ipBlock in its own rule",
                    );
                }
            }
        }
        ValidRule {
            index: index as u32,
            peers,
            ports,
        }
    }
}

fn mapped_v4_range() -> Ipv6Net {
    Ipv6Net::new(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96)
        .unwrap_or_else(|_| Ipv6Net::default())
}

/// An IANA service name as Kubernetes accepts it for a named port.
pub fn valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// Validates a (defaulted) policy. `key` names it in rejections.
pub fn validate(key: &ObjectKey, policy: &NetworkPolicy) -> Result<ValidPolicy, Vec<Rejection>> {
    let mut c = Checker {
        key,
        rejections: Vec::new(),
    };
    let spec = &policy.spec;
    let subjects = c.selector("spec.podSelector", &spec.pod_selector);
    if let Some(types) = &spec.policy_types {
        for (i, t) in types.iter().enumerate() {
            if t != "Ingress" && t != "Egress" {
                c.reject(
                    format!("spec.policyTypes[{i}]"),
                    format!("unknown policy type `{t}`; use Ingress or Egress"),
                );
            }
        }
    }
    let (isolate_ingress, isolate_egress) = policy.policy_types();
    let ingress: Vec<ValidRule> = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            c.rule(
                &format!("spec.ingress[{i}]"),
                "from",
                i,
                &r.from,
                &r.ports,
                false,
            )
        })
        .collect();
    let egress: Vec<ValidRule> = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| c.rule(&format!("spec.egress[{i}]"), "to", i, &r.to, &r.ports, true))
        .collect();
    if !c.rejections.is_empty() {
        return Err(c.rejections);
    }
    Ok(ValidPolicy {
        key: key.clone(),
        subjects,
        ingress: isolate_ingress.then_some(ingress),
        egress: isolate_egress.then_some(egress),
    })
}
