//! Connecting to PostgreSQL, and classifying its errors by SQLSTATE (never by message text).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
pub use sqlx::PgPool;

pub const UNIQUE_VIOLATION: &str = "23505";
pub const SERIALIZATION_FAILURE: &str = "40001";
/// Raised by `mira_register_appender()` and the log's insert guard (ADR 0010).
pub const NOT_IN_PREREQUISITE_STATE: &str = "55000";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    BadUrl(String),
    #[error("cannot connect to the database at {target}: {reason}")]
    Connect { target: String, reason: String },
}

/// A pool for `url`. Fails within `timeout` when the server is unreachable, with an error
/// that names the host and database but never the password.
/// A pool on `DATABASE_URL`, sized and timed out as `Database__*` say.
pub async fn connect_with(settings: &mira_config::Settings) -> Result<PgPool, DbError> {
    let url = settings.database_url().map_err(|e| DbError::BadUrl(e.to_string()))?;
    connect(
        url,
        settings.database.max_connections,
        Duration::from_secs(settings.database.connect_timeout_seconds),
    )
    .await
}

pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> Result<PgPool, DbError> {
    let opts: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::BadUrl(one_line(&e.to_string())))?;
    let target = format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("(default)")
    );
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_with(opts)
        .await
        .map_err(|e| DbError::Connect {
            target,
            reason: one_line(&e.to_string()),
        })
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// The violated constraint's name, for unique violations.
pub fn constraint(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.constraint().map(str::to_owned),
        _ => None,
    }
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The user and password a `postgres://` URL names, percent-decoded; `None` without a user.
pub fn url_credentials(url: &str) -> Option<(String, Option<String>)> {
    let (_, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (userinfo, None),
    };
    let user = percent_decode(user)?;
    if user.is_empty() {
        return None;
    }
    let password = match password {
        Some(p) => Some(percent_decode(p)?),
        None => None,
    };
    Some((user, password))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod url_tests {
    #[test]
    fn credentials_come_out_of_a_url_decoded() {
        assert_eq!(
            super::url_credentials("postgres://mira_svc_api:p%40ss%3Aw0rd@db.example:5432/mira?sslmode=require"),
            Some(("mira_svc_api".into(), Some("p@ss:w0rd".into())))
        );
        assert_eq!(
            super::url_credentials("postgresql://worker@127.0.0.1/mira"),
            Some(("worker".into(), None))
        );
        assert_eq!(super::url_credentials("postgres://127.0.0.1/mira"), None);
        assert_eq!(super::url_credentials("postgres://u:%zz@h/d"), None);
    }
}
