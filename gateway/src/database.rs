//! The two database roles of a deployment (DESIGN §2, §4.3; ADR 0012): the owner, which
//! `mira migrate` connects as (`Database__MigrationUrl`), and the login role every other
//! process connects as (`DATABASE_URL`), which owns nothing and holds the runtime roles.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;

use mira_config::Settings;

/// What `mira migrate` does: applies the schema as the owner (`Database__MigrationUrl`, else
/// `DATABASE_URL`), then grants the runtime roles to `DATABASE_URL`'s role when it is another.
/// Returns the migrations applied now and the role granted to.
pub async fn migrate(settings: &Settings) -> anyhow::Result<(Vec<i64>, Option<String>)> {
    let owner = mira_eventlog::db::connect(
        settings.migration_url()?,
        1,
        Duration::from_secs(settings.database.connect_timeout_seconds),
    )
    .await
    .context("Database__MigrationUrl (or DATABASE_URL)")?;
    let applied = mira_eventlog::migrate::run(&owner).await?;
    let granted = grant_runtime_roles(settings, &owner).await?;
    owner.close().await;
    Ok((applied, granted))
}

/// After migrating as `owner`: grants the runtime roles to `DATABASE_URL`'s role when that is
/// another role. Returns the role granted to, if any.
pub async fn grant_runtime_roles(settings: &Settings, owner: &PgPool) -> anyhow::Result<Option<String>> {
    let (Some(_), Ok(app_url)) = (&settings.database.migration_url, settings.database_url()) else {
        return Ok(None);
    };
    let app = mira_eventlog::db::connect(
        app_url,
        1,
        Duration::from_secs(settings.database.connect_timeout_seconds),
    )
    .await
    .context("DATABASE_URL (the application's role, which must exist and be able to log in)")?;
    let app_role = mira_eventlog::migrate::current_role(&app).await?;
    app.close().await;
    let owner_role = mira_eventlog::migrate::current_role(owner).await?;
    if app_role == owner_role {
        return Ok(None);
    }
    mira_eventlog::migrate::grant_runtime(owner, &app_role)
        .await
        .with_context(|| format!("cannot grant the runtime roles to {app_role}"))?;
    Ok(Some(app_role))
}

/// Logs a warning when the pool's role could switch the log's guards off (the owner, or a
/// superuser): the append-only guarantee then rests on that role's discipline alone.
pub async fn warn_if_owner(pool: &PgPool) {
    if let Ok(true) = mira_eventlog::migrate::can_disable_guards(pool).await {
        let role = mira_eventlog::migrate::current_role(pool).await.unwrap_or_default();
        tracing::warn!(
            role,
            "DATABASE_URL connects as a role that owns the event log or is a superuser: it could disable the log's guards; connect as a role that owns nothing (mira migrate, with Database__MigrationUrl as the owner, grants it what it needs)"
        );
    }
}
