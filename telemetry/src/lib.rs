//! Mira's telemetry: logs, and traces exported with OpenTelemetry (DESIGN §2, §12).
//!
//! Every process starts it with [`init`]: logs to stderr in `Logging__Format` (`text` or
//! `json`), filtered by `RUST_LOG`; and, when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, its `tracing` spans exported over OTLP/HTTP
//! (`OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`, the default, or `http/json`) as the
//! service `OTEL_SERVICE_NAME` (default: the process's own name). With neither set nothing is
//! exported and a span costs what it did before.
//!
//! A trace crosses the log and the bus through the W3C `traceparent` every event's metadata
//! carries: a command takes it from the span it runs in ([`traceparent`]), and whoever later
//! acts on the event (a consumer, the worker, the WebSocket push) continues that trace
//! ([`follow`]) or links to it ([`link`]). The message on the bus is only a notification; the
//! context comes from the stored event.

use std::sync::OnceLock;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry::Context;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;

/// `mira dev`'s default: Mira's own steps at `info` (a line per request, per slide verified,
/// per job started and ended), its libraries' chatter at `warn`. `RUST_LOG` overrides it, for
/// `mira dev` and, passed on, for the worker it starts.
pub const DEV_FILTER: &str =
    "info,sqlx=warn,hyper=warn,hyper_util=warn,tower=warn,aws_config=warn,aws_smithy_runtime=warn,reqwest=warn";

/// The spans exported: Mira's at `info`, its libraries' only from `warn` (none of them opens
/// spans worth a trace), and never the exporter's own.
pub const SPAN_FILTER: &str = "info,sqlx=warn,hyper=warn,hyper_util=warn,h2=warn,tower=warn,aws_config=warn,aws_smithy_runtime=warn,aws_smithy_runtime_api=warn,aws_sdk_s3=warn,aws_sdk_sns=warn,aws_sdk_sqs=warn,reqwest=warn,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// Why telemetry could not start; the message names the setting.
#[derive(Debug)]
pub enum InitError {
    Config(mira_config::ConfigError),
    Exporter(String),
}

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(e) => write!(f, "{e}"),
            Self::Exporter(e) => write!(f, "OTEL_EXPORTER_OTLP_ENDPOINT: cannot start the trace exporter: {e}"),
        }
    }
}

impl std::error::Error for InitError {}

/// Keeps the trace exporter running; dropping it sends what is left ([`Guard::flush`] sends it
/// sooner).
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops exporting traces"]
pub struct Guard(Option<SdkTracerProvider>);

impl Guard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.0.is_some()
    }

    /// Sends every finished span now. Blocks: call it off the async runtime's threads
    /// (`spawn_blocking`).
    pub fn flush(&self) {
        if let Some(p) = &self.0 {
            if let Err(e) = p.force_flush() {
                eprintln!("mira: could not send the last traces: {e}");
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.shutdown();
        }
    }
}

/// Whether the environment asks for traces to be exported (the OTLP endpoint is set).
pub fn export_requested(env: impl Fn(&str) -> Option<String>) -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|k| env(k).is_some_and(|v| !v.trim().is_empty()))
}

/// Starts logging to stderr, and exporting traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
/// as `service` unless `OTEL_SERVICE_NAME` names another. `default_filter` applies without
/// `RUST_LOG`. Installs the process's global subscriber once; a later call changes nothing.
pub fn init(service: &str, default_filter: &str) -> Result<Guard, InitError> {
    let format = mira_config::LogFormat::from_env(|k| std::env::var(k).ok()).map_err(InitError::Config)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let provider = if export_requested(|k| std::env::var(k).ok()) {
        Some(provider(service)?)
    } else {
        None
    };
    let sub = subscriber(filter, format, std::io::stderr, provider.as_ref());
    let _ = tracing::subscriber::set_global_default(sub);
    Ok(Guard(provider))
}

