//! The HTTP API over real connections: a gateway on port 0, a fresh database, moto's Cognito
//! and S3 on loopback (`MIRA_TEST_AWS_ENDPOINT`, started by `scripts/test`), and the relay and
//! projector in process on the in-memory bus.

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
        mira_gateway::telemetry::init("info").expect("logging starts");
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
    EncodingKey::from_rsa_pem(include_bytes!("fixtures/test-idp-rsa.pem")).unwrap()
}

/// Serves a JWKS holding moto's keys for the pool plus the test key, on port 0.
async fn serve_jwks(cognito: &Cognito) -> String {
    let mut jwks: Value = reqwest::get(cognito.jwks_url()).await.unwrap().json().await.unwrap();
    let test: Value = serde_json::from_str(include_str!("fixtures/test-idp-jwks.json")).unwrap();
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
        let r = self
            .post(
                token,
                "/api/slides",
                json!({"name": "CMU-1 H&E", "size_bytes": bytes.len(), "content_type": "image/tiff"}),
            )
            .await;
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
// Authentication (DESIGN §7) against moto's Cognito

#[tokio::test]
async fn a_cognito_id_token_with_a_role_passes() {
    let app = spawn_app(Storage::Local).await;
    let t = app.cognito.sign_in("lab-a", &["pathologist"]).await;
    let r = app.get(&t.id, "/api/jobs").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // And the test key's tokens pass too, so the refusals below are about what they test.
    let r = app.get(&app.token("lab-a", &["pathologist"]), "/api/jobs").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    app.stop().await;
}

#[tokio::test]
async fn an_access_token_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let t = app.cognito.sign_in("lab-a", &["pathologist"]).await;
    assert_refused(&app.get(&t.access, "/api/jobs").await, &t.access, "not an ID token");
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let mut c = claims(&app.cognito, "lab-a", &["pathologist"]);
    let past = Utc::now().timestamp() - 7200;
    c["iat"] = json!(past - 3600);
    c["exp"] = json!(past);
    let token = sign(&c, TEST_KID);
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "expired");
}

#[tokio::test]
async fn a_wrong_issuer_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let mut c = claims(&app.cognito, "lab-a", &["pathologist"]);
    c["iss"] = json!("https://cognito-idp.us-east-1.amazonaws.com/us-east-1_someoneelse");
    let token = sign(&c, TEST_KID);
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "wrong issuer");
}

#[tokio::test]
async fn a_wrong_audience_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let mut c = claims(&app.cognito, "lab-a", &["pathologist"]);
    c["aud"] = json!("another-app-client");
    let token = sign(&c, TEST_KID);
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "wrong audience");
}

#[tokio::test]
async fn alg_none_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let c = claims(&app.cognito, "lab-a", &["pathologist"]);
    let token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": TEST_KID})),
        b64(&c)
    );
    // "none" is no algorithm at all to the decoder: the header itself is refused.
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "malformed token");
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() {
    use hmac::Mac;
    let app = spawn_app(Storage::Local).await;
    let c = claims(&app.cognito, "lab-a", &["pathologist"]);
    // The classic confusion: the public key (as the JWKS publishes it) used as an HMAC secret.
    let public = include_str!("fixtures/test-idp-jwks.json");
    let signing_input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "typ": "JWT", "kid": TEST_KID})),
        b64(&c)
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(public.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    use base64::Engine;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    let token = format!("{signing_input}.{sig}");
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "bad signature");
}

#[tokio::test]
async fn an_unknown_kid_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let c = claims(&app.cognito, "lab-a", &["pathologist"]);
    let token = sign(&c, "rotated-away");
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "unknown key");
}

#[tokio::test]
async fn a_tampered_payload_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let t = app.cognito.sign_in("lab-a", &["pathologist"]).await;
    let mut parts: Vec<String> = t.id.split('.').map(str::to_owned).collect();
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut payload: Value = serde_json::from_slice(&engine.decode(&parts[1]).unwrap()).unwrap();
    assert_eq!(
        payload["custom:tenant"], "lab-a",
        "moto's ID token carries the tenant: {payload}"
    );
    payload["custom:tenant"] = json!("lab-b");
    parts[1] = engine.encode(payload.to_string());
    let token = parts.join(".");
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "bad signature");
    // Untouched, the same token passes.
    assert_eq!(app.get(&t.id, "/api/jobs").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_missing_role_is_403_and_no_token_is_401() {
    let app = spawn_app(Storage::Local).await;
    let t = app.cognito.sign_in("lab-a", &[]).await;
    assert_problem(&app.get(&t.id, "/api/jobs").await, StatusCode::FORBIDDEN);
    // An auditor reads but does not submit.
    let auditor = app.token("lab-a", &["auditor"]);
    assert_eq!(app.get(&auditor, "/api/jobs").await.status, StatusCode::OK);
    let r = app
        .post(
            &auditor,
            "/api/slides",
            json!({"name": "s", "size_bytes": 1, "content_type": "image/tiff"}),
        )
        .await;
    assert_problem(&r, StatusCode::FORBIDDEN);
    // Pathologists do not read the audit trail.
    let p = app.token("lab-a", &["pathologist"]);
    assert_problem(&app.get(&p, "/api/audit/events").await, StatusCode::FORBIDDEN);
    let r = app.send(app.http.get(format!("{}/api/jobs", app.base))).await;
    assert_problem(&r, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers["www-authenticate"], "Bearer",
        "no error code without a token (RFC 6750 §3.1)"
    );
    // The running version needs no token; without MIRA_COMMIT its commit is unknown.
    let r = app.send(app.http.get(format!("{}/api/version", app.base))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"version": env!("CARGO_PKG_VERSION"), "commit": "unknown"})
    );
}

#[tokio::test]
async fn each_refused_token_says_which_check_failed() {
    let app = spawn_app(Storage::Local).await;
    let c = claims(&app.cognito, "lab-a", &["pathologist"]);
    let now = Utc::now().timestamp();
    let mut future = c.clone();
    future["nbf"] = json!(now + 3600);
    let mut no_tenant = c.clone();
    no_tenant.as_object_mut().unwrap().remove("custom:tenant");
    let mut number_tenant = c.clone();
    number_tenant["custom:tenant"] = json!(42);
    let mut bad_tenant = c.clone();
    bad_tenant["custom:tenant"] = json!("Lab A/../b");
    let no_kid = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &c, &test_key()).unwrap();
    for (token, reason) in [
        (sign(&future, TEST_KID), "not yet valid"),
        (sign(&no_tenant, TEST_KID), "no tenant"),
        (sign(&number_tenant, TEST_KID), "no tenant"),
        (sign(&bad_tenant, TEST_KID), "no tenant"),
        (no_kid, "unknown key"),
        ("not.a.token".to_owned(), "malformed token"),
    ] {
        assert_refused(&app.get(&token, "/api/jobs").await, &token, reason);
    }
    // The WebSocket says the same.
    let token = sign(&future, TEST_KID);
    let url = format!("{}/ws?access_token={token}", app.base.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status(), 401);
            assert_eq!(
                res.headers()["www-authenticate"],
                "Bearer error=\"invalid_token\", error_description=\"not yet valid\""
            );
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn another_tenants_resources_are_404() {
    let app = spawn_app(Storage::Local).await;
    let a = app.cognito.sign_in("lab-a", &["pathologist"]).await.id;
    let b = app.cognito.sign_in("lab-b", &["pathologist", "auditor"]).await.id;
    let slide = app.upload_slide(&a, b"not really a slide").await;
    let job = app
        .post(&a, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    assert_eq!(job.status, StatusCode::ACCEPTED, "{}", job.body);
    let job_id = job.body["job_id"].as_str().unwrap().to_owned();
    // Visible to A once projected.
    eventually("the job in A's read model", || async {
        (app.get(&a, &format!("/api/jobs/{job_id}")).await.status == StatusCode::OK).then_some(Value::Null)
    })
    .await;
    for path in [
        format!("/api/jobs/{job_id}"),
        format!("/api/jobs/{job_id}/events"),
        format!("/api/slides/{slide}"),
    ] {
        assert_problem(&app.get(&b, &path).await, StatusCode::NOT_FOUND);
    }
    assert_problem(
        &app.post(&b, &format!("/api/jobs/{job_id}/cancel"), json!({})).await,
        StatusCode::NOT_FOUND,
    );
    let r = app
        .post(&b, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    assert_problem(&r, StatusCode::NOT_FOUND);
    // B's lists and audit trail are empty of A's rows.
    assert_eq!(app.get(&b, "/api/jobs").await.body["items"], json!([]));
    assert_eq!(app.get(&b, "/api/slides").await.body["items"], json!([]));
    assert_eq!(app.get(&b, "/api/audit/events").await.body["items"], json!([]));
    app.stop().await;
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

#[tokio::test]
async fn uploads_through_presigned_s3_urls_single_and_multipart() {
    // Slides over 6 MiB are copied to their immutable key part by part (UploadPartCopy).
    let app = spawn_app_with(Storage::S3, &[("Storage__CopySingleMaxBytes", "6291456")]).await;
    upload_flows(&app).await;
    // The objects really are in the bucket with their sizes.
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk().await)
            .force_path_style(true)
            .build(),
    );
    let list = s3
        .list_objects_v2()
        .bucket(app.bucket.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    let mut sizes: Vec<(String, i64)> = list
        .contents()
        .iter()
        .filter_map(|o| Some((o.key()?.split('/').next()?.to_owned(), o.size()?)))
        .collect();
    sizes.sort();
    // The uploads, and the immutable copies of the two whose size was right.
    let big = 11 * 1024 * 1024;
    let expected = [
        ("immutable", 100_000),
        ("immutable", big),
        ("slides", 999),
        ("slides", 100_000),
        ("slides", big),
    ];
    assert_eq!(
        sizes,
        expected.iter().map(|(p, n)| (p.to_string(), *n)).collect::<Vec<_>>()
    );
    // The multipart copy has the upload's bytes.
    let mut bodies = Vec::new();
    for prefix in ["slides/", "immutable/"] {
        let key = list
            .contents()
            .iter()
            .find(|o| o.size() == Some(big) && o.key().is_some_and(|k| k.starts_with(prefix)))
            .and_then(|o| o.key())
            .unwrap()
            .to_owned();
        let o = s3
            .get_object()
            .bucket(app.bucket.as_deref().unwrap())
            .key(key)
            .send()
            .await
            .unwrap();
        bodies.push(o.body.collect().await.unwrap().into_bytes());
    }
    assert!(bodies[0] == bodies[1], "the copy differs from the upload");
    app.stop().await;
}

#[tokio::test]
async fn uploads_through_the_local_store_single_and_multipart() {
    let app = spawn_app(Storage::Local).await;
    upload_flows(&app).await;
    // A URL whose signature or key was changed is refused.
    let t = app.token("lab-a", &["pathologist"]);
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "x", "size_bytes": 3, "content_type": "image/tiff"}),
        )
        .await;
    let url = r.body["upload"]["url"].as_str().unwrap().to_owned();
    let x_id = r.body["slide_id"].as_str().unwrap().to_owned();
    let forged = url.replace("X-Mira-Signature=", "X-Mira-Signature=00");
    let res = app.http.put(&forged).body("abc").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let other = url.replacen("/blobs/slides/", "/blobs/slides/x", 1);
    assert_eq!(
        app.http.put(&other).body("abc").send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    // The upload must carry the type the slide was registered with; the signed type cannot be
    // swapped in the URL either.
    for ct in [None, Some("text/html")] {
        let mut req = app.http.put(&url).body("abc");
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = app.send(req).await;
        assert_problem(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(r.body["detail"].as_str().unwrap().contains("image/tiff"), "{}", r.body);
    }
    let retyped = url.replace("X-Mira-Content-Type=image/tiff", "X-Mira-Content-Type=text/html");
    assert_ne!(retyped, url);
    let r = app
        .send(app.http.put(&retyped).header("content-type", "text/html").body("abc"))
        .await;
    assert_problem(&r, StatusCode::FORBIDDEN);
    // More bytes than the slide declared are refused, whether the length is announced or the
    // body is chunked, and nothing is kept.
    let r = app
        .send(app.http.put(&url).header("content-type", "image/tiff").body("abcd"))
        .await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE);
    let target = url.split_once(&app.base).unwrap().1;
    let chunked = raw_request(
        &app,
        &format!(
            "PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Type: image/tiff\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
        ),
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    let r = app.post(&t, &format!("/api/slides/{x_id}/uploaded"), json!({})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.body["detail"].as_str().unwrap().contains("never uploaded"),
        "{}",
        r.body
    );
    let r = app
        .send(app.http.put(&url).header("content-type", "image/tiff").body("abc"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    app.stop().await;
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

// ---------------------------------------------------------------------------------------------
// Bad input and idempotency

#[tokio::test]
async fn bad_input_gets_problem_json_4xx() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    // A NUL character in a query value (PostgreSQL's text refuses it) is the caller's error.
    let auditor = app.token("lab-a", &["auditor"]);
    for path in [
        "/api/audit/events?actor=a%00b",
        "/api/jobs?submitted_by=%00",
        "/api/audit/events?aggregate_id=%00",
    ] {
        let r = app.get(if path.contains("audit") { &auditor } else { &t }, path).await;
        assert_problem(&r, StatusCode::BAD_REQUEST);
        assert!(r.body["detail"].as_str().unwrap().contains("NUL"), "{path}: {}", r.body);
    }
    let url = format!("{}/api/jobs", app.base);
    let send = |body: String, ct: &'static str| {
        app.http
            .post(&url)
            .bearer_auth(&t)
            .header("content-type", ct)
            .body(body)
    };
    assert_problem(
        &app.send(send("{\"slide_id\": ".into(), "application/json")).await,
        StatusCode::BAD_REQUEST,
    );
    assert_problem(
        &app.send(send("{\"kind\": }".into(), "application/json")).await,
        StatusCode::BAD_REQUEST,
    );
    let huge =
        json!({"slide_id": uuid::Uuid::now_v7(), "kind": "wsi.preprocess", "params": {"pad": "x".repeat(10_000)}});
    assert_problem(
        &app.send(send(huge.to_string(), "application/json")).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    let unknown = json!({"slide_id": uuid::Uuid::now_v7(), "kind": "wsi.preprocess", "priority": 9});
    let r = app.send(send(unknown.to_string(), "application/json")).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body["detail"].as_str().unwrap().contains("priority"), "{}", r.body);
    let bad_param = json!({"slide_id": uuid::Uuid::now_v7(), "kind": "wsi.preprocess", "params": {"tile_sise": 256}});
    assert_problem(
        &app.send(send(bad_param.to_string(), "application/json")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    let not_uuid = json!({"slide_id": "slide-1", "kind": "wsi.preprocess"});
    assert_problem(
        &app.send(send(not_uuid.to_string(), "application/json")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    assert_problem(
        &app.send(send("{}".into(), "text/plain")).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
    );
    for path in ["/api/jobs/42", "/api/slides/not-a-uuid", "/api/jobs/x/events"] {
        let r = app.get(&t, path).await;
        assert_problem(&r, StatusCode::BAD_REQUEST);
        assert!(r.body["detail"].as_str().unwrap().contains("UUID"), "{}", r.body);
    }
    assert_problem(
        &app.post(&t, "/api/jobs/x/cancel", json!({})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_problem(&app.get(&t, "/api/jobs?limit=100000").await, StatusCode::BAD_REQUEST);
    assert_problem(&app.get(&t, "/api/jobs?status=done").await, StatusCode::BAD_REQUEST);
    assert_problem(&app.get(&t, "/api/jobs?cursor=garbage").await, StatusCode::BAD_REQUEST);
    assert_problem(&app.get(&t, "/api/nothing-here").await, StatusCode::NOT_FOUND);
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "", "size_bytes": 0, "content_type": "tiff"}),
        )
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    // Only what Mira can open: never a type a browser would render.
    for (ct, opens) in [
        ("text/html", false),
        ("image/svg+xml", false),
        ("application/pdf", false),
        ("image/tiff", true),
        ("application/octet-stream", true),
        ("Image/TIFF", true),
    ] {
        let slide = json!({"name": "s", "size_bytes": 10, "content_type": ct});
        let r = app.post(&t, "/api/slides", slide).await;
        if opens {
            assert_eq!(r.status, StatusCode::CREATED, "{ct}: {}", r.body);
        } else {
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(r.body["detail"].as_str().unwrap().contains("image/tiff"), "{}", r.body);
        }
    }
    // A wrong method is problem+json too, with the methods the endpoint takes.
    let r = app.send(app.http.delete(&url).bearer_auth(&t)).await;
    assert_problem(&r, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "GET, HEAD, POST");
    assert!(
        r.body["detail"].as_str().unwrap().contains("GET, HEAD, POST"),
        "{}",
        r.body
    );
    // Every route's `Allow` is what its router takes: each other method is a 405 naming it,
    // each listed one is not a 405.
    for (route, allow) in mira_gateway::api::ALLOWED_METHODS {
        let path = route
            .replace("{id}", &uuid::Uuid::now_v7().to_string())
            .replace("{*path}", "x")
            .replace("{*key}", "x");
        for method in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"] {
            let r = app
                .http
                .request(method.parse().unwrap(), format!("{}{path}", app.base))
                .send()
                .await
                .unwrap();
            let listed = allow.split(", ").any(|m| m == method);
            assert_eq!(
                r.status() == StatusCode::METHOD_NOT_ALLOWED,
                !listed,
                "{method} {route}: {}",
                r.status()
            );
            if !listed {
                assert_eq!(r.headers()["allow"], *allow, "{method} {route}");
            }
        }
    }
    // Every response carries a request id; a sane one from the caller is kept.
    let r = app
        .send(
            app.http
                .get(format!("{}/healthz", app.base))
                .header("x-request-id", "req-123"),
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "req-123");
    let r = app.get(&t, "/api/jobs/42").await;
    assert!(r.headers.contains_key("x-request-id"));
    app.stop().await;
}

/// What the document says is refused is refused: a `null` where it documents a string, a body
/// that is not an object, and a negative audit position (found by schemathesis's negative-data
/// check).
#[tokio::test]
async fn nulls_and_negative_positions_the_document_does_not_allow_are_refused() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let auditor = app.token("lab-a", &["auditor"]);
    let slide = json!({"name": "n", "size_bytes": 3, "content_type": "image/tiff"});
    for (field, value) in [("sha256", Value::Null), ("file_name", Value::Null)] {
        let mut body = slide.clone();
        body[field] = value;
        let r = app.post(&t, "/api/slides", body).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            r.body["detail"].as_str().unwrap().contains(field),
            "{field}: {}",
            r.body
        );
    }
    // Absent is fine, as before.
    let r = app.post(&t, "/api/slides", slide).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let id = r.body["slide_id"].as_str().unwrap().to_owned();
    let r = app
        .post(&t, &format!("/api/slides/{id}/uploaded"), json!({"upload_id": null}))
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    let job = submit_job(&app, &t, &id).await;
    let r = app
        .post(
            &t,
            "/api/jobs",
            json!({"slide_id": id, "kind": "wsi.preprocess", "priority": null}),
        )
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body["detail"].as_str().unwrap().contains("priority"), "{}", r.body);
    let r = app
        .post(&t, &format!("/api/jobs/{job}/cancel"), json!({"reason": null}))
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body["detail"].as_str().unwrap().contains("reason"), "{}", r.body);
    // A body of another JSON type than an object is refused, however its struct would read it
    // (an empty array reads as every default).
    for body in [json!([]), json!(["wrong slide"]), json!("x"), json!(7)] {
        let r = app.post(&t, &format!("/api/jobs/{job}/cancel"), body.clone()).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            r.body["detail"].as_str().unwrap().contains("object"),
            "{body}: {}",
            r.body
        );
    }
    // The job was not cancelled by the refused requests; a proper one cancels it.
    let r = app
        .post(&t, &format!("/api/jobs/{job}/cancel"), json!({"reason": "wrong slide"}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let r = app.get(&auditor, "/api/audit/events?after=-1").await;
    assert_problem(&r, StatusCode::BAD_REQUEST);
    assert!(r.body["detail"].as_str().unwrap().contains("after"), "{}", r.body);
    let r = app.get(&auditor, "/api/audit/events?after=0").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(!r.body["items"].as_array().unwrap().is_empty(), "{}", r.body);
}

#[tokio::test]
async fn an_idempotency_key_gives_one_job_and_refuses_a_different_body() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, b"bytes").await;
    let submit = |key: &'static str, params: Value| {
        let req = app
            .http
            .post(format!("{}/api/jobs", app.base))
            .bearer_auth(&t)
            .header("idempotency-key", key)
            .json(&json!({"slide_id": slide, "kind": "wsi.preprocess", "params": params}));
        app.send(req)
    };
    let first = submit("k-1", json!({"tile_size": 254})).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    // The same request, with the defaults spelled differently, is the same job.
    let second = submit("k-1", json!({})).await;
    assert_eq!(second.status, StatusCode::ACCEPTED, "{}", second.body);
    assert_eq!(first.body["job_id"], second.body["job_id"]);
    let other = submit("k-1", json!({"normalize": "macenko"})).await;
    assert_problem(&other, StatusCode::UNPROCESSABLE_ENTITY);
    // Ten concurrent repeats: still one job.
    let many = futures_join_all((0..10).map(|_| submit("k-2", Value::Null))).await;
    let ids: std::collections::BTreeSet<_> = many.iter().map(|r| r.body["job_id"].to_string()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'JobSubmitted'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
    // Slides too: the same key and body give the same slide (with fresh upload URLs), another
    // body is refused.
    let register = |name: &'static str| {
        let req = app
            .http
            .post(format!("{}/api/slides", app.base))
            .bearer_auth(&t)
            .header("idempotency-key", "s-1")
            .json(&json!({"name": name, "size_bytes": 10, "content_type": "image/tiff"}));
        app.send(req)
    };
    let a = register("same").await;
    let b = register("same").await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["slide_id"], b.body["slide_id"]);
    assert!(b.body["upload"]["url"].is_string(), "{}", b.body);
    assert_problem(&register("other").await, StatusCode::UNPROCESSABLE_ENTITY);
    app.stop().await;
}

