//! Verdict events made readable: which endpoint, which direction, which policies selected it and
//! which rule (if any) allowed the packet. Each becomes a JSON line in `<state-dir>/flows.jsonl`
//! (what `weir flows`/`explain` and the lab's demo read) and, for drops, a log line.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use weir_common::*;
use weir_policy::{
    model::ObjectKey,
    output::{Compiled, RuleOrigin},
};

use crate::datapath::addr::from_kernel;

/// One verdict, as written to flows.jsonl.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// "allow" or "drop".
    pub verdict: String,
    /// Why, e.g. "policy-denied", "revoked", "rule".
    pub reason: String,
    /// "ingress" or "egress", seen from `endpoint`.
    pub direction: String,
    /// The local pod the verdict was for ("ns/name"), if known.
    pub endpoint: Option<String>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: String,
    /// The peer's identity, described.
    pub peer: String,
    /// The policies that select the endpoint in this direction (those that isolated it).
    pub policies: Vec<String>,
    /// The rule that allowed it ("ns/policy ingress[0]"), if one did.
    pub rule: Option<String>,
}

/// What the agent knows to explain verdicts, refreshed after every compile.
#[derive(Clone, Debug, Default)]
pub struct Explainer {
    identity_names: BTreeMap<u32, String>,
    rule_origins: BTreeMap<u32, RuleOrigin>,
    endpoints: BTreeMap<IpAddr, ObjectKey>,
    /// Per subject identity, the policies selecting it now.
    selected: BTreeMap<u32, Selection>,
    /// Per subject identity, the selection it had before its last change: a drop the kernel
    /// decided under the rules of that version, and that is read after the change, is explained
    /// by the policies that caused it.
    superseded: BTreeMap<u32, Selection>,
}

/// The policies selecting one subject, in each direction, and the version of its rules in the
/// kernel's maps that they describe (a drop event carries the version it was decided under).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Selection {
    /// `None` until the write that puts these rules in the maps has returned.
    version: Option<u32>,
    ingress: Vec<String>,
    egress: Vec<String>,
}

impl Selection {
    fn of(compiled: &Compiled, subject: u32) -> Self {
        let names = |set: &BTreeSet<ObjectKey>| set.iter().map(ToString::to_string).collect();
        match compiled.subjects.get(&subject) {
            Some(rules) => Self {
                version: None,
                ingress: names(&rules.selected_by_ingress),
                egress: names(&rules.selected_by_egress),
            },
            None => Self::default(),
        }
    }

    fn same_policies(&self, other: &Self) -> bool {
        self.ingress == other.ingress && self.egress == other.egress
    }

    fn policies(&self, direction: u8) -> &[String] {
        if direction == DIR_EGRESS {
            &self.egress
        } else {
            &self.ingress
        }
    }
}

impl Explainer {
    /// An explainer of `compiled`, a full compile's output, to put in force before it is
    /// written: what is new is taken from `compiled`, and each subject whose policies changed
    /// keeps its selection from here as superseded (see `superseded`).
    pub fn rebuilt(&self, compiled: &Compiled) -> Self {
        let mut next = Self {
            identity_names: compiled.identity_names.clone(),
            rule_origins: compiled.rule_origins.clone(),
            endpoints: compiled
                .local_addresses
                .iter()
                .map(|(addr, (pod, _))| (*addr, pod.clone()))
                .collect(),
            selected: self.selected.clone(),
            superseded: self.superseded.clone(),
        };
        let subjects: BTreeSet<u32> = compiled
            .subjects
            .keys()
            .chain(self.selected.keys())
            .copied()
            .collect();
        for subject in subjects {
            next.subject_changed(compiled, subject);
        }
        next
    }

    /// Policies compiled in place (see `weir_policy::incremental`), which changed the rule sets
    /// of `subjects` and patched the rule origins: brings this up to `compiled` copying only
    /// what differs. A rebuild copies every name and origin, which at 10,000 policies costs
    /// more than the compile it explains; this runs before the write, on the change's path.
    pub fn policies_changed(&mut self, compiled: &Compiled, subjects: &BTreeSet<u32>) {
        sync_map(&mut self.rule_origins, &compiled.rule_origins);
        sync_map(&mut self.identity_names, &compiled.identity_names);
        for &subject in subjects {
            self.subject_changed(compiled, subject);
        }
    }

