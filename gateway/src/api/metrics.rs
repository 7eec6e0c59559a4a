//! `/metrics` in the Prometheus text format: request counts and latency sums per route and
//! status class, and, read from the database at scrape time, each projection's position and
//! lag and the log's watermark lag (DESIGN §4.1, §6).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), (u64, f64)>>,
    /// Set when this process runs the relay, which writes checkpoints to the witness.
    pub witness: std::sync::OnceLock<std::sync::Arc<mira_eventlog::checkpoint::WitnessHealth>>,
}

impl Metrics {
    pub fn observe(&self, route: &str, status: StatusCode, took: Duration) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry((route.to_owned(), status.as_u16())).or_default();
        e.0 += 1;
        e.1 += took.as_secs_f64();
    }

    /// Renders the request metrics, then `extra` (gauges read at scrape time).
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::new();
        out.push_str("# HELP mira_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE mira_http_requests_total counter\n");
        let m = self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for ((route, status), (n, _)) in &m {
            let _ = writeln!(
                out,
                "mira_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP mira_http_request_seconds_sum Time spent serving requests.\n");
        out.push_str("# TYPE mira_http_request_seconds_sum counter\n");
        for ((route, status), (_, secs)) in &m {
            let _ = writeln!(
                out,
                "mira_http_request_seconds_sum{{route=\"{}\",status=\"{status}\"}} {secs}",
                escape(route)
            );
        }
        if let Some(w) = self.witness.get() {
            out.push_str("# HELP mira_witness_conflicts_total Witness conflicts met while writing checkpoints: the tamper signal; checkpointing stops.\n");
            out.push_str("# TYPE mira_witness_conflicts_total counter\n");
            let _ = writeln!(out, "mira_witness_conflicts_total {}", w.conflicts());
            out.push_str("# HELP mira_witness_last_success_timestamp_seconds When the witness last took a checkpoint (Unix seconds; 0: not since this process started).\n");
            out.push_str("# TYPE mira_witness_last_success_timestamp_seconds gauge\n");
            let _ = writeln!(
                out,
                "mira_witness_last_success_timestamp_seconds {}",
                w.last_success_unix()
            );
        }
        let mut last = "";
        for g in gauges {
            if g.name != last {
                let _ = writeln!(out, "# HELP {} {}", g.name, g.help);
                let _ = writeln!(out, "# TYPE {} gauge", g.name);
                last = g.name;
            }
            let labels = if g.labels.is_empty() {
                String::new()
            } else {
                format!(
                    "{{{}}}",
                    g.labels
                        .iter()
                        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            };
            let _ = writeln!(out, "{}{labels} {}", g.name, g.value);
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Projection and watermark gauges, read now.
pub async fn database_gauges(pool: &sqlx::PgPool) -> Result<Vec<Gauge>, sqlx::Error> {
    let mut g = Vec::new();
    let status = mira_projections::rebuild::status(pool).await?;
    for (name, help, f) in [
        (
            "mira_projection_position",
            "The last log position applied to the projection.",
            (|s: &mira_projections::rebuild::Status| s.position as f64) as fn(&_) -> f64,
        ),
        (
            "mira_projection_lag_events",
            "Events in the log after the projection's position.",
            |s| s.lag_events as f64,
        ),
        (
            "mira_projection_lag_seconds",
            "Age of the oldest event the projection has not applied.",
            |s| s.lag_seconds,
        ),
    ] {
        for s in &status {
            g.push(Gauge {
                name,
                help,
                labels: vec![("projection", s.name.clone())],
                value: f(s),
            });
        }
    }
    // Each consumer's parked aggregates and slow work waiting for a retry (ADR 0025); every
    // consumer is shown, at zero when it has none.
    let health: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT consumer, parked, retrying FROM mira_consumer_health()")
            .fetch_all(pool)
            .await?;
    for (name, help, retrying) in [
        (
            "mira_consumer_parked_aggregates",
            "Aggregates parked for a consumer (mira dlq list): their events wait for mira dlq redrive.",
            false,
        ),
        (
            "mira_consumer_slow_work_retrying",
            "Slow work that failed and waits in the due-time table for its next try.",
            true,
        ),
    ] {
        // One gauge per consumer (the GPU worker's consumer reads two queues).
        for group in mira_bus::Group::ALL.into_iter().filter(|g| g.consumer() == g.suffix()) {
            let consumer = group.consumer();
            let (p, r) = health
                .iter()
                .find(|(c, _, _)| c == consumer)
                .map_or((0, 0), |(_, p, r)| (*p, *r));
            g.push(Gauge {
                name,
                help,
                labels: vec![("consumer", consumer.to_owned())],
                value: if retrying { r } else { p } as f64,
            });
        }
    }
    // Ready jobs the handlers have not admitted yet: what the GPU fleet scales on beside its
    // queues (KEDA), since the queues hold only the admission window.
    let (routine, stat): (i64, i64) = sqlx::query_as("SELECT routine, stat FROM mira_jobs_waiting_admission()")
        .fetch_one(pool)
        .await?;
    for (priority, n) in [("routine", routine), ("stat", stat)] {
        g.push(Gauge {
            name: "mira_jobs_waiting_admission",
            help: "Jobs ready to run (slide verified, retry due) that the handlers have not admitted to the GPU queues yet.",
            labels: vec![("priority", priority.to_owned())],
            value: n as f64,
        });
    }
    let w = mira_eventlog::store::watermark_lag(pool).await?;
    g.push(Gauge {
        name: "mira_log_watermark_lag_events",
        help: "Committed events that followers cannot read yet: an older appender to the log is still open.",
        labels: vec![],
        value: w.events as f64,
    });
    g.push(Gauge {
        name: "mira_log_watermark_lag_seconds",
        help: "Age of the oldest registered appender still open: only appenders hold the log's follow watermark back.",
        labels: vec![],
        value: w.seconds,
    });
    Ok(g)
}
