//! The `quiver-bench` binary; see the library's documentation.
#![forbid(unsafe_code)]

use clap::Parser as _;
use quiver_bench::cli::{self, Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => cli::run(*args).await,
        Command::EchoServer(args) => cli::echo_server(args).await,
        Command::Soak(args) => quiver_bench::soak::soak(args).await,
        Command::GenWeights(args) => quiver_bench::weights::gen_weights(&args),
    }
}