    /// The policies selecting `subject`, in each direction, as `compiled` has them, under a
    /// version the next write decides (see `versions_written`). A subject selected by no policy
    /// any more keeps an empty selection until then, so the drops of its last version stay
    /// explained.
    fn subject_changed(&mut self, compiled: &Compiled, subject: u32) {
        let now = Selection::of(compiled, subject);
        match self.selected.get(&subject) {
            Some(before) if before.same_policies(&now) => {}
            Some(_) => {
                let before = self.selected.insert(subject, now).expect("present");
                self.superseded.insert(subject, before);
            }
            None if now.ingress.is_empty() && now.egress.is_empty() => {}
            None => {
                self.selected.insert(subject, now);
            }
        }
    }

    /// After a successful write of `subjects` (`None`: of all), the version of each one's rules
    /// in the maps now (`version_of`, 0 for a subject without rules there). A write can change a
    /// subject's rules without changing the policies selecting it (a port, a peer), so every
    /// written subject takes its version, not only those whose selection changed. Subjects
    /// that no policy selects any more are forgotten here; their superseded selection keeps
    /// explaining their last version's drops.
    pub fn versions_written(
        &mut self,
        subjects: Option<&BTreeSet<u32>>,
        version_of: impl Fn(u32) -> u32,
    ) {
        let mut unselected = Vec::new();
        let mut update = |subject: u32, selection: &mut Selection| {
            selection.version = Some(version_of(subject));
            if selection.ingress.is_empty() && selection.egress.is_empty() {
                unselected.push(subject);
            }
        };
        match subjects {
            Some(subjects) => {
                for &subject in subjects {
                    if let Some(selection) = self.selected.get_mut(&subject) {
                        update(subject, selection);
                    }
                }
            }
            None => {
                for (&subject, selection) in &mut self.selected {
                    update(subject, selection);
                }
            }
        }
        for subject in unselected {
            self.selected.remove(&subject);
        }
    }

    /// The selection that explains a verdict on `subject` decided under `version`: the one
    /// before the subject's last change if that is the version it describes, else the current.
    fn selection(&self, subject: u32, version: u32) -> Option<&Selection> {
        let current = self.selected.get(&subject);
        match self.superseded.get(&subject) {
            Some(before)
                if before.version == Some(version)
                    && current.is_none_or(|now| now.version != Some(version)) =>
            {
                Some(before)
            }
            _ => current,
        }
    }

    /// Local endpoints wired or unwired in place (`Compiled::local_addresses` patched, see
    /// `weir_policy::incremental`): address → its pod now, `None` when it is no longer local.
    pub fn endpoints_changed(&mut self, changes: &BTreeMap<IpAddr, Option<(ObjectKey, u32)>>) {
        for (addr, owner) in changes {
            match owner {
                Some((pod, _)) => self.endpoints.insert(*addr, pod.clone()),
                None => self.endpoints.remove(addr),
            };
        }
    }

    /// Turns a kernel event into a record.
    pub fn explain(&self, event: &VerdictEvent) -> FlowRecord {
        let src = from_kernel(event.saddr);
        let dst = from_kernel(event.daddr);
        let endpoint_addr = if event.direction == DIR_EGRESS {
            src
        } else {
            dst
        };
        let rule = (event.rule != 0).then(|| match self.rule_origins.get(&event.rule) {
            // The deny list's "rule" is the line of the prefilter file that listed the source.
            _ if event.reason == REASON_PREFILTER_DENIED => {
                format!("prefilter line {}", event.rule)
            }
            Some(o) => format!("{} {}[{}]", o.policy, direction_name(o.direction), o.index),
            None if event.rule == RULE_FROM_HOST => {
                "built-in: the node reaches its own pods".into()
            }
            None => format!("rule {}", event.rule),
        });
        FlowRecord {
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            verdict: if event.verdict == VERDICT_DROP {
                "drop"
            } else {
                "allow"
            }
            .to_owned(),
            reason: reason_name(event.reason).to_owned(),
            direction: direction_name(event.direction).to_owned(),
            endpoint: self.endpoints.get(&endpoint_addr).map(ToString::to_string),
            src,
            dst,
            sport: u16::from_be(event.sport),
            dport: u16::from_be(event.dport),
            proto: proto_name(event.proto),
            peer: self.identity_name(event.peer),
            policies: self
                .selection(event.subject, event.subject_version)
                .map(|s| s.policies(event.direction).to_vec())
                .unwrap_or_default(),
            rule,
        }
    }

