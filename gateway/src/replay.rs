//! `mira audit replay`: an aggregate's state as of an instant, rebuilt from the log alone.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use mira_aggregates::{Job, Slide};
use mira_eventlog::StoredEvent;
use mira_events::{JobEvent, SlideEvent};
use serde::Serialize;
use sqlx::PgPool;

#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub tenant_id: String,
    /// The last sequence applied, and when it was recorded.
    pub sequence: i64,
    pub as_of_event: DateTime<Utc>,
    pub state: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("database error while replaying: {0}")]
    Db(#[from] sqlx::Error),
    #[error("event at position {position} does not load: {reason}")]
    Decode { position: i64, reason: String },
}

/// An aggregate being replayed.
enum Replaying {
    Job(Job),
    Slide(Slide),
}

fn decode<E: serde::de::DeserializeOwned>(e: &StoredEvent) -> Result<E, ReplayError> {
    e.decode().map_err(|x| ReplayError::Decode {
        position: e.global_position,
        reason: x.to_string(),
    })
}

/// Replays every Job and Slide (or only `aggregate_id`) up to and including `as_of`.
pub async fn replay(
    pool: &PgPool,
    as_of: DateTime<Utc>,
    aggregate_id: Option<&str>,
) -> Result<Vec<Replayed>, ReplayError> {
    let events = mira_eventlog::EventLog::new(pool.clone())
        .streams_as_of(&[Job::TYPE, Slide::TYPE], aggregate_id, as_of)
        .await?;
    let mut states: BTreeMap<(String, String), (Replaying, StoredEvent)> = BTreeMap::new();
    for e in events {
        let key = (e.aggregate_type.clone(), e.aggregate_id.clone());
        let entry = states.entry(key).or_insert_with(|| {
            let s = if e.aggregate_type == Job::TYPE {
                Replaying::Job(Job::default())
            } else {
                Replaying::Slide(Slide::default())
            };
            (s, e.clone())
        });
        match &mut entry.0 {
            Replaying::Job(j) => j.apply(decode::<JobEvent>(&e)?),
            Replaying::Slide(s) => s.apply(decode::<SlideEvent>(&e)?),
        }
        entry.1 = e;
    }
    Ok(states
        .into_values()
        .map(|(state, last)| Replayed {
            aggregate_type: last.aggregate_type.clone(),
            aggregate_id: last.aggregate_id.clone(),
            tenant_id: last.tenant_id.clone(),
            sequence: last.sequence,
            as_of_event: last.recorded_at,
            state: match state {
                Replaying::Job(j) => serde_json::to_value(j),
                Replaying::Slide(s) => serde_json::to_value(s),
            }
            .unwrap_or(serde_json::Value::Null),
        })
        .collect())
}
