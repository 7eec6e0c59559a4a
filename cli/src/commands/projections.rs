//! `mira projections …`: list, status, rebuild.

use mira_gateway::config::Settings;

use super::args::ProjectionsCommand;
use super::common::{pool, print_json, Verdict};

pub async fn projections(settings: &Settings, command: ProjectionsCommand) -> anyhow::Result<()> {
    match command {
        ProjectionsCommand::List { json } => {
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
        ProjectionsCommand::Status { json } => {
            let pool = pool(settings).await?;
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
        ProjectionsCommand::Rebuild { name, verify } => {
            if !mira_projections::rebuild::PROJECTIONS.iter().any(|(n, _)| *n == name) {
                anyhow::bail!("no projection named {name:?} (see `mira projections list`)");
            }
            let pool = pool(settings).await?;
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
    }
    Ok(())
}
