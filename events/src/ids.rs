//! Typed identifiers. Ids are parsed at the edge and never travel as bare strings or UUIDs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("tenant id must be 1 to 64 characters from [a-z0-9-], got {0:?}")]
    Tenant(String),
    #[error("{kind} must be a UUID, got {value:?}")]
    Uuid { kind: &'static str, value: String },
}

/// A tenant: an opaque string of 1–64 characters from `[a-z0-9-]` (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let ok = (1..=64).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(IdError::Tenant(value.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl FromStr for TenantId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! uuid_id {
    ($name:ident, $kind:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new time-ordered (v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn parse(value: &str) -> Result<Self, IdError> {
                Uuid::parse_str(value).map(Self).map_err(|_| IdError::Uuid {
                    kind: $kind,
                    value: value.to_owned(),
                })
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(JobId, "job id", "A processing job.");
uuid_id!(SlideId, "slide id", "An uploaded whole-slide image.");
uuid_id!(EventId, "event id", "One stored event; UUIDv7, made in Rust.");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_validated() {
        assert!(TenantId::parse("lab-1").is_ok());
        assert!(TenantId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "Lab", "lab_1", "lab 1", "läb", &"a".repeat(65)] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} accepted");
        }
        let err = serde_json::from_str::<TenantId>("\"UPPER\"").unwrap_err();
        assert!(err.to_string().contains("tenant id"));
    }

    #[test]
    fn uuid_ids_parse_and_refuse() {
        let id = JobId::new();
        assert_eq!(JobId::parse(&id.to_string()).unwrap(), id);
        assert_eq!(id.0.get_version_num(), 7);
        let err = SlideId::parse("nope").unwrap_err();
        assert_eq!(err.to_string(), "slide id must be a UUID, got \"nope\"");
    }
}
