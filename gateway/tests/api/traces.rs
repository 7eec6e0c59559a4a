//! One trace from the click to the GPU (DESIGN §2, §12): a job submitted with a caller's W3C
//! `traceparent` runs through `mira dev`'s wiring (this process: the API, the relay, the
//! projector, the handlers, the WebSocket) and a real worker (its own process), each exporting
//! its spans over OTLP/HTTP to a receiver in this test.

use std::sync::{Arc, Mutex};

use super::*;

/// An OTLP/HTTP receiver (`http/json`): keeps every span it is sent.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Value>>>,
}

async fn receiver() -> Receiver {
    let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let got = mira_telemetry::otlp_json_spans(&body);
                assert!(!got.is_empty(), "an OTLP/HTTP JSON export with spans");
                kept.lock().unwrap().extend(got);
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver { url, spans }
}

/// The caller's trace and span: the job's request continues them.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn attr(span: &Value, key: &str) -> Option<String> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| {
            let v = &a["value"];
            v["stringValue"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string())
        })
}

/// The spans of `TRACE` as an indented tree with their durations: what the note shows.
fn render(spans: &[Value]) -> String {
    fn walk(spans: &[Value], parent: &str, depth: usize, out: &mut String) {
        let mut children: Vec<&Value> = spans.iter().filter(|s| s["parentSpanId"] == parent).collect();
        children.sort_by_key(|s| {
            s["startTimeUnixNano"]
                .as_str()
                .and_then(|t| t.parse::<u128>().ok())
                .unwrap_or(0)
        });
        for s in children {
            let ns = |k: &str| s[k].as_str().and_then(|t| t.parse::<u128>().ok()).unwrap_or(0);
            let ms = (ns("endTimeUnixNano").saturating_sub(ns("startTimeUnixNano"))) as f64 / 1e6;
            let detail = ["route", "consumer", "event_type", "stage", "entity"]
                .iter()
                .filter_map(|k| attr(s, k).map(|v| format!("{k}={v}")))
                .collect::<Vec<_>>()
                .join(" ");
            out.push_str(&format!(
                "{}{} [{}] {ms:.1} ms {detail}\n",
                "  ".repeat(depth),
                s["name"].as_str().unwrap_or("?"),
                s["service"].as_str().unwrap_or("?"),
            ));
            walk(spans, s["spanId"].as_str().unwrap_or_default(), depth + 1, out);
        }
    }
    let mut out = String::new();
    walk(spans, CALLER, 0, &mut out);
    out
}

