//! `cargo xtask lab ...`: the lab from the command line.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};

use weir_lab::lab::{self as lab, Expectations, Lab, LabSpec, Manifest, ProbeSpec, Proto, Target};

#[derive(clap::Subcommand, Debug)]
pub enum LabCommand {
    /// Build a lab from a manifests file or directory (Namespaces, Pods, NetworkPolicies), or a
    /// mesh of clusters with `--cluster NAME=MANIFESTS` given twice or more.
    Up {
        #[arg(
            long,
            required_unless_present = "clusters",
            conflicts_with = "clusters"
        )]
        manifests: Option<PathBuf>,
        /// A cluster of a mesh lab: its name (what `weir.io/cluster` says) and its manifests.
        /// Each cluster gets `--nodes` nodes, the first its mesh gateway; only the gateways are
        /// joined, through a WAN namespace (see `cargo xtask demo mesh`).
        #[arg(long = "cluster", value_name = "NAME=MANIFESTS")]
        clusters: Vec<String>,
        /// Nodes (per cluster, in a mesh lab).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value = "lab")]
        name: String,
        /// A port every pod serves besides its containerPorts (repeatable).
        #[arg(long = "extra-port")]
        extra_ports: Vec<u16>,
    },
    /// Apply the objects of a file (policies, label changes, new pods).
    Apply {
        file: PathBuf,
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Delete the objects a file names.
    Delete {
        file: PathBuf,
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Replace the labels of a Pod (`ns/name`) or Namespace (`name`): KEY=VALUE...
    Label {
        /// `pod/NS/NAME` or `namespace/NAME`
        object: String,
        labels: Vec<String>,
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Probe from every pod to every pod's ports; print the matrix.
    Probe {
        #[arg(long, default_value = "lab")]
        name: String,
        /// Expectations (a Markdown table `| from | to | port | ALLOW/DENY |` or JSON); the
        /// differences are printed and make the command fail.
        #[arg(long)]
        expect: Option<PathBuf>,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Probe these PORT/PROTO on every pod instead of the declared containerPorts.
        #[arg(long = "port")]
        ports: Vec<String>,
    },
    /// Take a lab down (everything it made), or every lab.
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long)]
        all: bool,
    },
    /// (internal) The servers a lab pod runs.
    #[command(hide = true)]
    Serve(ServeArgs),
}

/// `lab serve`: the command line of weir_lab::lab::servers::spawn.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The lab this server belongs to (so `lab down` finds it).
    #[arg(long)]
    lab: String,
    /// The pod's name, written back on every connection and datagram.
    #[arg(long)]
    pod: String,
    #[arg(long)]
    tcp: Vec<u16>,
    #[arg(long)]
    udp: Vec<u16>,
}

pub fn run(command: LabCommand) -> anyhow::Result<()> {
    match command {
        LabCommand::Up {
            manifests,
            clusters,
            nodes,
            name,
            extra_ports,
        } => {
            let Some(manifests) = manifests else {
                return lab::mesh::up_from_cli(&name, &clusters, nodes, extra_ports);
            };
            let mut spec = LabSpec::new(&name, nodes).manifest(Manifest::Path(manifests));
            spec.extra_ports = extra_ports;
            let lab = Lab::up(spec)?;
            let state = lab.keep();
            println!(
                "lab {name}: {} nodes, {} pods",
                state.nodes.len(),
                state.pods.len()
            );
            for node in &state.nodes {
                println!(
                    "  {} (netns {}, underlay {}, pods {}, agent pid {}, log {})",
                    node.name,
                    node.netns,
                    node.underlay_ip,
                    node.pod_cidr,
                    node.agent_pid.unwrap_or(0),
                    node.log.display()
                );
            }
            for (key, pod) in &state.pods {
                println!(
                    "  {key} on {} at {} (netns {})",
                    pod.node,
                    pod.ips.join(","),
                    pod.netns
                );
            }
            println!("take it down with `cargo xtask lab down --name {name}`");
            Ok(())
        }
        LabCommand::Apply { file, name } => Lab::open(&name)?.apply(&file),
        LabCommand::Delete { file, name } => Lab::open(&name)?.delete(&file),
        LabCommand::Label {
            object,
            labels,
            name,
        } => {
            let mut lab = Lab::open(&name)?;
            let map: BTreeMap<String, String> = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("{l:?} is not KEY=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?;
            let parts: Vec<&str> = object.split('/').collect();
            match parts.as_slice() {
                ["pod", ns, pod] => lab.set_labels("Pod", Some(ns), pod, &map),
                ["namespace", ns] => lab.set_labels("Namespace", None, ns, &map),
                _ => bail!("name the object as pod/NS/NAME or namespace/NAME"),
            }
        }
        LabCommand::Probe {
            name,
            expect,
            json,
            ports,
        } => {
            if lab::mesh::is_mesh(&name) {
                return lab::mesh::probe_from_cli(&name, expect.as_deref(), json);
            }
            let lab = Lab::open(&name)?;
            let mut spec = ProbeSpec::default();
            if !ports.is_empty() {
                spec.ports = Some(
                    ports
                        .iter()
                        .map(|p| parse_port(p))
                        .collect::<anyhow::Result<_>>()?,
                );
            }
            let expect = expect.map(|p| Expectations::load(&p)).transpose()?;
            if let Some(e) = &expect {
                spec.extra = e
                    .entries
                    .keys()
                    .map(|(_, t)| t.clone())
                    .filter(|t: &Target| lab.state().pods.contains_key(&t.pod))
                    .collect();
            }
            let matrix = lab.probe(&spec)?;
            lab::matrix::report(&matrix, expect.as_ref(), json)
        }
        LabCommand::Down { name, all } => {
            if all {
                let names = lab::down_all()?;
                println!("took down: {}", names.join(", "));
            } else {
                lab::down(&name)?;
                println!("lab {name} is down");
            }
            Ok(())
        }
        LabCommand::Serve(args) => lab::servers::serve(&lab::servers::ServeOptions {
            lab: args.lab,
            pod: args.pod,
            tcp: args.tcp,
            udp: args.udp,
        }),
    }
}

fn parse_port(text: &str) -> anyhow::Result<(u16, Proto)> {
    let (port, proto) = text.split_once('/').unwrap_or((text, "TCP"));
    Ok((port.parse()?, proto.parse()?))
}
