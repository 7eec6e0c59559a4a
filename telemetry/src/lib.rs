//! Mira's telemetry: logs, and traces exported with OpenTelemetry (DESIGN §2, §12).
//!
//! Every process starts it with [`init`]: logs to stderr in `Logging__Format` (`text` or
//! `json`), filtered by `RUST_LOG`; and, when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, its `tracing` spans exported over OTLP/HTTP
//! (`OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`, the default, or `http/json`) as the
//! service `OTEL_SERVICE_NAME` (default: the process's own name). With neither set nothing is
//! exported and a span costs what it did before. JSON log lines written inside a recorded
//! span carry its `trace_id` and `span_id`.
//!
//! [`init`] also installs the process's metrics recorder ([`prom`]): every process serves the
//! series it records at `/metrics` (docs/observability/metrics.md).
//!
//! A trace crosses the log and the bus through the W3C `traceparent` every event's metadata
//! carries: a command takes it from the span it runs in ([`traceparent`]), and whoever later
//! acts on the event (a consumer, the worker, the WebSocket push) continues that trace
//! ([`follow`]) or links to it ([`link`]). The message on the bus is only a notification; the
//! context comes from the stored event.

pub mod prom;

use std::sync::{Arc, OnceLock};

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

/// The ADOT collector beside each task and worker pod on AWS (OTLP/HTTP), where traces go
/// with `Tracing__XRay__Enabled` and no `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub const XRAY_COLLECTOR: &str = "http://127.0.0.1:4318";

static XRAY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process started with `Tracing__XRay__Enabled`: it then also continues the
/// trace of an incoming `X-Amzn-Trace-Id` (the load balancer's) when no `traceparent` came.
pub fn xray_enabled() -> bool {
    XRAY.load(std::sync::atomic::Ordering::Relaxed)
}

/// `Tracing__XRay__Enabled` and `Tracing__XRay__ServiceName` (DESIGN §2), read from the
/// environment at start as the `OTEL_*` variables are.
fn xray_settings(env: impl Fn(&str) -> Option<String>) -> Result<(bool, Option<String>), InitError> {
    let enabled = match env("Tracing__XRay__Enabled")
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(InitError::Exporter(format!(
                "Tracing__XRay__Enabled is {other:?}: it is true or false"
            )))
        }
    };
    let name = env("Tracing__XRay__ServiceName").filter(|n| enabled && !n.trim().is_empty());
    Ok((enabled, name))
}

/// The W3C `traceparent` of an X-Ray trace header (`Root=1-5759e988-bd862e3fe1be46a994272793;
/// Parent=53995c3f42cd8ad8;Sampled=1`): the same trace id, its 8-digit time and 24-digit random
/// parts joined, as X-Ray and W3C ids are one. A header without `Parent` (the load balancer's
/// own) gets a fresh parent span id, so the request still joins the trace the load balancer's
/// logs name.
pub fn xray_traceparent(header: &str) -> Option<String> {
    let (mut root, mut parent, mut sampled) = (None, None, true);
    for part in header.split(';') {
        match part.trim().split_once('=') {
            Some(("Root", v)) => root = Some(v.trim()),
            Some(("Parent", v)) => parent = Some(v.trim().to_ascii_lowercase()),
            Some(("Sampled", v)) => sampled = v.trim() != "0",
            _ => {}
        }
    }
    let mut r = root?.split('-');
    let (version, time, random) = (r.next()?, r.next()?, r.next()?);
    if r.next().is_some() || version != "1" || time.len() != 8 || random.len() != 24 {
        return None;
    }
    let parent = parent.unwrap_or_else(|| format!("{:016x}", (uuid::Uuid::new_v4().as_u128() as u64).max(1)));
    let tp = format!(
        "00-{}{}-{parent}-{}",
        time.to_ascii_lowercase(),
        random.to_ascii_lowercase(),
        if sampled { "01" } else { "00" }
    );
    span_context(&tp).map(|_| tp)
}

/// Starts logging to stderr, and exporting traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
/// as `service` unless `OTEL_SERVICE_NAME` names another. `default_filter` applies without
/// `RUST_LOG`. Installs the process's global subscriber once; a later call changes nothing.
pub fn init(service: &str, default_filter: &str) -> Result<Guard, InitError> {
    let format = mira_config::LogFormat::from_env(|k| std::env::var(k).ok()).map_err(InitError::Config)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (xray, xray_name) = xray_settings(|k| std::env::var(k).ok())?;
    XRAY.store(xray, std::sync::atomic::Ordering::Relaxed);
    let provider = if xray || export_requested(|k| std::env::var(k).ok()) {
        Some(provider(xray_name.as_deref().unwrap_or(service))?)
    } else {
        None
    };
    let sub = subscriber(filter, format, std::io::stderr, provider.as_ref());
    let _ = tracing::dispatcher::set_global_default(sub);
    prom::install();
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
        // `Tracing__XRay__Enabled` alone: the collector beside the process.
        (None, None) => format!("{XRAY_COLLECTOR}/v1/traces"),
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
) -> tracing::Dispatch
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    // The JSON lines read the OpenTelemetry ids of their span through the dispatcher they are
    // written by, which exists only once the subscriber is built.
    let dispatch: Arc<OnceLock<tracing::dispatcher::WeakDispatch>> = Arc::default();
    // `RUST_LOG` chooses the log lines; the spans exported are Mira's own at `info` whatever it
    // says (a fleet logging at `warn` still sends its traces).
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_target(false);
    let fmt: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> = match format {
        mira_config::LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        // One object per line: timestamp, level, message and fields, the span it is in, and,
        // when traces are recorded, that span's `trace_id` and `span_id` (what CloudWatch Logs
        // Insights joins a trace's lines on).
        mira_config::LogFormat::Json => {
            let json = tracing_subscriber::fmt::format()
                .json()
                .with_target(false)
                .with_current_span(true)
                .with_span_list(false);
            fmt.json()
                .event_format(WithTraceIds {
                    inner: json,
                    dispatch: dispatch.clone(),
                })
                .with_filter(filter)
                .boxed()
        }
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
    let d = tracing::Dispatch::new(tracing_subscriber::registry().with(layers));
    let _ = dispatch.set(d.downgrade());
    d
}

