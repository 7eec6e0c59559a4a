//! The schema, applied by `mira migrate` (and by `mira dev`). Migrations are embedded in the
//! binary, applied in order under an advisory lock, each in its own transaction, and
//! recorded with a checksum; a changed migration that was already applied is an error.

use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};

/// (version, name, SQL), in order: every file of `migrations/`, embedded by `build.rs`.
pub const MIGRATIONS: &[(i64, &str, &str)] = include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// Every group role a process holds (migrations 0003, 0014), and `mira_app`, the operator's.
/// The tests' login holds them all; a deployment's logins hold one each ([`ensure_login`]).
pub const RUNTIME_ROLES: &[&str] = &[
    "mira_app",
    "mira_api",
    "mira_projector",
    "mira_relay",
    "mira_handlers",
    "mira_worker",
];

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Grants `roles` to `login` (the tests' login, which plays every process).
pub async fn grant_runtime(owner: &PgPool, login: &str) -> Result<(), sqlx::Error> {
    let sql = format!("GRANT {} TO {}", RUNTIME_ROLES.join(", "), ident(login));
    sqlx::query(&sql).execute(owner).await?;
    Ok(())
}

/// Makes `login` a login role holding `group` (one process's grants), creating it when missing,
/// and sets its password when one is given. Run by the owner after migrating (`mira migrate`).
/// The password never reaches the server: its SCRAM-SHA-256 verifier is computed here, so no
/// statement text (`pg_stat_activity`, the server's log) shows it.
pub async fn ensure_login(owner: &PgPool, login: &str, group: &str, password: Option<&str>) -> Result<(), sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(login)
        .fetch_one(owner)
        .await?;
    if !exists {
        let create = format!(
            "DO $$ BEGIN CREATE ROLE {} LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
            ident(login)
        );
        sqlx::raw_sql(&create).execute(owner).await?;
    }
    let member: bool = sqlx::query_scalar("SELECT pg_has_role($1, $2, 'MEMBER')")
        .bind(login)
        .bind(group)
        .fetch_one(owner)
        .await?;
    if !member {
        sqlx::query(&format!("GRANT {} TO {}", ident(group), ident(login)))
            .execute(owner)
            .await?;
    }
    if let Some(pw) = password {
        // ALTER ROLE takes no parameters: the verifier as a literal (base64, `$`, `:` and
        // digits only, so nothing in it needs quoting).
        let verifier = scram_verifier(pw).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        sqlx::query(&format!("ALTER ROLE {} LOGIN PASSWORD '{verifier}'", ident(login)))
            .execute(owner)
            .await?;
    }
    Ok(())
}

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802, RFC 7677): 4096
/// iterations of PBKDF2-HMAC-SHA-256 over a random 16-byte salt.
pub fn scram_verifier(password: &str) -> Result<String, getrandom::Error> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt)?;
    Ok(scram_verifier_with(password, &salt, 4096))
}

fn scram_verifier_with(password: &str, salt: &[u8], iterations: u32) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    type H = Hmac<Sha256>;
    let mac = |key: &[u8], data: &[u8]| -> [u8; 32] {
        let mut m = H::new_from_slice(key).expect("HMAC takes any key length");
        m.update(data);
        m.finalize().into_bytes().into()
    };
    // PBKDF2, one block: U1 = HMAC(P, salt ‖ 1), Ui = HMAC(P, Ui-1), the result their XOR.
    let mut u = mac(password.as_bytes(), &[salt, &1u32.to_be_bytes()].concat());
    let mut salted = u;
    for _ in 1..iterations {
        u = mac(password.as_bytes(), &u);
        for (s, x) in salted.iter_mut().zip(u) {
            *s ^= x;
        }
    }
    let stored_key = Sha256::digest(mac(&salted, b"Client Key"));
    let server_key = mac(&salted, b"Server Key");
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key),
        b64.encode(server_key)
    )
}

#[cfg(test)]
mod scram_tests {
    /// The example of RFC 7677 §3: password "pencil", its salt, 4096 iterations. These keys
    /// give that exchange's ServerSignature (v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=),
    /// checked with Python's hashlib.pbkdf2_hmac and hmac.
    #[test]
    fn the_verifier_matches_rfc_7677() {
        use base64::Engine;
        let salt = base64::engine::general_purpose::STANDARD
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .unwrap();
        let v = super::scram_verifier_with("pencil", &salt, 4096);
        assert_eq!(
            v,
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }
}

/// Whether the pool's login holds `group` (a member that may use its privileges).
pub async fn holds_role(pool: &PgPool, group: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_has_role(current_user, $1, 'USAGE')")
        .bind(group)
        .fetch_one(pool)
        .await
}

/// The role a pool connects as.
pub async fn current_role(pool: &PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT current_user::text").fetch_one(pool).await
}

/// Whether the pool's role could switch the log's guards off: a superuser, or a member of the
/// role that owns `events`.
pub async fn can_disable_guards(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false) \
         OR coalesce((SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c \
                      WHERE c.oid = to_regclass('public.events')), false)",
    )
    .fetch_one(pool)
    .await
}

const LOCK_KEY: i64 = 0x6d69_7261_6d69_6772; // "miramigr"

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {version} ({name}) was changed after it was applied")]
    Changed { version: i64, name: String },
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i64,
        name: String,
        source: sqlx::Error,
    },
    #[error("database error while migrating: {0}")]
    Db(#[from] sqlx::Error),
}

/// Applies what is missing; returns the versions applied now.
pub async fn run(pool: &PgPool) -> Result<Vec<i64>, MigrateError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    let result = apply(&mut conn).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn apply(conn: &mut sqlx::PgConnection) -> Result<Vec<i64>, MigrateError> {
    // Only when missing: CREATE needs the owner's rights even when the table exists, and the
    // application's role may check that the schema is up to date.
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public.mira_schema_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS mira_schema_migrations (
            version bigint PRIMARY KEY,
            name text NOT NULL,
            checksum bytea NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .execute(&mut *conn)
        .await?;
    }
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        let checksum = Sha256::digest(sql.as_bytes()).to_vec();
        let existing = sqlx::query("SELECT checksum FROM mira_schema_migrations WHERE version = $1")
            .bind(version)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = existing {
            let stored: Vec<u8> = row.try_get("checksum")?;
            if stored != checksum {
                return Err(MigrateError::Changed {
                    version: *version,
                    name: name.to_string(),
                });
            }
            continue;
        }
        let failed = |source| MigrateError::Failed {
            version: *version,
            name: name.to_string(),
            source,
        };
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(failed)?;
        sqlx::query("INSERT INTO mira_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)")
            .bind(version)
            .bind(name)
            .bind(&checksum)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        applied.push(*version);
    }
    Ok(applied)
}