/// Idempotency fingerprints cover bodies with patient data: they are keyed (HMAC with the
/// keyring's key), expire, and are confined to their tenant by row-level security.
#[tokio::test]
async fn idempotency_fingerprints_are_keyed_expire_and_stay_in_their_tenant() {
    use hmac::Mac;
    use sha2::Digest;
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let body = json!({"name": "Jane Roe, left breast", "size_bytes": 10, "content_type": "image/tiff"});
    let register = |key: &'static str, body: Value| {
        app.send(
            app.http
                .post(format!("{}/api/slides", app.base))
                .bearer_auth(&t)
                .header("idempotency-key", key)
                .json(&body),
        )
    };
    let first = register("k-phi", body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let stored: String = sqlx::query_scalar("SELECT request_hmac FROM api_idempotency WHERE key = 'k-phi'")
        .fetch_one(&app.db.owner)
        .await
        .unwrap();
    // Not a plain hash of anything the request held…
    // The request as the gateway understood it, fields in its own order.
    let canonical =
        br#"{"name":"Jane Roe, left breast","size_bytes":10,"content_type":"image/tiff","sha256":null,"file_name":null}"#
            .to_vec();
    for plain in [
        canonical.clone(),
        serde_json::to_vec(&body).unwrap(),
        b"Jane Roe, left breast".to_vec(),
    ] {
        assert_ne!(stored, hex::encode(sha2::Sha256::digest(&plain)));
    }
    // …but an HMAC under the keyring's idempotency key.
    let ring = mira_events::LocalKeyring::open(app.dir.join("keyring")).unwrap();
    let key = mira_events::Keyring::key_for(&ring, mira_gateway::api::idempotency::KEY_SUBJECT)
        .await
        .unwrap();
    assert_eq!(stored.len(), 64);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(b"mira.idempotency.v1\nslides\n");
    mac.update(&canonical);
    assert_eq!(
        stored,
        hex::encode(mac.finalize().into_bytes()),
        "keyed with the keyring's key"
    );

    // Another tenant's gateway transaction sees none of lab-a's rows.
    let mut tx = app.db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE mira_api").execute(&mut *tx).await.unwrap();
    sqlx::query("SELECT set_config('mira.tenant_id', 'lab-b', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM api_idempotency")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(seen, 0);
    tx.rollback().await.unwrap();

    // Within the retention a different body is refused; after it, the key is free again.
    let changed = json!({"name": "another", "size_bytes": 10, "content_type": "image/tiff"});
    assert_problem(
        &register("k-phi", changed.clone()).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    sqlx::query("UPDATE api_idempotency SET created_at = now() - interval '25 hours' WHERE key = 'k-phi'")
        .execute(&app.db.owner)
        .await
        .unwrap();
    let reused = register("k-phi", changed).await;
    assert_eq!(reused.status, StatusCode::CREATED, "{}", reused.body);
    assert_ne!(reused.body["slide_id"], first.body["slide_id"]);
    // And the sweeper deletes what expired.
    register("k-old", body.clone()).await;
    sqlx::query("UPDATE api_idempotency SET created_at = now() - interval '25 hours' WHERE key = 'k-old'")
        .execute(&app.db.owner)
        .await
        .unwrap();
    let swept = mira_gateway::api::idempotency::sweep(&app.db.pool, Duration::from_secs(24 * 3600))
        .await
        .unwrap();
    assert_eq!(swept, 1);
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM api_idempotency ORDER BY key")
        .fetch_all(&app.db.owner)
        .await
        .unwrap();
    assert_eq!(left, ["k-phi"]);
    app.stop().await;
}

/// Every table with a tenant_id, except the log itself, is under forced row-level security.
#[tokio::test]
async fn every_tenant_table_but_the_log_is_under_forced_row_level_security() {
    let db = TestDb::new().await;
    let tables: Vec<(String, String, bool, bool)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, c.relrowsecurity, c.relforcerowsecurity \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attname = 'tenant_id' AND NOT a.attisdropped AND c.relkind IN ('r', 'p') \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
    )
    .fetch_all(&db.owner)
    .await
    .unwrap();
    let names: Vec<String> = tables.iter().map(|(n, t, _, _)| format!("{n}.{t}")).collect();
    for expected in [
        "public.api_idempotency",
        "public.handler_waiting",
        "public.events",
        "rm.jobs",
        "rm.slides",
    ] {
        assert!(names.contains(&expected.to_owned()), "{names:?}");
    }
    let unguarded: Vec<&String> = tables
        .iter()
        .zip(&names)
        .filter(|((_, _, rls, forced), name)| name.as_str() != "public.events" && !(*rls && *forced))
        .map(|(_, name)| name)
        .collect();
    assert!(unguarded.is_empty(), "tenant tables without forced RLS: {unguarded:?}");
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

// ---------------------------------------------------------------------------------------------
// Jobs through the API

#[tokio::test]
async fn jobs_list_detail_cancel_retry_and_history() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, b"bytes").await;
    let r = app
        .post(&t, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.body["status"], "submitted");
    let id = r.body["job_id"].as_str().unwrap().to_owned();
    let r = app
        .post(&t, &format!("/api/jobs/{id}/cancel"), json!({"reason": "wrong slide"}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["status"], "cancelled");
    // Cancelling twice is a conflict, not a second event.
    assert_problem(
        &app.post(&t, &format!("/api/jobs/{id}/cancel"), json!({})).await,
        StatusCode::CONFLICT,
    );
    let r = app.post(&t, &format!("/api/jobs/{id}/retry"), json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["status"], "submitted");
    let history = eventually("the whole history in the read model", || async {
        let r = app.get(&t, &format!("/api/jobs/{id}/events")).await;
        (r.status == StatusCode::OK && r.body["events"].as_array().map(Vec::len) == Some(4)).then_some(r.body)
    })
    .await;
    let detail = app.get(&t, &format!("/api/jobs/{id}")).await.body;
    assert_eq!(detail["status"], "submitted", "{detail}");
    assert_eq!(detail["params"]["tile_size"], 254, "defaults are stored: {detail}");
    let types: Vec<_> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "JobSubmitted",
            "JobCancelRequested",
            "JobCancelled",
            "JobRetryRequested"
        ]
    );
    assert!(history["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["hash"].as_str().unwrap().len() == 64));
    let list = app
        .get(&t, &format!("/api/jobs?status=submitted&slide_id={slide}"))
        .await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1, "{}", list.body);
    assert_eq!(app.get(&t, "/api/jobs?status=cancelled").await.body["items"], json!([]));
    // The auditor sees the same events straight from the log, with hashes and actors.
    let auditor = app.token("lab-a", &["auditor"]);
    let audit = app.get(&auditor, &format!("/api/audit/events?aggregate_id={id}")).await;
    assert_eq!(audit.status, StatusCode::OK, "{}", audit.body);
    let items = audit.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["prev_hash"], "0".repeat(64));
    assert_eq!(items[1]["prev_hash"], items[0]["hash"]);
    assert_eq!(items[0]["metadata"]["actor"]["kind"], "user");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Operations

