//! `mira dlq …`: parked aggregates and dead letters.

use mira_bus::Bus;
use mira_gateway::config::{MessagingProvider, Settings};

use super::args::DlqCommand;
use super::common::{aws_bus, pool, print_json};

pub async fn dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { json } => {
            let pool = pool(settings).await?;
            let parked = mira_bus::consumer::list_parked(&pool).await?;
            let mut dead = Vec::new();
            if settings.messaging.provider == MessagingProvider::Aws {
                let bus = aws_bus(settings).await?;
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
                    println!(
                        "dead-letter queue {}: {n} messages",
                        mira_bus::Names::from_settings(settings).dlq(*g)
                    );
                }
            }
        }
        DlqCommand::Redrive {
            consumer,
            aggregate,
            dead_letters,
            json,
        } => {
            let pool = pool(settings).await?;
            let requested =
                mira_bus::consumer::request_redrive(&pool, consumer.as_deref(), aggregate.as_deref()).await?;
            let mut moved = 0;
            if dead_letters {
                let bus = aws_bus(settings).await?;
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
    }
    Ok(())
}
