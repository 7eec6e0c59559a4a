//! `mira`: parses arguments and settings, then calls the library. Every failure ends as one
//! line on stderr and a non-zero exit: 1 when `mira audit verify` finds the log altered,
//! 2 for anything else (bad settings, an unreachable database, …).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use mira_eventlog::checkpoint::{self, AuditKey};
use mira_eventlog::{verify, EventLog};
use mira_gateway::config::Settings;
use mira_gateway::{audit, bench, commands::Commands, telemetry};

#[derive(Parser)]
#[command(
    name = "mira",
    version,
    about = "Mira: whole-slide image processing on an audit-grade event log"
)]
struct Cli {
    /// Optional TOML settings file, read after the defaults and before the environment.
    #[arg(long, global = true, env = "MIRA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database schema (idempotent).
    Migrate {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Verify, checkpoint, replay and export the event log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Benchmarks against a live database.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Re-derive every hash and check every checkpoint's digest and signature. Exits 1 and
    /// names the first bad event if anything was altered, removed or re-hashed.
    Verify {
        /// The trusted public audit key (hex). Default: Audit__PublicKeyFile, or the `.pub`
        /// beside Audit__SigningKeyFile.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write a signed checkpoint covering every settled event now.
    Checkpoint {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild Job and Slide state as of an instant, from the log alone.
    Replay {
        /// The instant, RFC 3339 (for example 2026-11-25T18:00:00.123456Z).
        #[arg(long, value_parser = parse_time, value_name = "T")]
        as_of: DateTime<Utc>,
        /// Only this aggregate id.
        #[arg(long, value_name = "ID")]
        aggregate: Option<String>,
        /// Machine-readable output (one JSON object per aggregate per line).
        #[arg(long)]
        json: bool,
    },
    /// Write the log, its hashes and its checkpoints as JSON Lines for outside verification.
    Export {
        /// Only events recorded at or after this instant (RFC 3339).
        #[arg(long, value_parser = parse_time, value_name = "T")]
        from: Option<DateTime<Utc>>,
        /// Only events recorded at or before this instant (RFC 3339).
        #[arg(long, value_parser = parse_time, value_name = "T")]
        to: Option<DateTime<Utc>>,
        /// Output file (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The public audit key to name in the header. Default as for `verify`.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Real commands (submit, queue, start, progress, succeed) through the command path.
    Append {
        /// Commands to run (rounded up to whole jobs of five).
        #[arg(long, default_value_t = 5000)]
        commands: u64,
        /// Concurrent writers.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 instant ({e}), for example 2026-11-25T18:00:00Z"))
}

/// A failure that is a verdict, not an error.
#[derive(Debug)]
struct Verdict(String);

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Verdict {}

async fn pool(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    let url = settings.database_url()?;
    Ok(mira_eventlog::db::connect(
        url,
        settings.database.max_connections,
        Duration::from_secs(settings.database.connect_timeout_seconds),
    )
    .await?)
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref(), std::env::vars())?;
    match cli.command {
        Command::Migrate { json } => {
            let pool = pool(&settings).await?;
            let applied = mira_eventlog::migrate::run(&pool).await?;
            if json {
                print_json(&serde_json::json!({ "applied": applied }));
            } else if applied.is_empty() {
                println!("schema is up to date");
            } else {
                println!("applied migrations {applied:?}");
            }
        }
        Command::Audit { command } => audit_command(&settings, command).await?,
        Command::Bench {
            command:
                BenchCommand::Append {
                    commands,
                    concurrency,
                    json,
                },
        } => {
            let pool = pool(&settings).await?;
            let keyring = mira_events::LocalKeyring::open(&settings.keyring.local_dir)
                .with_context(|| {
                    format!("Keyring__LocalDir {}", settings.keyring.local_dir.display())
                })?;
            let cmds = Commands::new(EventLog::new(pool), Arc::new(keyring));
            let r = bench::append(&cmds, commands, concurrency).await?;
            if json {
                print_json(&r);
            } else {
                println!("| concurrency | commands | seconds | commands/s | events/s | p50 ms | p99 ms |");
                println!("|---|---|---|---|---|---|---|");
                println!(
                    "| {} | {} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} |",
                    r.concurrency,
                    r.commands,
                    r.seconds,
                    r.commands_per_second,
                    r.events_per_second,
                    r.latency_p50_ms,
                    r.latency_p99_ms
                );
            }
        }
    }
    Ok(())
}

async fn audit_command(settings: &Settings, command: AuditCommand) -> anyhow::Result<()> {
    let public_key = |flag: Option<PathBuf>| -> anyhow::Result<ed25519_dalek::VerifyingKey> {
        let path = flag.unwrap_or_else(|| settings.public_key_file());
        Ok(checkpoint::load_verifying_key(&path)?)
    };
    match command {
        AuditCommand::Verify {
            public_key: flag,
            json,
        } => {
            let key = public_key(flag)?;
            let pool = pool(settings).await?;
            match verify::verify(&pool, &key).await {
                Ok(r) => {
                    if json {
                        print_json(&serde_json::json!({ "ok": true, "report": r }));
                    } else {
                        println!(
                            "log intact: {} events, {} checkpoints ({} events not yet checkpointed), {:.2} s, {:.0} events/s",
                            r.events, r.checkpoints, r.uncheckpointed, r.seconds, r.events_per_second
                        );
                    }
                }
                Err(verify::VerifyError::Violation(v)) => {
                    if json {
                        print_json(&serde_json::json!({
                            "ok": false, "position": v.position, "event_id": v.event_id, "reason": v.reason,
                        }));
                    }
                    return Err(Verdict(format!("log verification FAILED: {v}")).into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        AuditCommand::Checkpoint { json } => {
            let key = AuditKey::load_or_create(&settings.audit.signing_key_file)?;
            let pool = pool(settings).await?;
            let info = checkpoint::write(&pool, &key).await?;
            if json {
                print_json(&info);
            } else {
                println!(
                    "checkpoint {} covers {} events through position {} ({} new), digest {}, key {}",
                    info.seq, info.event_count, info.upto_position, info.new_events, info.digest, info.key_id
                );
            }
        }
        AuditCommand::Replay {
            as_of,
            aggregate,
            json,
        } => {
            let pool = pool(settings).await?;
            let states = audit::replay(&pool, as_of, aggregate.as_deref()).await?;
            if aggregate.is_some() && states.is_empty() {
                anyhow::bail!(
                    "no events of aggregate {} at or before {as_of}",
                    aggregate.unwrap_or_default()
                );
            }
            for s in &states {
                if json {
                    print_json(s);
                } else {
                    println!(
                        "{} {} (tenant {}) at sequence {} ({}): {}",
                        s.aggregate_type,
                        s.aggregate_id,
                        s.tenant_id,
                        s.sequence,
                        s.as_of_event,
                        s.state
                    );
                }
            }
        }
        AuditCommand::Export {
            from,
            to,
            out,
            public_key: flag,
        } => {
            let key = public_key(flag)?;
            let pool = pool(settings).await?;
            let summary = match &out {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(file);
                    mira_eventlog::export::export(&pool, &key, from, to, &mut w).await?
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = std::io::BufWriter::new(stdout.lock());
                    mira_eventlog::export::export(&pool, &key, from, to, &mut w).await?
                }
            };
            eprintln!(
                "exported {} events and {} checkpoints",
                summary.events, summary.checkpoints
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init("warn");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mira: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = format!("{e:#}")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("mira: {line}");
            if e.is::<Verdict>() {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
        }
    }
}