/// Submits a job on `slide` with the caller's `traceparent` (`TRACE`, `CALLER`); its id.
async fn submit_in_trace(app: &App, t: &str, slide: &str) -> String {
    let r = app
        .send(
            app.http
                .post(format!("{}/api/jobs", app.base))
                .bearer_auth(t)
                .header("traceparent", format!("00-{TRACE}-{CALLER}-01"))
                .json(&json!({"slide_id": slide, "kind": "wsi.preprocess"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    r.body["job_id"].as_str().unwrap().to_owned()
}

/// A log writer that keeps what this process logs.
#[derive(Clone, Default)]
struct Logged(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logged {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A slide name and file name no telemetry may carry: sealed in the log, shown to its tenant.
const PLANTED_NAME: &str = "Zebulon Quixote 1947-03-12 biopsy";
const PLANTED_FILE: &str = "quixote-zebulon-MRN-5551234.svs";

/// `/metrics` read as a scraper reads it: every sample by series name and labels.
fn scrape(text: &str) -> Vec<prometheus_parse::Sample> {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("not the Prometheus text format ({e}):\n{text}"))
        .samples
}

/// The value of the sample `name` whose labels include `labels` (a histogram's count for a
/// histogram), or `None`.
fn sample(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

async fn worker_metrics(http: &reqwest::Client, addr: &str) -> String {
    eventually("the worker serves /metrics", || async {
        let r = http.get(format!("http://{addr}/metrics")).send().await.ok()?;
        (r.status() == 200).then_some(Value::String(r.text().await.ok()?))
    })
    .await
    .as_str()
    .unwrap()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_covers_the_request_the_log_the_bus_the_worker_and_the_push() {
    let rx = receiver().await;
    let provider = mira_telemetry::test_provider(&rx.url, "mira-dev").unwrap();
    // This process logs as JSON (Logging__Format=json), kept for the scans below.
    let logged = Logged::default();
    let out = logged.clone();
    tracing::dispatcher::set_global_default(mira_telemetry::subscriber(
        tracing_subscriber::EnvFilter::new("info"),
        mira_config::LogFormat::Json,
        move || out.clone(),
        Some(&provider),
    ))
    .unwrap();
    let app = spawn_app(Storage::Local).await;
    // The worker and the verifier, exporting their spans, logging JSON at `info` to files, and
    // the worker serving its own /metrics.
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let logs = app.dir.join("worker-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.url.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("Logging__Format", "json"),
        ("RUST_LOG", "info"),
    ];
    let mut processes = Vec::new();
    for (mode, extra) in [
        ("run", Some(("MIRA_METRICS_LISTEN", metrics_addr.as_str()))),
        ("verify", None),
    ] {
        let mut cmd = worker_command(&app, mode, &env);
        if let Some((k, v)) = extra {
            cmd.env(k, v);
        }
        cmd.stderr(std::fs::File::create(logs.join(format!("{mode}.log"))).unwrap());
        processes.push(cmd.spawn().expect("mira-worker starts"));
    }
    let before = scrape(&worker_metrics(&app.http, &metrics_addr).await);
    assert_eq!(
        sample(&before, "mira_jobs_finished_total", &[("outcome", "succeeded")]),
        None,
        "no job has ended yet"
    );
    let t = app.token("lab-a", &["pathologist"]);
    let mut ws = connect(&app, &t, None).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let slide = app
        .upload_slide_named(&t, &cmu_slide(), PLANTED_NAME, Some(PLANTED_FILE))
        .await;
    // Verified first: a job waiting for its slide is queued by the slide's verification, in
    // that trace.
    let verified = app.verified(&t, &slide).await;
    // The names are in the platform: its tenant reads them back.
    assert_eq!(verified["name"], PLANTED_NAME, "{verified}");
    let job = submit_in_trace(&app, &t, &slide).await;
    statuses_until(&mut ws, &job, "succeeded").await;
    // The job's events carry the caller's trace.
    let events = app.get(&t, &format!("/api/jobs/{job}/events")).await.body;
    assert!(!events["events"].as_array().unwrap().is_empty(), "{events}");

    // Everything this process recorded goes out; the worker sends its own every 100 ms.
    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap()
        .unwrap();
    let wanted = [
        "request",
        "command.job",
        "consume.event",
        "ws.push",
        "worker.lease",
        "worker.attempt",
        "worker.fetch",
        "worker.stage",
        "worker.store",
        "handlers.admit",
    ];
    // Until every span wanted is in, and every span's parent (a parent ends, and is sent,
    // after its children).
    let closed = |trace: &[Value]| {
        let names: Vec<&str> = trace.iter().filter_map(|s| s["name"].as_str()).collect();
        let ids: std::collections::HashSet<&str> = trace.iter().filter_map(|s| s["spanId"].as_str()).collect();
        wanted.iter().all(|w| names.contains(w))
            && trace.iter().all(|s| {
                let parent = s["parentSpanId"].as_str().unwrap_or_default();
                parent == CALLER || ids.contains(parent)
            })
    };
    let mut trace: Vec<Value> = Vec::new();
    for _ in 0..150 {
        trace = rx
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s["traceId"] == TRACE)
            .cloned()
            .collect();
        if closed(&trace) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tree = render(&trace);
    eprintln!("the job's trace:\n{tree}");
    let names: Vec<&str> = trace.iter().filter_map(|s| s["name"].as_str()).collect();
    for w in wanted {
        assert!(names.contains(&w), "no {w} span in the trace: {names:?}\n{tree}");
    }
    // Both processes are in it.
    let services: std::collections::BTreeSet<&str> = trace.iter().filter_map(|s| s["service"].as_str()).collect();
    assert_eq!(services, ["mira-dev", "mira-worker"].into_iter().collect(), "{tree}");
    // The spans form one tree under the caller's span: every parent is in the trace.
    let ids: std::collections::HashSet<&str> = trace.iter().filter_map(|s| s["spanId"].as_str()).collect();
    for s in &trace {
        let parent = s["parentSpanId"].as_str().unwrap_or_default();
        assert!(
            parent == CALLER || ids.contains(parent),
            "{} has a parent outside the trace ({parent:?})\n{tree}",
            s["name"]
        );
    }
    assert_eq!(
        trace.iter().filter(|s| s["parentSpanId"] == CALLER).count(),
        1,
        "one root, the request\n{tree}"
    );
    assert_eq!(
        tree.lines().count(),
        trace.len(),
        "every span is reached from the root\n{tree}"
    );
    // The worker's stages are under its attempt, in the worker's process.
    let stages: Vec<&Value> = trace.iter().filter(|s| s["name"] == "worker.stage").collect();
    assert!(stages.len() >= 3, "{tree}");
    // The relay's batch spans link to the events of the trace they published.
    let spans = rx.spans.lock().unwrap().clone();
    let linked = spans.iter().any(|s| {
        s["name"] == "relay.publish"
            && s["links"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l["traceId"] == TRACE))
    });
    assert!(linked, "no relay.publish span links to the trace");

    // Metrics: both processes' /metrics parse, and the series moved with the job.
    let worker = scrape(&worker_metrics(&app.http, &metrics_addr).await);
    let kind = [("kind", "wsi.preprocess")];
    assert_eq!(
        sample(
            &worker,
            "mira_jobs_finished_total",
            &[kind[0], ("outcome", "succeeded")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&worker, "mira_job_seconds", &[kind[0], ("outcome", "succeeded")]),
        Some(1.0)
    );
    for stage in ["download", "open", "pyramid", "mask", "write", "upload"] {
        assert_eq!(
            sample(&worker, "mira_job_stage_seconds", &[kind[0], ("stage", stage)]),
            Some(1.0),
            "stage {stage}"
        );
    }
    // CMU-1-Small-Region is 2220 × 2967 pixels.
    assert_eq!(
        sample(&worker, "mira_worker_pixels_total", &[("device", "cpu")]),
        Some(2220.0 * 2967.0)
    );
    for command in ["job.start", "job.succeed"] {
        assert_eq!(
            sample(
                &worker,
                "mira_command_seconds",
                &[("command", command), ("outcome", "ok")]
            ),
            Some(1.0),
            "{command}"
        );
    }
    assert!(
        sample(
            &worker,
            "mira_consumer_apply_seconds",
            &[("consumer", "gpu-jobs"), ("outcome", "applied")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    let gateway_text = app.metrics().await;
    let gateway = scrape(&gateway_text);
    assert_eq!(
        sample(
            &gateway,
            "mira_http_requests_total",
            &[("route", "/api/jobs"), ("status", "202")]
        ),
        Some(1.0),
        "{gateway_text}"
    );
    assert_eq!(
        sample(
            &gateway,
            "mira_http_request_seconds",
            &[("route", "/api/jobs"), ("status", "202")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &gateway,
            "mira_command_seconds",
            &[("command", "job.submit"), ("outcome", "ok")]
        ),
        Some(1.0)
    );
    assert!(
        sample(&gateway, "mira_relay_published_events_total", &[]).unwrap_or(0.0) >= 6.0,
        "{gateway_text}"
    );
    assert!(sample(&gateway, "mira_relay_batch_events", &[]).unwrap_or(0.0) >= 1.0);
    assert!(
        sample(
            &gateway,
            "mira_consumer_apply_seconds",
            &[("consumer", "projections"), ("outcome", "applied")]
        )
        .unwrap_or(0.0)
            >= 6.0,
        "{gateway_text}"
    );
    assert!(
        sample(
            &gateway,
            "mira_consumer_receive_delay_seconds",
            &[("queue", "projections")]
        )
        .unwrap_or(0.0)
            >= 6.0
    );
    assert_eq!(
        sample(&gateway, "mira_ws_connections", &[]),
        Some(1.0),
        "the test's socket is open"
    );
    assert!(sample(
        &gateway,
        "mira_queue_messages",
        &[("queue", "projections-dlq"), ("state", "visible")]
    )
    .is_some());
    assert!(sample(
        &gateway,
        "mira_projection_lag_seconds",
        &[("projection", "read_models")]
    )
    .is_some());

    // Logs: JSON lines, and the ones written inside the job's trace name it, in both
    // processes, so a log search joins them to the trace.
    let own = String::from_utf8(logged.0.lock().unwrap().clone()).unwrap();
    let worker_log = std::fs::read_to_string(logs.join("run.log")).unwrap();
    let verifier_log = std::fs::read_to_string(logs.join("verify.log")).unwrap();
    for (who, text) in [("mira dev", &own), ("the worker", &worker_log)] {
        let lines: Vec<Value> = text
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{who}: {e}: {l}")))
            .collect();
        let in_trace = lines.iter().filter(|l| l["trace_id"] == TRACE).count();
        assert!(in_trace >= 1, "{who} logged no line in the job's trace:\n{text}");
        assert!(
            lines
                .iter()
                .filter(|l| l["trace_id"] == TRACE)
                .all(|l| l["span_id"].as_str().is_some_and(|s| s.len() == 16)),
            "{who}"
        );
    }
    // The scans below read what the processes said about this job and slide: not nothing.
    assert!(own.contains(&job) && worker_log.contains(&job), "the logs name the job");
    assert!(
        verifier_log.contains(&slide),
        "the verifier's log names the slide:\n{verifier_log}"
    );

    // No patient data in telemetry: neither the slide's name nor its file name (nor a part
    // of them) is in any span exported, any log line, or any metric.
    let exported = serde_json::to_string(&spans).unwrap();
    for planted in [PLANTED_NAME, PLANTED_FILE, "Quixote", "quixote", "5551234"] {
        for (what, text) in [
            ("an exported span", &exported),
            ("mira dev's log", &own),
            ("the worker's log", &worker_log),
            ("the verifier's log", &verifier_log),
            ("the gateway's /metrics", &gateway_text),
        ] {
            assert!(!text.contains(planted), "{planted:?} is in {what}");
        }
    }
    drop(processes);
    app.stop().await;
}

/// A retry after a timeout stays in the job's trace: the worker running the job dies, its
/// lease runs out, the handlers expire it and schedule the retry (in the trace of the event
/// that set the lease), and the next worker's attempt is in the same trace as the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_lease_runs_out_is_in_the_jobs_trace() {
    let rx = receiver().await;
    let provider = mira_telemetry::test_provider(&rx.url, "mira-dev").unwrap();
    tracing::dispatcher::set_global_default(mira_telemetry::subscriber(
        tracing_subscriber::EnvFilter::new("info"),
        mira_config::LogFormat::Text,
        std::io::sink,
        Some(&provider),
    ))
    .unwrap();
    let app = spawn_app(Storage::Local).await;
    let export = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.url.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    // A slow first worker, with a short lease.
    let mut slow: Vec<(&str, &str)> = export.to_vec();
    slow.extend([("Worker__BandPauseMillis", "4000"), ("Worker__LeaseSeconds", "5")]);
    let mut first = spawn_worker(&app, &slow);
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, &tall_slide(&app.dir, 4)).await;
    app.verified(&t, &slide).await;
    let job = submit_in_trace(&app, &t, &slide).await;
    job_status_until(&app, &t, &job, &["running"], Duration::from_secs(60)).await;
    // The worker dies mid-job (its attempt's process with it); a healthy one takes over.
    first.jobs.kill().await.unwrap();
    let _second = spawn_worker(&app, &export);
    let j = job_status_until(
        &app,
        &t,
        &job,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(
        (j["status"].as_str(), j["attempt"].as_u64()),
        (Some("succeeded"), Some(2)),
        "{j}"
    );
    let events = job_events(&app, &job).await;
    assert!(events.iter().any(|e| e == "JobTimedOut"), "{events:?}");

    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap()
        .unwrap();
    let in_trace = |name: &str, key: &str, value: &str| {
        rx.spans
            .lock()
            .unwrap()
            .iter()
            .any(|s| s["traceId"] == TRACE && s["name"] == name && attr(s, key).as_deref() == Some(value))
    };
    eventually("the retried attempt's spans", || async {
        (in_trace("worker.attempt", "attempt", "2") && in_trace("handlers.due", "kind", mira_handlers::LEASE))
            .then_some(Value::Null)
    })
    .await;
    // The expiry and the admission of the retry are in the trace too: the whole story of the
    // job, first attempt, timeout and retry, under the request that asked for it.
    assert!(in_trace("worker.lease", "job_id", &job), "the first worker's lease");
    let spans = rx.spans.lock().unwrap().clone();
    let trace: Vec<Value> = spans.iter().filter(|s| s["traceId"] == TRACE).cloned().collect();
    let tree = render(&trace);
    let admitted = trace.iter().filter(|s| s["name"] == "handlers.admit").count();
    assert!(admitted >= 2, "the first admission and the retry's:\n{tree}");
    app.stop().await;
}