    fn identity_name(&self, identity: u32) -> String {
        match identity {
            IDENTITY_ANY => "unknown".to_owned(),
            IDENTITY_HOST => "reserved:host".to_owned(),
            IDENTITY_WORLD => "reserved:world".to_owned(),
            IDENTITY_REMOTE_NODE => "reserved:remote-node".to_owned(),
            id => self
                .identity_names
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("identity {id}")),
        }
    }
}

impl FlowRecord {
    /// The sentence a person reads in the agent's log.
    pub fn describe(&self) -> String {
        let who = self.endpoint.as_deref().unwrap_or("an unknown endpoint");
        let what = format!(
            "{} {}:{} -> {}:{} {} ({} {who}, peer {})",
            self.verdict,
            self.src,
            self.sport,
            self.dst,
            self.dport,
            self.proto,
            self.direction,
            self.peer
        );
        let why = match self.reason.as_str() {
            "policy-denied" => format!(
                "isolated by {}; no rule allowed it",
                self.policies.join(", ")
            ),
            "xdp-policy-denied" => format!(
                "dropped at XDP on the node's uplink: isolated by {}; no rule allowed a new connection from this peer",
                self.policies.join(", ")
            ),
            "prefilter-denied" => format!(
                "dropped at XDP on the node's uplink: the source is in the operator's deny list ({})",
                self.rule.as_deref().unwrap_or("prefilter file")
            ),
            "revoked" => format!(
                "an established connection that {} no longer allow",
                self.policies.join(", ")
            ),
            "unknown-endpoint" => "no endpoint is enforced for this address on this interface (before CNI ADD finished, or after DEL)".to_owned(),
            "spoofed-source" => "the source address is not the one this pod was given".to_owned(),
            "fragment-without-first" => "a later fragment of a datagram whose first fragment (the one with the ports) was not seen here: out of order, lost or forged, so it cannot be checked against the policies".to_owned(),
            "ipv6-extension-headers" => "an IPv6 extension header chain that is not walked (more than 6 headers, a header of unknown layout such as mobility or HIP, a second Fragment header, or hop-by-hop not first)".to_owned(),
            other => other.to_owned(),
        };
        format!("{what}: {why}")
    }
}

pub fn reason_name(reason: u8) -> &'static str {
    match reason {
        REASON_NOT_ISOLATED => "not-isolated",
        REASON_RULE => "rule",
        REASON_ESTABLISHED => "established",
        REASON_RELATED => "related",
        REASON_LINK_LOCAL => "link-local",
        REASON_POLICY_DENIED => "policy-denied",
        REASON_UNKNOWN_ENDPOINT => "unknown-endpoint",
        REASON_SPOOFED_SOURCE => "spoofed-source",
        REASON_REVOKED => "revoked",
        REASON_MALFORMED => "malformed",
        REASON_INTERNAL => "internal-error",
        REASON_FRAGMENT_WITHOUT_FIRST => "fragment-without-first",
        REASON_IPV6_EXTENSIONS => "ipv6-extension-headers",
        REASON_XDP_POLICY_DENIED => "xdp-policy-denied",
        REASON_PREFILTER_DENIED => "prefilter-denied",
        _ => "unknown",
    }
}

fn direction_name(direction: u8) -> &'static str {
    if direction == DIR_EGRESS {
        "egress"
    } else {
        "ingress"
    }
}

pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".to_owned(),
        PROTO_UDP => "UDP".to_owned(),
        PROTO_SCTP => "SCTP".to_owned(),
        PROTO_ICMP => "ICMP".to_owned(),
        PROTO_ICMPV6 => "ICMPv6".to_owned(),
        other => format!("proto-{other}"),
    }
}

/// Appends records to flows.jsonl, rotating to flows.jsonl.1 past a size limit, and hands each
/// to live subscribers (`weir flows --follow`).
pub struct FlowLog {
    path: PathBuf,
    max_bytes: u64,
    live: tokio::sync::broadcast::Sender<FlowRecord>,
}