#[tokio::test]
async fn health_readiness_metrics_and_the_openapi_document() {
    // A commit of digits alone stays text.
    let app = spawn_app_with(Storage::Local, &[("MIRA_COMMIT", "0123456")]).await;
    let get = |p: &str| app.send(app.http.get(format!("{}{p}", app.base)));
    assert_eq!(get("/healthz").await.status, StatusCode::OK);
    // What a deployment polls (through CloudFront's /api path) until its commit answers:
    // anonymous, and never cached on the way.
    let version = get("/api/version").await;
    assert_eq!(version.status, StatusCode::OK, "{}", version.body);
    assert_eq!(
        version.body,
        json!({"version": env!("CARGO_PKG_VERSION"), "commit": "0123456"})
    );
    assert_eq!(version.headers["cache-control"], "no-store");
    assert!(
        version.content_type.starts_with("application/json"),
        "{}",
        version.content_type
    );
    let ready = get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    assert_eq!(ready.body["checks"]["database"], "ok");
    // Every documented operation is routed.
    let doc = get("/api/openapi.json").await.body;
    assert_eq!(doc["openapi"], "3.1.0");
    // What is served is the golden document, whole.
    let golden: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    assert!(doc == golden, "the served document is not gateway/openapi.json");
    let t = app.token("lab-a", &["pathologist"]);
    let id = uuid::Uuid::now_v7().to_string();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let url = format!(
                "{}{}",
                app.base,
                path.replace("{id}", &id)
                    .replace("{key}", "k")
                    .replace("{path}", "slide.dzi")
            );
            let req = app
                .http
                .request(method.to_uppercase().parse().unwrap(), url)
                .bearer_auth(&t);
            let r = app.send(req).await;
            assert!(
                !(r.status == StatusCode::NOT_FOUND && r.body["detail"] == "no such endpoint")
                    && r.status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not routed"
            );
        }
    }
    // Every API route is documented, with each method it takes.
    for (route, allow) in mira_gateway::api::ALLOWED_METHODS {
        if !route.starts_with("/api/") {
            continue;
        }
        let path = route.replace("{*", "{");
        for method in allow.split(", ").filter(|m| *m != "HEAD") {
            assert!(
                doc["paths"][&path][method.to_lowercase()].is_object(),
                "{method} {route} is routed but not documented"
            );
        }
    }
    // A dependency down: readiness says which, and nothing of why (an anonymous caller reads
    // it; the reason is in the log).
    std::fs::remove_dir_all(app.dir.join("blobs")).unwrap();
    let down = get("/readyz").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE, "{}", down.body);
    assert_eq!(
        down.body,
        json!({"ready": false, "checks": {"database": "ok", "blob_store": "down", "bus": "ok"}})
    );
    app.stop().await;
}

