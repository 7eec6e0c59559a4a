//! `mira bench …`: the benchmarks, and their tables.

use std::sync::Arc;
use std::time::Duration;

use mira_bus::Bus;
use mira_eventlog::EventLog;
use mira_gateway::bench;
use mira_gateway::commands::Commands;
use mira_gateway::config::{MessagingProvider, Settings};

use super::args::BenchCommand;
use super::common::{aws_bus, pool, print_json};

pub async fn bench(settings: &Settings, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::E2e { jobs, json } => {
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
        BenchCommand::Rebuild { json } => {
            let pool = pool(settings).await?;
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
        BenchCommand::Append {
            commands,
            concurrency,
            json,
        } => {
            let pool = pool(settings).await?;
            let keyring = mira_keys::keyring(settings, &pool).await?;
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
        BenchCommand::Seed {
            jobs,
            checkpoint_span,
            json,
        } => {
            let pool = pool(settings).await?;
            let keyring = mira_keys::keyring(settings, &pool).await?;
            let cmds = Commands::new(EventLog::new(pool.clone()), keyring);
            let r = bench::seed(&cmds, jobs).await?;
            let checkpoints = match checkpoint_span {
                Some(span) => {
                    let c = mira_keys::checkpointer(settings).await?;
                    mira_eventlog::checkpoint::seed_spans(&pool, &c.key, c.witness.as_ref(), span).await?
                }
                None => 0,
            };
            if json {
                print_json(&serde_json::json!({"seed": r, "checkpoints": checkpoints}));
            } else {
                println!(
                    "seeded {} jobs, {} events in {:.1} s ({:.0} events/s){}",
                    r.jobs,
                    r.events,
                    r.seconds,
                    r.events_per_second,
                    if checkpoint_span.is_some() {
                        format!("; {checkpoints} checkpoints written")
                    } else {
                        String::new()
                    }
                );
            }
        }
        BenchCommand::Fanout {
            events,
            latency_events,
            interval_ms,
            in_memory,
            json,
        } => {
            let pool = pool(settings).await?;
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
                    (Arc::new(aws_bus(settings).await?), "sns-sqs")
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
