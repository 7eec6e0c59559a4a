//! `mira`'s commands: `args` is the command line, `run` dispatches each subcommand to the
//! module that does it; the tables and JSON each prints live with it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use mira_gateway::config::{MessagingProvider, Settings};

pub mod args;
mod audit;
mod bench;
mod dlq;
mod projections;

use args::{BusCommand, Cli, Command, DevCommand, KeysCommand};

pub fn parse_role(s: &str) -> Result<mira_gateway::roles::Role, String> {
    s.parse()
}

pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 instant ({e}), for example 2026-11-25T18:00:00Z"))
}

/// A failure that is a verdict, not an error.
#[derive(Debug)]
pub struct Verdict(pub String);

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Verdict {}

/// The application's pool (DATABASE_URL). Says so when its role could switch the log's guards
/// off: processes should connect as a role that owns nothing (Database__MigrationUrl is for
/// `mira migrate`).
async fn pool(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    let pool = settings.connect().await?;
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

pub async fn run(cli: Cli) -> anyhow::Result<()> {
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
        Command::Audit { command } => audit::run(&settings, command).await?,
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
        Command::Bench { command } => bench::bench(&settings, command).await?,
        Command::Projections { command } => projections::projections(&settings, command).await?,
        Command::Dlq { command } => dlq::dlq(&settings, command).await?,
    }
    Ok(())
}
