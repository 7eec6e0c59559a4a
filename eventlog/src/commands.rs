//! The command path: cqrs-es frameworks for the Slide and Job aggregates over the event log,
//! one per tenant (the repository only sees that tenant's streams).

use std::sync::Arc;

use crate::{EventLog, PgEventRepository};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateError, CqrsFramework};
use mira_aggregates::{Job, JobCommand, JobError, Slide, SlideCommand, SlideError, SlideServices};
use mira_events::{CommandContext, JobId, Keyring, SlideId, TenantId};

pub type JobCqrs = CqrsFramework<Job, PersistedEventStore<PgEventRepository, Job>>;
pub type SlideCqrs = CqrsFramework<Slide, PersistedEventStore<PgEventRepository, Slide>>;

/// Sends commands into the log. Cheap to clone.
#[derive(Clone)]
pub struct Commands {
    log: EventLog,
    keyring: Arc<dyn Keyring>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Commands")
    }
}

fn store<A: cqrs_es::Aggregate>(log: &EventLog, ctx: &CommandContext) -> PersistedEventStore<PgEventRepository, A> {
    PersistedEventStore::new_event_store(PgEventRepository::new(log.clone(), ctx.tenant.clone()))
        .with_upcasters(mira_events::upcast::upcasters())
}

async fn load<A: cqrs_es::Aggregate>(
    log: &EventLog,
    tenant: &TenantId,
    id: &str,
) -> Result<Option<A>, AggregateError<A::Error>> {
    use cqrs_es::EventStore;
    let store: PersistedEventStore<PgEventRepository, A> =
        PersistedEventStore::new_event_store(PgEventRepository::new(log.clone(), tenant.clone()))
            .with_upcasters(mira_events::upcast::upcasters());
    let ctx = store.load_aggregate(id).await?;
    Ok((ctx.current_sequence > 0).then_some(ctx.aggregate))
}

impl Commands {
    pub fn new(log: EventLog, keyring: Arc<dyn Keyring>) -> Self {
        Self { log, keyring }
    }

    pub fn log(&self) -> &EventLog {
        &self.log
    }

    #[tracing::instrument(name = "command.job", skip_all, fields(tenant = %ctx.tenant.as_str(), job_id = %id))]
    pub async fn job(
        &self,
        ctx: &CommandContext,
        id: JobId,
        command: JobCommand,
    ) -> Result<(), AggregateError<JobError>> {
        command
            .check_scope(&ctx.tenant, id)
            .map_err(AggregateError::UserError)?;
        let cqrs: JobCqrs = CqrsFramework::new(store(&self.log, ctx), vec![], ());
        let (t, label) = (mira_telemetry::prom::Timer::start(), command.label());
        let r = cqrs
            .execute_with_metadata(&id.to_string(), command, ctx.to_cqrs())
            .await;
        record(t, label, &r);
        r
    }

    /// The slide's current state, or `None` when the tenant has no such slide.
    pub async fn load_slide(
        &self,
        tenant: &TenantId,
        id: SlideId,
    ) -> Result<Option<Slide>, AggregateError<SlideError>> {
        load(&self.log, tenant, &id.to_string()).await
    }

    /// The job's current state, or `None` when the tenant has no such job.
    pub async fn load_job(&self, tenant: &TenantId, id: JobId) -> Result<Option<Job>, AggregateError<JobError>> {
        load(&self.log, tenant, &id.to_string()).await
    }

    #[tracing::instrument(name = "command.slide", skip_all, fields(tenant = %ctx.tenant.as_str(), slide_id = %id))]
    pub async fn slide(
        &self,
        ctx: &CommandContext,
        id: SlideId,
        command: SlideCommand,
    ) -> Result<(), AggregateError<SlideError>> {
        let services = SlideServices {
            keyring: self.keyring.clone(),
        };
        let cqrs: SlideCqrs = CqrsFramework::new(store(&self.log, ctx), vec![], services);
        let (t, label) = (mira_telemetry::prom::Timer::start(), command.label());
        let r = cqrs
            .execute_with_metadata(&id.to_string(), command, ctx.to_cqrs())
            .await;
        record(t, label, &r);
        r
    }
}

/// `mira_command_seconds{command,outcome}`: `ok`, `rejected` (the aggregate refused it),
/// `conflict` (another writer got there first) or `error` (the store failed).
fn record<E: std::error::Error>(
    t: mira_telemetry::prom::Timer,
    command: &'static str,
    r: &Result<(), AggregateError<E>>,
) {
    let outcome = match r {
        Ok(()) => "ok",
        Err(AggregateError::UserError(_)) => "rejected",
        Err(AggregateError::AggregateConflict) => "conflict",
        Err(_) => "error",
    };
    t.record(metrics::histogram!("mira_command_seconds", "command" => command, "outcome" => outcome));
}