/// The OTLP/HTTP exporter, configured by the standard `OTEL_*` variables, behind a batch
/// processor.
fn provider(service: &str) -> Result<SdkTracerProvider, InitError> {
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let endpoint = match (
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        env("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(traces), _) => traces,
        (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
        (None, None) => return Err(InitError::Exporter("no endpoint".into())),
    };
    let protocol = match env("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        None | Some("http/protobuf") => Protocol::HttpBinary,
        Some("http/json") => Protocol::HttpJson,
        Some(other) => {
            return Err(InitError::Exporter(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL is {other:?}: Mira sends http/protobuf or http/json"
            )))
        }
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(BlockingClient::default())
        .with_endpoint(endpoint)
        .with_protocol(protocol)
        .build()
        .map_err(|e| InitError::Exporter(e.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |s| s.trim().is_empty()) {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build())
}

/// The subscriber [`init`] installs: `format` to `writer`, and the spans to `provider`'s
/// tracer when there is one.
pub fn subscriber<W>(
    filter: EnvFilter,
    format: mira_config::LogFormat,
    writer: W,
    provider: Option<&SdkTracerProvider>,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    // `RUST_LOG` chooses the log lines; the spans exported are Mira's own at `info` whatever it
    // says (a fleet logging at `warn` still sends its traces).
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_target(false);
    let fmt: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> = match format {
        mira_config::LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        // One object per line: timestamp, level, message and fields, and the span it is in.
        mira_config::LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![fmt];
    if let Some(p) = provider {
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("mira"))
                .with_filter(EnvFilter::new(SPAN_FILTER))
                .boxed(),
        );
    }
    Box::new(tracing_subscriber::registry().with(layers))
}

/// A tracer provider that exports to `endpoint` (OTLP/HTTP, `http/json`) every 100 ms: for
/// tests that collect what a process sends.
pub fn test_provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider, InitError> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(BlockingClient::default())
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()
        .map_err(|e| InitError::Exporter(e.to_string()))?;
    // A batch processor, as in production (its own thread does the blocking sends), that sends
    // soon.
    let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            opentelemetry_sdk::trace::BatchConfigBuilder::default()
                .with_scheduled_delay(std::time::Duration::from_millis(100))
                .build(),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .with_span_processor(processor)
        .build())
}

/// The exporter's HTTP client: reqwest's blocking client, which the batch processor's own
/// thread may block on (it runs no async runtime). Built on first use, on that thread.
#[derive(Debug, Default)]
struct BlockingClient(OnceLock<reqwest::blocking::Client>);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for BlockingClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.0.get_or_init(|| {
            reqwest::blocking::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .unwrap_or_default()
        });
        let (parts, body) = request.into_parts();
        let mut req = client.request(parts.method, parts.uri.to_string()).body(body.to_vec());
        for (k, v) in &parts.headers {
            req = req.header(k, v);
        }
        let res = req.send()?;
        let status = res.status();
        let body = res.bytes()?;
        Ok(http::Response::builder().status(status).body(body)?)
    }
}

/// The W3C `traceparent` of the current span, for a command's metadata: the trace the
/// command's events belong to. A fresh random one (sampled) when no trace is recorded, so
/// every event still has one.
pub fn traceparent() -> String {
    current().map_or_else(random_traceparent, |sc| format_traceparent(&sc))
}

/// The current span's context, when traces are recorded.
fn current() -> Option<SpanContext> {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The current span's `traceparent` when traces are recorded, else `fallback` (the cause's own,
/// so that the events of one piece of work keep one trace id whether or not it is exported).
pub fn traceparent_within(fallback: &str) -> String {
    current().map_or_else(|| fallback.to_owned(), |sc| format_traceparent(&sc))
}

/// A fresh W3C `traceparent` (version 00, sampled).
pub fn random_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().as_u128();
    let span = (uuid::Uuid::new_v4().as_u128() as u64).max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

fn format_traceparent(sc: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8())
}

