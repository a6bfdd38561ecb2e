//! The ADD result (SPEC 1.1 "Success", and the 0.4.0 shape), merged with a prevResult when the
//! plugin is chained after another.

use std::net::IpAddr;

use serde_json::{Value, json};

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

/// The result JSON for `cni_version`; a `prev` result (chaining) keeps all its content, and
/// Weir's interfaces, addresses and routes are appended.
pub fn build(cni_version: &str, wired: &Wired, prev: Option<&Value>) -> Value {
    let legacy = cni_version.starts_with("0.");
    let mut interfaces: Vec<Value> = prev
        .and_then(|p| p.get("interfaces"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let base = interfaces.len();
    let mut host = json!({ "name": wired.host_ifname, "mac": wired.host_mac });
    let mut pod = json!({
        "name": wired.pod_ifname, "mac": wired.pod_mac, "sandbox": wired.netns
    });
    if cni_version == "1.1.0" {
        // Interface `mtu` is new in 1.1.
        host["mtu"] = json!(wired.mtu);
        pod["mtu"] = json!(wired.mtu);
    }
    interfaces.push(host);
    interfaces.push(pod);
    let pod_index = base + 1;

    let mut ips: Vec<Value> = prev
        .and_then(|p| p.get("ips"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut routes: Vec<Value> = prev
        .and_then(|p| p.get("routes"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (addr, prefix, gateway) in &wired.ips {
        let mut ip = json!({
            "address": format!("{addr}/{prefix}"),
            "gateway": gateway.to_string(),
            "interface": pod_index,
        });
        if legacy {
            ip["version"] = json!(if addr.is_ipv4() { "4" } else { "6" });
        }
        ips.push(ip);
        let default = if addr.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
        let mut route = json!({ "dst": default, "gw": gateway.to_string() });
        // Route `priority` is new in 1.1.
        if let Some(p) = wired.default_route_priority(addr.is_ipv6())
            && cni_version == "1.1.0"
        {
            route["priority"] = json!(p);
        }
        routes.push(route);
    }
    let dns = prev
        .and_then(|p| p.get("dns"))
        .cloned()
        .unwrap_or_else(|| json!({}));

    let mut result = match prev {
        Some(Value::Object(m)) => Value::Object(m.clone()),
        _ => json!({}),
    };
    result["cniVersion"] = json!(cni_version);
    result["interfaces"] = Value::Array(interfaces);
    result["ips"] = Value::Array(ips);
    result["routes"] = Value::Array(routes);
    result["dns"] = dns;
    result
}

/// The addresses (with prefix) a previous result lists for the interface named `ifname` in
/// `sandbox`, for CHECK.
pub fn prev_addresses(prev: &Value, ifname: &str) -> Vec<String> {
    let interfaces = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let Some(index) = interfaces.iter().position(|i| {
        i.get("name").and_then(Value::as_str) == Some(ifname) && i.get("sandbox").is_some()
    }) else {
        return Vec::new();
    };
    prev.get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|ip| ip.get("interface").and_then(Value::as_u64) == Some(index as u64))
        .filter_map(|ip| ip.get("address").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn result_has_the_spec_shape() {
        let r = build("1.1.0", &wired(), None);
        assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/p");
        assert_eq!(r["interfaces"][1]["mtu"], 1500);
        assert_eq!(r["ips"][0]["address"], "10.0.0.5/32");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"][1], json!({"dst": "::/0", "gw": "fe80::1"}));
        assert_eq!(r["dns"], json!({}));
        let legacy = build("0.4.0", &wired(), None);
        assert_eq!(legacy["ips"][1]["version"], "6");
        assert!(legacy["interfaces"][1].get("mtu").is_none());
        assert_eq!(
            prev_addresses(&r, "eth0"),
            vec!["10.0.0.5/32".to_string(), "fd00::5/128".to_string()]
        );
    }

    #[test]
    fn a_second_interfaces_route_metric_is_reported_in_1_1() {
        let mut second = wired();
        second.default_route_priorities = vec![(false, Some(1)), (true, Some(1025))];
        let r = build("1.1.0", &second, None);
        assert_eq!(
            r["routes"],
            json!([
                {"dst": "0.0.0.0/0", "gw": "169.254.1.1", "priority": 1},
                {"dst": "::/0", "gw": "fe80::1", "priority": 1025},
            ])
        );
        let legacy = build("1.0.0", &second, None);
        assert!(legacy["routes"][0].get("priority").is_none());
    }

    #[test]
    fn prev_result_is_kept_and_indices_shift() {
        let prev = json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "x"}],
            "ips": [{"address": "192.0.2.1/24", "interface": 0}],
            "dns": {"nameservers": ["192.0.2.53"]},
            "custom": 1,
        });
        let r = build("1.1.0", &wired(), Some(&prev));
        assert_eq!(r["interfaces"][0], json!({"name": "x"}));
        assert_eq!(r["ips"][1]["interface"], 2);
        assert_eq!(r["dns"], prev["dns"]);
        assert_eq!(r["custom"], 1);
    }
}