impl FlowLog {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("flows.jsonl"),
            max_bytes: 16 << 20,
            // A follower that falls this far behind misses records (and is told so).
            live: tokio::sync::broadcast::channel(1024).0,
        }
    }

    /// Records appended from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FlowRecord> {
        self.live.subscribe()
    }

    /// Every record still on disk, oldest first (the rotated file, then the current one);
    /// lines that do not parse (a torn last line) are skipped.
    pub fn history(&self) -> Vec<FlowRecord> {
        let mut out = Vec::new();
        for path in [self.path.with_extension("jsonl.1"), self.path.clone()] {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            out.extend(
                text.lines()
                    .filter_map(|l| serde_json::from_str::<FlowRecord>(l).ok()),
            );
        }
        out
    }

    /// Appends `record` to the file, then hands it to followers: a follower that subscribed
    /// before reading the file gets every record from one or the other.
    pub fn append(&self, record: &FlowRecord) {
        self.write(record);
        // No receiver is the normal case: nobody follows.
        let _ = self.live.send(record.clone());
    }

    fn write(&self, record: &FlowRecord) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() > self.max_bytes) {
            let _ = std::fs::rename(&self.path, self.path.with_extension("jsonl.1"));
        }
        let line = match serde_json::to_string(record) {
            Ok(line) => line,
            Err(_) => return,
        };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot append to the flow log");
        }
    }
}

