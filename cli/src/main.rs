//! `mira`: parses arguments and settings, then calls the library. Every failure ends as one
//! line on stderr and a non-zero exit: 1 when `mira audit verify` finds the log altered,
//! 2 for anything else (bad settings, an unreachable database, …).

use std::process::ExitCode;

use clap::Parser;
use mira_gateway::telemetry;

use commands::args::{Cli, Command};

mod commands;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `mira dev` is watched in a terminal: a line per request and per lifecycle step. Every
    // other command keeps its output to what it was asked for.
    let dev_run = matches!(&cli.command, Command::Dev { command: None, .. });
    if let Err(e) = telemetry::init(if dev_run { telemetry::DEV_FILTER } else { "warn" }) {
        eprintln!("mira: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mira: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("mira: {line}");
            if e.is::<commands::Verdict>() {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
        }
    }
}
