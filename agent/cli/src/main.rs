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
    /// Why a connection from SRC to DST on PORT/PROTO is allowed or denied (ALLOW or DENY first).
    Explain(ExplainArgs),
    /// Whether the agent is ready to serve CNI ADD, and on which node.
    Status,
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
    }
}

fn run_explain(cli: &Cli, args: &ExplainArgs) -> Result<String, CliError> {
    if args.manifests.is_empty() {
        return Err(CliError::Usage(
            "explain needs --manifests DIR (the agent's own explain is not served yet)".to_owned(),
        ));
    }
    let paths = &args.manifests;
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
    explain::offline(paths, source, destination, port, cli.output)
}
