//! Cognito ID-token validation (DESIGN §7). Tokens are checked against the JWKS at
//! `AWS__Cognito__JwksUrl`: RS256 only, `iss`, `exp`/`nbf` with a small leeway, `token_use` =
//! `id` and `aud` = the app client id. The JWKS is cached and fetched again when a token names
//! an unknown `kid`, at most once per `min_refresh`, so a flood of forged kids cannot turn the
//! gateway into a load generator against the key endpoint. `mira dev`'s local identity
//! provider serves its JWKS on the same path, so both go through this code.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mira_events::TenantId;
use serde::Deserialize;

/// The roles a user may hold, from `cognito:groups`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Pathologist,
    Auditor,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pathologist" => Some(Self::Pathologist),
            "auditor" => Some(Self::Auditor),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// A set of roles, as a setting names them (`Jobs__StatGroups`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleSet(u8);

impl RoleSet {
    pub fn of<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self(
            names
                .into_iter()
                .filter_map(Role::parse)
                .fold(0, |bits, r| bits | 1 << r as u8),
        )
    }

    pub fn contains(self, r: Role) -> bool {
        self.0 & (1 << r as u8) != 0
    }

    /// Whether `who` holds one of the roles.
    pub fn admits(self, who: &Identity) -> bool {
        who.roles.iter().any(|r| self.contains(*r))
    }

    /// The roles' names, for messages.
    pub fn names(self) -> Vec<&'static str> {
        [
            (Role::Pathologist, "pathologist"),
            (Role::Auditor, "auditor"),
            (Role::Admin, "admin"),
        ]
        .into_iter()
        .filter(|(r, _)| self.contains(*r))
        .map(|(_, n)| n)
        .collect()
    }
}

/// Who is calling, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub tenant: TenantId,
    pub roles: Vec<Role>,
    /// The token's `exp`: a WebSocket opened with it is closed then.
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

impl Identity {
    pub fn has_any(&self, roles: &[Role]) -> bool {
        self.roles.iter().any(|r| roles.contains(r))
    }
}

pub use mira_config::AuthConfig;

impl AuthError {
    /// What the client is told, in RFC 6750's `error_description` and the problem's `detail`:
    /// which check failed, in fixed words (DESIGN §7), never the token or key material.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "no bearer token",
            Self::Malformed(_) => "malformed token",
            Self::Algorithm(_) => "bad signature",
            Self::NoKid | Self::UnknownKid(_) => "unknown key",
            Self::Invalid { reason, .. } => reason,
            Self::NotIdToken(_) => "not an ID token",
            Self::Tenant => "no tenant",
        }
    }

    fn jwt(e: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        let reason = match e.kind() {
            K::ExpiredSignature => "expired",
            K::ImmatureSignature => "not yet valid",
            K::InvalidIssuer => "wrong issuer",
            K::InvalidAudience => "wrong audience",
            K::InvalidSignature | K::InvalidAlgorithm | K::InvalidAlgorithmName => "bad signature",
            K::MissingRequiredClaim(_) => "a required claim is missing",
            _ => "malformed token",
        };
        Self::Invalid {
            reason,
            detail: e.to_string(),
        }
    }
}

/// Why a token was refused. The client gets [`AuthError::reason`] (a fixed phrase, DESIGN §7);
/// the full error, which may quote claims, is only logged at debug.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not RS256")]
    Algorithm(String),
    #[error("token has no kid")]
    NoKid,
    #[error("unknown kid {0:?}")]
    UnknownKid(String),
    #[error("token rejected ({reason}): {detail}")]
    Invalid { reason: &'static str, detail: String },
    #[error("token_use is {0:?}, not \"id\"")]
    NotIdToken(Option<String>),
    #[error("token has no valid custom:tenant")]
    Tenant,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    aud: Option<serde_json::Value>,
    token_use: Option<String>,
    /// Any JSON, so that a tenant of the wrong type is "no tenant", not a malformed token.
    #[serde(rename = "custom:tenant")]
    tenant: Option<serde_json::Value>,
    #[serde(rename = "cognito:groups", default)]
    groups: Vec<String>,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kid: Option<String>,
    kty: String,
    n: Option<String>,
    e: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
}