/// The JSON format, with `trace_id` and `span_id` added to each line written inside a span
/// whose trace is recorded.
struct WithTraceIds<F> {
    inner: F,
    dispatch: Arc<OnceLock<tracing::dispatcher::WeakDispatch>>,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let span = ctx.event_scope().and_then(|mut scope| scope.next()).map(|s| s.id());
        let ids = span
            .zip(self.dispatch.get().and_then(|d| d.upgrade()))
            .and_then(|(id, d)| {
                let cx = tracing_opentelemetry::get_otel_context(&id, &d)?;
                let sc = cx.span().span_context().clone();
                sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
            });
        let mut line = String::new();
        self.inner
            .format_event(ctx, tracing_subscriber::fmt::format::Writer::new(&mut line), event)?;
        match (ids, line.trim_end().strip_suffix('}')) {
            (Some((trace, span)), Some(open)) => {
                writeln!(writer, "{open},\"trace_id\":\"{trace}\",\"span_id\":\"{span}\"}}")
            }
            _ => writer.write_str(&line),
        }
    }
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

/// The spans of an OTLP/HTTP JSON export (`/v1/traces` with `http/json`), each with its
/// resource's `service.name` added as `service`: for tests and tools that receive what Mira's
/// processes send. Not JSON, or no spans: none.
pub fn otlp_json_spans(body: &[u8]) -> Vec<serde_json::Value> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
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
    out
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
    fn quiet(level: &str, provider: Option<&SdkTracerProvider>) -> tracing::Dispatch {
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
    fn an_xray_header_names_the_same_trace() {
        let tp =
            xray_traceparent("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995C3F42CD8AD8;Sampled=1").unwrap();
        assert_eq!(tp, "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01");
        // The load balancer's header: a root and no parent.
        let tp = xray_traceparent("Root=1-67891233-abcdef012345678912345678").unwrap();
        let sc = span_context(&tp).unwrap();
        assert_eq!(sc.trace_id().to_string(), "67891233abcdef012345678912345678");
        assert!(sc.is_sampled());
        assert!(!xray_traceparent("Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=0")
            .unwrap()
            .ends_with("-01"));
        for bad in [
            "",
            "Parent=53995c3f42cd8ad8",
            "Root=2-5759e988-bd862e3fe1be46a994272793",
            "Root=1-5759e98-bd862e3fe1be46a994272793",
            "Root=1-zzzzzzzz-bd862e3fe1be46a994272793",
        ] {
            assert!(xray_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn xray_settings_are_read_and_a_wrong_one_is_named() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(xray_settings(env(&[])).unwrap(), (false, None));
        assert_eq!(
            xray_settings(env(&[
                ("Tracing__XRay__Enabled", "True"),
                ("Tracing__XRay__ServiceName", "mira-api")
            ]))
            .unwrap(),
            (true, Some("mira-api".to_owned()))
        );
        assert_eq!(
            xray_settings(env(&[
                ("Tracing__XRay__Enabled", "false"),
                ("Tracing__XRay__ServiceName", "mira-api")
            ]))
            .unwrap(),
            (false, None)
        );
        let e = xray_settings(env(&[("Tracing__XRay__Enabled", "yes")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Tracing__XRay__Enabled"), "{e}");
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
        tracing::dispatcher::with_default(&sub, || {
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
        tracing::dispatcher::with_default(&sub, || {
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

    /// A JSON log line written inside a span of a recorded trace names the trace and the span,
    /// so that a log search finds a trace's lines; outside any span it names none.
    #[test]
    fn json_lines_carry_their_trace_and_span_ids() {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let provider = SdkTracerProvider::builder().build();
        let sub = subscriber(
            EnvFilter::new("info"),
            mira_config::LogFormat::Json,
            move || w.clone(),
            Some(&provider),
        );
        let mut inside = None;
        tracing::dispatcher::with_default(&sub, || {
            tracing::info!("before any span");
            let span = tracing::info_span!("consume.event");
            follow(&span, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
            let _g = span.enter();
            inside = current_ids();
            tracing::info!(job = "j-1", "applied");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        let (trace, span) = inside.expect("the span is recorded");
        assert_eq!(lines[1]["trace_id"], "0af7651916cd43dd8448eb211c80319c", "{text}");
        assert_eq!(lines[1]["trace_id"], trace.as_str());
        assert_eq!(lines[1]["span_id"], span.as_str(), "{text}");
        assert_eq!(lines[1]["fields"]["job"], "j-1");
        assert_eq!(lines[1]["span"]["name"], "consume.event", "{text}");
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
        tracing::dispatcher::with_default(&sub, || {
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
