//! The HTTP API over real connections: a gateway on port 0, a fresh database, moto's Cognito
//! and S3 on loopback (`MIRA_TEST_AWS_ENDPOINT`, started by `scripts/test`), and the relay and
//! projector in process on the in-memory bus.
//!
//! One test binary: the shared fixtures (`spawn_app`, tokens, a registered slide, a submitted
//! job, a worker) live here, and the tests in one module per resource or concern, below.

use std::collections::BTreeMap;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use aws_sdk_cognitoidentityprovider as cognito;
use chrono::Utc;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mira_eventlog::testing::TestDb;
use mira_gateway::config::Settings;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// moto and AWS

fn endpoint() -> String {
    std::env::var("MIRA_TEST_AWS_ENDPOINT")
        .expect("MIRA_TEST_AWS_ENDPOINT names the moto server (scripts/test starts one)")
}

/// The SDK reads its endpoint and credentials from the environment; every test in this binary
/// uses the same values, set once.
fn aws_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (k, v) in [
            ("AWS_ENDPOINT_URL", endpoint()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ] {
            std::env::set_var(k, v);
        }
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    });
    if std::env::var_os("TEST_LOG").is_some() {
        std::mem::forget(mira_gateway::telemetry::init("mira-test", "info").expect("logging starts"));
    }
}

async fn sdk() -> aws_config::SdkConfig {
    aws_env();
    mira_bus::aws::sdk_config(Some("us-east-1")).await
}

/// A user pool on moto with `custom:tenant`, the three groups and an app client that allows
/// USER_PASSWORD_AUTH.
struct Cognito {
    client: cognito::Client,
    pool_id: String,
    client_id: String,
}

struct Tokens {
    id: String,
    access: String,
}

impl Cognito {
    async fn new() -> Self {
        let client = cognito::Client::new(&sdk().await);
        let pool = client
            .create_user_pool()
            .pool_name(format!("mira-{}", uuid::Uuid::new_v4().simple()))
            .schema(
                cognito::types::SchemaAttributeType::builder()
                    .name("tenant")
                    .attribute_data_type(cognito::types::AttributeDataType::String)
                    .mutable(true)
                    .build(),
            )
            .send()
            .await
            .expect("moto creates a user pool");
        let pool_id = pool.user_pool().and_then(|p| p.id()).unwrap().to_owned();
        let app = client
            .create_user_pool_client()
            .user_pool_id(&pool_id)
            .client_name("mira-spa")
            .explicit_auth_flows(cognito::types::ExplicitAuthFlowsType::AllowUserPasswordAuth)
            .explicit_auth_flows(cognito::types::ExplicitAuthFlowsType::AllowRefreshTokenAuth)
            .send()
            .await
            .expect("moto creates an app client");
        let client_id = app.user_pool_client().and_then(|c| c.client_id()).unwrap().to_owned();
        for g in ["pathologist", "auditor", "admin"] {
            client
                .create_group()
                .user_pool_id(&pool_id)
                .group_name(g)
                .send()
                .await
                .unwrap();
        }
        Self {
            client,
            pool_id,
            client_id,
        }
    }

    fn issuer(&self) -> String {
        format!("https://cognito-idp.us-east-1.amazonaws.com/{}", self.pool_id)
    }

    fn jwks_url(&self) -> String {
        format!("{}/{}/.well-known/jwks.json", endpoint(), self.pool_id)
    }

