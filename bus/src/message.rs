//! The message every queue carries: one stored event with its full envelope, payload and
//! metadata as the exact stored text, hashes in hex. A consumer can re-check the event's hash
//! from the message alone, so a corrupted message is refused rather than applied.

use chrono::{DateTime, Utc};
use mira_eventlog::StoredEvent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMessage {
    pub v: u32,
    pub event_id: uuid::Uuid,
    pub tenant_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub global_position: i64,
    pub tx_id: i64,
    pub event_type: String,
    pub event_version: String,
    pub recorded_at: DateTime<Utc>,
    pub payload: String,
    pub metadata: String,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("message body is not an event message: {0}")]
    Malformed(String),
    #[error("event {0}: its hash does not match its fields")]
    HashMismatch(uuid::Uuid),
}

impl From<&StoredEvent> for EventMessage {
    fn from(e: &StoredEvent) -> Self {
        Self {
            v: 1,
            event_id: e.event_id,
            tenant_id: e.tenant_id.clone(),
            aggregate_type: e.aggregate_type.clone(),
            aggregate_id: e.aggregate_id.clone(),
            sequence: e.sequence,
            global_position: e.global_position,
            tx_id: e.tx_id,
            event_type: e.event_type.clone(),
            event_version: e.event_version.clone(),
            recorded_at: e.recorded_at,
            payload: e.payload.clone(),
            metadata: e.metadata.clone(),
            prev_hash: hex::encode(e.prev_hash),
            hash: hex::encode(e.hash),
        }
    }
}

fn hash32(s: &str, id: uuid::Uuid) -> Result<[u8; 32], MessageError> {
    hex::decode(s)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(MessageError::HashMismatch(id))
}

impl EventMessage {
    /// The value of a message attribute the relay publishes (`bus/topology.json`'s
    /// `message_attributes`), for the in-process filters.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        match name {
            "event_type" => Some(&self.event_type),
            "aggregate_type" => Some(&self.aggregate_type),
            "tenant_id" => Some(&self.tenant_id),
            // Routing STAT jobs to their own queue; other events carry none.
            "priority" => (self.aggregate_type == "Job" && self.event_type == "JobQueued")
                .then(|| self.queued_priority().as_str()),
            _ => None,
        }
    }

    /// A `JobQueued`'s priority, from its payload as the upcasters read it (version 1, and
    /// anything unreadable, is routine: the hash check comes before any use).
    fn queued_priority(&self) -> mira_events::Priority {
        serde_json::from_str::<serde_json::Value>(&self.payload)
            .ok()
            .and_then(|p| p.get("priority").and_then(|v| v.as_str()).and_then(|s| s.parse().ok()))
            .unwrap_or_default()
    }

    /// A message with placeholder fields, for tests of routing.
    #[cfg(test)]
    pub fn example() -> Self {
        Self {
            v: 1,
            event_id: uuid::Uuid::nil(),
            tenant_id: "lab".into(),
            aggregate_type: "Job".into(),
            aggregate_id: "j".into(),
            sequence: 1,
            global_position: 1,
            tx_id: 1,
            event_type: "JobSubmitted".into(),
            event_version: "1".into(),
            recorded_at: chrono::Utc::now(),
            payload: "{}".into(),
            metadata: "{}".into(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    pub fn to_body(&self) -> String {
        serde_json::to_string(self).expect("an event message always serialises")
    }

    /// Parses a body and checks the event's hash.
    pub fn from_body(body: &str) -> Result<Self, MessageError> {
        let m: Self = serde_json::from_str(body).map_err(|e| MessageError::Malformed(e.to_string()))?;
        let e = m.to_stored()?;
        if e.recompute_hash() != e.hash {
            return Err(MessageError::HashMismatch(m.event_id));
        }
        Ok(m)
    }

    pub fn to_stored(&self) -> Result<StoredEvent, MessageError> {
        Ok(StoredEvent {
            global_position: self.global_position,
            tx_id: self.tx_id,
            event_id: self.event_id,
            tenant_id: self.tenant_id.clone(),
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            sequence: self.sequence,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            recorded_at: self.recorded_at,
            payload: self.payload.clone(),
            metadata: self.metadata.clone(),
            prev_hash: hash32(&self.prev_hash, self.event_id)?,
            hash: hash32(&self.hash, self.event_id)?,
        })
    }

    /// SNS/SQS FIFO message group: one per aggregate, so each aggregate's events stay in order.
    pub fn group_id(&self) -> String {
        format!("{}:{}", self.aggregate_type, self.aggregate_id)
    }
}
