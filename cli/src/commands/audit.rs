//! `mira audit …`: verify, checkpoint, replay, export.

use anyhow::Context;
use mira_eventlog::verify;
use mira_gateway::config::Settings;
use mira_gateway::replay;

use super::args::AuditCommand;
use super::common::{pool, print_json, Verdict};

pub async fn run(settings: &Settings, command: AuditCommand) -> anyhow::Result<()> {
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
            let states = replay::replay(&pool, as_of, aggregate.as_deref()).await?;
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
