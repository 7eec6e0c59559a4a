//! The read-model rows, each defined once. A view type is at the same time:
//!
//! * the row of its table in `rm` (written by the projector, read by the query layer): rows
//!   travel as JSON, `to_jsonb(row)` one way and `jsonb_populate_recordset` the other, so the
//!   column list is the type's fields and nothing else;
//! * the API's JSON for that entity (the gateway serialises the view as it is);
//! * the OpenAPI schema of that JSON (`utoipa::ToSchema`).
//!
//! A column the API does not show (the tenant, the aggregate state, the sequence guard) is
//! written through [`Stored`], beside the view.
//!
//! Adding a column: a migration that adds it to `rm` and to what `mira_create_read_models`
//! makes (see migration 0009), the value in the aggregate if it is new, and a field with its
//! line in `of` here.

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use mira_aggregates::{Job, JobStatus, Slide, SlideStatus};
use mira_events::{JobEvent, Priority, Sealed, SlideEvent};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A read-model table: its name and key columns.
pub trait Table: Serialize + serde::de::DeserializeOwned {
    const TABLE: &'static str;
    /// The primary key's columns, as `ON CONFLICT` names them.
    const KEY: &'static str;
}

/// The event a view is made after: the actor (who becomes the submitter or registrant on the
/// first event), its time and its log position.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    pub actor: &'a str,
    pub time: DateTime<Utc>,
    pub position: i64,
}

/// A read-model entity, folded from its aggregate's events.
pub trait Entity: Table + Send + Sync + Unpin + 'static {
    type State: Aggregate + Default + Serialize + serde::de::DeserializeOwned + Send + Sync + Unpin + 'static;
    fn id(&self) -> uuid::Uuid;
    /// Whether `event` may start a row.
    fn first(event: &<Self::State as Aggregate>::Event) -> bool;
    /// The view of `state` after the event `at`; `before` is the view before it, `None` for the
    /// first event.
    fn of(state: &Self::State, id: uuid::Uuid, before: Option<&Self>, at: &At) -> Result<Self, serde_json::Error>;
    /// Columns of the table the API does not show, set when the row is made.
    fn hidden(_state: &Self::State) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
}

/// How far a running attempt has come, in tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    pub done: i64,
    pub total: i64,
}

/// A job: one row of `rm.jobs`, and `GET /api/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = Job)]
pub struct JobView {
    pub job_id: uuid::Uuid,
    pub slide_id: uuid::Uuid,
    /// One of the job kinds (`JobSpec`), as submitted.
    pub kind: String,
    /// The kind's parameters, every default filled in.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    #[schema(inline)]
    pub status: JobStatus,
    pub attempt: i32,
    pub max_attempts: i32,
    /// `stat` or `routine`. A STAT job is taken before every routine one waiting. Routine
    /// in a row written before the column existed.
    #[schema(inline)]
    #[serde(default)]
    pub priority: Priority,
    pub worker_id: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    #[schema(inline)]
    pub progress: Option<Progress>,
    pub failure: Option<String>,
    pub manifest_key: Option<String>,
    pub manifest_sha256: Option<String>,
    pub submitted_by: String,
    pub submitted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The log position of the last event applied to this job. Not in the API's schema: the
    /// API never shows it (`gateway::api::public::public_view`; ADR 0020).
    #[schema(ignore)]
    pub position: i64,
}

impl Table for JobView {
    const TABLE: &'static str = "jobs";
    const KEY: &'static str = "job_id";
}

impl Entity for JobView {
    type State = Job;

    fn id(&self) -> uuid::Uuid {
        self.job_id
    }

    fn first(event: &JobEvent) -> bool {
        matches!(event, JobEvent::JobSubmitted { .. })
    }

    fn of(job: &Job, id: uuid::Uuid, before: Option<&Self>, at: &At) -> Result<Self, serde_json::Error> {
        Ok(Self {
            job_id: id,
            slide_id: job.slide_id.map(|s| s.as_uuid()).unwrap_or_default(),
            kind: job.spec.as_ref().map(|s| s.kind_name().to_owned()).unwrap_or_default(),
            params: job.spec.as_ref().map(|s| s.params()).unwrap_or_default(),
            status: job.status,
            attempt: job.attempt as i32,
            max_attempts: job.max_attempts as i32,
            priority: job.priority,
            worker_id: job.worker_id.clone(),
            lease_until: job.lease_until,
            progress: job.progress.map(|(done, total)| Progress {
                done: done as i64,
                total: total as i64,
            }),
            failure: job.failure.clone(),
            manifest_key: job.manifest_key.clone(),
            manifest_sha256: job.manifest_sha256.clone(),
            submitted_by: before.map_or_else(|| at.actor.to_owned(), |b| b.submitted_by.clone()),
            submitted_at: before.map_or(at.time, |b| b.submitted_at),
            updated_at: at.time,
            position: at.position,
        })
    }
}