#[tokio::test]
async fn metrics_export_projection_lag_and_the_watermark_lag() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    // Hold the watermark: an appender stays open, never committing, while events are
    // appended (only appenders hold it; see the fan-out tests below).
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (event_id, tenant_id, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, recorded_at, payload, metadata, prev_hash, hash) \
         VALUES (gen_random_uuid(), 'lab-a', 'Hold', 'h', 1, 'Hold', '1', now(), '{}', '{}', \
         decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'))",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    app.upload_slide(&t, b"bytes").await;
    let metrics = eventually("a held watermark in /metrics", || async {
        let text = app.metrics().await;
        (metric(&text, "mira_log_watermark_lag_events") >= 2.0 && metric(&text, "mira_log_watermark_lag_seconds") > 0.0)
            .then_some(Value::String(text))
    })
    .await;
    let text = metrics.as_str().unwrap();
    for name in [
        "mira_projection_position{projection=\"read_models\"}",
        "mira_projection_lag_events{projection=\"read_models\"}",
        "mira_projection_lag_seconds{projection=\"read_models\"}",
        "mira_http_requests_total{route=\"/api/slides\",status=\"201\"} 1",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    // While the watermark is held the projector cannot see the new events: lag in events.
    let lag = text
        .lines()
        .find(|l| l.starts_with("mira_projection_lag_events"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse::<f64>()
        .unwrap();
    assert!(lag >= 2.0, "{text}");
    holder.rollback().await.unwrap();
    eventually("the projection to catch up", || async {
        let text = app.metrics().await;
        text.lines()
            .any(|l| l == "mira_projection_lag_events{projection=\"read_models\"} 0")
            .then_some(Value::Null)
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn the_relay_exports_how_its_witness_fares() {
    let app = spawn_app_with(
        Storage::Local,
        &[
            ("Audit__CheckpointEveryEvents", "1"),
            ("Audit__CheckpointEverySeconds", "1"),
        ],
    )
    .await;
    let t = app.token("lab-a", &["pathologist"]);
    app.upload_slide(&t, b"bytes").await;
    let metrics = eventually("a witnessed checkpoint in /metrics", || async {
        let text = app.metrics().await;
        (metric(&text, "mira_witness_last_success_timestamp_seconds") > 1.7e9).then_some(Value::String(text))
    })
    .await;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("# TYPE mira_witness_conflicts_total counter"), "{text}");
    assert_eq!(metric(text, "mira_witness_conflicts_total"), 0.0, "{text}");
    app.stop().await;
}

/// The value of a Prometheus sample in `text`, or -1.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn long_transactions_here_and_in_another_database_do_not_delay_fan_out() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    // A report, a migration, a psql session left open: transactions with ids that are not
    // appenders, in this database and in another one on the same cluster.
    let other = TestDb::empty().await;
    let mut here = app.db.pool.begin().await.unwrap();
    let mut there = other.pool.begin().await.unwrap();
    for tx in [&mut here, &mut there] {
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(&mut **tx)
            .await
            .unwrap();
    }
    let held = Instant::now();
    let (mut latencies, mut lags) = (Vec::new(), Vec::new());
    let mut n = 0;
    while held.elapsed() < Duration::from_secs(30) {
        n += 1;
        let r = app
            .post(
                &t,
                "/api/slides",
                json!({"name": format!("s-{n}"), "size_bytes": 10, "content_type": "image/tiff"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let committed = Instant::now();
        let id = r.body["slide_id"].as_str().unwrap().to_owned();
        loop {
            let g = app.get(&t, &format!("/api/slides/{id}")).await;
            if g.status == StatusCode::OK {
                break;
            }
            assert!(
                committed.elapsed() < Duration::from_secs(2),
                "slide {n} not in the read model within 2 s of its commit, with long transactions open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies.push(committed.elapsed());
        let text = app.metrics().await;
        let lag = metric(&text, "mira_log_watermark_lag_seconds");
        assert!((0.0..2.0).contains(&lag), "watermark lag {lag} s at sample {n}");
        lags.push(lag);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    latencies.sort();
    eprintln!(
        "{n} slides with 30 s transactions open: read-model latency median {:?}, max {:?}; watermark lag max {:.3} s",
        latencies[latencies.len() / 2],
        latencies.last().unwrap(),
        lags.iter().cloned().fold(0.0, f64::max)
    );
    assert!(n >= 20, "only {n} samples in 30 s");
    here.rollback().await.unwrap();
    there.rollback().await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_manifest_outside_the_jobs_attempt_prefix_is_never_served() {
    use cqrs_es::persist::PersistedEventStore;
    use mira_aggregates::{Job, JobCommand};
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let log = mira_eventlog::EventLog::new(app.db.pool.clone());
    let tenant = mira_events::TenantId::parse("lab-a").unwrap();
    let job = mira_events::JobId::new();
    let now = Utc::now();
    let forged_key = "results/lab-b/0190c1d2-0000-7000-8000-000000000000/attempt-1/manifest.json";
    // The command path refuses it...
    let commands = mira_eventlog::commands::Commands::new(
        log.clone(),
        Arc::new(mira_events::LocalKeyring::open(app.dir.join("keyring")).unwrap()),
    );
    let ctx = mira_events::CommandContext::new(tenant.clone(), mira_events::Actor::worker("w"));
    let succeed = |key: &str| JobCommand::Succeed {
        attempt: 1,
        manifest_key: key.into(),
        manifest_sha256: "0".repeat(64),
        usage: mira_events::Usage {
            device: "cpu".into(),
            device_seconds: 1.0,
            bytes_written: 1,
        },
    };
    // ...so it is written around it, as by someone with write access to the log.
    let raw: cqrs_es::CqrsFramework<Job, _> = cqrs_es::CqrsFramework::new(
        PersistedEventStore::<_, Job>::new_event_store(mira_eventlog::PgEventRepository::new(
            log.clone(),
            tenant.clone(),
        )),
        vec![],
        (),
    );
    for cmd in [
        JobCommand::Submit {
            slide_id: mira_events::SlideId::new(),
            spec: mira_events::JobSpec::Preprocess(Default::default()),
            max_attempts: 1,
            priority: mira_aggregates::Priority::Routine,
        },
        JobCommand::Queue { now },
        JobCommand::Start {
            attempt: 1,
            worker_id: "w".into(),
            lease_until: now + chrono::Duration::minutes(5),
            now,
        },
    ] {
        raw.execute_with_metadata(&job.to_string(), cmd, ctx.to_cqrs())
            .await
            .unwrap();
    }
    let refused = commands.job(&ctx, job, succeed(forged_key)).await;
    assert!(
        matches!(
            refused,
            Err(cqrs_es::AggregateError::UserError(mira_aggregates::JobError::Invalid(
                _
            )))
        ),
        "{refused:?}"
    );
    raw.execute_with_metadata(&job.to_string(), succeed(forged_key), ctx.to_cqrs())
        .await
        .unwrap();
    eventually("the forged success in the read model", || async {
        let j = app.get(&t, &format!("/api/jobs/{job}")).await.body;
        (j["status"] == "succeeded").then_some(j)
    })
    .await;
    // The other tenant's objects exist; no redirect to them may be signed.
    let theirs = app.dir.join("blobs").join(forged_key);
    std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
    std::fs::write(&theirs, b"{}").unwrap();
    std::fs::write(theirs.with_file_name("slide.dzi"), b"<Image/>").unwrap();
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["manifest.json", "slide.dzi"] {
        let r = app
            .send(
                no_redirects
                    .get(format!("{}/api/jobs/{job}/results/{path}", app.base))
                    .bearer_auth(&t),
            )
            .await;
        assert_problem(&r, StatusCode::NOT_FOUND);
    }
    app.stop().await;
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

#[tokio::test]
async fn the_websocket_pushes_the_tenants_changes_and_resumes_from_a_position() {
    let app = spawn_app(Storage::Local).await;
    let a = app.token("lab-a", &["pathologist"]);
    let b = app.token("lab-b", &["pathologist"]);
    let mut sa = connect(&app, &a, None).await;
    let hello = next_json(&mut sa).await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["tenant"], "lab-a");
    // B connects with the token in the query string instead.
    let (mut sb, _) =
        tokio_tungstenite::connect_async(format!("{}/ws?access_token={b}", app.base.replace("http://", "ws://")))
            .await
            .unwrap();
    assert_eq!(next_json(&mut sb).await["type"], "hello");

    let slide = app.upload_slide(&a, b"bytes").await;
    let job = app
        .post(&a, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    let job_id = job.body["job_id"].as_str().unwrap().to_owned();
    // Changes of different aggregates may arrive in either order.
    let (mut uploaded, mut submitted, mut last) = (None, None, None);
    while uploaded.is_none() || submitted.is_none() {
        let m = next_json(&mut sa).await;
        // Each message carries an opaque cursor, never the log's global position.
        assert!(m.get("position").is_none(), "{m}");
        let cursor = m["cursor"].as_str().expect("a cursor").to_owned();
        assert!(cursor.parse::<i64>().is_err(), "{cursor}");
        last = Some(cursor);
        if m["type"] == "slide.updated" && m["slide"]["status"] == "uploaded" {
            assert_eq!(m["slide"]["slide_id"], slide.as_str());
            uploaded = Some(m);
        } else if m["type"] == "job.updated" {
            assert_eq!(m["job"]["job_id"], job_id.as_str());
            submitted = Some(m);
        }
    }
    let seen = last.unwrap();

    // B's first change is its own: nothing of A's was sent to it.
    app.upload_slide(&b, b"b's bytes").await;
    let m = next_json(&mut sb).await;
    assert_eq!(m["type"], "slide.updated", "{m}");
    assert_ne!(m["slide"]["slide_id"], slide.as_str());
    let b_cursor = m["cursor"].as_str().unwrap().to_owned();

    // A cursor opens only for its tenant, unchanged; a bare position is not a cursor.
    let mut flipped = seen.clone().into_bytes();
    flipped[20] = if flipped[20] == b'A' { b'B' } else { b'A' };
    for since in [b_cursor.clone(), String::from_utf8(flipped).unwrap(), "7".to_owned()] {
        let url = format!(
            "{}/ws?access_token={a}&since={since}",
            app.base.replace("http://", "ws://")
        );
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 400, "{since}"),
            other => panic!("expected a 400 for since={since}, got {other:?}"),
        }
    }

    // A goes away; meanwhile its job is cancelled; A comes back from the position it saw.
    drop(sa);
    let r = app.post(&a, &format!("/api/jobs/{job_id}/cancel"), json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let projected = eventually("the cancellation in the read model", || async {
        let j = app.get(&a, &format!("/api/jobs/{job_id}")).await.body;
        (j["status"] == "cancelled").then_some(j)
    })
    .await;
    let mut again = connect(&app, &a, Some(&seen)).await;
    assert_eq!(next_json(&mut again).await["type"], "hello");
    let m = until(&mut again, "the missed cancellation", |m| {
        m["type"] == "job.updated" && m["job"]["status"] == "cancelled"
    })
    .await;
    assert_eq!(m["job"]["updated_at"], projected["updated_at"]);
    // Views carry no global position, live or read.
    assert!(
        m["job"].get("position").is_none() && projected.get("position").is_none(),
        "{m}"
    );

    // A bad token never gets a socket.
    let bad = format!("{}/ws?access_token=not.a.token", app.base.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(bad).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("expected a 401, got {other:?}"),
    }
    app.stop().await;
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
    cmd.spawn().expect("mira-worker starts")
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

#[tokio::test]
async fn a_long_job_does_not_hold_back_anyone_elses_updates() {
    let app = spawn_app(Storage::Local).await;
    // Eight CMU regions high: the worker reads it in several bands, pausing after each.
    let bytes = tall_slide(&app.dir, 8);
    let _worker = spawn_worker(&app, &[("Worker__BandPauseMillis", "1800")]);
    let (a, b) = (
        app.token("lab-a", &["pathologist"]),
        app.token("lab-b", &["pathologist"]),
    );
    let mut wa = connect(&app, &a, None).await;
    let mut wb = connect(&app, &b, None).await;
    assert_eq!(next_json(&mut wa).await["type"], "hello");
    assert_eq!(next_json(&mut wb).await["type"], "hello");
    let slide = app.upload_slide(&a, &bytes).await;
    eventually("the tall slide verified", || async {
        let s = app.get(&a, &format!("/api/slides/{slide}")).await.body;
        (s["status"] == "verified").then_some(s)
    })
    .await;
    let job = app
        .post(&a, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    assert_eq!(job.status, StatusCode::ACCEPTED, "{}", job.body);
    let job = job.body["job_id"].as_str().unwrap().to_owned();

    // The job's start, then its progress, arrive while it runs.
    let running = until(&mut wa, "the job running", |m| {
        m["type"] == "job.updated" && m["job"]["job_id"] == job.as_str() && m["job"]["status"] == "running"
    })
    .await;
    let started = Instant::now();
    assert!(
        running["job"]["progress"]["done"].as_i64().unwrap_or(0)
            < running["job"]["progress"]["total"].as_i64().unwrap_or(1),
        "{running}"
    );
    let progressed = until(&mut wa, "progress while running", |m| {
        m["type"] == "job.updated"
            && m["job"]["job_id"] == job.as_str()
            && m["job"]["progress"]["done"].as_i64() > Some(0)
    })
    .await;
    assert_eq!(progressed["job"]["status"], "running", "{progressed}");

    // Meanwhile another tenant registers a slide: it reaches the read model and that tenant's
    // socket at once.
    let sent = Instant::now();
    let r = app
        .post(
            &b,
            "/api/slides",
            json!({"name": "during the job", "size_bytes": 10, "content_type": "image/tiff"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let other = r.body["slide_id"].as_str().unwrap().to_owned();
    let m = tokio::time::timeout(Duration::from_secs(2), next_json(&mut wb))
        .await
        .expect("lab-b's slide on its socket within 2 s while lab-a's job runs");
    assert_eq!(m["slide"]["slide_id"], other.as_str(), "{m}");
    let delivered = sent.elapsed();
    assert_eq!(
        app.get(&b, &format!("/api/slides/{other}")).await.status,
        StatusCode::OK
    );
    let still = app.get(&a, &format!("/api/jobs/{job}")).await.body;
    assert_eq!(still["status"], "running", "the job was still running: {still}");
    // And the running job holds no transaction open: nothing in this database has been in one
    // for more than a couple of seconds.
    let long: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT pid, state, left(query, 120) FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND xact_start < clock_timestamp() - interval '3 seconds'",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert!(long.is_empty(), "transactions open during the job: {long:?}");

    let seen = statuses_until(&mut wa, &job, "succeeded").await;
    assert_eq!(seen.last().map(String::as_str), Some("succeeded"), "{seen:?}");
    let ran = started.elapsed();
    eprintln!("another tenant's slide delivered in {delivered:?} while a job ran for {ran:?}");
    assert!(
        ran >= Duration::from_secs(15),
        "the job ran {ran:?}: start and progress came at its end"
    );
    app.stop().await;
}

/// The socket only pushes: a client message beyond a few kilobytes closes it.
#[tokio::test]
async fn the_websocket_closes_on_an_oversized_client_message() {
    use futures_util::{SinkExt, StreamExt};
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let mut ws = connect(&app, &t, None).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    // A small message is ignored, and the socket stays.
    ws.send(tokio_tungstenite::tungstenite::Message::Text("ping".into()))
        .await
        .unwrap();
    let big = "x".repeat(1 << 20);
    let _ = ws.send(tokio_tungstenite::tungstenite::Message::Text(big.into())).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a 1 MiB client message did not close the socket");
    app.stop().await;
}

/// The upload URL still works after `uploaded` (until it expires), and a declared checksum
/// must hold: the worker verifies and processes the copy taken at `uploaded`, never the upload
/// key, and refuses bytes that are not the declared ones.
#[tokio::test]
async fn a_replaced_upload_is_never_processed_and_a_declared_checksum_is_checked() {
    use sha2::Digest;
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let bytes = cmu_slide();
    let register = |name: &'static str, sha: String| {
        app.post(
            &t,
            "/api/slides",
            json!({"name": name, "size_bytes": bytes.len(), "content_type": "image/tiff", "sha256": sha}),
        )
    };
    let right = hex::encode(sha2::Sha256::digest(&bytes));
    let zeros = vec![0u8; bytes.len()];
    // A: the declared checksum is right; after `uploaded`, the upload is overwritten with zeros
    // through the same, still valid URL, before any worker looks at it.
    let a = register("replaced", right.clone()).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let a_id = a.body["slide_id"].as_str().unwrap().to_owned();
    put_upload(&app.http, &a.body["upload"], &bytes).await;
    let done = app.post(&t, &format!("/api/slides/{a_id}/uploaded"), json!({})).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    put_upload(&app.http, &a.body["upload"], &zeros).await;
    // B: the declared checksum is not the uploaded bytes'.
    let b = register("mislabelled", hex::encode(sha2::Sha256::digest(&zeros))).await;
    let b_id = b.body["slide_id"].as_str().unwrap().to_owned();
    put_upload(&app.http, &b.body["upload"], &bytes).await;
    let done = app.post(&t, &format!("/api/slides/{b_id}/uploaded"), json!({})).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);

    let mut worker = spawn_worker(&app, &[]);
    let a_now = eventually("A verified", || async {
        let s = app.get(&t, &format!("/api/slides/{a_id}")).await.body;
        (s["status"] != "uploaded").then_some(s)
    })
    .await;
    assert_eq!(
        a_now["status"], "verified",
        "the worker read the replaced upload: {a_now}"
    );
    assert_eq!(a_now["metadata"]["width"], 2220);
    let b_now = eventually("B rejected", || async {
        let s = app.get(&t, &format!("/api/slides/{b_id}")).await.body;
        (s["status"] != "uploaded").then_some(s)
    })
    .await;
    assert_eq!(b_now["status"], "rejected", "{b_now}");
    assert!(
        b_now["rejection"].as_str().unwrap_or_default().contains("SHA-256"),
        "{b_now}"
    );

    // A job on A runs on the verified bytes.
    let r = app
        .post(
            &t,
            "/api/jobs",
            json!({"slide_id": a_id, "kind": "wsi.preprocess", "params": {"format": "png"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let job = r.body["job_id"].as_str().unwrap().to_owned();
    let detail = eventually("the job on A finishes", || async {
        let d = app.get(&t, &format!("/api/jobs/{job}")).await.body;
        matches!(d["status"].as_str(), Some("succeeded" | "failed")).then_some(d)
    })
    .await;
    assert_eq!(detail["status"], "succeeded", "{detail}");
    let _ = worker.kill().await;
    app.stop().await;
}

#[tokio::test]
async fn the_whole_path_over_http_and_the_websocket_with_a_real_slide() {
    let app = spawn_app(Storage::Local).await;
    let mut worker = spawn_worker(&app, &[]);
    let t = app.token("lab-a", &["pathologist"]);
    let mut ws = connect(&app, &t, None).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");

    // Register the slide, and submit a job on it before it is even uploaded.
    let bytes = cmu_slide();
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "CMU-1-Small-Region", "size_bytes": bytes.len(), "content_type": "image/tiff"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let slide = r.body["slide_id"].as_str().unwrap().to_owned();
    let submit = |key: &'static str| {
        app.send(
            app.http
                .post(format!("{}/api/jobs", app.base))
                .bearer_auth(&t)
                .header("idempotency-key", key)
                .json(&json!({"slide_id": slide, "kind": "wsi.preprocess", "params": {"format": "png"}})),
        )
    };
    let first = submit("whole-path-1").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    assert_eq!(
        submit("whole-path-1").await.body["job_id"],
        first.body["job_id"],
        "one job per key"
    );
    let job = first.body["job_id"].as_str().unwrap().to_owned();
    put_upload(&app.http, &r.body["upload"], &bytes).await;
    let done = app.post(&t, &format!("/api/slides/{slide}/uploaded"), json!({})).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);

    // It waits for the worker's verdict on the slide, then runs to the end.
    let seen = statuses_until(&mut ws, &job, "succeeded").await;
    assert_eq!(seen.first().map(String::as_str), Some("submitted"), "{seen:?}");
    let order = ["submitted", "queued", "running", "succeeded"];
    let positions: Vec<usize> = seen
        .iter()
        .map(|s| order.iter().position(|o| o == s).expect("a known status"))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
    assert!(seen.contains(&"running".to_owned()), "{seen:?}");
    let slide_now = app.get(&t, &format!("/api/slides/{slide}")).await.body;
    assert_eq!(slide_now["status"], "verified", "{slide_now}");
    assert_eq!(slide_now["metadata"]["width"], 2220);
    let detail = app.get(&t, &format!("/api/jobs/{job}")).await.body;
    let manifest_key = detail["manifest_key"].as_str().unwrap();
    assert!(manifest_key.ends_with("attempt-1/manifest.json"), "{detail}");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(app.dir.join("blobs").join(manifest_key)).unwrap()).unwrap();
    assert_eq!(manifest["deepzoom"]["levels"], 13);
    // The results through the API: a redirect to a signed URL of the store, served as what
    // they are, so a viewer can use them straight from the store.
    let mut fetched = std::collections::HashMap::new();
    for (path, media_type) in [
        ("slide.dzi", "application/xml"),
        ("manifest.json", "application/json"),
        ("slide_files/12/0_0.png", "image/png"),
    ] {
        let r = app
            .http
            .get(format!("{}/api/jobs/{job}/results/{path}", app.base))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()["content-type"], media_type, "{path}");
        fetched.insert(path, r.bytes().await.unwrap());
    }
    assert!(String::from_utf8_lossy(&fetched["slide.dzi"]).contains("Width=\"2220\""));
    assert_eq!(&fetched["slide_files/12/0_0.png"][1..4], b"PNG");
    // Climbing out of the results, sent byte for byte (an HTTP client would remove the `..`
    // before the request left it, and the handler would never see them).
    for path in [
        "../../secret",
        "slide_files/../../../../other-job/attempt-1/x",
        "%2e%2e/%2e%2e/secret",
    ] {
        let res = raw_request(
            &app,
            &format!(
                "GET /api/jobs/{job}/results/{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(
            res.starts_with("HTTP/1.1 400") && res.contains("not a result path"),
            "{path}: {res}"
        );
    }

    // Cancel one job before it runs, then retry it: it runs to the end.
    let second = submit("whole-path-2").await.body["job_id"].as_str().unwrap().to_owned();
    let c = app.post(&t, &format!("/api/jobs/{second}/cancel"), json!({})).await;
    assert_eq!(c.status, StatusCode::ACCEPTED, "{}", c.body);
    let st = c.body["status"].as_str().unwrap().to_owned();
    assert!(st == "cancelled" || st == "cancel_requested", "{}", c.body);
    statuses_until(&mut ws, &second, "cancelled").await;
    let r = app.post(&t, &format!("/api/jobs/{second}/retry"), json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    statuses_until(&mut ws, &second, "succeeded").await;

    // Macenko normalisation: a second pyramid beside the first, the mask and the statistics.
    let job_on = |slide: String, params: Value| {
        let (http, base, t) = (app.http.clone(), app.base.clone(), t.clone());
        async move {
            let r = http
                .post(format!("{base}/api/jobs"))
                .bearer_auth(&t)
                .json(&json!({"slide_id": slide, "kind": "wsi.preprocess", "params": params}))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body = r.json::<Value>().await.unwrap();
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
            body["job_id"].as_str().unwrap().to_owned()
        }
    };
    let normalised = job_on(slide.clone(), json!({"normalize": "macenko"})).await;
    statuses_until(&mut ws, &normalised, "succeeded").await;
    let detail = app.get(&t, &format!("/api/jobs/{normalised}")).await.body;
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(app.dir.join("blobs").join(detail["manifest_key"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["normalized"]["stains"]["method"], "macenko", "{manifest}");
    assert!(manifest["tissue"]["fraction"].as_f64().unwrap() > 0.1, "{manifest}");
    for key in [
        "normalized.dzi",
        "mask.png",
        "stats.json",
        "normalized_files/12/0_0.jpeg",
    ] {
        let r = app
            .http
            .get(format!("{}/api/jobs/{normalised}/results/{key}", app.base))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{key}");
    }

    // A slide of blank glass is a valid slide, but has no stain to estimate: the job fails at
    // once, for good, with the reason, and no manifest points at anything it wrote.
    let blank_id = app.upload_slide(&t, &blank_slide(&app.dir)).await;
    let failing = job_on(blank_id, json!({"normalize": "macenko"})).await;
    let seen = statuses_until(&mut ws, &failing, "failed").await;
    assert!(!seen.contains(&"retry_scheduled".to_owned()), "not retried: {seen:?}");
    let detail = app.get(&t, &format!("/api/jobs/{failing}")).await.body;
    assert!(
        detail["failure"]
            .as_str()
            .unwrap_or_default()
            .contains("too few stained pixels"),
        "{detail}"
    );
    assert!(detail["manifest_key"].is_null(), "{detail}");
    assert_eq!(detail["attempt"], 1, "{detail}");
    let r = app.get(&t, &format!("/api/jobs/{failing}/results/slide.dzi")).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);

    // A truncated slide is rejected by the worker with OpenSlide's reason; the worker carries
    // on. A job submitted before the verdict fails without an attempt; one submitted after it
    // is refused with the slide's status. Which comes first is the worker's race to win.
    let cut_id = app.upload_slide(&t, &bytes[..bytes.len() / 3]).await;
    let job_on_cut = json!({"slide_id": cut_id, "kind": "wsi.preprocess", "params": {}});
    let r = app.post(&t, "/api/jobs", job_on_cut.clone()).await;
    match r.status {
        StatusCode::ACCEPTED => {
            let doomed = r.body["job_id"].as_str().unwrap().to_owned();
            statuses_until(&mut ws, &doomed, "failed").await;
            let detail = app.get(&t, &format!("/api/jobs/{doomed}")).await.body;
            assert!(
                detail["manifest_key"].is_null() && detail["failure"].is_string(),
                "{detail}"
            );
        }
        StatusCode::CONFLICT => assert!(
            r.body["detail"].as_str().unwrap_or_default().contains("rejected"),
            "{}",
            r.body
        ),
        other => panic!("a job on a truncated slide: {other} {}", r.body),
    }
    // Projections of different aggregates may land in either order: wait for the slide's.
    let slide_now = eventually("the truncated slide rejected in the read model", || async {
        let s = app.get(&t, &format!("/api/slides/{cut_id}")).await.body;
        (s["status"] == "rejected").then_some(s)
    })
    .await;
    let reason = slide_now["rejection"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "{slide_now}");
    // Mira's own check of the TIFF's tables finds the cut before OpenSlide does (ADR 0023).
    assert!(
        !reason.contains(&app.dir.display().to_string()) && reason.contains("the file is truncated or damaged"),
        "the reason names a path on the worker, or not the cut: {reason}"
    );
    // Once the verdict is in, a job on the slide is refused.
    let r = app.post(&t, "/api/jobs", job_on_cut).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap_or_default().contains("rejected"),
        "{}",
        r.body
    );
    assert!(worker.try_wait().unwrap().is_none(), "the worker is still running");

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &worker.id().unwrap().to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the worker stops cleanly on SIGTERM: {status:?}");
    app.stop().await;
}

/// What the in-memory bus held when its process stopped is not lost: the next process
/// publishes the log again and consumers skip what they had applied.
#[tokio::test]
async fn events_the_in_memory_bus_held_at_shutdown_reach_the_projection_after_a_restart() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("mira-restart-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let settings = local_settings(&db, &dir).await;
    let start = |roles: Vec<mira_gateway::server::Role>| {
        let (settings, pool, stop) = (settings.clone(), db.pool.clone(), CancellationToken::new());
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let options = mira_gateway::server::Options {
                roles,
                ..Default::default()
            };
            mira_gateway::server::run(&settings, pool, listener, &options, s).await
        });
        (stop, task)
    };
    // A process with a relay and no projector: the event is published into its bus, and the
    // relay's cursor moves past it, but nothing consumes it before the process stops.
    let (stop, task) = start(vec![mira_gateway::server::Role::Relay]);
    let commands = mira_gateway::commands::Commands::new(
        mira_eventlog::EventLog::new(db.pool.clone()),
        Arc::new(mira_events::LocalKeyring::open(dir.join("keyring")).unwrap()),
    );
    let slide = mira_events::SlideId::new();
    let ctx = mira_events::CommandContext::new(
        mira_events::TenantId::parse("lab").unwrap(),
        mira_events::Actor::user("u-1"),
    );
    commands
        .slide(
            &ctx,
            slide,
            mira_aggregates::SlideCommand::Register {
                slide_id: slide,
                name: "in flight".into(),
                file_name: None,
                size_bytes: 1,
                content_type: "image/tiff".into(),
                sha256: None,
                object_key: format!("slides/lab/{slide}"),
            },
        )
        .await
        .unwrap();
    eventually("the relay to publish it", || async {
        let p: Option<i64> = sqlx::query_scalar("SELECT position FROM relay_cursor WHERE name = 'in-memory'")
            .fetch_optional(&db.pool)
            .await
            .unwrap();
        (p.unwrap_or(0) > 0).then_some(Value::Null)
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM rm.slides")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(count().await, 0, "never projected by the first process");
    // The next process, with everything: the slide reaches the read model.
    let (stop, task) = start(vec![
        mira_gateway::server::Role::Relay,
        mira_gateway::server::Role::Projector,
        mira_gateway::server::Role::Handlers,
    ]);
    eventually("the slide in the read model after the restart", || async {
        (count().await == 1).then_some(Value::Null)
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// `mira dev`'s in-memory bus keeps nothing it does not deliver: only the projector's and the
/// handlers' queues exist in the gateway (the worker runs its own bus), and after 20,000
/// commands every queue has drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_bus_has_only_consumed_queues_and_they_drain() {
    use mira_gateway::server::Role;
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("mira-drain-{}", uuid::Uuid::new_v4()));
    let settings = local_settings(&db, &dir).await;
    let roles = vec![Role::Relay, Role::Projector, Role::Handlers];
    let bus = mira_gateway::server::in_memory_bus(&roles);
    assert_eq!(
        bus.groups(),
        [mira_bus::Group::Projections, mira_bus::Group::Handlers],
        "no queue without a consumer"
    );
    let stop = CancellationToken::new();
    let options = mira_gateway::server::Options {
        roles,
        bus: Some(bus.clone()),
        ..Default::default()
    };
    let (s, pool) = (stop.clone(), db.pool.clone());
    let task = tokio::spawn(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        mira_gateway::server::run(&settings, pool, listener, &options, s).await
    });
    let commands = mira_gateway::commands::Commands::new(
        mira_eventlog::EventLog::new(db.pool.clone()),
        Arc::new(mira_events::LocalKeyring::open(dir.join("keyring")).unwrap()),
    );
    let r = mira_gateway::bench::append(&commands, 20_000, 4).await.unwrap();
    assert_eq!(r.commands, 20_000);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let depths: Vec<usize> = bus.groups().iter().map(|g| bus.memory_queue(*g).depth()).collect();
        let projected: i64 = sqlx::query_scalar("SELECT coalesce(max(last_position), 0) FROM projection_positions")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let last: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if depths.iter().all(|d| *d == 0) && projected == last {
            break;
        }
        assert!(Instant::now() < deadline, "queues still hold {depths:?} messages");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
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

#[tokio::test]
async fn the_app_is_served_with_its_policy_and_mira_dev_signs_people_in() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("mira-web-{}", uuid::Uuid::new_v4()));
    let web = dir.join("app");
    std::fs::create_dir_all(web.join("assets")).unwrap();
    std::fs::write(web.join("index.html"), "<!doctype html><title>Mira</title>").unwrap();
    std::fs::write(web.join("assets/app-1a2b3c.js"), "console.log('mira')").unwrap();
    std::fs::write(dir.join("secret.txt"), "outside the app").unwrap();
    std::os::unix::fs::symlink(dir.join("secret.txt"), web.join("leak.txt")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let mut settings = local_settings(&db, &dir).await;
    settings.web.dir = Some(web.clone());
    settings.aws.cognito.issuer = Some(mira_gateway::dev::ISSUER.to_owned());
    settings.aws.cognito.client_id = Some(mira_gateway::dev::AUDIENCE.to_owned());
    settings.aws.cognito.jwks_url = Some(format!("{base}{}", mira_gateway::api::DEV_JWKS_PATH));
    let idp = Arc::new(mira_gateway::dev::DevIdp::open_or_create(&dir).unwrap());
    let options = mira_gateway::server::Options {
        dev_identity: Some(idp),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let (s, pool) = (stop.clone(), db.pool.clone());
    let task = tokio::spawn(async move { mira_gateway::server::run(&settings, pool, listener, &options, s).await });
    let http = reqwest::Client::new();
    let get = |p: &str| http.get(format!("{base}{p}")).send();

    let index = get("/").await.unwrap();
    assert_eq!(index.status(), StatusCode::OK);
    let h = index.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let csp = h["content-security-policy"].to_str().unwrap().to_owned();
    assert!(
        csp.contains("script-src 'self';") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(index.text().await.unwrap().contains("<title>Mira</title>"));

    let asset = get("/assets/app-1a2b3c.js").await.unwrap();
    assert_eq!(asset.status(), StatusCode::OK);
    assert_eq!(asset.headers()["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(asset.headers()["cache-control"], "public, max-age=31536000, immutable");

    // A client route is the app; a missing file is not.
    let route = get("/jobs/0190d2a4").await.unwrap();
    assert_eq!(route.status(), StatusCode::OK);
    assert!(route.text().await.unwrap().contains("<title>Mira</title>"));
    assert_eq!(get("/assets/missing.js").await.unwrap().status(), StatusCode::NOT_FOUND);
    // Nothing outside the directory: not through a link, not through `..` as sent.
    assert_eq!(get("/leak.txt").await.unwrap().status(), StatusCode::NOT_FOUND);
    for path in [
        "/assets/../../secret.txt",
        "/../secret.txt",
        "/assets/..%2f..%2fsecret.txt",
    ] {
        let (status, body) = raw_get(addr, path).await;
        assert!(status.contains(" 404 "), "{path}: {status}");
        assert!(!body.contains("outside the app"), "{path}: {body}");
    }
    // The API's own paths never fall back to the app.
    let unknown = get("/api/nothing").await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(unknown.headers()["content-type"], "application/problem+json");

    let config: Value = get("/api/app-config").await.unwrap().json().await.unwrap();
    assert_eq!(config["auth"]["mode"], "dev", "{config}");

    // mira dev's sign-in: a token the API takes, for the tenant and roles asked.
    let signed: Value = http
        .post(format!("{base}/dev/sign-in"))
        .json(&json!({"user": "ada", "tenant": "lab-a", "roles": ["pathologist"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = signed["id_token"].as_str().expect("a token").to_owned();
    let jobs = http
        .get(format!("{base}/api/jobs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(jobs.status(), StatusCode::OK);
    let audit = http
        .get(format!("{base}/api/audit/events"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(audit.status(), StatusCode::FORBIDDEN, "a pathologist is no auditor");
    let refused = http
        .post(format!("{base}/dev/sign-in"))
        .json(&json!({"user": "ada", "tenant": "lab-a", "roles": ["root"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // A user name is up to 128 characters as the document says, not 128 bytes; white space
    // alone is no name.
    for (user, expect) in [
        ("é".repeat(128), StatusCode::OK),
        ("é".repeat(129), StatusCode::UNPROCESSABLE_ENTITY),
        ("\u{c} ".into(), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = http
            .post(format!("{base}/dev/sign-in"))
            .json(&json!({"user": user, "tenant": "lab-a", "roles": ["pathologist"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), expect, "{user:?}");
    }
    // DNS rebinding: a page of another site reaches 127.0.0.1 under its own name. Sent over a
    // raw socket, so that no client rewrites the headers.
    let port = addr.port();
    let body = r#"{"user": "ada", "tenant": "lab-b", "roles": ["admin"]}"#;
    for (host, origin, content_type, expect) in [
        (
            format!("rebind.attacker.example:{port}"),
            Some(format!("http://rebind.attacker.example:{port}")),
            "text/plain",
            " 403 ",
        ),
        (
            format!("rebind.attacker.example:{port}"),
            None,
            "application/json",
            " 403 ",
        ),
        (
            format!("127.0.0.1:{port}"),
            Some("http://evil.example".to_owned()),
            "application/json",
            " 403 ",
        ),
        (format!("127.0.0.1:{port}"), None, "text/plain", " 403 "),
        (
            format!("localhost:{port}"),
            Some(format!("http://localhost:{port}")),
            "application/json",
            " 200 ",
        ),
        (format!("[::1]:{port}"), None, "application/json", " 200 "),
        // A loopback name with another port: a rebound name pointing at 127.0.0.1 with the
        // page's own port, or another local server's origin.
        (
            format!("127.0.0.1:{}", port.wrapping_add(1)),
            None,
            "application/json",
            " 403 ",
        ),
        (
            "localhost".to_owned(),
            Some("http://localhost".to_owned()),
            "application/json",
            " 403 ",
        ),
    ] {
        let (status, answer) = raw_post(addr, "/dev/sign-in", &host, origin.as_deref(), content_type, body).await;
        assert!(
            status.contains(expect),
            "{host} {origin:?} {content_type}: {status} {answer}"
        );
        assert_eq!(answer.contains("id_token"), expect == " 200 ", "{answer}");
    }
    // The JWKS, a GET, takes the same care about names and ports.
    for (host, expect) in [
        (format!("127.0.0.1:{port}"), " 200 "),
        (format!("rebind.attacker.example:{port}"), " 403 "),
        (format!("127.0.0.1:{}", port.wrapping_add(1)), " 403 "),
    ] {
        let (status, answer) = raw_exchange(
            addr,
            &format!("GET /dev/jwks.json HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(status.contains(expect), "{host}: {status} {answer}");
        assert_eq!(answer.contains("\"keys\""), expect == " 200 ", "{answer}");
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
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

#[tokio::test]
async fn a_jobs_events_verify_and_a_tampered_one_is_named() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, b"bytes").await;
    let r = app
        .post(&t, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    let id = r.body["job_id"].as_str().unwrap().to_owned();
    app.post(&t, &format!("/api/jobs/{id}/cancel"), json!({})).await;
    let path = format!("/api/jobs/{id}/verify");
    let ok = eventually("the job in the read model", || async {
        let r = app.get(&t, &path).await;
        (r.status == StatusCode::OK).then_some(r.body)
    })
    .await;
    assert_eq!(ok["verified"], true, "{ok}");
    assert!(ok["events"].as_u64().unwrap() >= 2, "{ok}");
    // Another tenant's job is not found, as everywhere.
    let other = app.token("lab-b", &["pathologist"]);
    assert_problem(&app.get(&other, &path).await, StatusCode::NOT_FOUND);
    // A changed byte, as a superuser with the guards off would make it.
    let pos: i64 = sqlx::query_scalar("SELECT global_position FROM events WHERE aggregate_id = $1 AND sequence = 2")
        .bind(&id)
        .fetch_one(&app.db.owner)
        .await
        .unwrap();
    mira_eventlog::testing::tamper(
        &app.db.owner,
        &format!("UPDATE events SET payload = overlay(payload placing 'X' from 3 for 1) WHERE global_position = {pos}"),
    )
    .await;
    let bad = app.get(&t, &path).await;
    assert_eq!(bad.status, StatusCode::OK, "{}", bad.body);
    assert_eq!(bad.body["verified"], false, "{}", bad.body);
    assert_eq!(bad.body["position"], pos, "{}", bad.body);
    assert!(bad.body["reason"].as_str().unwrap().contains("altered"), "{}", bad.body);
    app.stop().await;
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

#[tokio::test]
async fn slow_and_idle_connections_are_cut_and_a_full_listener_still_serves() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(
        Storage::Local,
        &[
            ("Api__HeaderReadTimeoutSeconds", "2"),
            ("Api__IdleTimeoutSeconds", "3"),
            ("Api__MaxConnections", "600"),
        ],
    )
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    app.answering().await;
    // A slowloris client: a header byte every half second is cut off at the header timeout.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let t0 = Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(8), Some(b"X")).await,
        "a client dripping its headers is cut off"
    );
    eprintln!("slowloris cut after {:?}", t0.elapsed());
    // A connection that sends nothing at all.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(8), None).await);
    // A keep-alive connection left idle after its request.
    let mut kept = tokio::net::TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(
        closed_within(&mut kept, Duration::from_secs(10), None).await,
        "an idle keep-alive connection is closed"
    );

    // 500 idle connections open: a normal request is still served.
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let t = app.token("lab-a", &["pathologist"]);
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), app.get(&t, "/api/slides"))
        .await
        .expect("served while 500 connections idle");
    assert_eq!(r.status, StatusCode::OK);
    eprintln!("a request beside 500 idle connections took {:?}", t0.elapsed());
    drop(idle);
    app.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_new_clients_wait_until_the_timeouts_make_room() {
    let app = spawn_app_with(
        Storage::Local,
        &[("Api__HeaderReadTimeoutSeconds", "2"), ("Api__MaxConnections", "5")],
    )
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    app.answering().await;
    let mut hogs = Vec::new();
    for _ in 0..5 {
        hogs.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // A new client (not the pooled connection above) waits in the backlog until a hog is cut
    // at the header timeout, then is served.
    let t0 = Instant::now();
    let fresh = reqwest::Client::new();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        fresh.get(format!("{}/healthz", app.base)).send(),
    )
    .await
    .expect("served once the hogs are cut")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "it waited for room: {:?}",
        t0.elapsed()
    );
    drop(hogs);
    app.stop().await;
}

#[tokio::test]
async fn a_client_past_its_rate_gets_429_and_health_checks_never_do() {
    let app = spawn_app_with(Storage::Local, &[("Api__RequestsPerSecond", "5")]).await;
    app.answering().await;
    let mut limited = None;
    for _ in 0..40 {
        let r = app.send(app.http.get(format!("{}/api/version", app.base))).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("a burst past twice the rate is limited");
    assert!(
        r.content_type.starts_with("application/problem+json"),
        "{}",
        r.content_type
    );
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    for _ in 0..40 {
        let r = app.http.get(format!("{}/healthz", app.base)).send().await.unwrap();
        assert_eq!(r.status(), 200, "health checks are not limited");
    }
    app.stop().await;
}

#[tokio::test]
async fn answers_are_not_sniffed_and_authenticated_ones_not_stored() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    for path in ["/api/slides", "/api/jobs", "/api/jobs/not-an-id", "/api/nope"] {
        let r = app.get(&t, path).await;
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(r.headers["cache-control"], "no-store", "{path}: {}", r.status);
    }
    // Refusals too, and a blob of the local store.
    let r = app.send(app.http.get(format!("{}/api/slides", app.base))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["cache-control"], "no-store");
    let r = app
        .send(app.http.get(format!("{}/blobs/slides/x?X-Mira-Expires=1", app.base)))
        .await;
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    // /api/version keeps its own policy.
    let r = app.send(app.http.get(format!("{}/api/version", app.base))).await;
    assert_eq!(r.headers["cache-control"], "no-store");
    app.stop().await;
}

#[tokio::test]
async fn a_very_long_subject_with_an_idempotency_key_is_served() {
    let app = spawn_app(Storage::Local).await;
    let mut c = claims(&app.cognito, "lab-a", &["pathologist"]);
    c["sub"] = json!("s".repeat(3000));
    let t = sign(&c, TEST_KID);
    let register = || {
        app.send(
            app.http
                .post(format!("{}/api/slides", app.base))
                .bearer_auth(&t)
                .header("idempotency-key", "long-subject")
                .json(&json!({"name": "long", "size_bytes": 10, "content_type": "image/tiff"})),
        )
    };
    let a = register().await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let b = register().await;
    assert_eq!(a.body["slide_id"], b.body["slide_id"], "the key still names one slide");
    // The row is keyed by the digest the migration computes in SQL, too.
    let (sql, rust): (Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT sha256(convert_to('mira.idempotency-key.v1' || E'\\n' \
           || octet_length(tenant_id) || ':' || tenant_id || E'\\n' \
           || octet_length(subject) || ':' || subject || E'\\n' \
           || octet_length(scope) || ':' || scope || E'\\n' \
           || octet_length(key) || ':' || key || E'\\n', 'UTF8')), key_digest \
         FROM api_idempotency WHERE key = 'long-subject'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(sql, rust);
    assert_eq!(
        rust,
        mira_gateway::api::idempotency::key_digest("lab-a", &"s".repeat(3000), "slides", "long-subject")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_huge_declared_slide_gets_its_part_urls_a_page_at_a_time() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let five_tib: u64 = 5 * 1024 * 1024 * 1024 * 1024;
    let r = app
        .http
        .post(format!("{}/api/slides", app.base))
        .bearer_auth(&t)
        .json(&json!({"name": "huge", "size_bytes": five_tib, "content_type": "image/tiff"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let text = r.text().await.unwrap();
    assert!(text.len() < 64 * 1024, "the answer is a page, not {} bytes", text.len());
    let body: Value = serde_json::from_str(&text).unwrap();
    let id = body["slide_id"].as_str().unwrap();
    let mp = &body["upload"]["multipart"];
    assert_eq!(mp["part_count"], 10_000);
    assert_eq!(mp["parts"].as_array().unwrap().len(), 100);
    assert_eq!(mp["parts"][99]["part_number"], 100);
    let upload_id = mp["upload_id"].as_str().unwrap();
    let page = |from: &str, upload: &str| {
        let path = format!("/api/slides/{id}/upload/parts?upload_id={upload}&from={from}");
        let (app, t) = (&app, &t);
        async move { app.get(t, &path).await }
    };
    let p = page("9950", upload_id).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    let parts = p.body["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 51);
    assert_eq!(parts[0]["part_number"], 9950);
    assert_eq!(parts[50]["part_number"], 10_000);
    assert_eq!(p.body["part_size"], mp["part_size"]);
    assert_problem(&page("10001", upload_id).await, StatusCode::BAD_REQUEST);
    assert_problem(&page("0", upload_id).await, StatusCode::BAD_REQUEST);
    assert_problem(
        &page("1", "0190aaaabbbbccccdddd").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    // Another tenant does not see the slide.
    let other = app.token("lab-b", &["pathologist"]);
    let r = app
        .get(
            &other,
            &format!("/api/slides/{id}/upload/parts?upload_id={upload_id}&from=1"),
        )
        .await;
    assert_problem(&r, StatusCode::NOT_FOUND);
    // A page's URL uploads that part.
    let url = parts[0]["url"].as_str().unwrap();
    assert!(url.contains("partNumber=9950"), "{url}");
    app.stop().await;
}

#[tokio::test]
async fn metrics_answer_only_their_token_here_and_anyone_on_their_own_listener() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let app = spawn_app_with(Storage::Local, &[("Api__MetricsListen", &listen)]).await;
    let scraped = eventually("/metrics on its own listener", || async {
        let r = reqwest::get(format!("http://{listen}/metrics")).await.ok()?;
        (r.status() == 200).then_some(json!(r.text().await.ok()?))
    })
    .await;
    assert!(scraped.as_str().unwrap().contains("mira_"), "{scraped}");
    // Its own listener serves nothing else.
    let r = reqwest::get(format!("http://{listen}/api/version")).await.unwrap();
    assert_eq!(r.status(), 404);
    // On the API's listener: a tenant's token is not the metrics token.
    let t = app.token("lab-a", &["admin"]);
    assert_problem(&app.get(&t, "/metrics").await, StatusCode::UNAUTHORIZED);
    assert_problem(
        &app.send(app.http.get(format!("{}/metrics", app.base))).await,
        StatusCode::UNAUTHORIZED,
    );
    assert!(app.metrics().await.contains("mira_"));
    app.stop().await;
    // Without a token, /metrics is not on the API's listener at all.
    let plain = spawn_app_with(Storage::Local, &[("Api__MetricsToken", "")]).await;
    let r = eventually("the gateway answers", || async {
        let r = plain.http.get(format!("{}/metrics", plain.base)).send().await.ok()?;
        Some(json!(r.status().as_u16()))
    })
    .await;
    assert_eq!(r, 404);
    plain.stop().await;
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

#[tokio::test]
async fn a_cancelled_running_job_stops_within_seconds_and_the_worker_takes_the_next() {
    let app = spawn_app(Storage::Local).await;
    let bytes = tall_slide(&app.dir, 8);
    let _worker = spawn_worker(&app, &[("Worker__BandPauseMillis", "1000")]);
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, &bytes).await;
    eventually("the tall slide verified", || async {
        let s = app.get(&t, &format!("/api/slides/{slide}")).await.body;
        (s["status"] == "verified").then_some(s)
    })
    .await;
    let submit = || app.post(&t, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}));
    let first = submit().await.body["job_id"].as_str().unwrap().to_owned();
    job_status_until(&app, &t, &first, &["running"], Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = Instant::now();
    let r = app
        .post(
            &t,
            &format!("/api/jobs/{first}/cancel"),
            json!({"reason": "wrong stain"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["status"], "cancel_requested");
    let j = job_status_until(
        &app,
        &t,
        &first,
        &["cancelled", "failed", "succeeded"],
        Duration::from_secs(60),
    )
    .await;
    let latency = asked.elapsed();
    eprintln!("cancelled {latency:?} after the request (bands paused 1 s)");
    assert_eq!(
        j["status"], "cancelled",
        "cancelled by the user, not ended otherwise: {j}"
    );
    // Nothing of that attempt follows the request but the cancellation itself.
    let events = job_events(&app, &first).await;
    let at = events
        .iter()
        .position(|e| e == "JobCancelRequested")
        .expect("the request is in the log");
    assert_eq!(events[at + 1..], ["JobCancelled"], "{events:?}");
    // The worker then takes the next job.
    let second = submit().await.body["job_id"].as_str().unwrap().to_owned();
    let j = job_status_until(
        &app,
        &t,
        &second,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(j["status"], "succeeded", "{j}");
    let events = job_events(&app, &second).await;
    eprintln!("a job of the tall slide: {} events: {events:?}", events.len());
    assert!(events.len() <= 15, "no event a second: {events:?}");
    app.stop().await;
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

/// A pipeline that stops making progress (the test hook stops the tall slide's third band for
/// ever; a one-band slide never gets there) is killed after `Worker__StallSeconds`, retried,
/// and fails for good when it stalls again; meanwhile the worker runs another tenant's job.
#[tokio::test]
async fn a_stalled_attempt_is_killed_and_retried_once_while_the_worker_runs_other_work() {
    let app = spawn_app(Storage::Local).await;
    let tall = tall_slide(&app.dir, 8);
    let worker = spawn_worker(&app, &[("Worker__TestHangAtBand", "3"), ("Worker__StallSeconds", "10")]);
    let worker_pid = worker.id().unwrap();
    let (a, b) = (
        app.token("lab-a", &["pathologist"]),
        app.token("lab-b", &["pathologist"]),
    );
    let (stuck_slide, small_slide) = (
        app.upload_slide(&a, &tall).await,
        app.upload_slide(&b, &cmu_slide()).await,
    );
    for (t, s) in [(&a, &stuck_slide), (&b, &small_slide)] {
        eventually("the slide verified", || async {
            let v = app.get(t, &format!("/api/slides/{s}")).await.body;
            (v["status"] == "verified").then_some(v)
        })
        .await;
    }
    let stuck = submit_job(&app, &a, &stuck_slide).await;
    job_status_until(&app, &a, &stuck, &["running"], Duration::from_secs(60)).await;
    let other = submit_job(&app, &b, &small_slide).await;
    let o = job_status_until(
        &app,
        &b,
        &other,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(o["status"], "succeeded", "{o}");
    let j = job_status_until(
        &app,
        &a,
        &stuck,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["attempt"], 2, "retried once: {j}");
    let failure = j["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("no progress for 10 s in stage building the pyramid (tiles ")
            && failure.ends_with("it stalled before too, so it is not retried"),
        "{failure}"
    );
    let events = job_events(&app, &stuck).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(String::as_str)
        .filter(|e| ["JobAttemptFailed", "JobRetryScheduled", "JobFailed"].contains(e))
        .collect();
    assert_eq!(
        kinds,
        ["JobAttemptFailed", "JobRetryScheduled", "JobAttemptFailed", "JobFailed"],
        "{events:?}"
    );
    // The other tenant's job finished while the stuck one waited for its retry.
    let at = |job: &str, kind: &str| {
        let (job, kind) = (job.to_owned(), kind.to_owned());
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT global_position FROM events WHERE aggregate_id = $1 AND event_type = $2 ORDER BY global_position LIMIT 1",
            )
            .bind(job)
            .bind(kind)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(at(&other, "JobSucceeded").await < at(&stuck, "JobFailed").await);
    // The stalled attempts' processes were killed, not left behind.
    let left: Vec<String> = children_of(worker_pid)
        .into_iter()
        .filter(|c| c.contains(" process "))
        .collect();
    assert!(left.is_empty(), "attempt processes still there: {left:?}");
    drop(worker);
    app.stop().await;
}

/// A job whose slide is never uploaded fails after `Jobs__SlideWaitHours` (here 0.001 h,
/// 3.6 s) with a reason that says so.
#[tokio::test]
async fn a_job_for_a_slide_never_uploaded_fails_after_the_wait() {
    let app = spawn_app_with(Storage::Local, &[("Jobs__SlideWaitHours", "0.001")]).await;
    let t = app.token("lab-a", &["pathologist"]);
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "never sent", "size_bytes": 1000, "content_type": "image/tiff"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let slide = r.body["slide_id"].as_str().unwrap().to_owned();
    let submitted = Instant::now();
    let job = submit_job(&app, &t, &slide).await;
    let j = job_status_until(
        &app,
        &t,
        &job,
        &["failed", "queued", "cancelled"],
        Duration::from_secs(60),
    )
    .await;
    let waited = submitted.elapsed();
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["failure"], "the slide was never uploaded (waited 4 s)", "{j}");
    assert!(waited >= Duration::from_secs(3), "not before the wait: {waited:?}");
    app.stop().await;
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

/// Three tiny TIFFs that declare huge slides (tiles shared between positions) are rejected at
/// verification, before a pixel is decoded, with a reason a person understands; the worker's
/// memory stays small, and an honest slide is still verified.
#[tokio::test]
async fn slides_that_lie_about_their_size_are_rejected_at_verification() {
    let app = spawn_app(Storage::Local).await;
    let worker = spawn_worker(&app, &[]);
    let pid = worker.id().unwrap();
    let t = app.token("lab-a", &["pathologist"]);
    for (name, bytes) in lying_tiffs(&app.dir) {
        let id = app.upload_slide(&t, &bytes).await;
        let started = Instant::now();
        let s = eventually("the lying slide judged", || async {
            let s = app.get(&t, &format!("/api/slides/{id}")).await.body;
            matches!(s["status"].as_str(), Some("rejected" | "verified")).then_some(s)
        })
        .await;
        assert_eq!(s["status"], "rejected", "{name}: {s}");
        let reason = s["rejection"].as_str().unwrap();
        assert!(
            reason.starts_with("the slide is refused: it declares") && reason.contains("pixels per byte"),
            "{name}: {reason}"
        );
        eprintln!(
            "{name} ({} bytes): rejected within {:?}: {reason}",
            bytes.len(),
            started.elapsed()
        );
    }
    let peak = peak_rss(pid);
    eprintln!("the worker's peak resident memory: {} MiB", peak >> 20);
    assert!(peak < 1 << 30, "the worker peaked at {peak} bytes");
    let honest = app.upload_slide(&t, &tall_slide(&app.dir, 2)).await;
    let s = eventually("the honest slide verified", || async {
        let s = app.get(&t, &format!("/api/slides/{honest}")).await.body;
        matches!(s["status"].as_str(), Some("rejected" | "verified")).then_some(s)
    })
    .await;
    assert_eq!(s["status"], "verified", "{s}");
    drop(worker);
    app.stop().await;
}

/// Submits a job on a new slide of `bytes` and waits for its end.
async fn job_to_the_end(app: &App, t: &str, bytes: &[u8]) -> Value {
    let slide = app.upload_slide(t, bytes).await;
    eventually("the slide verified", || async {
        let s = app.get(t, &format!("/api/slides/{slide}")).await.body;
        (s["status"] == "verified").then_some(s)
    })
    .await;
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

/// A job whose estimated memory is over `Worker__MemoryBudgetBytes` fails before it starts,
/// for good and with the figures; the worker takes the next job, which fits.
#[tokio::test]
async fn a_job_over_the_memory_budget_fails_with_the_figures_and_the_next_one_runs() {
    let app = spawn_app(Storage::Local).await;
    let _worker = spawn_worker(&app, &[("Worker__MemoryBudgetBytes", "314572800")]);
    let t = app.token("lab-a", &["pathologist"]);
    let j = job_to_the_end(&app, &t, &cmu_slide()).await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["attempt"], 1, "not retried: {j}");
    let failure = j["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("the slide needs about ")
            && failure.contains("2220 pixels wide")
            && failure.ends_with("more than Worker__MemoryBudgetBytes (300.0 MiB)"),
        "{failure}"
    );
    let j = job_to_the_end(&app, &t, &blank_slide(&app.dir)).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    app.stop().await;
}

/// An attempt that allocates past its data limit (the test hook allocates 4 GiB under a
/// 1 GiB budget) fails for good with the allocation named; the worker, untouched, runs the
/// next job.
#[tokio::test]
async fn an_attempt_past_its_memory_limit_fails_and_the_worker_runs_the_next_job() {
    let app = spawn_app(Storage::Local).await;
    let mut worker = spawn_worker(
        &app,
        &[
            ("Worker__MemoryBudgetBytes", "1073741824"),
            ("Worker__TestAllocateBytes", "4294967296"),
        ],
    );
    let t = app.token("lab-a", &["pathologist"]);
    let j = job_to_the_end(&app, &t, &cmu_slide()).await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["attempt"], 1, "not retried: {j}");
    let failure = j["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("the attempt ran out of memory (memory allocation of 4294967296 bytes failed"),
        "{failure}"
    );
    assert!(worker.try_wait().unwrap().is_none(), "the worker is still running");
    // Under a megapixel, the hook leaves the attempt alone.
    let j = job_to_the_end(&app, &t, &blank_slide(&app.dir)).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    app.stop().await;
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
    eventually("the tall slide verified", || async {
        let s = app.get(&t, &format!("/api/slides/{slide}")).await.body;
        (s["status"] == "verified").then_some(s)
    })
    .await;
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

// Each lease in a test of its own (a process of its own under nextest): two gateways in one
// process share its environment.
#[tokio::test]
async fn a_minute_long_job_keeps_a_short_lease_by_renewing_it() {
    let (j, events, ran) = minute_job("10").await;
    report(10, ran, &events);
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["attempt"], 1, "the lease was renewed, not lost: {j}");
    assert!(ran >= Duration::from_secs(48), "about a minute: {ran:?}");
    let renewals = events.iter().filter(|e| *e == "JobLeaseExtended").count();
    assert!(renewals >= 3, "a 10 s lease is renewed every ~3 s: {events:?}");
}

#[tokio::test]
async fn a_minute_long_job_writes_a_few_events_with_the_default_lease() {
    let (j, events, ran) = minute_job("60").await;
    report(60, ran, &events);
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["attempt"], 1, "{j}");
    assert!(ran >= Duration::from_secs(48), "about a minute: {ran:?}");
    // Submitted, queued, started and the outcome, progress every 10 s and a renewal every
    // 20 s at most: 13 for a minute, at most 15 as the issue asks; a loaded machine that
    // stretches the job may add one of each per 10 or 20 s more, and no more than that.
    let secs = ran.as_secs_f64();
    let cadence = 4 + (secs / 10.0).ceil() as usize + (secs / 20.0).ceil() as usize;
    assert!(
        events.len() <= cadence.max(15),
        "{} events in {ran:?}: {events:?}",
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

/// Two completions of one upload with a byte swap between them: the second, while the first
/// copies, is refused (409); once the first is recorded, a completion after other bytes were
/// PUT through the still-valid URL copies nothing; and a copy changed behind the log's back
/// is refused by the job, for good, with both hashes.
#[tokio::test]
async fn a_swapped_upload_is_never_processed_on_the_local_store() {
    use sha2::Digest;
    let app = spawn_app(Storage::Local).await;
    let _worker = spawn_worker(&app, &[]);
    let t = app.token("lab-a", &["pathologist"]);
    let bytes = blank_slide(&app.dir);
    let mut other = bytes.clone();
    let n = other.len();
    other[n - 1] ^= 0xff;
    let (slide, upload) = registered_and_put(&app, &t, &bytes).await;
    let done = format!("/api/slides/{slide}/uploaded");
    let claim = hold_copy_claim(&app, &slide).await;
    let r = app.post(&t, &done, json!({})).await;
    assert_problem(&r, StatusCode::CONFLICT);
    assert!(r.body["detail"].as_str().unwrap().contains("in progress"), "{}", r.body);
    sqlx::Connection::close(claim).await.unwrap();
    let r = app.post(&t, &done, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(put_upload(&app.http, &upload, &other).await.is_none());
    let r = app.post(&t, &done, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let copy = app
        .dir
        .join("blobs")
        .join(mira_aggregates::copy_key(&format!("slides/lab-a/{slide}")));
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        bytes,
        "the copy is the first upload's bytes"
    );
    eventually("the slide verified", || async {
        let s = app.get(&t, &format!("/api/slides/{slide}")).await.body;
        (s["status"] == "verified").then_some(s)
    })
    .await;
    let j = job_on(&app, &t, &slide).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    // The copy changes behind the log's back: the next job refuses it.
    std::fs::write(&copy, &other).unwrap();
    let j = job_on(&app, &t, &slide).await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["attempt"], 1, "not retried: {j}");
    let failure = j["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("the slide's bytes changed after it was verified (verified SHA-256 ")
            && failure.contains(&hex::encode(sha2::Sha256::digest(&bytes)))
            && failure.contains(&hex::encode(sha2::Sha256::digest(&other))),
        "{failure}"
    );
    app.stop().await;
}

/// On S3 (moto, a versioned bucket): a second completion while the first copies is refused,
/// the copy's version is recorded with `SlideUploaded`, and a completion after a byte swap
/// through the still-valid URL makes no new version of the copy.
#[tokio::test]
async fn a_swapped_upload_makes_no_new_copy_on_s3() {
    let app = spawn_app(Storage::S3).await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk().await)
            .force_path_style(true)
            .build(),
    );
    let bucket = app.bucket.clone().unwrap();
    s3.put_bucket_versioning()
        .bucket(&bucket)
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let t = app.token("lab-a", &["pathologist"]);
    let bytes = b"the first upload's bytes".to_vec();
    let other = b"the other upload's bytes".to_vec();
    let (slide, upload) = registered_and_put(&app, &t, &bytes).await;
    let done = format!("/api/slides/{slide}/uploaded");
    let claim = hold_copy_claim(&app, &slide).await;
    assert_problem(&app.post(&t, &done, json!({})).await, StatusCode::CONFLICT);
    sqlx::Connection::close(claim).await.unwrap();
    // Completions racing, then more after other bytes were PUT through the still-valid URL:
    // each is done (200), refused while another copies (409) or told the server is busy (503),
    // and only one copy is ever made.
    let burst = |n: usize| {
        let (app, t, done) = (&app, &t, &done);
        async move {
            let statuses = futures_util::future::join_all((0..n).map(|_| app.post(t, done, json!({})))).await;
            let statuses: Vec<StatusCode> = statuses.into_iter().map(|r| r.status).collect();
            assert!(
                statuses
                    .iter()
                    .all(|s| [StatusCode::OK, StatusCode::CONFLICT, StatusCode::SERVICE_UNAVAILABLE].contains(s)),
                "{statuses:?}"
            );
            statuses
        }
    };
    let first = burst(8).await;
    assert!(first.contains(&StatusCode::OK), "{first:?}");
    assert!(put_upload(&app.http, &upload, &other).await.is_none());
    burst(8).await;
    assert_eq!(app.post(&t, &done, json!({})).await.status, StatusCode::OK);
    let recorded: String = sqlx::query_scalar(
        "SELECT payload::jsonb ->> 'version_id' FROM events WHERE aggregate_id = $1 AND event_type = 'SlideUploaded'",
    )
    .bind(&slide)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let versions = s3
        .list_object_versions()
        .bucket(&bucket)
        .prefix("immutable/")
        .send()
        .await
        .unwrap();
    let versions: Vec<_> = versions
        .versions()
        .iter()
        .filter(|v| v.key().is_some_and(|k| k.contains(&slide)))
        .collect();
    assert_eq!(versions.len(), 1, "one copy, never replaced: {versions:?}");
    assert_eq!(versions[0].version_id(), Some(recorded.as_str()));
    let copy = s3
        .get_object()
        .bucket(&bucket)
        .key(versions[0].key().unwrap())
        .version_id(&recorded)
        .send()
        .await
        .unwrap();
    assert_eq!(copy.body.collect().await.unwrap().into_bytes().as_ref(), &bytes[..]);
    app.stop().await;
}

/// `projections rebuild --verify` compares without holding back live delivery: while its
/// comparison is held open, a new slide reaches the read model and the WebSocket.
#[tokio::test]
async fn a_verifying_rebuild_does_not_hold_back_live_delivery() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let first = app.upload_slide(&t, b"before the rebuild").await;
    eventually("the first slide in the read model", || async {
        (app.get(&t, &format!("/api/slides/{first}")).await.status == StatusCode::OK).then_some(Value::Null)
    })
    .await;
    let mut socket = connect(&app, &t, None).await;
    assert_eq!(next_json(&mut socket).await["type"], "hello");
    let (comparing, is_comparing) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let pool = app.db.pool.clone();
    let rebuild = tokio::spawn(async move {
        mira_projections::rebuild::rebuild_with(&pool, true, |_| {}, async move {
            comparing.send(()).unwrap();
            released.await.unwrap();
        })
        .await
    });
    tokio::time::timeout(Duration::from_secs(60), is_comparing)
        .await
        .expect("the rebuild reaches its comparison")
        .unwrap();
    let second = app.upload_slide(&t, b"during the comparison").await;
    eventually(
        "the second slide in the read model while the rebuild compares",
        || async {
            (app.get(&t, &format!("/api/slides/{second}")).await.status == StatusCode::OK).then_some(Value::Null)
        },
    )
    .await;
    until(&mut socket, "the second slide on the WebSocket", |m| {
        m.to_string().contains(&second)
    })
    .await;
    assert!(!rebuild.is_finished(), "the comparison is still held open");
    release.send(()).unwrap();
    let report = rebuild.await.unwrap().unwrap();
    assert!(
        report.swapped && report.differences.is_empty(),
        "{:?}",
        report.differences
    );
    for slide in [&first, &second] {
        assert_eq!(
            app.get(&t, &format!("/api/slides/{slide}")).await.status,
            StatusCode::OK
        );
    }
    app.stop().await;
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

/// A slide whose copy cannot be read for 20 s is verified once it can be, without an
/// operator: its verification is tried again from the due-time table with backoff, never
/// redelivered into the dead-letter queue, and nothing is parked.
#[tokio::test]
async fn a_copy_unreadable_for_a_while_is_verified_once_readable() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let (slide, copy, hidden) = uploaded_with_copy_hidden(&app, &t, &blank_slide(&app.dir)).await;
    let hid = Instant::now();
    let _verifier = spawn_verifier(
        &app,
        &[
            ("Messaging__SlowRetryFirstSeconds", "1"),
            ("Messaging__SlowRetryMaxSeconds", "4"),
            ("Messaging__SlowRetryAttempts", "15"),
        ],
    );
    // The failed verification waits in the due-time table, and /metrics counts it.
    eventually("the verification waiting for a retry", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM due_work WHERE kind = 'slow-work:verify'")
            .fetch_one(&app.db.owner)
            .await
            .unwrap();
        (n == 1).then_some(Value::Null)
    })
    .await;
    let text = app.metrics().await;
    assert_eq!(
        metric(&text, "mira_consumer_slow_work_retrying{consumer=\"verify\"}"),
        1.0,
        "{text}"
    );
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(hid.elapsed())).await;
    assert_eq!(slide_status(&app, &t, &slide).await, "uploaded");
    std::fs::rename(&hidden, &copy).unwrap();
    eventually("the slide verified once its copy is readable", || async {
        (slide_status(&app, &t, &slide).await == "verified").then_some(Value::Null)
    })
    .await;
    assert_eq!(parked_for(&app, &slide).await, None);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM due_work WHERE kind = 'slow-work:verify'")
        .fetch_one(&app.db.owner)
        .await
        .unwrap();
    assert_eq!(left, 0, "the retry is done with");
    app.stop().await;
}

/// One unreadable past the last try is parked with the reason, listed by `mira dlq list`,
/// and verified after `mira dlq redrive` once readable.
#[tokio::test]
async fn slow_work_past_its_last_try_is_parked_and_redriven() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let (slide, copy, hidden) = uploaded_with_copy_hidden(&app, &t, &blank_slide(&app.dir)).await;
    let _verifier = spawn_verifier(
        &app,
        &[
            ("Messaging__SlowRetryFirstSeconds", "1"),
            ("Messaging__SlowRetryMaxSeconds", "1"),
            ("Messaging__SlowRetryAttempts", "2"),
        ],
    );
    let reason = eventually("the slide's verification parked", || async {
        parked_for(&app, &slide).await.map(Value::String)
    })
    .await;
    let reason = reason.as_str().unwrap();
    assert!(
        reason.contains("SlideUploaded") && reason.contains("failed 2 times") && reason.contains("cannot be read"),
        "{reason}"
    );
    let mira = |args: &[&str]| {
        let out = std::process::Command::new(worker_binary().with_file_name("mira"))
            .args(args)
            .env("DATABASE_URL", &app.db.url)
            .env("Messaging__Provider", "InMemory")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mira {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed: Value = serde_json::from_str(&mira(&["dlq", "list", "--json"])).unwrap();
    let parked = listed["parked"].as_array().unwrap();
    assert!(
        parked
            .iter()
            .any(|p| p["consumer"] == "verify" && p["aggregate_id"] == slide.as_str() && p["reason"] == reason),
        "{listed}"
    );
    let text = app.metrics().await;
    assert_eq!(
        metric(&text, "mira_consumer_parked_aggregates{consumer=\"verify\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(slide_status(&app, &t, &slide).await, "uploaded");
    std::fs::rename(&hidden, &copy).unwrap();
    mira(&["dlq", "redrive", "--consumer", "verify", "--aggregate", &slide]);
    eventually("the slide verified after the redrive", || async {
        (slide_status(&app, &t, &slide).await == "verified").then_some(Value::Null)
    })
    .await;
    assert_eq!(parked_for(&app, &slide).await, None);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// STAT jobs (issue 33)

/// `priority` on `POST /api/jobs`: a pathologist may submit STAT (the default
/// `Jobs__StatGroups`), an admin may not and is told which setting says so, an unknown value
/// is a 422, and a job without one is routine; the job's JSON shows it.
#[tokio::test]
async fn stat_jobs_are_submitted_by_the_groups_the_setting_names() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let admin = app.token("lab-a", &["admin"]);
    let slide = app.upload_slide(&t, &blank_slide(&app.dir)).await;
    let post = |token: String, priority: Value| {
        let app = &app;
        let slide = slide.clone();
        async move {
            let mut body = json!({"slide_id": slide, "kind": "wsi.preprocess"});
            if !priority.is_null() {
                body["priority"] = priority;
            }
            app.post(&token, "/api/jobs", body).await
        }
    };
    let stat = post(t.clone(), json!("stat")).await;
    assert_eq!(stat.status, StatusCode::ACCEPTED, "{}", stat.body);
    let refused = post(admin.clone(), json!("stat")).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let detail = refused.body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("Jobs__StatGroups") && detail.contains("pathologist"),
        "{detail}"
    );
    // The admin may still submit a routine job.
    let routine = post(admin, Value::Null).await;
    assert_eq!(routine.status, StatusCode::ACCEPTED, "{}", routine.body);
    let bad = post(t.clone(), json!("urgent")).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    for (r, want) in [(&stat, "stat"), (&routine, "routine")] {
        let id = r.body["job_id"].as_str().unwrap().to_owned();
        let j = eventually("the job's view", || async {
            let j = app.get(&t, &format!("/api/jobs/{id}")).await.body;
            j.get("priority").is_some().then_some(j)
        })
        .await;
        assert_eq!(j["priority"], want, "{j}");
    }
    app.stop().await;
}

/// With 50 routine jobs queued on one worker, a STAT job queued after them is the next job the
/// worker starts: no routine job starts between its queueing and its start.
#[tokio::test]
async fn a_stat_job_starts_before_fifty_routine_jobs_queued_ahead() {
    let app = spawn_app(Storage::Local).await;
    // Every job pauses after each band, so the routine jobs stay queued behind the one running.
    let _worker = spawn_worker(&app, &[("Worker__BandPauseMillis", "2000")]);
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, &blank_slide(&app.dir)).await;
    eventually("the slide verified", || async {
        let s = app.get(&t, &format!("/api/slides/{slide}")).await.body;
        (s["status"] == "verified").then_some(s)
    })
    .await;
    let mut routine = Vec::new();
    for _ in 0..50 {
        routine.push(submit_job(&app, &t, &slide).await);
    }
    // Each is ready: queued, or waiting for its admission (the handlers keep only
    // Jobs__AdmissionWindow routine jobs in the queue at once).
    let ready = |ids: Vec<String>| {
        let app = &app;
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(DISTINCT aggregate_id) FROM events WHERE event_type = 'JobQueued' AND aggregate_id = ANY($1)) \
                      + (SELECT count(*) FROM due_work WHERE kind = 'job.queue' AND key = ANY($1))",
            )
            .bind(&ids)
            .fetch_one(&app.db.owner)
            .await
            .unwrap();
            n
        }
    };
    eventually("the 50 routine jobs ready", || async {
        (ready(routine.clone()).await >= 50).then_some(Value::Null)
    })
    .await;
    let r = app
        .post(
            &t,
            "/api/jobs",
            json!({"slide_id": slide, "kind": "wsi.preprocess", "priority": "stat"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let stat = r.body["job_id"].as_str().unwrap().to_owned();
    job_status_until(&app, &t, &stat, &["running", "succeeded"], Duration::from_secs(120)).await;
    // The log says in which order the jobs were queued and started.
    let rows: Vec<(String, String, i64, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT aggregate_id, event_type, global_position, recorded_at FROM events \
         WHERE aggregate_type = 'Job' AND event_type IN ('JobQueued', 'JobStarted') ORDER BY global_position",
    )
    .fetch_all(&app.db.owner)
    .await
    .unwrap();
    let stat_queued = rows
        .iter()
        .find(|r| r.0 == stat && r.1 == "JobQueued")
        .expect("the STAT job was queued");
    let first_start_after = rows
        .iter()
        .find(|r| r.1 == "JobStarted" && r.2 > stat_queued.2)
        .expect("a job started after the STAT job was queued");
    assert_eq!(
        first_start_after.0, stat,
        "the STAT job started next, not {first_start_after:?}"
    );
    let started_before: usize = rows
        .iter()
        .filter(|r| r.1 == "JobStarted" && r.2 < first_start_after.2)
        .count();
    assert!(
        started_before <= 2,
        "at most the running job (and one that began before the STAT job was queued) went first: {started_before}"
    );
    eprintln!(
        "STAT job: queued to started in {} ms with {} routine jobs ready ahead of it (queued or waiting for admission)",
        (first_start_after.3 - stat_queued.3).num_milliseconds(),
        50 - started_before
    );
    app.stop().await;
}

/// Tenant A queues 40 jobs, then tenant B 2: with one worker, B's first job starts within the
/// next 3 jobs. Before B came, A alone had the worker: every A job was queued before the one
/// ahead of it ended, so the worker never waited for an admission. /metrics counts the jobs
/// waiting for admission (what the fleet scales on).
#[tokio::test]
async fn tenants_take_turns_and_a_lone_tenant_keeps_the_worker_busy() {
    let app = spawn_app(Storage::Local).await;
    let _worker = spawn_worker(&app, &[("Worker__BandPauseMillis", "1000")]);
    let (a, b) = (
        app.token("lab-a", &["pathologist"]),
        app.token("lab-b", &["pathologist"]),
    );
    let (slide_a, slide_b) = (
        app.upload_slide(&a, &blank_slide(&app.dir)).await,
        app.upload_slide(&b, &blank_slide(&app.dir)).await,
    );
    for (t, s) in [(&a, &slide_a), (&b, &slide_b)] {
        eventually("the slide verified", || async {
            let v = app.get(t, &format!("/api/slides/{s}")).await.body;
            (v["status"] == "verified").then_some(v)
        })
        .await;
    }
    let mut jobs_a = Vec::new();
    for _ in 0..40 {
        jobs_a.push(submit_job(&app, &a, &slide_a).await);
    }
    let succeeded = |ids: Vec<String>| {
        let pool = app.db.owner.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM events WHERE event_type = 'JobSucceeded' AND aggregate_id = ANY($1)",
            )
            .bind(ids)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    eventually("three of A's jobs done", || async {
        (succeeded(jobs_a.clone()).await >= 3).then_some(Value::Null)
    })
    .await;
    let waiting = metric(
        &app.metrics().await,
        "mira_jobs_waiting_admission{priority=\"routine\"}",
    );
    assert!(waiting >= 30.0, "A's jobs wait for admission: {waiting}");
    // The API shows which: A's last job waits, still `submitted`; the one running does not.
    let last = app.get(&a, &format!("/api/jobs/{}", jobs_a[39])).await.body;
    assert_eq!(
        (&last["status"], &last["waiting_for_admission"]),
        (&json!("submitted"), &json!(true)),
        "{last}"
    );
    let listed = app.get(&a, "/api/jobs?limit=100").await.body;
    let flags: Vec<bool> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["waiting_for_admission"].as_bool().expect("every job says"))
        .collect();
    assert!(flags.iter().filter(|w| **w).count() >= 30, "{listed}");
    assert!(flags.iter().any(|w| !*w), "{listed}");
    let jobs_b = [
        submit_job(&app, &b, &slide_b).await,
        submit_job(&app, &b, &slide_b).await,
    ];
    job_status_until(
        &app,
        &b,
        &jobs_b[0],
        &["running", "succeeded"],
        Duration::from_secs(120),
    )
    .await;
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, event_type, global_position FROM events \
         WHERE aggregate_type = 'Job' AND event_type IN ('JobSubmitted', 'JobQueued', 'JobStarted', 'JobSucceeded') \
         ORDER BY global_position",
    )
    .fetch_all(&app.db.owner)
    .await
    .unwrap();
    let at = |job: &str, kind: &str| rows.iter().find(|r| r.0 == job && r.1 == kind).map(|r| r.2);
    let b_submitted = at(&jobs_b[0], "JobSubmitted").unwrap();
    let b_started = at(&jobs_b[0], "JobStarted").unwrap();
    let starts_between = rows
        .iter()
        .filter(|r| r.1 == "JobStarted" && r.2 > b_submitted && r.2 < b_started)
        .count();
    eprintln!("B's first job started after {starts_between} of A's jobs started once B had submitted it");
    assert!(
        starts_between <= 2,
        "B's first job was among the next 3 to start: {starts_between}"
    );
    // A alone: each of A's jobs that started before B came was queued before the previous
    // one ended.
    let started_a: Vec<&String> = rows
        .iter()
        .filter(|r| r.1 == "JobStarted" && r.2 < b_submitted && jobs_a.contains(&r.0))
        .map(|r| &r.0)
        .collect();
    assert!(started_a.len() >= 3, "{started_a:?}");
    for pair in started_a.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        assert!(
            at(next, "JobQueued").unwrap() < at(prev, "JobSucceeded").unwrap(),
            "job {next} was queued before {prev} ended"
        );
    }
    app.stop().await;
}