/// The span context a W3C `traceparent` names (remote), or `None` when it is not one.
pub fn span_context(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(trace, span, TraceFlags::new(flags), true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// Makes `span` continue the trace `traceparent` names: its parent becomes that span. Does
/// nothing when `traceparent` is not a valid one, or when traces are not recorded. Call it
/// before `span` is entered.
pub fn follow(span: &tracing::Span, traceparent: &str) {
    if let Some(sc) = span_context(traceparent) {
        let _ = span.set_parent(Context::new().with_remote_span_context(sc));
    }
}

/// Links `span` to the span `traceparent` names, for work that serves many traces at once
/// (the relay's batch of events).
pub fn link(span: &tracing::Span, traceparent: &str) {
    if let Some(sc) = span_context(traceparent) {
        span.add_link(sc);
    }
}

/// The trace id and span id of the current span, as hex, when traces are recorded: for a
/// log line or a response header.
pub fn current_ids() -> Option<(String, String)> {
    current().map(|sc| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscriber that logs nothing at `level`'s lines, with `provider`'s spans.
    fn quiet(level: &str, provider: Option<&SdkTracerProvider>) -> Box<dyn tracing::Subscriber + Send + Sync> {
        subscriber(
            EnvFilter::new(level),
            mira_config::LogFormat::Text,
            std::io::sink,
            provider,
        )
    }

    #[test]
    fn a_traceparent_reads_back_as_its_ids() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let sc = span_context(tp).unwrap();
        assert_eq!(sc.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(format_traceparent(&sc), tp);
        for bad in [
            "",
            "garbage",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
        ] {
            assert!(span_context(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_fresh_traceparent_is_valid_and_new() {
        let (a, b) = (random_traceparent(), random_traceparent());
        assert!(span_context(&a).is_some(), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn without_a_recorded_trace_a_command_gets_a_fresh_traceparent() {
        let sub = quiet("info", None);
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("request");
            follow(&span, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
            let _g = span.enter();
            let tp = traceparent();
            assert!(span_context(&tp).is_some(), "{tp}");
            assert!(current_ids().is_none());
        });
    }

    #[test]
    fn a_span_that_follows_a_traceparent_is_in_its_trace() {
        let provider = SdkTracerProvider::builder().build();
        let sub = quiet("info", Some(&provider));
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("consume.apply");
            follow(&span, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
            let _g = span.enter();
            let (trace, span_id) = current_ids().unwrap();
            assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
            assert_ne!(span_id, "b7ad6b7169203331");
            let tp = traceparent();
            assert!(tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{tp}");
            assert!(
                !tp.contains("b7ad6b7169203331"),
                "the command's parent is this span: {tp}"
            );
        });
    }

    /// What `mira-worker` does with `OTEL_EXPORTER_OTLP_ENDPOINT` set and `RUST_LOG=warn`: its
    /// `info` spans still go to the endpoint, as OTLP/HTTP, under its service name.
    #[test]
    fn spans_go_to_the_otlp_endpoint_whatever_the_log_level() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
        std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json");
        assert!(export_requested(|k| std::env::var(k).ok()));
        let got = std::thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let started = std::time::Instant::now();
            let mut s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if started.elapsed() < std::time::Duration::from_secs(20) => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    Err(_) => return String::from("nothing was sent"),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len || n == 0 {
                        let _ = s.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
                        );
                        return text;
                    }
                }
                if n == 0 {
                    return text;
                }
            }
        });
        let p = provider("mira-worker").unwrap();
        let sub = quiet("warn", Some(&p));
        tracing::subscriber::with_default(sub, || {
            let _g = tracing::info_span!("worker.stage", stage = "building the pyramid").entered();
        });
        p.force_flush().unwrap();
        let req = got.join().unwrap();
        assert!(req.starts_with("POST /v1/traces "), "{req}");
        assert!(
            req.contains("worker.stage") && req.contains("building the pyramid"),
            "{req}"
        );
        assert!(req.contains("mira-worker"), "the service: {req}");
    }
}
