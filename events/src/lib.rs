//! `mira-events` is the contract every other part of Mira agrees on: the typed ids, the
//! envelope and metadata that wrap every stored event, the versioned Slide and Job event
//! enums, the canonical bytes that the audit hash chain covers, the sealing of fields that can
//! carry patient data, and the upcasters that read old event versions.
//!
//! Nothing here does I/O beyond the local keyring. The event store (`mira-eventlog`) writes
//! what this crate defines; the aggregates (`mira-aggregates`) decide which events happen.
//!
//! The canonical encoding is documented in `docs/audit/canonical-bytes.md` and pinned by the
//! published vectors in `docs/audit/test-vectors.json`.

pub mod canonical;
pub mod ids;
pub mod job;
pub mod metadata;
pub mod params;
pub mod seal;
pub mod slide;
pub mod upcast;

pub use canonical::{chain_hash, CanonicalEvent, Hash32, ZERO_HASH};
pub use ids::{EventId, IdError, JobId, SlideId, TenantId};
pub use job::{JobEvent, Priority, Usage};
pub use metadata::{Actor, ActorKind, CommandContext, Metadata, MetadataError};
pub use params::{JobKind, JobSpec, ParamsError};
pub use seal::{Keyring, KeyringError, LocalKeyring, Sealed};
pub use slide::{SlideEvent, SlideLevel, SlideMetadata};
