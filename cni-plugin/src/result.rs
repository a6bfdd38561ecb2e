//! What the plugin prints, as typed CNI objects: the ADD result (SPEC 1.1 "Success", in the
//! shape of the configuration's `cniVersion`), merged with a prevResult when the plugin is
//! chained after another; the VERSION answer; the error object.
//!
//! The shapes differ by version ([`Shape`]): 0.4.0 gives every IP its `version` ("4" or "6"),
//! which 1.0.0 removed; 1.1.0 added an interface's `mtu` and a route's `priority`. A prevResult
//! keeps all it carries, fields this plugin does not know included (`other`), and is put in the
//! shape of the version asked for.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The result shapes of the CNI versions this plugin speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// 0.4.0: `ips[].version` is required.
    V0_4,
    /// 1.0.0: no `ips[].version`.
    V1_0,
    /// 1.1.0: as 1.0.0, plus `interfaces[].mtu` and `routes[].priority`.
    V1_1,
}

impl Shape {
    /// The shape of `cni_version` (one of `config::SUPPORTED_VERSIONS`, checked before).
    pub fn of(cni_version: &str) -> Self {
        match cni_version {
            v if v.starts_with("0.") => Shape::V0_4,
            "1.0.0" => Shape::V1_0,
            _ => Shape::V1_1,
        }
    }

    fn has_ip_version(self) -> bool {
        self == Shape::V0_4
    }

    fn has_mtu_and_priority(self) -> bool {
        self == Shape::V1_1
    }
}

/// An ADD result (also what a runtime passes back as `prevResult`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
    /// What a prevResult carries beyond the spec's keys, kept as it was.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 1.1.0 and later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The network namespace of an interface inside the container; none for a host interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<u64>,
    /// "4" or "6": 0.4.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    /// 1.1.0 and later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// The VERSION answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionResult {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

/// The spec's error object, printed with a non-zero exit.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResult {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// What Weir wired for one attachment.
#[derive(Debug, Clone)]
pub struct Wired {
    pub host_ifname: String,
    pub host_mac: String,
    pub pod_ifname: String,
    pub pod_mac: String,
    pub netns: String,
    pub mtu: u32,
    /// Address with prefix, and its gateway.
    pub ips: Vec<(IpAddr, u8, IpAddr)>,
    /// Per family (IPv6?), the metric the default route was given, when not the kernel's
    /// default (another interface of the pod had a default route first).
    pub default_route_priorities: Vec<(bool, Option<u32>)>,
}

impl Wired {
    fn default_route_priority(&self, v6: bool) -> Option<u32> {
        self.default_route_priorities
            .iter()
            .find(|(family, _)| *family == v6)
            .and_then(|(_, p)| *p)
    }
}

fn ip_version(address: &str) -> &'static str {
    if address.contains(':') { "6" } else { "4" }
}

/// The result for `cni_version`: a `prev` result (chaining) keeps all its content, and Weir's
/// interfaces, addresses and routes are appended.
pub fn build(cni_version: &str, wired: &Wired, prev: Option<&CniResult>) -> CniResult {
    let shape = Shape::of(cni_version);
    let mut result = prev.cloned().unwrap_or_default();
    result.cni_version = cni_version.to_owned();
    let mtu = shape.has_mtu_and_priority().then_some(wired.mtu);
    result.interfaces.push(Interface {
        name: Some(wired.host_ifname.clone()),
        mac: Some(wired.host_mac.clone()),
        mtu,
        ..Interface::default()
    });
    result.interfaces.push(Interface {
        name: Some(wired.pod_ifname.clone()),
        mac: Some(wired.pod_mac.clone()),
        mtu,
        sandbox: Some(wired.netns.clone()),
        ..Interface::default()
    });
    let pod_index = result.interfaces.len() as u64 - 1;
    for (addr, prefix, gateway) in &wired.ips {
        result.ips.push(IpConfig {
            address: format!("{addr}/{prefix}"),
            gateway: Some(gateway.to_string()),
            interface: Some(pod_index),
            ..IpConfig::default()
        });
        result.routes.push(Route {
            dst: if addr.is_ipv4() { "0.0.0.0/0" } else { "::/0" }.to_owned(),
            gw: Some(gateway.to_string()),
            priority: wired
                .default_route_priority(addr.is_ipv6())
                .filter(|_| shape.has_mtu_and_priority()),
            ..Route::default()
        });
    }
    // Every IP, a prevResult's too, in the version's shape.
    for ip in &mut result.ips {
        ip.version = shape
            .has_ip_version()
            .then(|| ip_version(&ip.address).to_owned());
    }
    result
}

