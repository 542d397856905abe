//! `vkx-guest`: the guest agent.
//!
//! In this release it reports its versions; attestation (`once`, `run`)
//! arrives with the sessions, transports and TPM evidence.

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout)] // A command-line tool prints its results.

use clap::{Parser, Subcommand};
use vkx_common::wire::PROTOCOL_VERSION_1;

#[derive(Parser)]
#[command(name = "vkx-guest", version, about = "vkx guest agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the agent and protocol versions.
    Version,
}

fn main() {
    match Cli::parse().command {
        Command::Version => println!(
            "vkx-guest {} (protocol versions {PROTOCOL_VERSION_1}..={PROTOCOL_VERSION_1})",
            env!("CARGO_PKG_VERSION")
        ),
    }
}
