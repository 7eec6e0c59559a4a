//! `mira-worker`: Mira's slide-processing worker. Its subcommands (`run`, `process`) arrive
//! with the GPU-worker issue; today it answers `--help` and `--version` only.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "mira-worker",
    version,
    about = "Mira's slide-processing worker (subcommands arrive with the GPU-worker issue)"
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("mira-worker: no subcommands yet; see --help");
    std::process::exit(2);
}
