//! NetworkPolicy validation: the raw object → a checked, normalised policy, or the reasons it is
//! rejected, as the API server checks it (names, labels and selectors, CIDRs, ports, peers).
//! A rejected policy allows nothing but still isolates the pods its `podSelector` selects in
//! the directions it declares ([`Rejected::isolation`]); the others keep being enforced.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weir_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::{
    model::{IntOrString, IpBlock, LabelSelector, NetworkPolicy, ObjectKey, Peer, PolicyPort},
    names,
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
            if let Some(why) = names::label_key(k).or_else(|| names::label_value(v)) {
                self.reject(
                    format!("{field}.matchLabels"),
                    format!(
                        "{} is not a valid label: {why}",
                        names::shown(&format!("{k}: {v}"))
                    ),
                );
                continue;
            }
            requirements.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for (i, e) in s.match_expressions.iter().enumerate() {
            let path = format!("{field}.matchExpressions[{i}]");
            if let Some(why) = names::label_key(&e.key) {
                self.reject(
                    format!("{path}.key"),
                    format!("label key {}", names::why_of(&e.key, &why)),
                );
                continue;
            }
            if let Some((j, v, why)) = e
                .values
                .iter()
                .flatten()
                .enumerate()
                .find_map(|(j, v)| names::label_value(v).map(|why| (j, v, why)))
            {
                self.reject(
                    format!("{path}.values[{j}]"),
                    format!("label value {}", names::why_of(v, &why)),
                );
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

    /// A CIDR as the API server parses it (`netutils.ParseCIDRSloppy`): IPv4 octets may have
    /// leading zeros (read as decimal) and host bits are masked. An IPv6 prefix of at least /96
    /// inside `::ffff:0:0/96` is IPv4-mapped and means its IPv4 form, as Go's `net.IPNet` treats
    /// it. Returns the prefix and the prefix length as written (the API server compares those
    /// for `except`).
    fn cidr(&mut self, field: &str, text: &str) -> Option<(IpNet, u8)> {
        let Ok(net) = sloppy_cidr(text.trim()) else {
            self.reject(
                field,
                format!(
                    "{} is not a CIDR; write an address with a prefix length, e.g. 10.0.0.0/8 or fd00::/64",
                    names::shown(text)
                ),
            );
            return None;
        };
        let written = net.prefix_len();
        let net = match net {
            IpNet::V6(v6) if v6.prefix_len() >= 96 && mapped_v4_range().contains(&v6) => {
                let v4 = v6
                    .network()
                    .to_ipv4_mapped()
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
                Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4)
            }
            other => other,
        };
        Some((net.trunc(), written))
    }

    fn ip_block(&mut self, field: &str, b: &IpBlock) -> Option<IpBlockLabel> {
        let (cidr, cidr_len) = self.cidr(&format!("{field}.cidr"), &b.cidr)?;
        let mut except = BTreeSet::new();
        let mut ok = true;
        for (i, e) in b.except.iter().enumerate() {
            let path = format!("{field}.except[{i}]");
            let Some((net, len)) = self.cidr(&path, e) else {
                ok = false;
                continue;
            };
            if !cidr.contains(&net) || len <= cidr_len || net.prefix_len() <= cidr.prefix_len() {
                self.reject(
                    path,
                    format!(
                        "except {} is not strictly inside cidr {}; every except must be a smaller block within the cidr (and of the same address family)",
                        names::shown(e),
                        names::shown(&b.cidr)
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
        ValidRule {
            index: index as u32,
            peers,
            ports,
        }
    }
}

/// Go's `ParseCIDRSloppy`: leading zeros in IPv4 octets are decimal (`010.0.0.0/8` is
/// `10.0.0.0/8`), which the strict parser refuses.
fn sloppy_cidr(text: &str) -> Result<IpNet, ipnet::AddrParseError> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net);
    }
    let (addr, len) = text.rsplit_once('/').unwrap_or((text, ""));
    let (head, dotted) = match addr.rfind(':') {
        Some(i) => addr.split_at(i + 1),
        None => ("", addr),
    };
    let octets: Vec<&str> = dotted
        .split('.')
        .map(|o| {
            let t = o.trim_start_matches('0');
            if t.is_empty() && !o.is_empty() {
                "0"
            } else {
                t
            }
        })
        .collect();
    format!("{head}{}/{len}", octets.join(".")).parse::<IpNet>()
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
    check(key, policy).map_err(|r| r.rejections)
}

/// A rejected policy: why, and what is still enforced for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub rejections: Vec<Rejection>,
    /// The policy's fail-closed remainder: the pods its `podSelector` selects (every pod of its
    /// namespace when the selector is invalid) are isolated in the directions it declares (both
    /// when its `policyTypes` are invalid), with no rule: it allows nothing.
    pub isolation: ValidPolicy,
}

/// Validates a (defaulted) policy; a rejected one still isolates what it selects.
pub fn check(key: &ObjectKey, policy: &NetworkPolicy) -> Result<ValidPolicy, Box<Rejected>> {
    let mut c = Checker {
        key,
        rejections: Vec::new(),
    };
    for p in &policy.problems {
        c.reject(p.field.clone(), p.reason.clone());
    }
    let unnamed = policy.problems.iter().any(|p| p.field == "metadata.name");
    if let Some(why) = names::dns1123_subdomain(&key.name).filter(|_| !unnamed) {
        c.reject(
            "metadata.name",
            format!("NetworkPolicy name {}", names::why_of(&key.name, &why)),
        );
    }
    if let Some(why) = names::dns1123_label(&key.namespace) {
        c.reject(
            "metadata.namespace",
            format!("namespace {}", names::why_of(&key.namespace, &why)),
        );
    }
    if let Some(why) = names::first_bad_label(&policy.metadata.labels) {
        c.reject("metadata.labels", why);
    }
    let spec = &policy.spec;
    let before = c.rejections.len();
    let subjects = c.selector("spec.podSelector", &spec.pod_selector);
    let subjects_valid = c.rejections.len() == before;
    let mut types_valid = true;
    if let Some(types) = &spec.policy_types {
        for (i, t) in types.iter().enumerate() {
            if t != "Ingress" && t != "Egress" {
                types_valid = false;
                c.reject(
                    format!("spec.policyTypes[{i}]"),
                    format!(
                        "unknown policy type {}; use Ingress or Egress",
                        names::shown(t)
                    ),
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
        .map(|(i, r)| c.rule(&format!("spec.ingress[{i}]"), "from", i, &r.from, &r.ports))
        .collect();
    let egress: Vec<ValidRule> = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| c.rule(&format!("spec.egress[{i}]"), "to", i, &r.to, &r.ports))
        .collect();
    if !c.rejections.is_empty() {
        let (ingress, egress) = if types_valid {
            (isolate_ingress, isolate_egress)
        } else {
            (true, true)
        };
        return Err(Box::new(Rejected {
            rejections: c.rejections,
            isolation: ValidPolicy {
                key: key.clone(),
                subjects: if subjects_valid {
                    subjects
                } else {
                    Selector::all()
                },
                ingress: ingress.then(Vec::new),
                egress: egress.then(Vec::new),
            },
        }));
    }
    Ok(ValidPolicy {
        key: key.clone(),
        subjects,
        ingress: isolate_ingress.then_some(ingress),
        egress: isolate_egress.then_some(egress),
    })
}
