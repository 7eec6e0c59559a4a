//! Event metadata (DESIGN §3): who acted, and how the event relates to the request and to
//! other events. cqrs-es carries metadata as a flat `HashMap<String, String>` from the command
//! to the repository; [`CommandContext`] writes that map and [`Metadata::from_cqrs`] reads it
//! back, so a missing or malformed field is refused before anything is stored.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::TenantId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActorKind {
    User,
    Worker,
    System,
}

impl fmt::Display for ActorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::User => "user",
            Self::Worker => "worker",
            Self::System => "system",
        })
    }
}

impl std::str::FromStr for ActorKind {
    type Err = MetadataError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Self::User),
            "worker" => Ok(Self::Worker),
            "system" => Ok(Self::System),
            other => Err(MetadataError::Invalid("actor.kind", other.to_owned())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub kind: ActorKind,
    pub id: String,
}

impl Actor {
    pub fn user(id: impl Into<String>) -> Self {
        Self {
            kind: ActorKind::User,
            id: id.into(),
        }
    }
    pub fn worker(id: impl Into<String>) -> Self {
        Self {
            kind: ActorKind::Worker,
            id: id.into(),
        }
    }
    pub fn system(id: impl Into<String>) -> Self {
        Self {
            kind: ActorKind::System,
            id: id.into(),
        }
    }
}

/// The metadata stored with every event. Field order is the serialised order, and the
/// serialised bytes are what the hash covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub actor: Actor,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("event metadata lacks {0}")]
    Missing(&'static str),
    #[error("event metadata has an invalid {0}: {1:?}")]
    Invalid(&'static str, String),
}

/// Who issues a command, for which tenant, within which request. Every command that reaches
/// the event store carries one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandContext {
    pub tenant: TenantId,
    pub actor: Actor,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub traceparent: String,
    pub idempotency_key: Option<String>,
}

const K_TENANT: &str = "tenant_id";
const K_ACTOR_KIND: &str = "actor.kind";
const K_ACTOR_ID: &str = "actor.id";
const K_CORRELATION: &str = "correlation_id";
const K_CAUSATION: &str = "causation_id";
const K_TRACEPARENT: &str = "traceparent";
const K_IDEMPOTENCY: &str = "idempotency_key";

impl CommandContext {
    /// A context that starts a new correlation (a command with no cause but its request).
    pub fn new(tenant: TenantId, actor: Actor) -> Self {
        let id = Uuid::now_v7();
        Self {
            tenant,
            actor,
            correlation_id: id,
            causation_id: id,
            traceparent: new_traceparent(),
            idempotency_key: None,
        }
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The flat map that cqrs-es hands to the event repository.
    pub fn to_cqrs(&self) -> HashMap<String, String> {
        let mut m = HashMap::with_capacity(7);
        m.insert(K_TENANT.into(), self.tenant.as_str().into());
        m.insert(K_ACTOR_KIND.into(), self.actor.kind.to_string());
        m.insert(K_ACTOR_ID.into(), self.actor.id.clone());
        m.insert(K_CORRELATION.into(), self.correlation_id.to_string());
        m.insert(K_CAUSATION.into(), self.causation_id.to_string());
        m.insert(K_TRACEPARENT.into(), self.traceparent.clone());
        if let Some(k) = &self.idempotency_key {
            m.insert(K_IDEMPOTENCY.into(), k.clone());
        }
        m
    }
}

impl Metadata {
    /// The flat map cqrs-es expects when it loads events back into envelopes.
    pub fn to_cqrs(&self, tenant: &TenantId) -> HashMap<String, String> {
        CommandContext {
            tenant: tenant.clone(),
            actor: self.actor.clone(),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            traceparent: self.traceparent.clone(),
            idempotency_key: self.idempotency_key.clone(),
        }
        .to_cqrs()
    }

    /// Reads the map written by [`CommandContext::to_cqrs`], as cqrs-es serialised it.
    pub fn from_cqrs(value: &serde_json::Value) -> Result<(TenantId, Self), MetadataError> {
        let get = |k: &'static str| -> Result<&str, MetadataError> {
            value.get(k).and_then(|v| v.as_str()).ok_or(MetadataError::Missing(k))
        };
        let uuid = |k: &'static str| -> Result<Uuid, MetadataError> {
            let s = get(k)?;
            Uuid::parse_str(s).map_err(|_| MetadataError::Invalid(k, s.to_owned()))
        };
        let tenant = TenantId::parse(get(K_TENANT)?).map_err(|e| MetadataError::Invalid(K_TENANT, e.to_string()))?;
        let actor = Actor {
            kind: get(K_ACTOR_KIND)?.parse()?,
            id: get(K_ACTOR_ID)?.to_owned(),
        };
        if actor.id.is_empty() {
            return Err(MetadataError::Missing(K_ACTOR_ID));
        }
        let traceparent = get(K_TRACEPARENT)?;
        if !is_traceparent(traceparent) {
            return Err(MetadataError::Invalid(K_TRACEPARENT, traceparent.to_owned()));
        }
        Ok((
            tenant,
            Self {
                actor,
                correlation_id: uuid(K_CORRELATION)?,
                causation_id: uuid(K_CAUSATION)?,
                traceparent: traceparent.to_owned(),
                idempotency_key: value.get(K_IDEMPOTENCY).and_then(|v| v.as_str()).map(str::to_owned),
            },
        ))
    }
}

/// A fresh W3C `traceparent` (version 00, sampled).
pub fn new_traceparent() -> String {
    let mut b = [0u8; 24];
    getrandom::getrandom(&mut b).expect("the operating system's random source failed");
    format!("00-{}-{}-01", hex::encode(&b[..16]), hex::encode(&b[16..]))
}

fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 4
        && [2usize, 32, 16, 2]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_round_trips_through_the_cqrs_map() {
        let ctx = CommandContext::new(TenantId::parse("lab").unwrap(), Actor::user("u-1")).with_idempotency_key("k1");
        let value = serde_json::to_value(ctx.to_cqrs()).unwrap();
        let (tenant, md) = Metadata::from_cqrs(&value).unwrap();
        assert_eq!(tenant.as_str(), "lab");
        assert_eq!(md.actor, Actor::user("u-1"));
        assert_eq!(md.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(md.correlation_id, ctx.correlation_id);
    }

    #[test]
    fn missing_or_bad_fields_are_refused() {
        let ctx = CommandContext::new(TenantId::parse("lab").unwrap(), Actor::system("bench"));
        let mut map = ctx.to_cqrs();
        map.remove("tenant_id");
        let err = Metadata::from_cqrs(&serde_json::to_value(&map).unwrap()).unwrap_err();
        assert_eq!(err, MetadataError::Missing("tenant_id"));
        let mut map = ctx.to_cqrs();
        map.insert("traceparent".into(), "garbage".into());
        assert!(Metadata::from_cqrs(&serde_json::to_value(&map).unwrap()).is_err());
        assert!(Metadata::from_cqrs(&serde_json::json!({})).is_err());
    }
}