    /// A user of `tenant` in `groups`, signed in through `initiate_auth`.
    async fn sign_in(&self, tenant: &str, groups: &[&str]) -> Tokens {
        let name = format!("u{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let password = "Correct-Horse-9";
        self.client
            .admin_create_user()
            .user_pool_id(&self.pool_id)
            .username(&name)
            .user_attributes(
                cognito::types::AttributeType::builder()
                    .name("custom:tenant")
                    .value(tenant)
                    .build()
                    .unwrap(),
            )
            .message_action(cognito::types::MessageActionType::Suppress)
            .send()
            .await
            .unwrap();
        self.client
            .admin_set_user_password()
            .user_pool_id(&self.pool_id)
            .username(&name)
            .password(password)
            .permanent(true)
            .send()
            .await
            .unwrap();
        for g in groups {
            self.client
                .admin_add_user_to_group()
                .user_pool_id(&self.pool_id)
                .username(&name)
                .group_name(*g)
                .send()
                .await
                .unwrap();
        }
        let auth = self
            .client
            .initiate_auth()
            .client_id(&self.client_id)
            .auth_flow(cognito::types::AuthFlowType::UserPasswordAuth)
            .auth_parameters("USERNAME", &name)
            .auth_parameters("PASSWORD", password)
            .send()
            .await
            .expect("initiate_auth");
        let r = auth.authentication_result().expect("tokens, not a challenge");
        Tokens {
            id: r.id_token().unwrap().to_owned(),
            access: r.access_token().unwrap().to_owned(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A second key the gateway trusts, for tokens a real pool would never issue

const TEST_KID: &str = "mira-test-idp-1";

fn test_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(include_bytes!("../fixtures/test-idp-rsa.pem")).unwrap()
}

/// Serves a JWKS holding moto's keys for the pool plus the test key, on port 0.
async fn serve_jwks(cognito: &Cognito) -> String {
    let mut jwks: Value = reqwest::get(cognito.jwks_url()).await.unwrap().json().await.unwrap();
    let test: Value = serde_json::from_str(include_str!("../fixtures/test-idp-jwks.json")).unwrap();
    jwks["keys"]
        .as_array_mut()
        .unwrap()
        .extend(test["keys"].as_array().unwrap().iter().cloned());
    let body = jwks.to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let b = body.clone();
            async move { ([("content-type", "application/json")], b) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/jwks.json")
}

fn sign(claims: &Value, kid: &str) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&h, claims, &test_key()).unwrap()
}

fn claims(c: &Cognito, tenant: &str, groups: &[&str]) -> Value {
    let now = Utc::now().timestamp();
    json!({
        "sub": uuid::Uuid::new_v4().to_string(), "iss": c.issuer(), "aud": c.client_id,
        "token_use": "id", "custom:tenant": tenant, "cognito:groups": groups,
        "iat": now, "auth_time": now, "exp": now + 3600,
    })
}

fn b64(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

// ---------------------------------------------------------------------------------------------
// The gateway

enum Storage {
    Local,
    S3,
}

/// `Api__MetricsToken` of the test gateways.
const METRICS_TOKEN: &str = "metrics-token-of-the-tests";

struct App {
    base: String,
    http: reqwest::Client,
    db: TestDb,
    cognito: Arc<Cognito>,
    bucket: Option<String>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    dir: std::path::PathBuf,
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn spawn_app(storage: Storage) -> App {
    spawn_app_with(storage, &[]).await
}

async fn spawn_app_with(storage: Storage, extra: &[(&str, &str)]) -> App {
    aws_env();
    let db = TestDb::new().await;
    let cognito = Arc::new(Cognito::new().await);
    let jwks = serve_jwks(&cognito).await;
    let dir = std::env::temp_dir().join(format!("mira-api-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut env: BTreeMap<String, String> = [
        ("DATABASE_URL", db.url.clone()),
        ("AWS__Cognito__UserPoolId", cognito.pool_id.clone()),
        ("AWS__Cognito__ClientId", cognito.client_id.clone()),
        ("AWS__Cognito__Issuer", cognito.issuer()),
        ("AWS__Cognito__JwksUrl", jwks),
        ("Keyring__LocalDir", dir.join("keyring").display().to_string()),
        ("Audit__SigningKeyFile", dir.join("audit.key").display().to_string()),
        ("Audit__WitnessDir", dir.join("witness").display().to_string()),
        ("Storage__LocalDir", dir.join("blobs").display().to_string()),
        ("Storage__MultipartThresholdBytes", (6 * 1024 * 1024).to_string()),
        ("Storage__PartSizeBytes", (5 * 1024 * 1024).to_string()),
        ("Api__MaxBodyBytes", "4096".into()),
        // A pool per login (the API and each role): a few connections each, so that the
        // suite's apps and workers stay within the one test server's max_connections.
        ("Database__MaxConnections", "8".into()),
        // Tests send bursts from one address; the limit has a test of its own.
        ("Api__RequestsPerSecond", "0".into()),
        ("Api__MetricsToken", METRICS_TOKEN.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut bucket = None;
    if let Storage::S3 = storage {
        let name = format!("mira-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk().await)
                .force_path_style(true)
                .build(),
        );
        s3.create_bucket()
            .bucket(&name)
            .send()
            .await
            .expect("moto creates a bucket");
        env.insert("Storage__Provider".into(), "S3".into());
        env.insert("AWS__S3__BucketName".into(), name.clone());
        bucket = Some(name);
    }
    for (k, v) in extra {
        // An empty value unsets a default of the tests.
        if v.is_empty() {
            env.remove(*k);
        } else {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
    }
    let settings = Settings::load(None, env).expect("test settings are valid");
    mira_keys::init(&settings).await.expect("mira keys init");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let pool = db.pool.clone();
    let s = stop.clone();
    let roles = [
        mira_gateway::server::Role::Relay,
        mira_gateway::server::Role::Projector,
        mira_gateway::server::Role::Handlers,
    ];
    let options = mira_gateway::server::Options {
        roles: roles.to_vec(),
        ..Default::default()
    };
    let task = tokio::spawn(async move { mira_gateway::server::run(&settings, pool, listener, &options, s).await });
    App {
        base,
        http: reqwest::Client::new(),
        db,
        cognito,
        bucket,
        stop,
        task: Some(task),
        dir,
    }
}

struct Res {
    status: StatusCode,
    content_type: String,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl App {
    async fn send(&self, req: reqwest::RequestBuilder) -> Res {
        let r = req.send().await.expect("the gateway answers");
        let status = r.status();
        let headers = r.headers().clone();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "a 500: {body}");
        Res {
            status,
            content_type,
            headers,
            body,
        }
    }

    async fn get(&self, token: &str, path: &str) -> Res {
        self.send(self.http.get(format!("{}{path}", self.base)).bearer_auth(token))
            .await
    }

    async fn post(&self, token: &str, path: &str, body: Value) -> Res {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .bearer_auth(token)
                .json(&body),
        )
        .await
    }

    /// A token for a fresh user of `tenant` with `groups`, from the test key.
    fn token(&self, tenant: &str, groups: &[&str]) -> String {
        sign(&claims(&self.cognito, tenant, groups), TEST_KID)
    }

    /// Registers a slide of `bytes` and uploads it through its URLs; returns the slide id.
    async fn upload_slide(&self, token: &str, bytes: &[u8]) -> String {
        self.upload_slide_named(token, bytes, "CMU-1 H&E", None).await
    }

    /// Registers and uploads a slide under `name` (and `file_name`); returns its id.
    async fn upload_slide_named(&self, token: &str, bytes: &[u8], name: &str, file_name: Option<&str>) -> String {
        let mut body = json!({"name": name, "size_bytes": bytes.len(), "content_type": "image/tiff"});
        if let Some(f) = file_name {
            body["file_name"] = json!(f);
        }
        let r = self.post(token, "/api/slides", body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let id = r.body["slide_id"].as_str().unwrap().to_owned();
        let parts = put_upload(&self.http, &r.body["upload"], bytes).await;
        let body = match parts {
            Some(p) => json!({ "parts": p }),
            None => json!({}),
        };
        let done = self.post(token, &format!("/api/slides/{id}/uploaded"), body).await;
        assert_eq!(done.status, StatusCode::OK, "{}", done.body);
        id
    }

    /// Waits until the gateway answers `/healthz`.
    async fn answering(&self) {
        eventually("the gateway answers", || async {
            let r = self.http.get(format!("{}/healthz", self.base)).send().await.ok()?;
            (r.status() == 200).then_some(json!(true))
        })
        .await;
    }

    /// Waits until the slide is verified; returns it.
    async fn verified(&self, token: &str, slide: &str) -> Value {
        eventually("the slide verified", || async {
            let s = self.get(token, &format!("/api/slides/{slide}")).await.body;
            (s["status"] == "verified").then_some(s)
        })
        .await
    }

    /// `/metrics`, as Prometheus would read it (with `Api__MetricsToken`).
    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(METRICS_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap().expect("the gateway stops cleanly");
        }
    }
}

/// Uploads `bytes` as the plan says: one PUT, or each part (returning the parts list).
async fn put_upload(http: &reqwest::Client, upload: &Value, bytes: &[u8]) -> Option<Vec<Value>> {
    if let Some(mp) = upload.get("multipart") {
        let part_size = mp["part_size"].as_u64().unwrap() as usize;
        let mut parts = Vec::new();
        for (i, p) in mp["parts"].as_array().unwrap().iter().enumerate() {
            let chunk = &bytes[i * part_size..((i + 1) * part_size).min(bytes.len())];
            let r = http
                .put(p["url"].as_str().unwrap())
                .body(chunk.to_vec())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "part upload: {}", r.status());
            let etag = r.headers()["etag"].to_str().unwrap().to_owned();
            parts.push(json!({"part_number": p["part_number"], "etag": etag}));
        }
        Some(parts)
    } else {
        let mut req = http.put(upload["url"].as_str().unwrap()).body(bytes.to_vec());
        for (k, v) in upload["headers"].as_object().unwrap() {
            if !k.eq_ignore_ascii_case("content-length") {
                req = req.header(k, v.as_str().unwrap());
            }
        }
        let r = req.send().await.unwrap();
        assert!(
            r.status().is_success(),
            "upload: {} {}",
            r.status(),
            r.text().await.unwrap()
        );
        None
    }
}

async fn eventually<F, Fut>(what: &str, mut f: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    // A deadline, not a speed limit: it returns as soon as `f` does, and only a stuck path
    // waits it out (a job of the worker's, on two loaded cores, has taken over 20 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_problem(r: &Res, status: StatusCode) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.content_type, "application/problem+json", "{}", r.body);
    assert_eq!(r.body["status"], status.as_u16(), "{}", r.body);
    assert!(r.body["type"]
        .as_str()
        .unwrap()
        .starts_with("https://mira.dev/problems/"));
}

/// A 401 that says which check failed, in RFC 6750's header and in the problem's detail, and
/// never echoes the token.
fn assert_refused(r: &Res, token: &str, reason: &str) {
    assert_problem(r, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers.get("www-authenticate").and_then(|v| v.to_str().ok()),
        Some(format!("Bearer error=\"invalid_token\", error_description=\"{reason}\"").as_str()),
        "{}",
        r.body
    );
    assert_eq!(r.body["detail"], reason, "{}", r.body);
    let body = r.body.to_string();
    for part in token.split('.').filter(|p| p.len() > 8) {
        assert!(!body.contains(part), "the token leaks into the answer: {body}");
    }
}

// ---------------------------------------------------------------------------------------------
// Uploads

async fn upload_flows(app: &App) {
    let t = app.token("lab-a", &["pathologist"]);
    // Single PUT.
    let small: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let id = app.upload_slide(&t, &small).await;
    // Repeating the completion is harmless.
    let again = app.post(&t, &format!("/api/slides/{id}/uploaded"), json!({})).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["size_bytes"], 100_000);
    // Multipart: 11 MiB in parts of 5 MiB.
    let big: Vec<u8> = (0..11 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "big", "size_bytes": big.len(), "content_type": "image/tiff"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let mp = &r.body["upload"]["multipart"];
    assert_eq!(mp["parts"].as_array().unwrap().len(), 3, "{}", r.body);
    assert_eq!(mp["part_size"], 5 * 1024 * 1024);
    let big_id = r.body["slide_id"].as_str().unwrap().to_owned();
    let parts = put_upload(&app.http, &r.body["upload"], &big).await.unwrap();
    // A wrong ETag is refused, and the upload can still be completed afterwards.
    let mut bad = parts.clone();
    bad[1]["etag"] = json!("\"0000\"");
    let r = app
        .post(&t, &format!("/api/slides/{big_id}/uploaded"), json!({"parts": bad}))
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app
        .post(&t, &format!("/api/slides/{big_id}/uploaded"), json!({"parts": parts}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["size_bytes"], big.len());
    // Never uploaded.
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "ghost", "size_bytes": 10, "content_type": "image/tiff"}),
        )
        .await;
    let ghost = r.body["slide_id"].as_str().unwrap().to_owned();
    let r = app.post(&t, &format!("/api/slides/{ghost}/uploaded"), json!({})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.body["detail"].as_str().unwrap().contains("never uploaded"),
        "{}",
        r.body
    );
    // The wrong size.
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "short", "size_bytes": 1000, "content_type": "image/tiff"}),
        )
        .await;
    let short = r.body["slide_id"].as_str().unwrap().to_owned();
    put_upload(&app.http, &r.body["upload"], &[7u8; 999]).await;
    let r = app.post(&t, &format!("/api/slides/{short}/uploaded"), json!({})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body["detail"].as_str().unwrap().contains("999"), "{}", r.body);
    // The slides list shows the uploaded ones with their names opened.
    let list = eventually("both uploads in the read model", || async {
        let l = app.get(&t, "/api/slides").await.body;
        let uploaded = l["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "uploaded")
            .count();
        (uploaded == 2).then_some(l)
    })
    .await;
    assert!(
        list["items"].as_array().unwrap().iter().any(|s| s["name"] == "big"),
        "{list}"
    );
}

/// Sends `request` as written, byte for byte, and returns the whole response as text: no
/// client normalises its path or its framing on the way.
async fn raw_request(app: &App, request: &str) -> String {
    raw_to(app.base.trim_start_matches("http://"), request).await
}

/// Sends `request` to `addr` over a raw socket, bytes exactly as given (no client rewrites a
/// path or a header); returns all that came back within 10 s.
async fn raw_to(addr: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    let handles: Vec<_> = fs.collect();
    // Poll them concurrently on this task.
    let mut pinned: Vec<_> = handles.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if results[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => results[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(results.into_iter().map(Option::unwrap));
    out
}

/// The value of a Prometheus sample in `text`, or -1.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

// ---------------------------------------------------------------------------------------------
// The WebSocket

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(app: &App, token: &str, since: Option<&str>) -> Socket {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ws = app.base.replace("http://", "ws://");
    let url = match since {
        Some(c) => format!("{ws}/ws?since={c}"),
        None => format!("{ws}/ws"),
    };
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", format!("mira.v1, {token}").parse().unwrap());
    let (socket, res) = tokio_tungstenite::connect_async(req)
        .await
        .expect("the WebSocket opens");
    assert_eq!(res.headers()["sec-websocket-protocol"], "mira.v1");
    socket
}

/// The next JSON message, within 20 s.
async fn next_json(s: &mut Socket) -> Value {
    next_json_within(s, Duration::from_secs(20)).await
}

/// The next JSON message, within `within`.
async fn next_json_within(s: &mut Socket, within: Duration) -> Value {
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(within, s.next())
            .await
            .expect("a message in time")
            .expect("the socket stays open")
            .expect("a frame");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            eprintln!("ws <- {t}");
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

/// Reads messages until `pred` holds for one; returns it.
async fn until(s: &mut Socket, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no message: {what}");
        let m = next_json(s).await;
        if pred(&m) {
            return m;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The whole path, with the worker

/// `mira-worker`, built beside this test binary by `cargo nextest run --workspace`.
fn worker_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("mira-worker");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo build --workspace)",
        bin.display()
    );
    bin
}

fn cmu_slide() -> Vec<u8> {
    let dir =
        std::env::var("MIRA_TESTDATA").expect("MIRA_TESTDATA names the test slides (scripts/bootstrap fetches them)");
    std::fs::read(std::path::Path::new(&dir).join("CMU-1-Small-Region.svs")).expect("the CMU slide")
}

/// `mira-worker run` (the jobs) and `mira-worker verify` (the uploads) for `app`, each on its
/// own in-memory bus and the app's local store, as `mira dev` starts them. Reads as the jobs'
/// worker; both stop when dropped.
struct Workers {
    jobs: tokio::process::Child,
    _verifier: tokio::process::Child,
}

impl std::ops::Deref for Workers {
    type Target = tokio::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.jobs
    }
}

impl std::ops::DerefMut for Workers {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.jobs
    }
}

fn spawn_worker(app: &App, extra: &[(&str, &str)]) -> Workers {
    Workers {
        jobs: spawn_worker_as(app, "run", extra),
        _verifier: spawn_worker_as(app, "verify", extra),
    }
}

/// `mira-worker verify` alone: uploads are verified, no job runs.
fn spawn_verifier(app: &App, extra: &[(&str, &str)]) -> tokio::process::Child {
    spawn_worker_as(app, "verify", extra)
}

fn spawn_worker_as(app: &App, mode: &str, extra: &[(&str, &str)]) -> tokio::process::Child {
    worker_command(app, mode, extra).spawn().expect("mira-worker starts")
}

/// `mira-worker <mode>` on the test's database, bus and blobs, not started yet.
fn worker_command(app: &App, mode: &str, extra: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(worker_binary());
    cmd.arg(mode)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &app.db.url)
        .env("Messaging__Provider", "InMemory")
        .env("Storage__Provider", "Local")
        .env("Storage__LocalDir", app.dir.join("blobs"))
        .env("Keyring__LocalDir", app.dir.join("keyring"))
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        // Each takes one message at a time: a few connections do, and the suite's tests share
        // one PostgreSQL server (its max_connections).
        .env("Database__MaxConnections", "4")
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

fn vips(args: &[&str]) {
    let o = std::process::Command::new("vips")
        .args(args)
        .output()
        .expect("vips is installed");
    assert!(
        o.status.success(),
        "vips {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `v` saved as a pyramidal JPEG TIFF (as DESIGN §8 makes test slides).
fn pyramid(v: &std::path::Path, tif: &std::path::Path) -> Vec<u8> {
    vips(&[
        "tiffsave",
        v.to_str().unwrap(),
        tif.to_str().unwrap(),
        "--tile",
        "--pyramid",
        "--compression",
        "jpeg",
        "--tile-width",
        "256",
        "--tile-height",
        "256",
    ]);
    std::fs::read(tif).unwrap()
}

/// A 600×500 pyramidal TIFF of blank glass.
fn blank_slide(dir: &std::path::Path) -> Vec<u8> {
    let (black, v) = (dir.join("black.v"), dir.join("blank.v"));
    vips(&["black", black.to_str().unwrap(), "600", "500", "--bands", "3"]);
    vips(&[
        "linear",
        black.to_str().unwrap(),
        v.to_str().unwrap(),
        "1",
        "242",
        "--uchar",
    ]);
    pyramid(&v, &dir.join("blank.tif"))
}

/// The CMU region stacked `copies` times, top to bottom: a tall slide the worker reads in
/// several bands.
fn tall_slide(dir: &std::path::Path, copies: usize) -> Vec<u8> {
    let testdata = std::env::var("MIRA_TESTDATA").expect("MIRA_TESTDATA names the test slides");
    let cmu = std::path::Path::new(&testdata).join("CMU-1-Small-Region.svs");
    let v = dir.join("tall.v");
    let inputs = vec![cmu.to_str().unwrap().to_owned(); copies].join(" ");
    vips(&["arrayjoin", &inputs, v.to_str().unwrap(), "--across", "1"]);
    pyramid(&v, &dir.join("tall.tif"))
}

/// Statuses of `job` seen on the socket, until it reaches `last`.
async fn statuses_until(s: &mut Socket, job: &str, last: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    loop {
        // A running job is quiet between its lease renewals (a third of the lease) and its
        // progress (every 10 s at most): no message a second any more.
        let m = next_json_within(s, Duration::from_secs(120)).await;
        if m["type"] == "job.updated" && m["job"]["job_id"] == job {
            let st = m["job"]["status"].as_str().unwrap().to_owned();
            if seen.last() != Some(&st) {
                seen.push(st.clone());
            }
            if st == last {
                return seen;
            }
            assert!(
                !["failed", "cancelled", "succeeded"].contains(&st.as_str()),
                "{job} ended {st}: {m}"
            );
        }
    }
}

/// Settings for a gateway on `db` with its keys, witness and blobs in `dir` (keys made), no
/// identity provider to speak of.
async fn local_settings(db: &TestDb, dir: &std::path::Path) -> Settings {
    let env: BTreeMap<String, String> = [
        ("DATABASE_URL", db.url.clone()),
        ("AWS__Cognito__Issuer", "urn:test".to_owned()),
        ("AWS__Cognito__ClientId", "test".to_owned()),
        ("AWS__Cognito__JwksUrl", "http://127.0.0.1:9/jwks.json".to_owned()),
        ("Keyring__LocalDir", dir.join("keyring").display().to_string()),
        ("Audit__SigningKeyFile", dir.join("audit.key").display().to_string()),
        ("Audit__WitnessDir", dir.join("witness").display().to_string()),
        ("Storage__LocalDir", dir.join("blobs").display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings = Settings::load(None, env).unwrap();
    mira_keys::init(&settings).await.unwrap();
    settings
}

/// A raw HTTP/1.1 GET, so the path reaches the server exactly as written (an HTTP client
/// would resolve `..` first). Returns the status line and the body.
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    raw_exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// [`raw_to`], split into the status line and the body.
async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> (String, String) {
    let out = raw_to(&addr.to_string(), request).await;
    let status = out.lines().next().unwrap_or_default().to_owned();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// A POST over a raw socket, headers exactly as given; returns the status line and the body.
async fn raw_post(
    addr: std::net::SocketAddr,
    path: &str,
    host: &str,
    origin: Option<&str>,
    content_type: &str,
    body: &str,
) -> (String, String) {
    let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
    raw_exchange(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Hostile clients (ADR 0020)

/// Whether the server closed `s` within `within` (end of stream or a reset), sending what
/// `drip` gives every 500 ms meanwhile.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration, drip: Option<&[u8]>) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        if Instant::now() >= deadline {
            return false;
        }
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => {
                if let Some(d) = drip {
                    if s.write_all(d).await.is_err() {
                        return true;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running jobs (issue 29, first part)

/// The job's events, in order.
async fn job_events(app: &App, job: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence")
        .bind(job)
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

async fn job_status_until(app: &App, t: &str, job: &str, wanted: &[&str], within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let j = app.get(t, &format!("/api/jobs/{job}")).await.body;
        if wanted.iter().any(|w| j["status"] == *w) {
            return j;
        }
        assert!(Instant::now() < deadline, "the job is not {wanted:?}: {j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The processes whose parent is `pid`, with their command lines.
fn children_of(pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …: the command may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid == Some(pid.to_string().as_str()) {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(String::from_utf8_lossy(&cmd).replace('\0', " "));
        }
    }
    found
}

/// The hostile TIFFs of ADR 0023 (tools/lying_tiffs.py), by name.
fn lying_tiffs(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let python = std::env::var("MIRA_PYTHON").expect("MIRA_PYTHON names the tools' Python (scripts/bootstrap)");
    let out = dir.join("lying");
    let tool = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/lying_tiffs.py");
    let o = std::process::Command::new(python).arg(tool).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ["wide_1m.tif", "area_100k.tif", "wide_2g.tif"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(out.join(n)).unwrap()))
        .collect()
}

/// A process's peak resident memory, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Submits a job on a new slide of `bytes` and waits for its end.
async fn job_to_the_end(app: &App, t: &str, bytes: &[u8]) -> Value {
    let slide = app.upload_slide(t, bytes).await;
    app.verified(t, &slide).await;
    job_on(app, t, &slide).await
}

/// Submits a preprocessing job on `slide`; returns its id.
async fn submit_job(app: &App, t: &str, slide: &str) -> String {
    let r = app
        .post(t, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    r.body["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a job id: {}", r.body))
        .to_owned()
}

/// Submits a job on the verified `slide` and waits for its end.
async fn job_on(app: &App, t: &str, slide: &str) -> Value {
    let job = submit_job(app, t, slide).await;
    job_status_until(
        app,
        t,
        &job,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(180),
    )
    .await
}

/// A job of about a minute: submitted on a fresh gateway and worker with `lease` seconds;
/// returns the job as it ended, its events and how long it ran.
async fn minute_job(lease: &'static str) -> (Value, Vec<String>, Duration) {
    let app = spawn_app(Storage::Local).await;
    // Four bands, each followed by 14 s of pause: about a minute however fast the machine.
    let bytes = tall_slide(&app.dir, 4);
    let _worker = spawn_worker(
        &app,
        &[("Worker__BandPauseMillis", "14000"), ("Worker__LeaseSeconds", lease)],
    );
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, &bytes).await;
    app.verified(&t, &slide).await;
    let job = submit_job(&app, &t, &slide).await;
    job_status_until(&app, &t, &job, &["running"], Duration::from_secs(60)).await;
    let started = Instant::now();
    let j = job_status_until(
        &app,
        &t,
        &job,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(240),
    )
    .await;
    let ran = started.elapsed();
    let events = job_events(&app, &job).await;
    app.stop().await;
    (j, events, ran)
}

/// Events of a job, per minute, for the note.
fn report(lease: u64, ran: Duration, events: &[String]) {
    let per_minute = events.len() as f64 * 60.0 / ran.as_secs_f64().max(1.0);
    eprintln!(
        "lease {lease} s: a job of {ran:?}: {} events ({per_minute:.1} a minute): {events:?}",
        events.len()
    );
}

// ---------------------------------------------------------------------------------------------
// The verified copy is what jobs process (issue 30)

/// Holds the copy claim of `slide` the way a completion that is copying holds it; released
/// when the returned connection is closed.
async fn hold_copy_claim(app: &App, slide: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(format!("mira.slide-copy:{slide}"))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(got);
    conn
}

/// Registers a slide of `bytes` and PUTs them; returns its id and upload plan.
async fn registered_and_put(app: &App, t: &str, bytes: &[u8]) -> (String, Value) {
    let r = app
        .post(
            t,
            "/api/slides",
            json!({"name": "swap", "size_bytes": bytes.len(), "content_type": "image/tiff"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let id = r.body["slide_id"].as_str().unwrap().to_owned();
    assert!(put_upload(&app.http, &r.body["upload"], bytes).await.is_none());
    (id, r.body["upload"].clone())
}

// ---------------------------------------------------------------------------------------------
// Slow work that fails is tried again with backoff, then parked (issue 32)

/// Registers and uploads `bytes` with no worker running, then moves the slide's immutable copy
/// away: the copy the worker will try to verify cannot be read. Returns the slide and where
/// the copy was and is.
async fn uploaded_with_copy_hidden(
    app: &App,
    t: &str,
    bytes: &[u8],
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let slide = app.upload_slide(t, bytes).await;
    let copy = app
        .dir
        .join("blobs")
        .join(mira_aggregates::copy_key(&format!("slides/lab-a/{slide}")));
    let hidden = copy.with_extension("hidden");
    std::fs::rename(&copy, &hidden).unwrap();
    (slide, copy, hidden)
}

async fn slide_status(app: &App, t: &str, slide: &str) -> String {
    app.get(t, &format!("/api/slides/{slide}")).await.body["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn parked_for(app: &App, slide: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT parked_reason FROM consumer_streams WHERE consumer = 'verify' AND aggregate_id = $1 AND parked_at IS NOT NULL",
    )
    .bind(slide)
    .fetch_optional(&app.db.owner)
    .await
    .unwrap()
    .flatten()
}

mod audit;
mod auth;
mod jobs;
mod limits;
mod ops;
mod requests;
mod slides;
mod traces;
mod web;
mod worker;
mod ws;
