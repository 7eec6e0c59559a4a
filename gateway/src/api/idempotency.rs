//! `Idempotency-Key` (DESIGN §7). A key is scoped to the caller (tenant and subject) and the
//! endpoint. The first request with a key records the SHA-256 of its canonical body and the id
//! of the resource it creates; a repeat with the same body gets the same resource, a repeat
//! with another body gets 422.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::auth::Identity;
use super::problem::ApiError;

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

/// SHA-256 of the request as the gateway understood it (field order fixed by the type).
pub fn fingerprint(request: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(request).unwrap_or_default();
    hex::encode(Sha256::digest(bytes))
}

/// Claims `key` for a new resource `fresh`, or finds what it already named.
pub async fn claim(
    pool: &PgPool,
    who: &Identity,
    scope: &str,
    key: &str,
    fingerprint: &str,
    fresh: uuid::Uuid,
) -> Result<Claim, ApiError> {
    let inserted: Option<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO api_idempotency (tenant_id, subject, scope, key, request_sha256, resource_id) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING resource_id",
    )
    .bind(who.tenant.as_str())
    .bind(&who.subject)
    .bind(scope)
    .bind(key)
    .bind(fingerprint)
    .bind(fresh)
    .fetch_optional(pool)
    .await?;
    if let Some(id) = inserted {
        return Ok(Claim::New(id));
    }
    let (sha, id): (String, uuid::Uuid) = sqlx::query_as(
        "SELECT request_sha256, resource_id FROM api_idempotency \
         WHERE tenant_id = $1 AND subject = $2 AND scope = $3 AND key = $4",
    )
    .bind(who.tenant.as_str())
    .bind(&who.subject)
    .bind(scope)
    .bind(key)
    .fetch_one(pool)
    .await?;
    if sha != fingerprint {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "this Idempotency-Key was already used with a different request body",
        ));
    }
    Ok(Claim::Replay(id))
}
