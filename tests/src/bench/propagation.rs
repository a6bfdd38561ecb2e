//! Propagation: how long a policy change takes to reach the maps (compile, diff, write), with
//! 1,000 local pods and 1,000 policies; and a full recompile of 10,000 policies. Runs the agent's
//! own compiler and writer against a real (unpinned) kernel object. The manifests-directory path
//! in front of it (inotify, parsing one changed file) is not included.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use weir_agent::datapath::{desired::desired_maps, loader, maps::DatapathMaps, writer::Writer};
use weir_policy::{
    compile::{CompileInput, compile},
    identity::IdentityAllocator,
    model::{ClusterState, ObjectKey, parse_documents},
};

use super::stats::{Samples, ms, rss_mib};

const NODE: &str = "bench";
const NAMESPACES: usize = 10;

fn pod_address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 70, (i / 250) as u8, (i % 250 + 2) as u8))
}

fn cluster_yaml(pods: usize) -> String {
    let mut y = String::new();
    for n in 0..NAMESPACES {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns{n}\n  labels:\n    team: t{}\n",
            n % 3
        );
    }
    for i in 0..pods {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: ns{}\n  labels:\n    app: app{}\n    tier: t{}\nspec:\n  nodeName: {NODE}\n  containers:\n  - name: c\n    ports:\n    - containerPort: 80\n      name: http\n",
            i % NAMESPACES,
            i % 100,
            i % 20
        );
    }
    y
}

/// Policy `j`: selects app{j%100} in ns{j%10}, admits a tier from the same namespace on `port`,
/// a team of namespaces on the named port, and every tenth one an ipBlock with an except.
fn policy_yaml(j: usize, port: u16) -> String {
    let mut y = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: pol{j}\n  namespace: ns{}\nspec:\n  podSelector:\n    matchLabels:\n      app: app{}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          tier: t{}\n    ports:\n    - port: {port}\n  - from:\n    - namespaceSelector:\n        matchLabels:\n          team: t{}\n    ports:\n    - port: http\n",
        j % NAMESPACES,
        j % 100,
        (j + 1) % 20,
        j % 3
    );
    if j.is_multiple_of(10) {
        let _ = write!(
            y,
            "  - from:\n    - ipBlock:\n        cidr: 10.{}.0.0/16\n        except: [10.{}.1.0/24]\n",
            100 + j % 100,
            100 + j % 100
        );
    }
    let _ = write!(
        y,
        "  egress:\n  - to:\n    - podSelector:\n        matchLabels:\n          app: app{}\n    ports:\n    - port: 5432\n      endPort: 5440\n",
        (j + 7) % 100
    );
    y
}

fn state_of(yaml: &str) -> anyhow::Result<ClusterState> {
    let mut state = ClusterState::default();
    for object in parse_documents(yaml, "bench") {
        state.apply(object.map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    Ok(state)
}

fn input(pods: usize, policies: usize) -> anyhow::Result<CompileInput> {
    let mut yaml = cluster_yaml(pods);
    for j in 0..policies {
        yaml.push_str(&policy_yaml(j, 80));
    }
    let local_endpoints: BTreeMap<ObjectKey, Vec<IpAddr>> = (0..pods)
        .map(|i| {
            (
                ObjectKey::new(format!("ns{}", i % NAMESPACES), format!("p{i}")),
                vec![pod_address(i)],
            )
        })
        .collect();
    Ok(CompileInput {
        state: state_of(&yaml)?,
        node_name: NODE.to_owned(),
        cluster_id: 0,
        local_endpoints,
    })
}

pub fn run(changes: usize) -> anyhow::Result<()> {
    let rss_before = rss_mib();
    let mut ebpf = loader::load(None)?;
    let mut writer = Writer::adopt(DatapathMaps::take(&mut ebpf)?)?;
    let mut ids = IdentityAllocator::default();

    let mut input = input(1000, 1000)?;
    let started = Instant::now();
    let compiled = compile(&input, &mut ids)?;
    let compile_first = started.elapsed();
    let stats = writer.apply(&desired_maps(&compiled, |_| Some(1), 0))?;
    let first = started.elapsed();
    let entries = stats.writes;
    let rss_after = rss_mib();

    // Change one policy at a time (a port flips), as a user editing a policy would.
    let mut samples = Vec::with_capacity(changes);
    for c in 0..changes {
        let j = (c * 37) % 1000;
        let port = if c % 2 == 0 { 81 } else { 80 };
        let changed = state_of(&policy_yaml(j, port))?;
        let started = Instant::now();
        for (key, policy) in changed.policies {
            input.state.policies.insert(key, policy);
        }
        let compiled = compile(&input, &mut ids)?;
        writer.apply(&desired_maps(&compiled, |_| Some(1), 0))?;
        samples.push(started.elapsed());
    }
    let samples = Samples::new(samples);
    println!("propagation with 1,000 local pods and 1,000 policies ({entries} map entries):");
    println!(
        "  first compile {} , first compile + write {}",
        ms(compile_first),
        ms(first)
    );
    println!(
        "  one policy changed, compile + diff + write ({changes} changes): p50 {}  p99 {}  (goal p99 <= 100 ms)",
        ms(samples.percentile(50.0)),
        ms(samples.percentile(99.0))
    );
    println!(
        "  memory: {:.1} MiB resident for the compiled state and maps' shadow ({:.1} MiB before)",
        rss_after, rss_before
    );

    let big = input_for_full_recompile()?;
    let mut ids = IdentityAllocator::default();
    let started = Instant::now();
    let compiled = compile(&big, &mut ids)?;
    let compile_time = started.elapsed();
    let mut ebpf = loader::load(None)?;
    let mut writer = Writer::adopt(DatapathMaps::take(&mut ebpf)?)?;
    let stats = writer.apply(&desired_maps(&compiled, |_| Some(1), 0))?;
    let total: Duration = started.elapsed();
    println!(
        "full recompile of 10,000 policies (1,000 pods): compile {} , compile + write {} ({} entries) (goal <= 1 s)",
        ms(compile_time),
        ms(total),
        stats.writes
    );
    println!("  memory: {:.1} MiB resident", rss_mib());
    Ok(())
}

fn input_for_full_recompile() -> anyhow::Result<CompileInput> {
    input(1000, 10_000)
}
