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
                let v: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                let mut out = kept.lock().unwrap();
                for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                    let service = rs["resource"]["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["key"] == "service.name")
                        .map(|a| a["value"]["stringValue"].clone())
                        .unwrap_or_default();
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        for s in ss["spans"].as_array().into_iter().flatten() {
                            let mut s = s.clone();
                            s["service"] = service.clone();
                            out.push(s);
                        }
                    }
                }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_covers_the_request_the_log_the_bus_the_worker_and_the_push() {
    let rx = receiver().await;
    let provider = mira_telemetry::test_provider(&rx.url, "mira-dev").unwrap();
    tracing::subscriber::set_global_default(mira_telemetry::subscriber(
        tracing_subscriber::EnvFilter::new("info"),
        mira_config::LogFormat::Text,
        std::io::sink,
        Some(&provider),
    ))
    .unwrap();
    let app = spawn_app(Storage::Local).await;
    let _worker = spawn_worker(
        &app,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.url.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let t = app.token("lab-a", &["pathologist"]);
    let mut ws = connect(&app, &t, None).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let slide = app.upload_slide(&t, &cmu_slide()).await;
    // Verified first: a job waiting for its slide is queued by the slide's verification, in
    // that trace.
    eventually("the slide verified", || async {
        let s = app.get(&t, &format!("/api/slides/{slide}")).await.body;
        (s["status"] == "verified").then_some(s)
    })
    .await;
    let r = app
        .send(
            app.http
                .post(format!("{}/api/jobs", app.base))
                .bearer_auth(&t)
                .header("traceparent", format!("00-{TRACE}-{CALLER}-01"))
                .json(&json!({"slide_id": slide, "kind": "wsi.preprocess"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let job = r.body["job_id"].as_str().unwrap().to_owned();
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
        "worker.attempt",
        "worker.stage",
    ];
    let mut trace: Vec<Value> = Vec::new();
    for _ in 0..100 {
        trace = rx
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s["traceId"] == TRACE)
            .cloned()
            .collect();
        let names: Vec<&str> = trace.iter().filter_map(|s| s["name"].as_str()).collect();
        if wanted.iter().all(|w| names.contains(w)) && names.contains(&"worker.store") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tree = render(&trace);
    eprintln!("the job's trace:\n{tree}");
    if std::env::var_os("MIRA_TRACE_DEBUG").is_some() {
        for s in rx.spans.lock().unwrap().iter() {
            eprintln!(
                "{} {} {} parent={}",
                s["traceId"], s["name"], s["service"], s["parentSpanId"]
            );
        }
    }
    let names: Vec<&str> = trace.iter().filter_map(|s| s["name"].as_str()).collect();
    for w in wanted
        .iter()
        .chain(&["worker.lease", "worker.fetch", "worker.store", "handlers.admit"])
    {
        assert!(names.contains(w), "no {w} span in the trace: {names:?}\n{tree}");
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
    app.stop().await;
}
