//! `weir`: the operator's CLI.
//!
//! - `weir explain --manifests DIR SRC DST PORT/PROTO` answers offline (no agent, no root, no
//!   kernel) from the same compiler and the same lookup the datapath enforces;
//!   `--matrix [--svg FILE]` does it for every pair of pods.
//! - The other commands read a running agent through its local gRPC API (read-only), on
//!   `--socket`.

mod error;
mod explain;
mod live;
mod manifests;
mod matrix;
mod output;
mod svg;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use weir_policy::explain::PortProto;

use crate::{error::CliError, output::Format};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Weir's operator CLI: why can A reach B, and what the agent enforces"
)]
struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "WEIR_SOCKET", default_value = weir_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format: table for people, json or yaml for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Why a connection from SRC to DST on PORT/PROTO is allowed or denied (ALLOW or DENY
    /// first): from the agent, or offline with --manifests.
    Explain(ExplainArgs),
    /// The agent's enforcement state, generation, endpoints, policies (rejected ones with
    /// reasons), map pressure and dropped events.
    Status,
    /// The pod interfaces this node enforces, with addresses, identities and labels.
    Endpoints,
    /// Every identity the datapath knows: pods', CIDR and reserved.
    Identities,
    /// Every rule enforced for a pod on this node, per direction, named by policy and index.
    Policy {
        /// namespace/name
        pod: String,
    },
    /// Recent verdicts from the agent's flow log, and with --follow new ones as they happen.
    Flows(FlowsArgs),
}

#[derive(clap::Args)]
struct FlowsArgs {
    /// Keep printing new verdicts until interrupted.
    #[arg(short, long)]
    follow: bool,
    /// Only this pod (namespace/name).
    #[arg(long)]
    pod: Option<String>,
    /// Only pods in this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only drops or only allows.
    #[arg(long, value_enum)]
    verdict: Option<FlowVerdict>,
    /// Only verdicts from this long ago on: 30s, 5m, 2h, 1d.
    #[arg(long, value_parser = live::parse_since)]
    since: Option<std::time::Duration>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FlowVerdict {
    Drop,
    Allow,
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// Answer from manifests (Namespaces, Pods, NetworkPolicies, Nodes) instead of the agent:
    /// no agent, root or kernel needed. A directory is read as the agent reads it; repeat the
    /// flag to add directories or single files.
    #[arg(long, value_name = "DIR|FILE")]
    manifests: Vec<PathBuf>,
    /// Every pod to every port every other pod declares (with --manifests).
    #[arg(long, conflicts_with_all = ["source", "destination", "port"])]
    matrix: bool,
    /// With --matrix: also draw the matrix as an SVG picture into FILE.
    #[arg(long, value_name = "FILE", requires = "matrix")]
    svg: Option<PathBuf>,
    /// With --matrix: a port to ask about on every pod as well (repeatable), e.g. 3307/TCP.
    #[arg(long = "port", value_name = "PORT/PROTO", requires = "matrix")]
    extra_ports: Vec<String>,
    /// The connecting pod, as namespace/name.
    #[arg(value_name = "SRC", required_unless_present = "matrix")]
    source: Option<String>,
    /// The pod connected to, as namespace/name.
    #[arg(value_name = "DST", required_unless_present = "matrix")]
    destination: Option<String>,
    /// The destination port and protocol, e.g. 8080/TCP.
    #[arg(value_name = "PORT/PROTO", required_unless_present = "matrix")]
    port: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut text = format!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{text}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<String, CliError> {
    match &cli.command {
        Command::Explain(args) => run_explain(cli, args),
        Command::Status => live::block_on(live::status(&cli.socket, cli.output)),
        Command::Endpoints => live::block_on(live::endpoints(&cli.socket, cli.output)),
        Command::Identities => live::block_on(live::identities(&cli.socket, cli.output)),
        Command::Policy { pod } => live::block_on(live::policy(&cli.socket, pod, cli.output)),
        Command::Flows(args) => {
            let query = live::FlowQuery {
                follow: args.follow,
                pod: args.pod.clone(),
                namespace: args.namespace.clone(),
                verdict: args.verdict.map(|v| {
                    match v {
                        FlowVerdict::Drop => "drop",
                        FlowVerdict::Allow => "allow",
                    }
                    .to_owned()
                }),
                since: args.since,
            };
            live::block_on(live::flows(&cli.socket, query, cli.output))
        }
    }
}

fn run_explain(cli: &Cli, args: &ExplainArgs) -> Result<String, CliError> {
    let paths = &args.manifests;
    if paths.is_empty() && args.matrix {
        return Err(CliError::Usage(
            "--matrix needs --manifests DIR: the matrix is computed offline".to_owned(),
        ));
    }
    if args.matrix {
        let extra: Vec<PortProto> = args
            .extra_ports
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()?;
        let scenario = explain::load_scenario(paths)?;
        let m = matrix::Matrix::build(&scenario, &extra)?;
        if let Some(path) = &args.svg {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            let title = format!("Reachability: {}", names.join(" + "));
            std::fs::write(path, svg::draw(&m, &title)).map_err(|source| CliError::Write {
                path: path.clone(),
                source,
            })?;
        }
        return m.render(cli.output);
    }
    let (Some(source), Some(destination), Some(port)) =
        (&args.source, &args.destination, &args.port)
    else {
        return Err(CliError::Usage(
            "explain needs SRC DST PORT/PROTO, or --matrix".to_owned(),
        ));
    };
    if paths.is_empty() {
        return live::block_on(live::explain(
            &cli.socket,
            source,
            destination,
            port,
            cli.output,
        ));
    }
    explain::offline(paths, source, destination, port, cli.output)
}
