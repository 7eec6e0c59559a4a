//! What several commands share: parsing flags, the pool and the bus from the settings, signal
//! handling, JSON output, and the verdict that makes a check exit 1.

use chrono::{DateTime, Utc};
use mira_gateway::config::{MessagingProvider, Settings};

pub fn parse_role(s: &str) -> Result<mira_gateway::roles::Role, String> {
    s.parse()
}

pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 instant ({e}), for example 2026-11-25T18:00:00Z"))
}

/// A failure that is a verdict, not an error.
#[derive(Debug)]
pub struct Verdict(pub String);

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Verdict {}

/// The application's pool (DATABASE_URL). Says so when its role could switch the log's guards
/// off: processes should connect as a role that owns nothing (Database__MigrationUrl is for
/// `mira migrate`).
pub async fn pool(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    let pool = mira_eventlog::db::connect_with(settings).await?;
    mira_gateway::database::warn_if_owner(&pool).await;
    Ok(pool)
}

pub async fn aws_config(settings: &Settings) -> aws_config::SdkConfig {
    mira_bus::aws::sdk_config(settings.aws.region.as_deref()).await
}

pub async fn aws_bus(settings: &Settings) -> anyhow::Result<mira_bus::aws::AwsBus> {
    if settings.messaging.provider != MessagingProvider::Aws {
        anyhow::bail!(
            "Messaging__Provider is InMemory: the in-memory bus lives inside one process (`mira dev`); set Messaging__Provider=Aws to use SNS and SQS"
        );
    }
    Ok(mira_bus::aws::AwsBus::connect(
        &aws_config(settings).await,
        &mira_bus::Names::from_settings(settings),
        None,
    )
    .await?)
}

/// Cancelled on SIGTERM or Ctrl-C, so work in hand can drain.
pub fn shutdown_on_signals() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    t.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    token
}

pub fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}
