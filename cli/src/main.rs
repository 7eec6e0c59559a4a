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
    // The service name its traces carry, unless OTEL_SERVICE_NAME says another.
    let service = match &cli.command {
        Command::Dev { .. } => "mira-dev",
        Command::Serve { .. } => "mira-gateway",
        Command::Relay { .. } => "mira-relay",
        Command::Projector { .. } => "mira-projector",
        Command::Handlers { .. } => "mira-handlers",
        _ => "mira",
    };
    // `mira dev --otlp URL`: this process and the workers it starts send their traces there.
    if let Command::Dev { otlp: Some(url), .. } = &cli.command {
        // Set before any thread starts; the workers inherit it.
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", url);
    }
    let telemetry = match telemetry::init(service, if dev_run { telemetry::DEV_FILTER } else { "warn" }) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("mira: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mira: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(commands::run(cli));
    // The last spans go out before the process ends.
    drop(rt);
    drop(telemetry);
    match result {
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
