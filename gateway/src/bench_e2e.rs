//! `mira bench e2e` (DESIGN §12): latency from `POST /api/jobs` to the first `job.updated` for
//! that job on the WebSocket, measured from outside the gateway over real HTTP and a real
//! socket. The gateway runs in this process with the relay, projector and handlers, on the
//! configured bus: the in-memory bus (as in `mira dev`) or SNS/SQS (moto, or AWS). Tokens come
//! from a local identity provider in a scratch directory, served and validated on the same path
//! as Cognito's. Jobs are submitted one at a time, so each figure is a latency, not a queue.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

#[derive(Debug, Clone, Serialize)]
pub struct E2eReport {
    pub bus: String,
    pub jobs: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
}

/// Runs `jobs` submissions against a gateway built from `env` (which names the database and
/// the bus) and returns the latency distribution.
pub async fn run(env: Vec<(String, String)>, jobs: usize) -> anyhow::Result<E2eReport> {
    let scratch = std::env::temp_dir().join(format!("mira-bench-e2e-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&scratch)?;
    let result = measure(env, jobs, &scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn measure(env: Vec<(String, String)>, jobs: usize, scratch: &std::path::Path) -> anyhow::Result<E2eReport> {
    let idp = std::sync::Arc::new(crate::dev::DevIdp::open_or_create(scratch)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut env: std::collections::BTreeMap<String, String> = env.into_iter().collect();
    let at = |p: &str| scratch.join(p).display().to_string();
    for (k, v) in [
        ("Storage__Provider", "Local".to_owned()),
        ("Storage__LocalDir", at("blobs")),
        ("Keyring__LocalDir", at("keyring")),
        ("Audit__SigningKeyFile", at("audit.key")),
        ("Audit__WitnessDir", at("witness")),
        ("AWS__Cognito__Issuer", crate::dev::ISSUER.to_owned()),
        ("AWS__Cognito__ClientId", crate::dev::AUDIENCE.to_owned()),
        (
            "AWS__Cognito__JwksUrl",
            format!("http://{addr}{}", crate::api::DEV_JWKS_PATH),
        ),
    ] {
        env.insert(k.into(), v);
    }
    let settings = Settings::load(None, env)?;
    let bus = match settings.messaging.provider {
        crate::config::MessagingProvider::Aws => {
            let sdk = mira_bus::aws::sdk_config(settings.aws.region.as_deref()).await;
            mira_bus::aws::init(&sdk, &mira_bus::Names::from_settings(&settings)).await?;
            "sns-sqs"
        }
        crate::config::MessagingProvider::InMemory => "in-memory",
    };
    crate::database::migrate(&settings).await?;
    // The rig's own throwaway keys, in its scratch directory.
    mira_keys::init(&settings).await?;
    let pool = mira_eventlog::db::connect_with(&settings).await?;
    let stop = CancellationToken::new();
    let options = crate::server::Options::everything(Some(idp.clone()));
    let s = stop.clone();
    let server = tokio::spawn(async move { crate::server::run(&settings, pool, listener, &options, s).await });
    let outcome = drive(&idp, addr, jobs).await;
    stop.cancel();
    server.await.context("the gateway task")??;
    let mut latencies = outcome?;
    latencies.sort();
    let n = latencies.len();
    let total: Duration = latencies.iter().sum();
    Ok(E2eReport {
        bus: bus.into(),
        jobs: n,
        p50_ms: crate::bench::percentile(&latencies, 0.50),
        p99_ms: crate::bench::percentile(&latencies, 0.99),
        mean_ms: total.as_secs_f64() * 1e3 / n.max(1) as f64,
        max_ms: latencies.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0),
    })
}

async fn drive(idp: &crate::dev::DevIdp, addr: std::net::SocketAddr, jobs: usize) -> anyhow::Result<Vec<Duration>> {
    let tenant = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let token = idp.token("bench", &tenant, &["pathologist".to_owned()], Duration::from_secs(3600))?;
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    // The gateway is up once it answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slide: serde_json::Value = http
        .post(format!("{base}/api/slides"))
        .bearer_auth(&token)
        .json(&json!({"name": "bench", "size_bytes": 4, "content_type": "image/tiff"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let slide_id = slide["slide_id"].as_str().context("slide id")?.to_owned();
    let upload = slide["upload"]["url"].as_str().context("upload url")?;
    http.put(upload)
        .header("content-type", "image/tiff")
        .body("data")
        .send()
        .await?
        .error_for_status()?;
    http.post(format!("{base}/api/slides/{slide_id}/uploaded"))
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()?;

    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/ws").into_client_request()?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("{}, {token}", crate::api::ws::PROTOCOL).parse()?,
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(req).await.context("WebSocket")?;
    let mut out = Vec::with_capacity(jobs);
    for i in 0..jobs {
        let started = Instant::now();
        let r: serde_json::Value = http
            .post(format!("{base}/api/jobs"))
            .bearer_auth(&token)
            .json(&json!({"slide_id": slide_id, "kind": "wsi.preprocess"}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let job = r["job_id"].as_str().context("job id")?.to_owned();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), socket.next())
                .await
                .with_context(|| format!("no job.updated for job {i} within 30 s"))?
                .context("the WebSocket closed")??;
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                if v["type"] == "job.updated" && v["job"]["job_id"] == job.as_str() {
                    out.push(started.elapsed());
                    break;
                }
            }
        }
    }
    let _ = socket.close(None).await;
    let _ = socket.flush().await;
    Ok(out)
}
