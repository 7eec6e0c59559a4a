//! `mira`'s commands: `args` is the command line, `run` dispatches each subcommand to the
//! module that does it; the tables and JSON each prints live with it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use mira_gateway::config::Settings;

pub mod args;
mod audit;
mod bench;
mod common;
mod dlq;
mod projections;

use args::{BusCommand, Cli, Command, DevCommand, KeysCommand};
pub use common::Verdict;
use common::{aws_config, print_json, shutdown_on_signals};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // `mira dev` layers its own defaults before the file and the environment.
    if let Command::Dev {
        data_dir,
        listen,
        expose_sign_in,
        database_url,
        command,
        ..
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
            Some(DevCommand::Url { service }) => {
                let dir = mira_gateway::dev::token_data_dir(data_dir.as_deref())?;
                println!("{}", mira_gateway::dev::database_url(&dir, *service)?);
                Ok(())
            }
            None => {
                let opts = mira_gateway::dev::DevOptions {
                    data_dir: data_dir.clone().unwrap_or_else(|| PathBuf::from(".mira")),
                    listen: listen.clone(),
                    expose_sign_in: *expose_sign_in,
                    database_url: database_url.clone(),
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
            let (applied, logins) = mira_gateway::database::migrate(&settings).await?;
            if json {
                print_json(&serde_json::json!({ "applied": applied, "logins": logins }));
            } else {
                if applied.is_empty() {
                    println!("schema is up to date");
                } else {
                    println!("applied migrations {applied:?}");
                }
                for l in &logins {
                    let pw = if l.password_set { ", password set" } else { "" };
                    println!("login {} for the {} (holds {}{pw})", l.role, l.process, l.group);
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
            command: BusCommand::Topology { json },
        } => {
            if json {
                print!("{}", mira_bus::topology::TOPOLOGY_JSON);
            } else {
                let names = mira_bus::Names::from_settings(&settings);
                let t = mira_bus::topology::topology();
                println!("topic {} {:?}", names.topic, t.topic.attributes);
                for q in &t.queues {
                    println!(
                        "queue {} (dead letters: {} after {} receives), filter {}",
                        names.queue(q.group),
                        names.dlq(q.group),
                        t.dead_letter.max_receive_count,
                        q.group
                            .filter_policy()
                            .map_or("none: every event".to_owned(), |f| f.to_string())
                    );
                }
            }
        }
        Command::Bus {
            command: BusCommand::Init { json },
        } => {
            let info =
                mira_bus::aws::init(&aws_config(&settings).await, &mira_bus::Names::from_settings(&settings)).await?;
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
        Command::Serve { listen, with, metrics } => {
            let mut settings = settings.clone();
            if let Some(addr) = metrics.addr {
                settings.api.metrics_listen = Some(addr);
            }
            let pool = mira_gateway::database::api_pool(&settings).await?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let options = mira_gateway::server::Options {
                roles: with.unwrap_or_else(|| settings.enabled_roles()),
                ..Default::default()
            };
            mira_gateway::server::run(&settings, pool, listener, &options, shutdown_on_signals()).await?;
        }
        Command::Relay { metrics } => alone(&settings, mira_gateway::roles::Role::Relay, metrics).await?,
        Command::Projector { metrics } => alone(&settings, mira_gateway::roles::Role::Projector, metrics).await?,
        Command::Handlers { metrics } => alone(&settings, mira_gateway::roles::Role::Handlers, metrics).await?,
        Command::Bench { command } => bench::bench(&settings, command).await?,
        Command::Projections { command } => projections::projections(&settings, command).await?,
        Command::Dlq { command } => dlq::dlq(&settings, command).await?,
    }
    Ok(())
}

/// `mira relay`, `mira projector`, `mira handlers`: one role alone, with its `/metrics` where
/// `--metrics-listen` (or `Api__MetricsListen`) says.
async fn alone(
    settings: &Settings,
    role: mira_gateway::roles::Role,
    metrics: args::MetricsListen,
) -> anyhow::Result<()> {
    let mut settings = settings.clone();
    if let Some(addr) = metrics.addr {
        settings.api.metrics_listen = Some(addr);
    }
    mira_gateway::roles::run_alone(&settings, &[role], shutdown_on_signals()).await
}
