//! cqrs-es's `PersistedEventRepository` over the event log (DESIGN §4.5).
//!
//! One repository serves one tenant: it reads only that tenant's streams and stamps that
//! tenant on what it writes. A command naming another tenant's aggregate therefore finds
//! nothing (`NotFound`), and creating over it is a conflict. Snapshots are not kept: streams
//! are short, and the log stays the only state.

use cqrs_es::persist::{PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot};
use cqrs_es::Aggregate;
use mira_events::{Metadata, TenantId};
use serde_json::Value;

use crate::store::{AppendError, EventLog, NewEvent, StoredEvent};

#[derive(Debug, Clone)]
pub struct PgEventRepository {
    log: EventLog,
    tenant: TenantId,
}

impl PgEventRepository {
    pub fn new(log: EventLog, tenant: TenantId) -> Self {
        Self { log, tenant }
    }
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

fn conn_err(e: sqlx::Error) -> PersistenceError {
    PersistenceError::ConnectionError(boxed(e))
}

/// Why a stored event cannot be read as its consumer expects. Names the event by its position.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event at position {position}: the tenant id {id:?} is invalid: {source}")]
    Tenant {
        position: i64,
        id: String,
        source: mira_events::IdError,
    },
    #[error("event at position {position}: the {aggregate} id {id:?} is invalid: {source}")]
    Id {
        position: i64,
        aggregate: String,
        id: String,
        source: mira_events::IdError,
    },
    #[error("event at position {position}: {event_type} (version {version}) does not read: {reason}")]
    Payload {
        position: i64,
        event_type: String,
        version: String,
        reason: String,
    },
}

impl StoredEvent {
    /// The payload, upcast to the current version and read as `E`: what every consumer of the
    /// log (projector, handlers, worker) does with an event.
    pub fn decode<E: serde::de::DeserializeOwned>(&self) -> Result<E, DecodeError> {
        let bad = |reason: String| DecodeError::Payload {
            position: self.global_position,
            event_type: self.event_type.clone(),
            version: self.event_version.clone(),
            reason,
        };
        let s = mira_events::upcast::upcast(to_serialized(self.clone()).map_err(|x| bad(x.to_string()))?);
        serde_json::from_value(s.payload).map_err(|x| bad(x.to_string()))
    }

    /// The tenant whose stream the event is in.
    pub fn tenant(&self) -> Result<TenantId, DecodeError> {
        TenantId::parse(&self.tenant_id).map_err(|source| DecodeError::Tenant {
            position: self.global_position,
            id: self.tenant_id.clone(),
            source,
        })
    }

    /// The aggregate's id, typed: `e.id::<JobId>()`.
    pub fn id<I: std::str::FromStr<Err = mira_events::IdError>>(&self) -> Result<I, DecodeError> {
        self.aggregate_id.parse().map_err(|source| DecodeError::Id {
            position: self.global_position,
            aggregate: self.aggregate_type.clone(),
            id: self.aggregate_id.clone(),
            source,
        })
    }
}

/// A stored event as cqrs-es wants it: the payload as JSON, and the metadata as its flat map.
/// Upcasting is left to the reader.
pub fn to_serialized(e: StoredEvent) -> Result<SerializedEvent, PersistenceError> {
    let payload: Value = serde_json::from_str(&e.payload)?;
    let metadata: Metadata = serde_json::from_str(&e.metadata)?;
    let tenant = TenantId::parse(&e.tenant_id).map_err(|x| PersistenceError::DeserializationError(boxed(x)))?;
    Ok(SerializedEvent::new(
        e.aggregate_id,
        e.sequence as usize,
        e.aggregate_type,
        e.event_type,
        e.event_version,
        payload,
        serde_json::to_value(metadata.to_cqrs(&tenant))?,
    ))
}

impl PgEventRepository {
    async fn read<A: Aggregate>(&self, id: &str, after: usize) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.log
            .read_stream(Some(&self.tenant), A::TYPE, id, after as i64)
            .await
            .map_err(conn_err)?
            .into_iter()
            .map(to_serialized)
            .collect()
    }

    fn stream_of(events: Vec<SerializedEvent>) -> ReplayStream {
        let (mut feed, stream) = ReplayStream::new(events.len().max(1));
        tokio::spawn(async move {
            for e in events {
                if feed.push(Ok(e)).await.is_err() {
                    break;
                }
            }
        });
        stream
    }
}

impl PersistedEventRepository for PgEventRepository {
    async fn get_events<A: Aggregate>(&self, aggregate_id: &str) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.read::<A>(aggregate_id, 0).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.read::<A>(aggregate_id, last_sequence).await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        _aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        Ok(None)
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        _snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut new = Vec::with_capacity(events.len());
        for e in events {
            let (tenant, metadata) =
                Metadata::from_cqrs(&e.metadata).map_err(|x| PersistenceError::UnknownError(boxed(x)))?;
            if tenant != self.tenant {
                return Err(PersistenceError::UnknownError(
                    format!(
                        "command metadata names tenant {tenant}, the repository serves {}",
                        self.tenant
                    )
                    .into(),
                ));
            }
            new.push(NewEvent {
                aggregate_type: e.aggregate_type.clone(),
                aggregate_id: e.aggregate_id.clone(),
                sequence: e.sequence as u64,
                event_type: e.event_type.clone(),
                event_version: e.event_version.clone(),
                payload: serde_json::to_string(&e.payload)?,
                metadata: serde_json::to_string(&metadata)?,
            });
        }
        match self.log.append(&self.tenant, &new).await {
            Ok(_) => Ok(()),
            Err(AppendError::Conflict { .. } | AppendError::TenantMismatch { .. }) => {
                Err(PersistenceError::OptimisticLockError)
            }
            Err(AppendError::Db(e) | AppendError::NotFirstWrite(e)) => Err(conn_err(e)),
        }
    }

    async fn stream_events<A: Aggregate>(&self, aggregate_id: &str) -> Result<ReplayStream, PersistenceError> {
        Ok(Self::stream_of(self.read::<A>(aggregate_id, 0).await?))
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        let sql = format!(
            "SELECT {} FROM events WHERE aggregate_type = $1 AND tenant_id = $2 \
             ORDER BY events.tx_id, events.global_position",
            crate::store::COLUMNS
        );
        let rows = sqlx::query(&sql)
            .bind(A::TYPE)
            .bind(self.tenant.as_str())
            .fetch_all(self.log.pool())
            .await
            .map_err(conn_err)?;
        let events = rows
            .iter()
            .map(|r| crate::store::from_row(r).map_err(conn_err).and_then(to_serialized))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::stream_of(events))
    }
}
