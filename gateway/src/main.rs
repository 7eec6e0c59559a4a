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
use mira_bus::Bus;
use mira_eventlog::{verify, EventLog};
use mira_gateway::config::{MessagingProvider, Settings};
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
    /// Apply the database schema (idempotent), as the owner (Database__MigrationUrl, else
    /// DATABASE_URL), and grant the runtime roles to DATABASE_URL's role when it is another.
    Migrate {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create the keys the settings name, where they do not exist yet: the checkpoint signing
    /// key, the local keyring and the witness directory. No other command creates a key.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
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
    /// The SNS/SQS topology.
    Bus {
        #[command(subcommand)]
        command: BusCommand,
    },
    /// The whole platform on embedded defaults: a private PostgreSQL cluster (unless
    /// DATABASE_URL is set), the in-memory bus, the local blob store, a local identity
    /// provider, the relay, projector and handlers. Ctrl-C stops it; the data persists.
    Dev {
        /// Where the cluster, blobs, keys and identity key live (default ./.mira; `dev token`
        /// without it uses ./.mira if it has a key, else the running `mira dev`'s).
        #[arg(long, global = true, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: String,
        #[command(subcommand)]
        command: Option<DevCommand>,
    },
    /// Serve the HTTP API (and, with --with, background roles in the same process).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: String,
        /// Also run these roles here (comma-separated): relay, projector, handlers. Without it,
        /// the roles Roles__Enabled names (none by default).
        #[arg(long = "with", value_parser = parse_role, value_delimiter = ',', value_name = "ROLES")]
        with: Option<Vec<mira_gateway::roles::Role>>,
    },
    /// Follow the log and publish every event to the SNS topic (one active relay at a time).
    Relay,
    /// Run the read-model projector on the `projections` queue (Messaging__Provider=Aws).
    Projector,
    /// Run the lifecycle handlers on the `handlers` queue (Messaging__Provider=Aws): queueing
    /// jobs when their slide is verified, retries after backoff, lease expiry.
    Handlers,
    /// List, inspect and rebuild projections.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Parked aggregates and dead-lettered messages.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Print an ID token that the running `mira dev` with this data directory accepts.
    Token {
        /// The user (`sub`).
        #[arg(long, default_value = "dev-user")]
        sub: String,
        /// The tenant (`custom:tenant`).
        #[arg(long, default_value = "dev")]
        tenant: String,
        /// Roles (`cognito:groups`), comma-separated: pathologist, auditor, admin.
        #[arg(long, value_delimiter = ',', default_value = "pathologist,auditor")]
        groups: Vec<String>,
        /// Hours until the token expires.
        #[arg(long, default_value_t = 12)]
        hours: u64,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create what is missing; keep what exists (idempotent). Prints the public audit key.
    Init {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BusCommand {
    /// Create the FIFO topic, the three FIFO queues with their DLQs, filters and
    /// subscriptions (idempotent), on AWS or the endpoint in AWS_ENDPOINT_URL.
    Init {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// The projections Mira keeps.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Each projection's position, lag in events and lag in seconds.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a projection from the log into new tables while the old ones serve, then swap.
    /// Safe to interrupt and rerun.
    Rebuild {
        /// The projection (see `mira projections list`).
        name: String,
        /// Compare the rebuilt model with the live one before swapping; print the differences
        /// and exit 1 (without swapping) if there are any.
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Parked aggregates per consumer, and messages in each dead-letter queue.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Un-park aggregates: their consumers replay them from the log. With --dead-letters,
    /// also move dead-lettered messages back to their queues.
    Redrive {
        /// Only this consumer's parked aggregates (for example `projections`).
        #[arg(long)]
        consumer: Option<String>,
        /// Only this aggregate id.
        #[arg(long)]
        aggregate: Option<String>,
        /// Also move SQS dead-letter messages back (Messaging__Provider=Aws).
        #[arg(long)]
        dead_letters: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
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
    /// Write a large synthetic log fast (one real job, cloned with valid hashes, by COPY), for
    /// scale tests of `audit verify` and `projections rebuild`. Scratch databases only.
    Seed {
        /// Jobs to write (five events each).
        #[arg(long, default_value_t = 1000)]
        jobs: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Events/s of a full read-model rebuild against a plain sequential read of the log.
    Rebuild {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Latency from POST /api/jobs to the first job.updated on the WebSocket, through a
    /// gateway in this process with the relay, projector and handlers on the configured bus.
    E2e {
        /// Jobs to submit, one at a time.
        #[arg(long, default_value_t = 500)]
        jobs: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Relay throughput and append→consume latency on the configured bus.
    Fanout {
        /// Events for the throughput phase.
        #[arg(long, default_value_t = 1000)]
        events: u64,
        /// Events for the latency phase, appended one at a time.
        #[arg(long, default_value_t = 200)]
        latency_events: u64,
        /// Pause between latency-phase appends, in milliseconds.
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        /// Use the in-memory bus instead of Messaging__Provider.
        #[arg(long)]
        in_memory: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn parse_role(s: &str) -> Result<mira_gateway::roles::Role, String> {
    s.parse()
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

async fn connect(settings: &Settings, url: &str) -> anyhow::Result<sqlx::PgPool> {
    Ok(mira_eventlog::db::connect(
        url,
        settings.database.max_connections,
        Duration::from_secs(settings.database.connect_timeout_seconds),
    )
    .await?)
}

/// The application's pool (DATABASE_URL). Says so when its role could switch the log's guards
/// off: processes should connect as a role that owns nothing (Database__MigrationUrl is for
/// `mira migrate`).
async fn pool(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    let pool = connect(settings, settings.database_url()?).await?;
    mira_gateway::warn_if_owner(&pool).await;
    Ok(pool)
}

async fn aws_config(settings: &Settings) -> aws_config::SdkConfig {
    mira_bus::aws::sdk_config(settings.aws.region.as_deref()).await
}

async fn aws_bus(settings: &Settings) -> anyhow::Result<mira_bus::aws::AwsBus> {
    if settings.messaging.provider != MessagingProvider::Aws {
        anyhow::bail!(
            "Messaging__Provider is InMemory: the in-memory bus lives inside one process (`mira dev`); set Messaging__Provider=Aws to use SNS and SQS"
        );
    }
    Ok(mira_bus::aws::AwsBus::connect(&aws_config(settings).await, &settings.bus_names(), None).await?)
}

/// Cancelled on SIGTERM or Ctrl-C, so work in hand can drain.
fn shutdown_on_signals() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    t.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    token
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // `mira dev` layers its own defaults before the file and the environment.
    if let Command::Dev {
        data_dir,
        listen,
        command,
    } = &cli.command
    {
        return match command {
            Some(DevCommand::Token {
                sub,
                tenant,
                groups,
                hours,
            }) => {
                let dir = mira_gateway::dev::token_data_dir(data_dir.as_deref())?;
                let t = mira_gateway::dev::token(&dir, sub, tenant, groups, Duration::from_secs(hours * 3600))?;
                println!("{t}");
                Ok(())
            }
            None => {
                let opts = mira_gateway::dev::DevOptions {
                    data_dir: data_dir.clone().unwrap_or_else(|| PathBuf::from(".mira")),
                    listen: listen.clone(),
                };
                mira_gateway::dev::run(
                    cli.config.as_deref(),
                    std::env::vars().collect(),
                    &opts,
                    shutdown_on_signals(),
                    |lines| {
                        use std::io::Write;
                        // A closed stdout must not take the platform down with it.
                        let mut out = std::io::stdout().lock();
                        for l in lines {
                            let _ = writeln!(out, "{l}");
                        }
                        let _ = out.flush();
                    },
                )
                .await
            }
        };
    }
    let settings = Settings::load(cli.config.as_deref(), std::env::vars())?;
    match cli.command {
        Command::Dev { .. } => unreachable!("handled above"),
        Command::Migrate { json } => {
            let (applied, granted) = mira_gateway::database::migrate(&settings).await?;
            if json {
                print_json(&serde_json::json!({ "applied": applied, "granted_to": granted }));
            } else {
                if applied.is_empty() {
                    println!("schema is up to date");
                } else {
                    println!("applied migrations {applied:?}");
                }
                if let Some(role) = granted {
                    println!("granted the runtime roles to {role}");
                }
            }
        }
        Command::Keys {
            command: KeysCommand::Init { json },
        } => {
            let report = mira_keys::init(&settings).await?;
            if json {
                print_json(&report);
            } else {
                for l in &report.lines {
                    println!("{l}");
                }
            }
        }
        Command::Audit { command } => audit_command(&settings, command).await?,
        Command::Bus {
            command: BusCommand::Init { json },
        } => {
            let info = mira_bus::aws::init(&aws_config(&settings).await, &settings.bus_names()).await?;
            if json {
                print_json(&info);
            } else {
                println!("topic {}", info.topic_arn);
                for q in &info.queues {
                    println!(
                        "queue {:?}: {} ({})\n  dlq {} ({})\n  subscription {}",
                        q.group, q.url, q.arn, q.dlq_url, q.dlq_arn, q.subscription_arn
                    );
                }
            }
        }
        Command::Serve { listen, with } => {
            let pool = pool(&settings).await?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let options = mira_gateway::server::Options {
                roles: with.unwrap_or_else(|| settings.enabled_roles()),
                ..Default::default()
            };
            mira_gateway::server::run(&settings, pool, listener, &options, shutdown_on_signals()).await?;
        }
        Command::Relay => {
            mira_gateway::roles::run_alone(&settings, &[mira_gateway::roles::Role::Relay], shutdown_on_signals())
                .await?
        }
        Command::Bench {
            command: BenchCommand::E2e { jobs, json },
        } => {
            settings.database_url()?;
            let r = mira_gateway::bench_e2e::run(std::env::vars().collect(), jobs).await?;
            if json {
                print_json(&r);
            } else {
                println!("| bus | jobs | POST → first job.updated p50 ms | p99 ms | mean ms | max ms |");
                println!("|---|---|---|---|---|---|");
                println!(
                    "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    r.bus, r.jobs, r.p50_ms, r.p99_ms, r.mean_ms, r.max_ms
                );
            }
        }
        Command::Bench {
            command: BenchCommand::Rebuild { json },
        } => {
            let pool = pool(&settings).await?;
            let r = bench::rebuild(&pool).await?;
            if json {
                print_json(&r);
            } else {
                println!("| events | sequential read events/s | rebuild events/s | rebuild / read |");
                println!("|---|---|---|---|");
                println!(
                    "| {} | {:.0} | {:.0} | {:.3} |",
                    r.events, r.read_events_per_second, r.rebuild_events_per_second, r.ratio
                );
            }
        }
        Command::Projector => {
            mira_gateway::roles::run_alone(
                &settings,
                &[mira_gateway::roles::Role::Projector],
                shutdown_on_signals(),
            )
            .await?
        }
        Command::Handlers => {
            mira_gateway::roles::run_alone(&settings, &[mira_gateway::roles::Role::Handlers], shutdown_on_signals())
                .await?
        }
        Command::Projections {
            command: ProjectionsCommand::List { json },
        } => {
            if json {
                let list: Vec<_> = mira_projections::rebuild::PROJECTIONS
                    .iter()
                    .map(|(n, d)| serde_json::json!({"name": n, "description": d}))
                    .collect();
                print_json(&list);
            } else {
                for (n, d) in mira_projections::rebuild::PROJECTIONS {
                    println!("{n}: {d}");
                }
            }
        }
        Command::Projections {
            command: ProjectionsCommand::Status { json },
        } => {
            let pool = pool(&settings).await?;
            let status = mira_projections::rebuild::status(&pool).await?;
            if json {
                print_json(&status);
            } else {
                println!("| projection | position | lag events | lag seconds |");
                println!("|---|---|---|---|");
                for s in &status {
                    println!(
                        "| {} | {} | {} | {:.1} |",
                        s.name, s.position, s.lag_events, s.lag_seconds
                    );
                }
            }
        }
        Command::Projections {
            command: ProjectionsCommand::Rebuild { name, verify },
        } => {
            if !mira_projections::rebuild::PROJECTIONS.iter().any(|(n, _)| *n == name) {
                anyhow::bail!("no projection named {name:?} (see `mira projections list`)");
            }
            let pool = pool(&settings).await?;
            let report = mira_projections::rebuild::rebuild(&pool, verify, |p| {
                eprint!(
                    "\rrebuilding {name}: {}/{} events, {:.0} events/s, ETA {:.0} s   ",
                    p.events, p.total_estimate, p.events_per_second, p.eta_seconds
                );
            })
            .await?;
            eprintln!();
            for d in &report.differences {
                println!("{d}");
            }
            if !report.swapped {
                return Err(Verdict(format!(
                    "{} differences between the live and the rebuilt {name} (the first {} above); the live model was kept",
                    report.difference_count,
                    report.differences.len()
                ))
                .into());
            }
            println!(
                "rebuilt {name}: {} events in {:.2} s ({:.0} events/s){}, swapped in",
                report.events,
                report.seconds,
                report.events_per_second,
                if verify { ", identical to the live model" } else { "" }
            );
        }
        Command::Dlq {
            command: DlqCommand::List { json },
        } => {
            let pool = pool(&settings).await?;
            let parked = mira_bus::consumer::list_parked(&pool).await?;
            let mut dead = Vec::new();
            if settings.messaging.provider == MessagingProvider::Aws {
                let bus = aws_bus(&settings).await?;
                for g in mira_bus::Group::ALL {
                    dead.push((g, bus.queue(g).dead_letter_count().await?));
                }
            }
            if json {
                let dead: Vec<_> = dead
                    .iter()
                    .map(|(g, n)| serde_json::json!({"queue": g, "messages": n}))
                    .collect();
                print_json(&serde_json::json!({ "parked": parked, "dead_letters": dead }));
            } else {
                println!("{} parked aggregates", parked.len());
                for p in &parked {
                    println!(
                        "  {} {} {}: parked at sequence {} since {} ({} set aside){}: {}",
                        p.consumer,
                        p.aggregate_type,
                        p.aggregate_id,
                        p.parked_sequence.unwrap_or_default(),
                        p.parked_at,
                        p.set_aside,
                        if p.redrive_requested { ", redrive requested" } else { "" },
                        p.reason.as_deref().unwrap_or("")
                    );
                }
                for (g, n) in &dead {
                    println!("dead-letter queue {}: {n} messages", settings.bus_names().dlq(*g));
                }
            }
        }
        Command::Dlq {
            command:
                DlqCommand::Redrive {
                    consumer,
                    aggregate,
                    dead_letters,
                    json,
                },
        } => {
            let pool = pool(&settings).await?;
            let requested =
                mira_bus::consumer::request_redrive(&pool, consumer.as_deref(), aggregate.as_deref()).await?;
            let mut moved = 0;
            if dead_letters {
                let bus = aws_bus(&settings).await?;
                for g in mira_bus::Group::ALL {
                    moved += bus.queue(g).redrive_dead_letters().await?;
                }
            }
            if json {
                print_json(&serde_json::json!({ "redrive_requested": requested, "dead_letters_moved": moved }));
            } else {
                println!("redrive requested for {requested} parked aggregates (their consumers replay them from the log); {moved} dead letters moved back");
            }
        }
        Command::Bench {
            command:
                BenchCommand::Append {
                    commands,
                    concurrency,
                    json,
                },
        } => {
            let pool = pool(&settings).await?;
            let keyring = mira_keys::keyring(&settings, &pool).await?;
            let cmds = Commands::new(EventLog::new(pool), keyring);
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
        Command::Bench {
            command: BenchCommand::Seed { jobs, json },
        } => {
            let pool = pool(&settings).await?;
            let keyring = mira_keys::keyring(&settings, &pool).await?;
            let cmds = Commands::new(EventLog::new(pool), keyring);
            let r = bench::seed(&cmds, jobs).await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "seeded {} jobs, {} events in {:.1} s ({:.0} events/s)",
                    r.jobs, r.events, r.seconds, r.events_per_second
                );
            }
        }
        Command::Bench {
            command:
                BenchCommand::Fanout {
                    events,
                    latency_events,
                    interval_ms,
                    in_memory,
                    json,
                },
        } => {
            let pool = pool(&settings).await?;
            let (bus, provider): (Arc<dyn Bus>, &str) =
                if in_memory || settings.messaging.provider == MessagingProvider::InMemory {
                    (
                        Arc::new(mira_bus::memory::MemoryBus::new(
                            Duration::from_secs(30),
                            10,
                            &mira_bus::Group::ALL,
                        )),
                        "in-memory",
                    )
                } else {
                    (Arc::new(aws_bus(&settings).await?), "sns-sqs")
                };
            let r = bench::fanout(
                &EventLog::new(pool),
                bus,
                provider,
                events,
                latency_events,
                Duration::from_millis(interval_ms),
            )
            .await?;
            if json {
                print_json(&r);
            } else {
                println!("| bus | events | relay events/s | ms per PublishBatch | latency events | append→consume p50 ms | p99 ms |");
                println!("|---|---|---|---|---|---|---|");
                println!(
                    "| {} | {} | {:.0} | {:.2} | {} | {:.1} | {:.1} |",
                    r.provider,
                    r.events,
                    r.relay_events_per_second,
                    r.relay_ms_per_batch,
                    r.latency_events,
                    r.latency_p50_ms,
                    r.latency_p99_ms
                );
            }
        }
    }
    Ok(())
}

async fn audit_command(settings: &Settings, command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { public_key: flag, json } => {
            let key = mira_keys::verifying_key(settings, flag.as_deref()).await?;
            // Without a witness, deleted checkpoints cannot be told from none: not verified.
            let witness = mira_keys::witness(settings)
                .await
                .map_err(|e| Verdict(format!("log verification FAILED: {e:#}")))?;
            let pool = pool(settings).await?;
            match verify::verify(&pool, &key, witness.as_ref()).await {
                Ok(r) => {
                    if json {
                        print_json(&serde_json::json!({ "ok": true, "report": r }));
                    } else {
                        println!(
                            "log intact: {} events, {} checkpoints ({} events not yet checkpointed; newest witnessed checkpoint {} in {}), {:.2} s, {:.0} events/s",
                            r.events,
                            r.checkpoints,
                            r.uncheckpointed,
                            r.witnessed_checkpoint.map_or("none".to_owned(), |s| s.to_string()),
                            r.witness,
                            r.seconds,
                            r.events_per_second
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
            let checkpoints = mira_keys::checkpointer(settings).await?;
            let pool = pool(settings).await?;
            let info = checkpoints.write(&pool).await?;
            if json {
                print_json(&info);
            } else {
                println!(
                    "checkpoint {} covers {} events through position {} ({} new, {} checkpoints written), digest {}, key {}, witnessed in {}",
                    info.seq,
                    info.event_count,
                    info.upto_position,
                    info.new_events,
                    info.written,
                    info.digest,
                    info.key_id,
                    info.witness
                );
            }
        }
        AuditCommand::Replay { as_of, aggregate, json } => {
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
                        s.aggregate_type, s.aggregate_id, s.tenant_id, s.sequence, s.as_of_event, s.state
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
            let key = mira_keys::verifying_key(settings, flag.as_deref()).await?;
            let pool = pool(settings).await?;
            let summary = match &out {
                Some(path) => {
                    let file =
                        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
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
    // `mira dev` is watched in a terminal: a line per request and per lifecycle step. Every
    // other command keeps its output to what it was asked for.
    let dev_run = matches!(&cli.command, Command::Dev { command: None, .. });
    telemetry::init(if dev_run { telemetry::DEV_FILTER } else { "warn" });
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mira: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("mira: {line}");
            if e.is::<Verdict>() {
                ExitCode::from(1)
            } else {
                ExitCode::from(2)
            }
        }
    }
}
