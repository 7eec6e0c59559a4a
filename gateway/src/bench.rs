//! `mira bench append`: real commands through the command path into PostgreSQL.
//!
//! Each job runs submit → queue → start → progress → succeed: five commands, five events,
//! each command loading its aggregate, deciding, and appending with its hash in its own
//! transaction. Jobs are `wsi.preprocess` with the defaults, on a slide id that names no slide,
//! and the benchmark starts and finishes each attempt itself: run it on a platform without
//! workers (a worker may take a benchmark's queued attempt first, and the benchmark then counts
//! the refused start as an error).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use mira_aggregates::JobCommand;
use mira_events::{Actor, CommandContext, JobId, SlideId, TenantId, Usage};
use serde::Serialize;

use crate::commands::Commands;

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

fn job_commands(tenant: &TenantId, id: JobId) -> Vec<JobCommand> {
    let now = Utc::now();
    vec![
        JobCommand::Submit {
            slide_id: SlideId::new(),
            spec: mira_events::JobSpec::Preprocess(Default::default()),
            max_attempts: 1,
            priority: mira_aggregates::Priority::Routine,
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
            manifest_key: mira_aggregates::manifest_key(tenant, id, 1),
            manifest_sha256: "0".repeat(64),
            usage: Usage {
                device: "cpu".into(),
                device_seconds: 0.0,
                bytes_written: 0,
            },
        },
    ]
}

pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Runs about `commands` commands (rounded up to whole jobs) with `concurrency` writers.
pub async fn append(commands: &Commands, total: u64, concurrency: usize) -> anyhow::Result<AppendReport> {
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
                for cmd in job_commands(&tenant, id) {
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

/// What `mira bench fanout` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub provider: String,
    pub events: u64,
    pub relay_seconds: f64,
    pub relay_events_per_second: f64,
    /// Mean time per `PublishBatch` of up to ten events (the relay's unit of work).
    pub relay_ms_per_batch: f64,
    pub latency_events: u64,
    /// From the event's commit (`recorded_at`) to its effect in the projections consumer,
    /// with the relay and all three consumers running.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
}

struct LatencyProbe {
    samples: Arc<std::sync::Mutex<Vec<f64>>>,
}

#[async_trait::async_trait]
impl mira_bus::consumer::Apply for LatencyProbe {
    async fn apply(
        &self,
        _tx: &mut sqlx::PgConnection,
        e: &mira_eventlog::StoredEvent,
    ) -> Result<(), mira_bus::consumer::ApplyError> {
        let ms = (Utc::now() - e.recorded_at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        self.samples.lock().expect("samples lock").push(ms);
        Ok(())
    }
}

fn bench_event(aggregate: &str, sequence: u64) -> mira_eventlog::NewEvent {
    mira_eventlog::NewEvent {
        aggregate_type: "Job".into(),
        aggregate_id: aggregate.into(),
        sequence,
        event_type: "JobProgressed".into(),
        event_version: "1".into(),
        payload: format!(r#"{{"type":"JobProgressed","attempt":1,"done":{sequence},"total":1000000}}"#),
        metadata: r#"{"actor":{"kind":"system","id":"bench"}}"#.into(),
    }
}

/// Relay throughput over `events` events, then append→consume latency over `latency_events`
/// events appended one at a time every `interval`, on `bus`.
pub async fn fanout(
    log: &mira_eventlog::EventLog,
    bus: Arc<dyn mira_bus::Bus>,
    provider: &str,
    events: u64,
    latency_events: u64,
    interval: Duration,
) -> anyhow::Result<FanoutReport> {
    use mira_bus::consumer::{Consumer, ConsumerConfig};
    use mira_bus::relay::{Relay, RelayConfig};
    use tokio_util::sync::CancellationToken;

    let tenant = TenantId::parse("bench").expect("valid tenant");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let aggregates: Vec<String> = (0..events.div_ceil(10).max(1))
        .map(|i| format!("bench-{run}-{i}"))
        .collect();
    let mut seq = vec![0u64; aggregates.len()];
    for i in 0..events as usize {
        let a = i % aggregates.len();
        seq[a] += 1;
        log.append(&tenant, &[bench_event(&aggregates[a], seq[a])]).await?;
    }
    let relay = Arc::new(Relay::new(
        log.clone(),
        bus.publisher(),
        RelayConfig {
            idle_poll: Duration::from_millis(5),
            ..RelayConfig::default()
        },
        None,
    ));
    let stop = CancellationToken::new();
    // Settle: what the relay sees now is only what was appended above.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let published = relay.drain(&stop).await?;
    let relay_seconds = t.elapsed().as_secs_f64();

    // Consumers for all three queues, so no queue grows.
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for g in mira_bus::Group::ALL {
        let mut cfg = ConsumerConfig::for_group(g);
        cfg.name = format!("bench-{run}-{}", g.suffix());
        cfg.wait = Duration::from_millis(500);
        let handler: Arc<dyn mira_bus::consumer::Apply> = if g == mira_bus::Group::Projections {
            Arc::new(LatencyProbe {
                samples: samples.clone(),
            })
        } else {
            Arc::new(LatencyProbe {
                samples: Arc::default(),
            })
        };
        let c = Consumer::new(log.clone(), bus.queue(g), handler, cfg);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move { c.run(stop).await }));
    }
    // Drain the throughput phase's messages before measuring latency.
    let deadline = Instant::now() + Duration::from_secs(300);
    while (samples.lock().expect("samples lock").len() as u64) < published && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    samples.lock().expect("samples lock").clear();
    let relay_task = {
        let (stop, relay) = (stop.clone(), relay.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Some(p) = relay.publish_next(&stop).await? {
                    relay.commit(&p).await?;
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            anyhow::Ok(())
        })
    };
    let probe = format!("bench-{run}-latency");
    for i in 1..=latency_events {
        log.append(&tenant, &[bench_event(&probe, i)]).await?;
        tokio::time::sleep(interval).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (samples.lock().expect("samples lock").len() as u64) < latency_events && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    relay_task.await??;
    for t in tasks {
        t.await??;
    }
    let mut lat: Vec<f64> = samples.lock().expect("samples lock").clone();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    Ok(FanoutReport {
        provider: provider.to_owned(),
        events: published,
        relay_seconds,
        relay_events_per_second: published as f64 / relay_seconds,
        relay_ms_per_batch: relay_seconds * 1000.0
            / (published.div_ceil(mira_bus::relay::PUBLISH_BATCH as u64).max(1)) as f64,
        latency_events: lat.len() as u64,
        latency_p50_ms: pct(0.5),
        latency_p99_ms: pct(0.99),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct RebuildBench {
    pub events: u64,
    pub read_seconds: f64,
    pub read_events_per_second: f64,
    pub rebuild_seconds: f64,
    pub rebuild_events_per_second: f64,
    pub ratio: f64,
}

/// A plain sequential read of the whole log by the follow cursor (parsed into events, nothing
/// applied), then a full rebuild of the read models, on the same events.
pub async fn rebuild(pool: &sqlx::PgPool) -> anyhow::Result<RebuildBench> {
    let log = mira_eventlog::EventLog::new(pool.clone());
    let t = Instant::now();
    let mut cursor = mira_eventlog::Cursor::START;
    let mut read = 0u64;
    loop {
        let batch = log.read_after(cursor, 5_000).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor();
        read += batch.len() as u64;
    }
    let read_seconds = t.elapsed().as_secs_f64();
    let report = mira_projections::rebuild::rebuild(pool, false, |p| {
        eprint!(
            "\rrebuild: {}/{} events, {:.0} events/s, ETA {:.0} s   ",
            p.events, p.total_estimate, p.events_per_second, p.eta_seconds
        );
    })
    .await?;
    eprintln!();
    let read_rate = read as f64 / read_seconds.max(1e-9);
    Ok(RebuildBench {
        events: read,
        read_seconds,
        read_events_per_second: read_rate,
        rebuild_seconds: report.seconds,
        rebuild_events_per_second: report.events_per_second,
        ratio: report.events_per_second / read_rate,
    })
}

/// What `mira bench seed` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    pub jobs: u64,
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
}

/// Quotes a CSV field for COPY.
fn csv(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `mira bench seed`: a large log for scale tests of `audit verify` and `projections
/// rebuild`, fast. One job runs through the real command path; its five events are then
/// cloned `jobs - 1` times under new job ids, each clone hashed and chained exactly as an
/// append would, and written with COPY by registered appenders (50 000 events per
/// transaction). The log verifies; the read models project. For scratch databases only.
pub async fn seed(commands: &Commands, jobs: u64) -> anyhow::Result<SeedReport> {
    use mira_eventlog::StoredEvent;
    use mira_events::canonical::ZERO_HASH;
    let started = Instant::now();
    if jobs == 0 {
        // `--jobs 0 --checkpoint-span N`: only checkpoints for a log seeded before.
        return Ok(SeedReport {
            jobs: 0,
            events: 0,
            seconds: 0.0,
            events_per_second: 0.0,
        });
    }
    let tenant = TenantId::parse("bench").expect("a valid tenant");
    let ctx = CommandContext::new(tenant.clone(), Actor::system("bench-seed"));
    let template_id = JobId::new();
    for cmd in job_commands(&tenant, template_id) {
        commands.job(&ctx, template_id, cmd).await?;
    }
    let pool = commands.log().pool().clone();
    let template = commands
        .log()
        .read_stream(None, "Job", &template_id.to_string(), 0)
        .await?;
    anyhow::ensure!(
        template.len() == COMMANDS_PER_JOB as usize,
        "the template job has {} events",
        template.len()
    );
    const PER_TX: u64 = 50_000;
    let mut written = template.len() as u64;
    let mut remaining = jobs.saturating_sub(1);
    while remaining > 0 {
        let n = remaining.min(PER_TX / COMMANDS_PER_JOB);
        remaining -= n;
        let mut tx = pool.begin().await?;
        // The log takes each event's recorded_at from the transaction (migration 0013).
        let recorded_at = mira_eventlog::store::transaction_time(&mut tx).await?;
        let mut copy = tx
            .copy_in_raw(
                "COPY events (event_id, tenant_id, aggregate_type, aggregate_id, sequence, event_type, \
                 event_version, recorded_at, payload, metadata, prev_hash, hash) FROM STDIN WITH (FORMAT csv)",
            )
            .await?;
        let mut buf = String::with_capacity(4 << 20);
        for _ in 0..n {
            let id = JobId::new().to_string();
            let mut prev = ZERO_HASH;
            for t in &template {
                let mut e = StoredEvent {
                    event_id: uuid::Uuid::now_v7(),
                    aggregate_id: id.clone(),
                    recorded_at,
                    prev_hash: prev,
                    ..t.clone()
                };
                e.hash = e.recompute_hash();
                prev = e.hash;
                buf.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{},{},\\x{},\\x{}\n",
                    e.event_id,
                    e.tenant_id,
                    e.aggregate_type,
                    e.aggregate_id,
                    e.sequence,
                    e.event_type,
                    e.event_version,
                    e.recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    csv(&e.payload),
                    csv(&e.metadata),
                    hex::encode(e.prev_hash),
                    hex::encode(e.hash),
                ));
            }
            if buf.len() > (4 << 20) - 8192 {
                copy.send(buf.as_bytes()).await?;
                buf.clear();
            }
        }
        copy.send(buf.as_bytes()).await?;
        copy.finish().await?;
        tx.commit().await?;
        written += n * COMMANDS_PER_JOB;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(SeedReport {
        jobs,
        events: written,
        seconds,
        events_per_second: written as f64 / seconds.max(1e-9),
    })
}