pub struct JwksVerifier {
    cfg: AuthConfig,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, Arc<DecodingKey>>>,
    /// When the JWKS was last fetched; also serialises fetches.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for JwksVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksVerifier")
            .field("jwks_url", &self.cfg.jwks_url)
            .finish()
    }
}

impl JwksVerifier {
    pub fn new(cfg: AuthConfig) -> Self {
        // Only the aws-lc provider is compiled in; installing it is idempotent in effect.
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        Self {
            cfg,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            keys: RwLock::new(HashMap::new()),
            last_fetch: tokio::sync::Mutex::new(None),
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    fn cached(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).get(kid).cloned()
    }

    async fn key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        if let Some(k) = self.cached(kid) {
            return Some(k);
        }
        let mut last = self.last_fetch.lock().await;
        // Another request may have fetched while this one waited.
        if let Some(k) = self.cached(kid) {
            return Some(k);
        }
        if matches!(*last, Some(t) if t.elapsed() < self.cfg.min_refresh) {
            return None;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), url = %self.cfg.jwks_url, "JWKS fetched");
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
            }
            Err(e) => tracing::warn!(error = %e, url = %self.cfg.jwks_url, "JWKS fetch failed"),
        }
        self.cached(kid)
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<DecodingKey>>, String> {
        let res = self
            .http
            .get(&self.cfg.jwks_url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !res.status().is_success() {
            return Err(format!("HTTP {}", res.status()));
        }
        let jwks: Jwks = res.json().await.map_err(|e| e.to_string())?;
        let mut out = HashMap::new();
        for k in jwks.keys {
            if k.kty != "RSA" || k.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let (Some(kid), Some(n), Some(e)) = (k.kid, k.n, k.e) else {
                continue;
            };
            match DecodingKey::from_rsa_components(&n, &e) {
                Ok(key) => {
                    out.insert(kid, Arc::new(key));
                }
                Err(err) => tracing::warn!(%kid, error = %err, "skipping an unusable JWKS key"),
            }
        }
        Ok(out)
    }

    /// Validates an ID token and returns the caller.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(AuthError::NoKid)?;
        let key = self.key(&kid).await.ok_or(AuthError::UnknownKid(kid))?;
        let mut v = Validation::new(Algorithm::RS256);
        v.set_issuer(&[&self.cfg.issuer]);
        // The audience is checked below, after token_use: a Cognito access token has no `aud`
        // at all, and "not an ID token" tells its sender more than "a claim is missing".
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp", "iss", "sub"]);
        v.leeway = self.cfg.leeway.as_secs();
        v.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(AuthError::jwt)?;
        let c = data.claims;
        if c.token_use.as_deref() != Some("id") {
            return Err(AuthError::NotIdToken(c.token_use));
        }
        // An ID token's `aud` is the app client id (a string; a one-element list is accepted).
        let aud_ok = match &c.aud {
            Some(serde_json::Value::String(a)) => *a == self.cfg.audience,
            Some(serde_json::Value::Array(l)) => l.iter().any(|a| a.as_str() == Some(self.cfg.audience.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(AuthError::Invalid {
                reason: "wrong audience",
                detail: format!("aud is {:?}", c.aud),
            });
        }
        let tenant = c
            .tenant
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .and_then(|t| TenantId::parse(t).ok())
            .ok_or(AuthError::Tenant)?;
        if c.sub.is_empty() {
            return Err(AuthError::Invalid {
                reason: "a required claim is missing",
                detail: "empty sub".into(),
            });
        }
        let expires_at = chrono::DateTime::from_timestamp(c.exp, 0).ok_or(AuthError::Invalid {
            reason: "malformed token",
            detail: "exp out of range".into(),
        })?;
        Ok(Identity {
            subject: c.sub,
            tenant,
            roles: c.groups.iter().filter_map(|g| Role::parse(g)).collect(),
            expires_at,
        })
    }
}
