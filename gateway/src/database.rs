//! The database roles of a deployment (DESIGN §2, §4.3; ADR 0012): the owner, which `mira
//! migrate` connects as (`Database__MigrationUrl`), and one login per process (the API, the
//! relay, the projector, the handlers, the worker), which owns nothing and holds that process's
//! group role only.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;

use mira_config::{DbProcess, Settings};

/// A login `mira migrate` made sure of: its process, its name, whether a password was set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Login {
    pub process: &'static str,
    pub role: String,
    pub group: &'static str,
    pub password_set: bool,
}

/// What `mira migrate` does: applies the schema as the owner (`Database__MigrationUrl`, else
/// `DATABASE_URL`), then makes sure of each process's login (ADR 0012): the role its
/// `Database__Logins__…` URL names (else `mira_svc_<process>`), created when missing, holding
/// that process's group role only, with the URL's password when it has one. Returns the
/// migrations applied now and the logins.
pub async fn migrate(settings: &Settings) -> anyhow::Result<(Vec<i64>, Vec<Login>)> {
    let owner = mira_eventlog::db::connect(
        settings.migration_url()?,
        1,
        Duration::from_secs(settings.database.connect_timeout_seconds),
    )
    .await
    .context("Database__MigrationUrl (or DATABASE_URL)")?;
    let applied = mira_eventlog::migrate::run(&owner).await?;
    let logins = ensure_logins(settings, &owner).await?;
    owner.close().await;
    Ok((applied, logins))
}

/// After migrating as `owner`: each process's login, as [`migrate`] says.
pub async fn ensure_logins(settings: &Settings, owner: &PgPool) -> anyhow::Result<Vec<Login>> {
    let mut out = Vec::new();
    for p in DbProcess::ALL {
        let (role, password) = match settings.database.logins.get(p) {
            Some(url) => mira_eventlog::db::url_credentials(url.expose())
                .with_context(|| format!("{}: the URL names no user", p.setting()))?,
            None => (p.default_login(), None),
        };
        mira_eventlog::migrate::ensure_login(owner, &role, p.group_role(), password.as_deref())
            .await
            .with_context(|| {
                format!(
                    "cannot make {role} the {} login (holding {}): the migrating role needs CREATEROLE",
                    p.name(),
                    p.group_role()
                )
            })?;
        out.push(Login {
            process: p.name(),
            role,
            group: p.group_role(),
            password_set: password.is_some(),
        });
    }
    Ok(out)
}

/// A pool for `process`, on its login (`Database__Logins__…`, else `DATABASE_URL`), refused
/// unless that login holds the process's group role: a process on another's login would fail
/// later, one permission at a time, or work with grants it must not have.
pub async fn process_pool(settings: &Settings, process: DbProcess) -> anyhow::Result<PgPool> {
    let (pool, setting) = login_pool(settings, process).await?;
    require_role(&pool, process, setting).await?;
    Ok(pool)
}

/// A pool on `process`'s login, and the setting its URL came from.
async fn login_pool(settings: &Settings, process: DbProcess) -> anyhow::Result<(PgPool, &'static str)> {
    let (url, setting) = settings.login_url(process)?;
    let pool = mira_eventlog::db::connect(
        url,
        settings.database.max_connections,
        Duration::from_secs(settings.database.connect_timeout_seconds),
    )
    .await
    .with_context(|| setting.to_owned())?;
    Ok((pool, setting))
}

/// The API's pool: `Database__Logins__Api`, else `DATABASE_URL` (`mira serve`; the server
/// checks that its login holds mira_api).
pub async fn api_pool(settings: &Settings) -> anyhow::Result<PgPool> {
    let (pool, _) = login_pool(settings, DbProcess::Api).await?;
    warn_if_owner(&pool).await;
    Ok(pool)
}

/// Refuses a pool whose login does not hold `process`'s group role, naming the setting.
pub async fn require_role(pool: &PgPool, process: DbProcess, setting: &str) -> anyhow::Result<()> {
    if !mira_eventlog::migrate::holds_role(pool, process.group_role()).await? {
        let role = mira_eventlog::migrate::current_role(pool).await.unwrap_or_default();
        anyhow::bail!(
            "the {} connects as {role} ({setting}), which does not hold {}: set {} to the {} login ({} unless that setting names another; mira migrate creates it)",
            process.name(),
            process.group_role(),
            process.setting(),
            process.name(),
            process.default_login(),
        );
    }
    // A login that holds other processes' roles too (a shared login of an older deployment, a
    // superuser) works, with grants this process must not have: say so.
    let mut others = Vec::new();
    for p in DbProcess::ALL.into_iter().filter(|p| *p != process) {
        if mira_eventlog::migrate::holds_role(pool, p.group_role()).await? {
            others.push(p.group_role());
        }
    }
    if !others.is_empty() {
        let role = mira_eventlog::migrate::current_role(pool).await.unwrap_or_default();
        tracing::warn!(
            role,
            setting,
            others = others.join(","),
            "the {} connects as a login that also holds other processes' roles: give it its own login ({})",
            process.name(),
            process.setting()
        );
    }
    Ok(())
}

/// Logs a warning when the pool's role could switch the log's guards off (the owner, or a
/// superuser): the append-only guarantee then rests on that role's discipline alone.
pub async fn warn_if_owner(pool: &PgPool) {
    if let Ok(true) = mira_eventlog::migrate::can_disable_guards(pool).await {
        let role = mira_eventlog::migrate::current_role(pool).await.unwrap_or_default();
        tracing::warn!(
            role,
            "DATABASE_URL connects as a role that owns the event log or is a superuser: it could disable the log's guards; connect as the process's own login, which owns nothing (mira migrate, with Database__MigrationUrl as the owner, creates it: Database__Logins__…)"
        );
    }
}
