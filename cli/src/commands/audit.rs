//! `mira audit …`: verify, checkpoint, replay, export.

use anyhow::Context;
use mira_eventlog::checkpoint::{self, CheckpointError};
use mira_eventlog::verify;
use mira_eventlog::witness_check::EpochSummary;
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
                        print_json(&serde_json::json!({ "ok": true, "report": r, "peak_rss_kib": peak_rss_kib() }));
                    } else {
                        println!(
                            "log intact: {} events, {} checkpoints ({} events not yet checkpointed); {} witness records in {} all match (newest witnessed checkpoint {}), {:.2} s, {:.0} events/s",
                            r.events,
                            r.checkpoints,
                            r.uncheckpointed,
                            r.witness_records,
                            r.witness,
                            r.witnessed_checkpoint.map_or("none".to_owned(), |s| s.to_string()),
                            r.seconds,
                            r.events_per_second
                        );
                        for e in &r.epochs {
                            println!("  {}", epoch_line(e));
                        }
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
            let info = match checkpoints.write(&pool).await {
                Ok(info) => info,
                // The tamper signal: exit 1, like a failed verification.
                Err(e @ CheckpointError::Conflict { .. }) => return Err(Verdict(e.to_string()).into()),
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&info);
            } else {
                println!(
                    "checkpoint {} covers {} events through position {} ({} new, {} checkpoints written{}), digest {}, key {}, each witnessed in {}",
                    info.seq,
                    info.event_count,
                    info.upto_position,
                    info.new_events,
                    info.written,
                    match info.rolled_forward {
                        0 => String::new(),
                        n => format!(", {n} rolled forward from the witness"),
                    },
                    info.digest,
                    info.key_id,
                    info.witness
                );
            }
        }
        AuditCommand::NewEpoch { reason, json } => {
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must say why a new epoch starts (for example the restore's time and ticket)");
            }
            let checkpoints = mira_keys::checkpointer(settings).await?;
            let pool = pool(settings).await?;
            let r = checkpoint::new_epoch(&pool, &checkpoints.key, checkpoints.witness.as_ref(), &reason).await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "epoch {} started after checkpoint {} of epoch {}; its record is in {}. Checkpoints from {} on belong to it; restart the relay if it stopped on a conflict.",
                    r.epoch,
                    r.after_seq,
                    r.previous,
                    r.witness,
                    r.after_seq + 1
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

/// One line per epoch for `mira audit verify`.
fn epoch_line(e: &EpochSummary) -> String {
    let range = match e.last_seq {
        Some(l) => format!("checkpoints {}..={l}", e.first_seq),
        None if e.in_log => format!("checkpoints from {}", e.first_seq),
        None => "a branch the log does not follow".to_owned(),
    };
    let mut line = format!(
        "epoch {}{}: {range}, {} witness records",
        e.epoch,
        if e.current { " (current)" } else { "" },
        e.records
    );
    if e.abandoned > 0 {
        line.push_str(&format!(
            ", {} of them numbered past where the log left the epoch (abandoned by a restore)",
            e.abandoned
        ));
    }
    match e.witness_from {
        Some(w) if w > e.first_seq => line.push_str(&format!("; every checkpoint witnessed from {w} on")),
        None if e.in_log => line.push_str("; no epoch record yet (written with the next checkpoint)"),
        _ => {}
    }
    if let Some(r) = &e.reason {
        line.push_str(&format!("; started: {r}"));
    }
    line
}

/// This process's peak resident memory (Linux), for the memory bound `verify` keeps.
fn peak_rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
