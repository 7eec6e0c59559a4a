//! Each background role started one way, wherever it runs: beside the API (`mira serve --with`
//! or `Roles__Enabled`, and `mira dev`), or alone (`mira relay`, `mira projector`, `mira
//! handlers`). The worker's private relay takes its configuration from the same
//! [`Settings::relay_config`].

use std::sync::Arc;

use anyhow::Context;
use mira_bus::Bus;
use mira_eventlog::EventLog;
use mira_events::Keyring;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::commands::Commands;
pub use crate::config::Role;
use crate::config::{DbProcess, MessagingProvider, Settings};

/// What every role needs.
#[derive(Clone)]
pub struct RoleContext {
    pub settings: Settings,
    pub pool: PgPool,
    pub bus: Arc<dyn Bus>,
    pub keyring: Arc<dyn Keyring>,
    /// How the relay's witness fares, for `/metrics`.
    pub witness_health: Arc<mira_eventlog::checkpoint::WitnessHealth>,
}

/// The pool `process` works on: its own login's when `Database__Logins__…` names one, else the
/// process's (`DATABASE_URL`); either way that login must hold the process's group role.
async fn role_pool(ctx: &RoleContext, process: DbProcess) -> anyhow::Result<sqlx::PgPool> {
    if ctx.settings.database.logins.get(process).is_some() {
        crate::database::process_pool(&ctx.settings, process).await
    } else {
        crate::database::require_role(&ctx.pool, process, "DATABASE_URL").await?;
        Ok(ctx.pool.clone())
    }
}

/// Starts `role` on `tasks`, stopping on `shutdown`.
pub async fn spawn(
    role: Role,
    ctx: &RoleContext,
    tasks: &mut JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let stop = shutdown.clone();
    let pool = role_pool(ctx, role.process()).await?;
    let log = EventLog::new(pool.clone());
    match role {
        Role::Relay => {
            let mut checkpoints = mira_keys::checkpointer(&ctx.settings).await?;
            checkpoints.health = ctx.witness_health.clone();
            let in_memory = ctx.settings.messaging.provider == MessagingProvider::InMemory;
            // The in-memory bus has a relay (and cursor) of its own.
            let name = if in_memory { "in-memory" } else { "main" };
            let relay =
                mira_bus::relay::Relay::from_settings(&ctx.settings, name, log, ctx.bus.publisher(), Some(checkpoints));
            if in_memory {
                // Messages in flight when the last process stopped died with it, taken by a
                // consumer or not: publish everything again; consumers skip what they applied.
                relay.forget_cursor().await?;
            }
            let url = ctx.settings.login_url(DbProcess::Relay)?.0.to_owned();
            tasks.spawn(async move { relay.run(&url, stop).await.context("relay") });
            // The relay samples every queue's depth for /metrics (one process does: the relay's).
            let (bus, stop) = (ctx.bus.clone(), shutdown.clone());
            tasks.spawn(async move {
                sample_queues(bus, stop).await;
                Ok(())
            });
        }
        Role::Projector => {
            let consumer = mira_bus::consumer::Consumer::new(
                log,
                ctx.bus.queue(mira_bus::Group::Projections),
                Arc::new(mira_projections::Projector::default()),
                mira_bus::consumer::ConsumerConfig::for_group(mira_bus::Group::Projections),
            );
            tasks.spawn(async move { consumer.run(stop).await.context("projector") });
        }
        Role::Handlers => {
            let queue = ctx.bus.queue(mira_bus::Group::Handlers);
            let commands = Commands::new(log, ctx.keyring.clone());
            let slide_wait = ctx.settings.jobs.slide_wait();
            let jobs = &ctx.settings.jobs;
            let admission = mira_handlers::Admission {
                window: jobs.admission_window.max(1),
                max_per_tenant: (jobs.max_running_per_tenant > 0).then_some(jobs.max_running_per_tenant),
            };
            tasks.spawn(async move {
                mira_handlers::run(pool, commands, queue, slide_wait, admission, stop)
                    .await
                    .context("handlers")
            });
        }
    }
    tracing::info!(role = %role, "role started");
    Ok(())
}

