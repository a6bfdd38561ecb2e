//! `cargo xtask <command>`: everything beyond a plain `cargo build`.

mod setup;
mod test;
mod toolchain;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Weir's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check, and install where missing, what building the kernel programs needs.
    Setup,
    /// The whole test suite: formatting, clippy, unit tests, and the root-only kernel tests.
    Test(test::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test(options) => test::run(&options),
    }
}