/// The addresses (with prefix) a previous result lists for the interface named `ifname` in a
/// sandbox, for CHECK.
pub fn prev_addresses(prev: &CniResult, ifname: &str) -> Vec<String> {
    let Some(index) = prev
        .interfaces
        .iter()
        .position(|i| i.name.as_deref() == Some(ifname) && i.sandbox.is_some())
    else {
        return Vec::new();
    };
    prev.ips
        .iter()
        .filter(|ip| ip.interface == Some(index as u64))
        .map(|ip| ip.address.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn wired() -> Wired {
        Wired {
            host_ifname: "weir0123456789a".into(),
            host_mac: "02:00:00:00:00:01".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "02:00:00:00:00:02".into(),
            netns: "/run/netns/p".into(),
            mtu: 1500,
            ips: vec![
                (
                    "10.0.0.5".parse().unwrap(),
                    32,
                    "169.254.1.1".parse().unwrap(),
                ),
                ("fd00::5".parse().unwrap(), 128, "fe80::1".parse().unwrap()),
            ],
            default_route_priorities: vec![(false, None), (true, None)],
        }
    }

    fn json_of(r: &CniResult) -> Value {
        serde_json::to_value(r).unwrap()
    }

    #[test]
    fn the_1_1_result_has_interface_mtu_and_no_ip_version() {
        let r = build("1.1.0", &wired(), None);
        assert_eq!(
            json_of(&r),
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "weir0123456789a", "mac": "02:00:00:00:00:01", "mtu": 1500},
                    {"name": "eth0", "mac": "02:00:00:00:00:02", "mtu": 1500, "sandbox": "/run/netns/p"},
                ],
                "ips": [
                    {"address": "10.0.0.5/32", "gateway": "169.254.1.1", "interface": 1},
                    {"address": "fd00::5/128", "gateway": "fe80::1", "interface": 1},
                ],
                "routes": [
                    {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                    {"dst": "::/0", "gw": "fe80::1"},
                ],
                "dns": {},
            })
        );
        assert_eq!(
            prev_addresses(&r, "eth0"),
            vec!["10.0.0.5/32".to_string(), "fd00::5/128".to_string()]
        );
    }

    #[test]
    fn the_0_4_result_has_ip_versions_and_no_1_1_fields() {
        let mut second = wired();
        second.default_route_priorities = vec![(false, Some(1)), (true, Some(1025))];
        let r = build("0.4.0", &second, None);
        assert_eq!(
            json_of(&r),
            json!({
                "cniVersion": "0.4.0",
                "interfaces": [
                    {"name": "weir0123456789a", "mac": "02:00:00:00:00:01"},
                    {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/p"},
                ],
                "ips": [
                    {"address": "10.0.0.5/32", "gateway": "169.254.1.1", "interface": 1, "version": "4"},
                    {"address": "fd00::5/128", "gateway": "fe80::1", "interface": 1, "version": "6"},
                ],
                "routes": [
                    {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                    {"dst": "::/0", "gw": "fe80::1"},
                ],
                "dns": {},
            })
        );
    }

    #[test]
    fn a_second_interfaces_route_metric_is_reported_in_1_1() {
        let mut second = wired();
        second.default_route_priorities = vec![(false, Some(1)), (true, Some(1025))];
        let r = build("1.1.0", &second, None);
        assert_eq!(
            json_of(&r)["routes"],
            json!([
                {"dst": "0.0.0.0/0", "gw": "169.254.1.1", "priority": 1},
                {"dst": "::/0", "gw": "fe80::1", "priority": 1025},
            ])
        );
        let r = json_of(&build("1.0.0", &second, None));
        assert!(r["routes"][0].get("priority").is_none());
        assert!(r["interfaces"][0].get("mtu").is_none());
        assert!(r["ips"][0].get("version").is_none());
    }

    #[test]
    fn prev_result_is_kept_and_indices_shift() {
        let prev: CniResult = serde_json::from_value(json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "x", "pciID": "0000:00:01.0"}],
            "ips": [{"address": "192.0.2.1/24", "interface": 0}],
            "routes": [{"dst": "192.0.2.0/24", "table": 100}],
            "dns": {"nameservers": ["192.0.2.53"]},
            "custom": 1,
        }))
        .unwrap();
        let r = json_of(&build("1.1.0", &wired(), Some(&prev)));
        assert_eq!(
            r["interfaces"][0],
            json!({"name": "x", "pciID": "0000:00:01.0"})
        );
        assert_eq!(
            r["ips"][0],
            json!({"address": "192.0.2.1/24", "interface": 0})
        );
        assert_eq!(r["ips"][1]["interface"], 2);
        assert_eq!(r["routes"][0], json!({"dst": "192.0.2.0/24", "table": 100}));
        assert_eq!(r["dns"], json!({"nameservers": ["192.0.2.53"]}));
        assert_eq!(r["custom"], 1);
    }

    #[test]
    fn a_prev_result_is_put_in_the_shape_asked_for() {
        let prev: CniResult = serde_json::from_value(json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "x", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "192.0.2.1/24", "interface": 0, "version": "4"}],
        }))
        .unwrap();
        let r = json_of(&build("1.0.0", &wired(), Some(&prev)));
        assert_eq!(
            r["ips"][0],
            json!({"address": "192.0.2.1/24", "interface": 0})
        );
        let mut prev = prev;
        prev.ips[0].version = None;
        prev.ips[0].address = "2001:db8::1/64".into();
        let r = json_of(&build("0.4.0", &wired(), Some(&prev)));
        assert_eq!(r["ips"][0]["version"], "6");
        assert_eq!(
            prev_addresses(&prev, "x"),
            vec!["2001:db8::1/64".to_string()]
        );
    }

    #[test]
    fn version_and_error_objects_have_the_spec_keys() {
        let v = VersionResult {
            cni_version: "1.1.0".into(),
            supported_versions: vec!["0.4.0".into(), "1.0.0".into(), "1.1.0".into()],
        };
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            json!({"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
        );
        let e = ErrorResult {
            cni_version: "0.4.0".into(),
            code: 7,
            msg: "invalid network configuration".into(),
            details: "why".into(),
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"cniVersion": "0.4.0", "code": 7, "msg": "invalid network configuration", "details": "why"})
        );
    }
}
