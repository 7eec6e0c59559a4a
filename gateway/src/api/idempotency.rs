//! `Idempotency-Key` (DESIGN §7). A key is scoped to the caller (tenant and subject) and the
//! endpoint. The first request with a key records a keyed fingerprint of its canonical body
//! and the id of the resource it creates; a repeat with the same body gets the same resource,
//! a repeat with another body gets 422.
//!
//! Bodies carry patient data (a slide's name), so the fingerprint is an HMAC-SHA256 under a
//! key from the keyring (subject [`KEY_SUBJECT`]), never a plain hash that a short name could
//! be guessed back from. A key names its resource for `Api__IdempotencyRetentionHours`; after
//! that it may be used again, and the gateway deletes expired rows.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use sqlx::PgPool;

use super::auth::Identity;
use super::problem::ApiError;

/// The keyring subject whose data key keys the fingerprints.
pub const KEY_SUBJECT: &str = "mira:api-idempotency";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First use of the key: create the resource with this id.
    New(uuid::Uuid),
    /// The key was used before with the same request: answer with this resource.
    Replay(uuid::Uuid),
}

impl Claim {
    pub fn id(self) -> uuid::Uuid {
        match self {
            Self::New(id) | Self::Replay(id) => id,
        }
    }
}

/// HMAC-SHA256 of the request as the gateway understood it (field order fixed by the type),
/// bound to the endpoint.
pub fn fingerprint(key: &[u8; 32], scope: &str, request: &impl Serialize) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"mira.idempotency.v1\n");
    mac.update(scope.as_bytes());
    mac.update(b"\n");
    mac.update(&serde_json::to_vec(request).unwrap_or_default());
    hex::encode(mac.finalize().into_bytes())
}

/// What a row is keyed by: SHA-256 over the tenant, the subject, the endpoint and the key,
/// each length-prefixed (migrations/0011 computes the same in SQL). Bounded, whatever the
/// length of a token's `sub`.
pub fn key_digest(tenant: &str, subject: &str, scope: &str, key: &str) -> Vec<u8> {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(b"mira.idempotency-key.v1\n");
    for part in [tenant, subject, scope, key] {
        h.update(format!("{}:", part.len()).as_bytes());
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_vec()
}

/// [`claim`] for a request of `state`'s gateway: the fingerprint keyed with the keyring's
/// idempotency key, the retention from the settings.
pub async fn claim_request(
    state: &super::state::AppState,
    who: &Identity,
    scope: &str,
    key: &str,
    request: &impl Serialize,
    fresh: uuid::Uuid,
) -> Result<Claim, ApiError> {
    let mac_key = state
        .idempotency_key
        .get_or_try_init(|| async { state.keyring.key_for(KEY_SUBJECT).await })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "the idempotency key is unavailable");
            ApiError::unavailable("the keyring")
        })?;
    let fp = fingerprint(mac_key, scope, request);
    claim(
        &state.pool,
        who,
        scope,
        key,
        &fp,
        fresh,
        state.limits.idempotency_retention,
    )
    .await
}

/// Claims `key` for a new resource `fresh`, or finds what it already named. Works as
/// `mira_api` confined to the caller's tenant.
pub async fn claim(
    pool: &PgPool,
    who: &Identity,
    scope: &str,
    key: &str,
    fingerprint: &str,
    fresh: uuid::Uuid,
    retention: Duration,
) -> Result<Claim, ApiError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL ROLE mira_api").execute(&mut *tx).await?;
    sqlx::query("SELECT set_config('mira.tenant_id', $1, true)")
        .bind(who.tenant.as_str())
        .execute(&mut *tx)
        .await?;
    // New, or an expired row taken over.
    let digest = key_digest(who.tenant.as_str(), &who.subject, scope, key);
    let inserted: Option<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO api_idempotency (tenant_id, subject, scope, key, request_hmac, resource_id, key_digest) \
         VALUES ($1, $2, $3, $4, $5, $6, $8) \
         ON CONFLICT (tenant_id, key_digest) DO UPDATE \
           SET request_hmac = EXCLUDED.request_hmac, resource_id = EXCLUDED.resource_id, created_at = now() \
           WHERE api_idempotency.created_at < now() - make_interval(secs => $7) \
         RETURNING resource_id",
    )
    .bind(who.tenant.as_str())
    .bind(&who.subject)
    .bind(scope)
    .bind(key)
    .bind(fingerprint)
    .bind(fresh)
    .bind(retention.as_secs_f64())
    .bind(&digest)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(id) = inserted {
        tx.commit().await?;
        return Ok(Claim::New(id));
    }
    let (hmac, id): (String, uuid::Uuid) = sqlx::query_as(
        "SELECT request_hmac, resource_id FROM api_idempotency WHERE tenant_id = $1 AND key_digest = $2",
    )
    .bind(who.tenant.as_str())
    .bind(&digest)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    if hmac != fingerprint {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "this Idempotency-Key was already used with a different request body",
        ));
    }
    Ok(Claim::Replay(id))
}

/// Deletes rows older than `retention` (an hour at least), across tenants, through the one
/// function that may (`mira_sweep_idempotency`, migration 0014). Returns how many.
pub async fn sweep(pool: &PgPool, retention: Duration) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT mira_sweep_idempotency(make_interval(secs => $1))")
        .bind(retention.as_secs_f64())
        .fetch_one(pool)
        .await?;
    Ok(n.max(0) as u64)
}
