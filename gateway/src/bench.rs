//! `mira bench append`: real commands through the command path into PostgreSQL.
//!
//! Each job runs submit → queue → start → progress → succeed: five commands, five events,
//! each command loading its aggregate, deciding, and appending with its hash in its own
//! transaction. Jobs have kind `bench.noop`, which no worker takes, so the benchmark can run
//! against a live system.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use mira_aggregates::JobCommand;
use mira_events::{Actor, CommandContext, JobId, SlideId, TenantId, Usage};
use serde::Serialize;

use crate::commands::Commands;

pub const BENCH_KIND: &str = "bench.noop";
const COMMANDS_PER_JOB: u64 = 5;

#[derive(Debug, Clone, Serialize)]
pub struct AppendReport {
    pub commands: u64,
    pub events: u64,
    pub concurrency: usize,
    pub seconds: f64,
    pub commands_per_second: f64,
    pub events_per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Average stored payload + metadata bytes per event, for the pgbench peer.
    pub avg_payload_bytes: f64,
    pub avg_metadata_bytes: f64,
}

fn job_commands(id: JobId) -> Vec<JobCommand> {
    let now = Utc::now();
    vec![
        JobCommand::Submit {
            slide_id: SlideId::new(),
            kind: BENCH_KIND.into(),
            params: serde_json::json!({}),
            max_attempts: 1,
        },
        JobCommand::Queue { now },
        JobCommand::Start {
            attempt: 1,
            worker_id: "bench".into(),
            lease_until: now + chrono::Duration::minutes(10),
            now,
        },
        JobCommand::Progress {
            attempt: 1,
            done: 1,
            total: 2,
        },
        JobCommand::Succeed {
            attempt: 1,
            manifest_key: format!("bench/{id}/manifest.json"),
            manifest_sha256: "0".repeat(64),
            usage: Usage {
                device: "cpu".into(),
                device_seconds: 0.0,
                bytes_written: 0,
            },
        },
    ]
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Runs about `commands` commands (rounded up to whole jobs) with `concurrency` writers.
pub async fn append(
    commands: &Commands,
    total: u64,
    concurrency: usize,
) -> anyhow::Result<AppendReport> {
    let tenant = TenantId::parse("bench").expect("valid tenant");
    let jobs = total.div_ceil(COMMANDS_PER_JOB).max(1);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (commands, next, tenant) = (commands.clone(), next.clone(), tenant.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                let id = JobId::new();
                let ctx = CommandContext::new(tenant.clone(), Actor::system("bench"));
                for cmd in job_commands(id) {
                    let t = Instant::now();
                    commands.job(&ctx, id, cmd).await?;
                    latencies.push(t.elapsed());
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    let n = latencies.len() as u64;
    let (p, m): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT avg(octet_length(payload))::float8, avg(octet_length(metadata))::float8 FROM \
         (SELECT payload, metadata FROM events WHERE tenant_id = 'bench' ORDER BY global_position DESC LIMIT 1000) e",
    )
    .fetch_one(commands.log().pool())
    .await?;
    Ok(AppendReport {
        commands: n,
        events: n,
        concurrency,
        seconds,
        commands_per_second: n as f64 / seconds,
        events_per_second: n as f64 / seconds,
        latency_p50_ms: percentile(&latencies, 0.50),
        latency_p99_ms: percentile(&latencies, 0.99),
        avg_payload_bytes: p.unwrap_or(0.0),
        avg_metadata_bytes: m.unwrap_or(0.0),
    })
}
