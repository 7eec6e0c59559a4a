//! `/metrics` in the Prometheus text format (the catalogue: `docs/observability/metrics.md`):
//! request counts and latency per route and status, every series the process records, and,
//! read from the database at scrape time, each projection's position and
//! lag and the log's watermark lag (DESIGN §4.1, §6).

use std::time::Duration;

use axum::http::StatusCode;

/// The API's part of the process's metrics (the recorder is the process's one:
/// [`mira_telemetry::prom`]).
#[derive(Debug)]
pub struct Metrics {
    /// Set when this process runs the relay, which writes checkpoints to the witness.
    pub witness: std::sync::OnceLock<std::sync::Arc<mira_eventlog::checkpoint::WitnessHealth>>,
}

impl Default for Metrics {
    fn default() -> Self {
        mira_telemetry::prom::install();
        Self {
            witness: Default::default(),
        }
    }
}

impl Metrics {
    pub fn observe(&self, route: &str, status: StatusCode, took: Duration) {
        let labels = [("route", route.to_owned()), ("status", status.as_u16().to_string())];
        metrics::counter!("mira_http_requests_total", &labels).increment(1);
        metrics::histogram!("mira_http_request_seconds", &labels).record(took.as_secs_f64());
    }

    /// Sets the gauges read at scrape time (`gauges`, the witness's health), then renders every
    /// series of the process.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        if let Some(w) = self.witness.get() {
            metrics::counter!("mira_witness_conflicts_total").absolute(w.conflicts());
            metrics::gauge!("mira_witness_last_success_timestamp_seconds").set(w.last_success_unix() as f64);
        }
        for g in gauges {
            let labels: Vec<(&'static str, String)> = g.labels.clone();
            metrics::describe_gauge!(g.name, g.help);
            metrics::gauge!(g.name, &labels).set(g.value);
        }
        mira_telemetry::prom::render()
    }
}

#[derive(Debug, Clone)]
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
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