/// A slide's display name. The read model keeps it sealed, as the log does; the gateway opens
/// it for the API, which shows the name or `null` (once its subject is erased).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SlideName {
    Sealed(Sealed),
    Open(Option<String>),
}

/// A slide: one row of `rm.slides`, and `GET /api/slides/{id}` once its name is opened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = Slide)]
pub struct SlideView {
    pub slide_id: uuid::Uuid,
    #[schema(inline)]
    pub status: SlideStatus,
    #[schema(value_type = Option<String>)]
    pub name: SlideName,
    pub size_bytes: i64,
    pub content_type: String,
    /// What the worker read from the slide (dimensions, levels, vendor), once verified.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    pub rejection: Option<String>,
    pub registered_by: String,
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The log position of the last event applied to this slide. Not in the API's schema: the
    /// API never shows it (`gateway::api::public::public_view`; ADR 0020).
    #[schema(ignore)]
    pub position: i64,
}

impl Table for SlideView {
    const TABLE: &'static str = "slides";
    const KEY: &'static str = "slide_id";
}

impl Entity for SlideView {
    type State = Slide;

    fn id(&self) -> uuid::Uuid {
        self.slide_id
    }

    fn first(event: &SlideEvent) -> bool {
        matches!(event, SlideEvent::SlideRegistered { .. })
    }

    fn of(slide: &Slide, id: uuid::Uuid, before: Option<&Self>, at: &At) -> Result<Self, serde_json::Error> {
        Ok(Self {
            slide_id: id,
            status: slide.status,
            name: match &slide.name {
                Some(sealed) => SlideName::Sealed(sealed.clone()),
                None => SlideName::Open(None),
            },
            size_bytes: slide.size_bytes as i64,
            content_type: slide.content_type.clone(),
            metadata: slide.metadata.as_ref().map(serde_json::to_value).transpose()?,
            rejection: slide.rejection.clone(),
            registered_by: before.map_or_else(|| at.actor.to_owned(), |b| b.registered_by.clone()),
            registered_at: before.map_or(at.time, |b| b.registered_at),
            updated_at: at.time,
            position: at.position,
        })
    }

    /// The slide's object key.
    fn hidden(slide: &Slide) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::from_iter([("object_key".to_owned(), slide.object_key.clone().into())])
    }
}

/// One event of a job's history: one row of `rm.job_timeline`, and an item of
/// `GET /api/jobs/{id}/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TimelineEntry {
    pub sequence: i64,
    pub event_id: uuid::Uuid,
    pub event_type: String,
    pub actor_kind: String,
    pub actor_id: String,
    pub recorded_at: DateTime<Utc>,
    /// The event's hash in the log's chain, hex.
    pub hash: String,
    pub position: i64,
}

impl Table for TimelineEntry {
    const TABLE: &'static str = "job_timeline";
    const KEY: &'static str = "job_id, sequence";
}

/// A timeline row as stored: the entry, its job and tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredTimelineEntry {
    #[serde(flatten)]
    pub entry: TimelineEntry,
    pub job_id: uuid::Uuid,
    pub tenant_id: String,
}

/// A row as stored: the view and the columns the API does not show.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored<V, S> {
    #[serde(flatten)]
    pub view: V,
    pub tenant_id: String,
    /// The aggregate's state after `last_sequence`: what the next event is applied to.
    pub state: S,
    /// The stream sequence applied last; an event at or below it was applied already.
    pub last_sequence: i64,
    /// Columns of this table only (the slide's object key).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A stored job row.
pub type StoredJob = Stored<JobView, Job>;
/// A stored slide row.
pub type StoredSlide = Stored<SlideView, Slide>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slide_name_reads_back_sealed_or_open() {
        let open: SlideName = serde_json::from_value(serde_json::json!(null)).unwrap();
        assert_eq!(open, SlideName::Open(None));
        let open: SlideName = serde_json::from_value(serde_json::json!("biopsy")).unwrap();
        assert_eq!(open, SlideName::Open(Some("biopsy".into())));
    }
}
