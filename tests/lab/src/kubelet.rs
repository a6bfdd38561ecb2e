//! Kubelet as a CNI plugin and a standalone agent see it: a Pod's object is in the cluster (the
//! manifests directory) before its sandbox is wired, the plugin's ADD runs in the node's
//! namespace, and the addresses it returns are published in the Pod's `status.podIPs`, which is
//! how the other nodes learn them.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context as _, bail};

use crate::cni::{Plugin, PodRef};
use crate::objects::{self, Object};

/// Starts a pod as kubelet does: its object first, ADD, then its addresses in its status.
/// Returns the addresses.
pub fn start_pod(
    plugin: &Plugin,
    manifests: &Path,
    pod: &mut Object,
    container_id: &str,
    pod_netns: &str,
) -> anyhow::Result<Vec<IpAddr>> {
    objects::write(manifests, pod)?;
    let key = pod.key();
    let (namespace, name) = key.split_once('/').context("a Pod is namespaced")?;
    let pod_ref = PodRef {
        container_id,
        namespace,
        name,
        netns: pod_netns,
    };
    let (out, _) = plugin
        .try_run_on("ADD", &pod_ref, "eth0", None)
        .with_context(|| format!("running {:?}", plugin.program))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "CNI ADD of {key} failed ({}): {} {}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let ips = crate::cni::addresses(&stdout)
        .map_err(|e| anyhow::anyhow!("the CNI ADD result of {key} ({e}): {stdout}"))?;
    pod.set_pod_ips(&ips.iter().map(IpAddr::to_string).collect::<Vec<_>>());
    objects::write(manifests, pod)?;
    Ok(ips)
}

/// Tears a pod's sandbox down: CNI DEL (whose failure is returned, after the object is gone),
/// and the Pod object removed.
pub fn stop_pod(plugin: &Plugin, manifests: &Path, pod: &PodRef<'_>) -> anyhow::Result<()> {
    let result = plugin.try_run_on("DEL", pod, "eth0", None);
    let _ = std::fs::remove_file(manifests.join(objects::file_name(
        "Pod",
        Some(pod.namespace),
        pod.name,
    )));
    let (out, _) = result.with_context(|| format!("running {:?}", plugin.program))?;
    if !out.status.success() {
        bail!(
            "CNI DEL of {}/{} failed ({}): {}",
            pod.namespace,
            pod.name,
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}