/// How often the relay samples the queues' depths.
const QUEUE_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Sets `mira_queue_messages{queue,state}` (and the oldest message's age, where the bus tells
/// it) for every queue and dead-letter queue, now and every [`QUEUE_SAMPLE_EVERY`].
async fn sample_queues(bus: Arc<dyn Bus>, stop: CancellationToken) {
    let queues: Vec<_> = bus.groups().into_iter().map(|g| (g.suffix(), bus.queue(g))).collect();
    loop {
        for (name, q) in &queues {
            match q.depth().await {
                Ok(d) => {
                    let dlq = format!("{name}-dlq");
                    for (queue, state, n) in [
                        (*name, "visible", d.visible),
                        (*name, "in_flight", d.in_flight),
                        (*name, "delayed", d.delayed),
                        (dlq.as_str(), "visible", d.dead_letters),
                    ] {
                        metrics::gauge!("mira_queue_messages", "queue" => queue.to_owned(), "state" => state)
                            .set(n as f64);
                    }
                    if let Some(age) = d.oldest_age {
                        metrics::gauge!("mira_queue_oldest_message_age_seconds", "queue" => *name)
                            .set(age.as_secs_f64());
                    }
                }
                Err(e) => tracing::warn!(queue = name, error = %e, "cannot read the queue's depth"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(QUEUE_SAMPLE_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Runs `roles` alone in this process (no API) on SNS/SQS, until `shutdown`; a role that fails
/// stops the others.
pub async fn run_alone(settings: &Settings, roles: &[Role], shutdown: CancellationToken) -> anyhow::Result<()> {
    if settings.messaging.provider != MessagingProvider::Aws {
        anyhow::bail!(
            "Messaging__Provider is InMemory: the in-memory bus lives inside one process (`mira dev`); set Messaging__Provider=Aws to use SNS and SQS"
        );
    }
    let pool = mira_eventlog::db::connect_with(settings).await?;
    crate::database::warn_if_owner(&pool).await;
    let sdk = mira_bus::aws::sdk_config(settings.aws.region.as_deref()).await;
    let bus: Arc<dyn Bus> =
        Arc::new(mira_bus::aws::AwsBus::connect(&sdk, &mira_bus::Names::from_settings(settings), None).await?);
    let keyring = mira_keys::keyring(settings, &pool).await?;
    let ctx = RoleContext {
        settings: settings.clone(),
        pool,
        bus,
        keyring,
        witness_health: Default::default(),
    };
    let mut tasks = JoinSet::new();
    for r in roles {
        spawn(*r, &ctx, &mut tasks, &shutdown).await?;
    }
    // `--metrics-listen` (or `Api__MetricsListen`): this process's own series, and the relay's
    // witness.
    if let Some(at) = &settings.api.metrics_listen {
        mira_telemetry::prom::install();
        let l = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("--metrics-listen (Api__MetricsListen): cannot listen on {at}"))?;
        tracing::info!(addr = %l.local_addr()?, "serving /metrics");
        let (witness, relay, stop) = (
            ctx.witness_health.clone(),
            roles.contains(&Role::Relay),
            shutdown.clone(),
        );
        tasks.spawn(async move {
            let refresh = move || {
                if relay {
                    metrics::counter!("mira_witness_conflicts_total").absolute(witness.conflicts());
                    metrics::gauge!("mira_witness_last_success_timestamp_seconds")
                        .set(witness.last_success_unix() as f64);
                }
            };
            mira_telemetry::prom::serve(l, refresh, stop.cancelled_owned()).await;
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.context("a role panicked").and_then(|r| r) {
            shutdown.cancel();
            while tasks.join_next().await.is_some() {}
            return Err(e);
        }
    }
    Ok(())
}
