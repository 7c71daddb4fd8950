use anyhow::Result;
use clap::{Parser, Subcommand};
use kpx::datapath::{Datapath, LoadOptions};

/// kpx: a kube-proxy replacement with an eBPF datapath.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath into this kernel (the verifier runs) and report its maps.
    Check,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Check => check(),
    }
}

fn check() -> Result<()> {
    let dp = Datapath::load(&LoadOptions::default())?;
    println!("datapath loaded: the kernel's verifier accepted it");
    drop(dp);
    Ok(())
}