/// Makes `dst` equal to `src`, cloning only the entries that differ: one walk of both maps in
/// key order, so what did not change costs a comparison and no allocation.
fn sync_map<K: Ord + Clone, V: PartialEq + Clone>(dst: &mut BTreeMap<K, V>, src: &BTreeMap<K, V>) {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let (mut stale, mut fresh) = (Vec::new(), Vec::new());
    let (mut old, mut new) = (dst.iter().peekable(), src.iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => Less,
            (None, Some(_)) => Greater,
            (Some((o, _)), Some((n, _))) => o.cmp(n),
        };
        match order {
            Less => stale.extend(old.next().map(|(k, _)| k.clone())),
            Greater => fresh.extend(new.next().map(|(k, v)| (k.clone(), v.clone()))),
            Equal => {
                let ((_, was), (k, now)) = (old.next().unwrap(), new.next().unwrap());
                if was != now {
                    fresh.push((k.clone(), now.clone()));
                }
            }
        }
    }
    for k in stale {
        dst.remove(&k);
    }
    dst.extend(fresh);
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_policy::{
        compile::CompileInput,
        identity::IdentityAllocator,
        incremental::Incremental,
        model::{ClusterState, parse_documents},
    };

    #[test]
    fn a_synced_map_equals_its_source_and_keeps_what_did_not_change() {
        let mut seed = 7u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let random_map = |next: &mut dyn FnMut() -> u64| -> BTreeMap<u32, String> {
                (0..next() % 40)
                    .map(|_| ((next() % 60) as u32, format!("v{}", next() % 3)))
                    .collect()
            };
            let (mut dst, src) = (random_map(&mut next), random_map(&mut next));
            let kept: Vec<(u32, *const u8)> = dst
                .iter()
                .filter(|(k, v)| src.get(k) == Some(v))
                .map(|(k, v)| (*k, v.as_ptr()))
                .collect();
            sync_map(&mut dst, &src);
            assert_eq!(dst, src);
            for (k, ptr) in kept {
                assert_eq!(
                    dst[&k].as_ptr(),
                    ptr,
                    "entry {k} was copied though unchanged"
                );
            }
        }
    }

    fn state(yaml: &str) -> ClusterState {
        let mut state = ClusterState::default();
        for object in parse_documents(yaml, "test") {
            state.apply(object.unwrap());
        }
        state
    }

    fn policy(name: &str, app: &str, from: &str, port: u16) -> String {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{podSelector: {{matchLabels: {{app: {app}}}}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}], ports: [{{port: {port}}}]}}]}}\n"
        )
    }

    /// Pods a, b and c on node n1 (10.0.0.1-3, each labelled `app: <name>`), and `policies`.
    fn three_local_pods_and(policies: &str) -> CompileInput {
        let pods: String = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, app)| {
                format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {app}, namespace: default, labels: {{app: {app}}}}}\n\
                     spec: {{nodeName: n1, containers: [{{name: c}}]}}\nstatus: {{podIPs: [{{ip: 10.0.0.{}}}]}}\n",
                    i + 1
                )
            })
            .collect();
        CompileInput {
            state: state(&format!("{pods}{policies}")),
            node_name: "n1".to_owned(),
            cluster_id: 0,
            local_endpoints: ["a", "b", "c"]
                .iter()
                .enumerate()
                .map(|(i, app)| {
                    let addr: IpAddr = format!("10.0.0.{}", i + 1).parse().unwrap();
                    (ObjectKey::new("default", *app), vec![addr])
                })
                .collect(),
        }
    }

    #[test]
    fn an_explainer_patched_for_policies_compiled_in_place_equals_one_rebuilt() {
        let mut input = three_local_pods_and(&policy("p1", "a", "b", 80));
        let mut ids = IdentityAllocator::default();
        let (mut compiled, mut incremental) = Incremental::compile(&input, &mut ids).unwrap();
        let mut explainer = Explainer::default().rebuilt(&compiled);
        explainer.versions_written(None, |_| 1);
        // A policy added, one changed, one removed: each compiled in place.
        let changes = [
            ("p2", Some(policy("p2", "b", "c", 81))),
            ("p1", Some(policy("p1", "a", "c", 82))),
            ("p2", None),
            ("p3", Some(policy("p3", "c", "a", 83))),
        ];
        for (name, text) in changes {
            let key = ObjectKey::new("default", name);
            match text {
                Some(text) => input
                    .state
                    .apply(parse_documents(&text, "test").pop().unwrap().unwrap()),
                None => {
                    input.state.policies.remove(&key);
                }
            }
            let subjects = incremental
                .policies_changed(&input, &[key], &mut ids, &mut compiled)
                .expect("compiled in place");
            explainer.policies_changed(&compiled, &subjects);
            explainer.versions_written(Some(&subjects), |_| 1);
            let mut rebuilt = Explainer::default().rebuilt(&compiled);
            rebuilt.versions_written(None, |_| 1);
            assert_eq!(explainer.rule_origins, rebuilt.rule_origins, "after {name}");
            assert_eq!(
                explainer.identity_names, rebuilt.identity_names,
                "after {name}"
            );
            assert_eq!(explainer.selected, rebuilt.selected, "after {name}");
            assert_eq!(explainer.endpoints, rebuilt.endpoints, "after {name}");
        }
    }

    #[test]
    fn a_drop_is_explained_by_the_policies_of_the_version_it_was_decided_under() {
        let mut input = three_local_pods_and(&policy("p1", "a", "b", 80));
        let mut ids = IdentityAllocator::default();
        let (mut compiled, mut incremental) = Incremental::compile(&input, &mut ids).unwrap();
        let a = compiled.local_addresses[&"10.0.0.1".parse::<IpAddr>().unwrap()].1;
        let drop_under = |version: u32| VerdictEvent {
            saddr: ipv4_mapped([10, 0, 0, 3]),
            daddr: ipv4_mapped([10, 0, 0, 1]),
            proto: PROTO_TCP,
            direction: DIR_INGRESS,
            verdict: VERDICT_DROP,
            reason: REASON_POLICY_DENIED,
            subject: a,
            subject_version: version,
            ..VerdictEvent::default()
        };
        let mut explainer = Explainer::default().rebuilt(&compiled);
        explainer.versions_written(None, |_| 1);
        let policies = |e: &Explainer, version| e.explain(&drop_under(version)).policies;
        assert_eq!(policies(&explainer, 1), ["default/p1"]);

        // p1 replaced by p3, which selects a too: compiled in place, explained before the write.
        let (p1, p3) = (
            ObjectKey::new("default", "p1"),
            ObjectKey::new("default", "p3"),
        );
        input.state.policies.remove(&p1);
        let p3_text = policy("p3", "a", "c", 83);
        input
            .state
            .apply(parse_documents(&p3_text, "test").pop().unwrap().unwrap());
        let subjects = incremental
            .policies_changed(&input, &[p1, p3], &mut ids, &mut compiled)
            .expect("compiled in place");
        explainer.policies_changed(&compiled, &subjects);
        // During the write: a drop under the old rules names p1, one under the new rules p3.
        assert_eq!(policies(&explainer, 1), ["default/p1"]);
        assert_eq!(policies(&explainer, 2), ["default/p3"]);
        explainer.versions_written(Some(&subjects), |_| 2);
        // After it, a drop decided before the change and read late still names p1.
        assert_eq!(policies(&explainer, 1), ["default/p1"]);
        assert_eq!(policies(&explainer, 2), ["default/p3"]);
        // A version it never saw (an event older than the last change but one): the current.
        assert_eq!(policies(&explainer, 9), ["default/p3"]);

        // A full compile that no longer selects a (p3 removed): rebuilt, the same way.
        input
            .state
            .policies
            .remove(&ObjectKey::new("default", "p3"));
        let (compiled, _) = Incremental::compile(&input, &mut ids).unwrap();
        let mut rebuilt = explainer.rebuilt(&compiled);
        assert_eq!(policies(&rebuilt, 2), ["default/p3"]);
        rebuilt.versions_written(None, |_| 0);
        assert_eq!(policies(&rebuilt, 2), ["default/p3"]);
        assert!(policies(&rebuilt, 0).is_empty(), "not isolated any more");
    }

    #[test]
    fn every_reason_the_programs_count_has_a_name() {
        let reasons = [
            REASON_NOT_ISOLATED,
            REASON_RULE,
            REASON_ESTABLISHED,
            REASON_RELATED,
            REASON_LINK_LOCAL,
            REASON_POLICY_DENIED,
            REASON_UNKNOWN_ENDPOINT,
            REASON_SPOOFED_SOURCE,
            REASON_REVOKED,
            REASON_MALFORMED,
            REASON_INTERNAL,
            REASON_FRAGMENT_WITHOUT_FIRST,
            REASON_IPV6_EXTENSIONS,
            REASON_XDP_POLICY_DENIED,
            REASON_PREFILTER_DENIED,
        ];
        let names: std::collections::BTreeSet<&str> =
            reasons.iter().map(|&r| reason_name(r)).collect();
        assert_eq!(names.len(), reasons.len(), "names are distinct: {names:?}");
        assert!(!names.contains("unknown"));
        assert!(reasons.iter().all(|&r| u32::from(r) < FIRST_COUNTER_SLOT));
    }

    #[test]
    fn fragment_and_extension_header_drops_are_explained() {
        let event = VerdictEvent {
            saddr: ipv4_mapped([10, 0, 0, 1]),
            daddr: ipv4_mapped([10, 0, 0, 2]),
            proto: PROTO_UDP,
            direction: DIR_INGRESS,
            verdict: VERDICT_DROP,
            reason: REASON_FRAGMENT_WITHOUT_FIRST,
            ..VerdictEvent::default()
        };
        let explainer = Explainer::default();
        let record = explainer.explain(&event);
        assert_eq!(record.reason, "fragment-without-first");
        assert!(record.describe().contains("first fragment"));
        let record = explainer.explain(&VerdictEvent {
            reason: REASON_IPV6_EXTENSIONS,
            ..event
        });
        assert_eq!(record.reason, "ipv6-extension-headers");
        assert!(record.describe().contains("extension header chain"));
    }

    #[test]
    fn xdp_drops_are_explained() {
        let event = VerdictEvent {
            saddr: ipv4_mapped([10, 0, 0, 1]),
            daddr: ipv4_mapped([10, 0, 0, 2]),
            proto: PROTO_TCP,
            direction: DIR_INGRESS,
            verdict: VERDICT_DROP,
            reason: REASON_PREFILTER_DENIED,
            rule: 3,
            ..VerdictEvent::default()
        };
        let explainer = Explainer::default();
        let record = explainer.explain(&event);
        assert_eq!(record.reason, "prefilter-denied");
        assert_eq!(record.rule.as_deref(), Some("prefilter line 3"));
        assert!(record.describe().contains("deny list (prefilter line 3)"));
        let record = explainer.explain(&VerdictEvent {
            reason: REASON_XDP_POLICY_DENIED,
            rule: 0,
            ..event
        });
        assert_eq!(record.reason, "xdp-policy-denied");
        assert!(record.describe().contains("dropped at XDP"));
    }
}
