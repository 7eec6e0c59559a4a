//! Metrics in the Prometheus text format, through the `metrics` facade and
//! `metrics-exporter-prometheus` (the catalogue: `docs/observability/metrics.md`).
//!
//! Any crate records with `metrics::counter!`, `gauge!` and `histogram!`; [`install`] puts the
//! process's one recorder in place (every process's start does), and [`render`] is what its
//! `/metrics` answers. Before [`install`] a recording costs nothing and goes nowhere.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of the histograms in seconds: a millisecond to ten minutes.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Buckets of the histograms that count (events in a relay batch).
pub const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder, once, and describes Mira's series. A later call changes
/// nothing. Returns `false` when another recorder was installed first (then [`render`] has
/// nothing to show).
pub fn install() -> bool {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_events".into()), COUNT_BUCKETS)
                .and_then(|b| b.set_buckets(SECONDS_BUCKETS))
                .expect("the bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                return None;
            }
            describe();
            // Histograms fold their samples in when rendered; between scrapes (or with no
            // scraper) the upkeep keeps them from growing.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("mira-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                });
            Some(handle)
        })
        .is_some()
}

/// What `/metrics` answers: every series recorded so far, in the Prometheus text format.
pub fn render() -> String {
    match HANDLE.get() {
        Some(Some(h)) => h.render(),
        _ => String::new(),
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "mira_http_requests_total",
        "HTTP requests answered, by route template and status."
    );
    describe_histogram!(
        "mira_http_request_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request."
    );
    describe_histogram!(
        "mira_command_seconds",
        Unit::Seconds,
        "From a command's start to its events committed, by command and outcome."
    );
    describe_counter!(
        "mira_append_conflicts_total",
        "Appends that lost a race for an aggregate's next sequence."
    );
    describe_histogram!(
        "mira_relay_publish_seconds",
        Unit::Seconds,
        "Time to publish one batch of events."
    );
    describe_histogram!(
        "mira_relay_batch_events",
        Unit::Count,
        "Events in each published batch."
    );
    describe_counter!("mira_relay_published_events_total", "Events the relay published.");
    describe_gauge!(
        "mira_queue_messages",
        "Messages in each queue and dead-letter queue, by state (sampled)."
    );
    describe_gauge!(
        "mira_queue_oldest_message_age_seconds",
        Unit::Seconds,
        "Age of the oldest message waiting in a queue (the in-memory bus; on SQS, CloudWatch's ApproximateAgeOfOldestMessage)."
    );
    describe_histogram!(
        "mira_consumer_receive_delay_seconds",
        Unit::Seconds,
        "From a message's publication to its receipt by a consumer."
    );
    describe_histogram!(
        "mira_consumer_apply_seconds",
        Unit::Seconds,
        "Time to apply one event, by consumer and outcome."
    );
    describe_counter!(
        "mira_consumer_retries_total",
        "Events whose apply failed and will be tried again."
    );
    describe_histogram!(
        "mira_job_stage_seconds",
        Unit::Seconds,
        "Time in each stage of a job's attempt, by kind and stage."
    );
    describe_histogram!(
        "mira_job_seconds",
        Unit::Seconds,
        "One attempt of a job, from its lease to its outcome."
    );
    describe_counter!("mira_jobs_finished_total", "Attempts ended, by kind and outcome.");
    describe_counter!(
        "mira_worker_pixels_total",
        "Slide pixels processed, on the GPU or the CPU."
    );
    describe_histogram!(
        "mira_worker_compute_seconds",
        Unit::Seconds,
        "Time each job's pipeline took, on the GPU or the CPU."
    );
    describe_gauge!("mira_ws_connections", "Open WebSocket connections.");
    describe_counter!(
        "mira_ws_dropped_slow_clients_total",
        "WebSocket clients dropped for reading too slowly."
    );
}

/// Serves `GET /metrics` on `listener` until `stop` completes: for processes that have no API of
/// their own (`mira-worker`, `mira relay`, `mira projector`, `mira handlers`, with
/// `--metrics-listen`). `refresh` runs before each render, to set the gauges read at scrape
/// time. Anything else is 404; a request must arrive within 10 s and fit in 8 KiB.
pub async fn serve<F>(listener: tokio::net::TcpListener, refresh: F, stop: impl std::future::Future<Output = ()>)
where
    F: Fn() + Send + Sync + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let refresh = std::sync::Arc::new(refresh);
    tokio::pin!(stop);
    loop {
        let (mut conn, _) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    let n = conn.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                std::io::Result::Ok(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            let target = std::str::from_utf8(line)
                .unwrap_or_default()
                .split(' ')
                .take(2)
                .collect::<Vec<_>>();
            let (status, body) = match target[..] {
                ["GET", path] if path == "/metrics" || path.starts_with("/metrics?") => {
                    refresh();
                    ("200 OK", render())
                }
                ["GET", _] => ("404 Not Found", "only /metrics is served here\n".to_owned()),
                _ => ("405 Method Not Allowed", "GET /metrics\n".to_owned()),
            };
            let res = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(res.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// A timer for a histogram in seconds: `let t = Timer::start(); ...; t.record(histogram)`.
#[derive(Debug, Clone, Copy)]
pub struct Timer(std::time::Instant);

impl Timer {
    pub fn start() -> Self {
        Self(std::time::Instant::now())
    }

    pub fn record(self, h: metrics::Histogram) {
        h.record(self.0.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_series_render_as_prometheus_text() {
        assert!(install());
        assert!(install(), "a second call keeps the recorder");
        metrics::counter!("mira_jobs_finished_total", "kind" => "deepzoom", "outcome" => "succeeded").increment(2);
        metrics::histogram!("mira_relay_batch_events").record(3.0);
        metrics::histogram!("mira_relay_publish_seconds").record(0.02);
        let text = render();
        assert!(
            text.contains("mira_jobs_finished_total{kind=\"deepzoom\",outcome=\"succeeded\"} 2"),
            "{text}"
        );
        assert!(text.contains("# TYPE mira_relay_publish_seconds histogram"), "{text}");
        assert!(
            text.contains("mira_relay_publish_seconds_bucket{le=\"0.025\"} 1"),
            "{text}"
        );
        assert!(text.contains("mira_relay_batch_events_bucket{le=\"5\"} 1"), "{text}");
        assert!(
            text.contains("# HELP mira_jobs_finished_total Attempts ended"),
            "{text}"
        );
    }
}
