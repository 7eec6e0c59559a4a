//! The `mira` binary end to end: bad input, migrate, audit verify/checkpoint/replay/export,
//! and the append benchmark, against a real PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use chrono::Utc;
use mira_aggregates::JobCommand;
use mira_eventlog::testing::{settle, TestDb};
use mira_eventlog::EventLog;
use mira_events::{Actor, CommandContext, JobId, LocalKeyring, SlideId, TenantId};
use mira_gateway::commands::Commands;

struct Env {
    dir: PathBuf,
    url: String,
    extra: Vec<(String, String)>,
}

impl Env {
    fn new(url: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mira-cli-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            dir,
            url: url.to_owned(),
            extra: Vec::new(),
        }
    }

    /// Settings for SNS/SQS on moto, with names no other test uses.
    fn on_moto(mut self, endpoint: &str) -> Self {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
        for (k, v) in [
            ("Messaging__Provider", "Aws".to_string()),
            ("AWS_ENDPOINT_URL", endpoint.to_string()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS__SNS__TopicName", format!("mira-c{tag}-events.fifo")),
            ("AWS__SQS__QueuePrefix", format!("mira-c{tag}-")),
        ] {
            self.extra.push((k.into(), v));
        }
        self
    }

    fn set(mut self, k: &str, v: &str) -> Self {
        self.extra.retain(|(key, _)| key != k);
        self.extra.push((k.into(), v.into()));
        self
    }

    fn unset(mut self, k: &str) -> Self {
        self.extra.retain(|(key, _)| key != k);
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mira"));
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &self.dir)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("DATABASE_URL", &self.url)
            .env("Database__ConnectTimeoutSeconds", "3")
            .env("Audit__SigningKeyFile", self.dir.join("audit.key"))
            .env("Keyring__LocalDir", self.dir.join("keyring"))
            .envs(
                (!self.extra.iter().any(|(k, _)| k == "Audit__WitnessBucket"))
                    .then(|| ("Audit__WitnessDir", self.dir.join("witness").display().to_string())),
            )
            .envs(self.extra.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir);
        c
    }

    fn mira(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `mira keys init`, as an operator runs it once.
    fn keys(self) -> Self {
        let out = self.mira(&["keys", "init"]);
        assert!(out.status.success(), "mira keys init: {}", stderr(&out));
        self
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn commands(db: &TestDb, dir: &Path) -> Commands {
    Commands::new(
        EventLog::new(db.pool.clone()),
        std::sync::Arc::new(LocalKeyring::init(dir.join("keyring")).unwrap().0),
    )
}

fn ctx() -> CommandContext {
    CommandContext::new(TenantId::parse("lab").unwrap(), Actor::user("pathologist-1"))
}

const SUBCOMMANDS: &[&[&str]] = &[
    &["migrate"],
    &["audit", "verify"],
    &["audit", "checkpoint"],
    &["audit", "new-epoch", "--reason", "restored"],
    &["audit", "replay", "--as-of", "2026-01-01T00:00:00Z"],
    &["audit", "export"],
    &["bench", "append", "--commands", "5"],
    &["bench", "fanout", "--events", "1", "--latency-events", "1"],
    &["relay"],
    &["dlq", "list"],
    &["dlq", "redrive"],
    &["projections", "status"],
    &["projections", "rebuild", "read_models"],
];

#[test]
fn a_wrong_or_unreachable_database_is_one_line_and_non_zero() {
    let admin = mira_eventlog::testing::admin_url();
    let wrong_db = format!("{}_does_not_exist", admin);
    for url in [
        "postgres://mira@127.0.0.1:1/mira",
        wrong_db.as_str(),
        "postgres://[::1",
        "mysql://nope",
    ] {
        let env = Env::new(url);
        // Keys and the witness exist, so every command gets as far as the database.
        mira_eventlog::AuditKey::init(&env.dir.join("audit.key")).unwrap();
        LocalKeyring::init(env.dir.join("keyring")).unwrap();
        std::fs::create_dir_all(env.dir.join("witness")).unwrap();
        for args in SUBCOMMANDS {
            let out = env.mira(args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{args:?} with {url}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{args:?} with {url}: {err}");
            assert!(err.starts_with("mira: "), "{args:?}: {err}");
            assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
        }
    }
}

#[test]
fn a_missing_database_url_names_the_setting() {
    let out = Command::new(env!("CARGO_BIN_EXE_mira"))
        .arg("migrate")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("DATABASE_URL"), "{}", stderr(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(["migrate"])
        .env_clear()
        .env("DATABASE_URL", "postgres://x@127.0.0.1:1/x")
        .env("Database__MaxConnections", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Database__MaxConnections"), "{}", stderr(&out));
}

#[tokio::test]
async fn migrate_is_idempotent_through_the_cli() {
    let db = TestDb::empty().await;
    let env = Env::new(&db.url);
    let first = env.mira(&["migrate", "--json"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let all: Vec<i64> = mira_eventlog::migrate::MIGRATIONS.iter().map(|m| m.0).collect();
    let v: serde_json::Value = serde_json::from_str(stdout(&first).trim()).unwrap();
    assert_eq!(v["applied"], serde_json::json!(all));
    assert_eq!(v["logins"].as_array().map(Vec::len), Some(5), "{v}");
    let again = env.mira(&["migrate"]);
    assert!(again.status.success());
    assert_eq!(stdout(&again).lines().next(), Some("schema is up to date"));
}

#[tokio::test]
async fn replay_returns_the_state_between_two_events() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url);
    let c = commands(&db, &env.dir);
    let id = JobId::new();
    let now = Utc::now();
    c.job(
        &ctx(),
        id,
        JobCommand::Submit {
            slide_id: SlideId::new(),
            spec: mira_events::JobSpec::Preprocess(Default::default()),
            max_attempts: 3,
            priority: mira_aggregates::Priority::Routine,
        },
    )
    .await
    .unwrap();
    c.job(&ctx(), id, JobCommand::Queue { now }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.job(
        &ctx(),
        id,
        JobCommand::Start {
            attempt: 1,
            worker_id: "w-7".into(),
            lease_until: now + chrono::Duration::minutes(5),
            now,
        },
    )
    .await
    .unwrap();
    let times: Vec<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT recorded_at FROM events WHERE aggregate_id = $1 ORDER BY sequence")
            .bind(id.to_string())
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(times.len(), 3);
    let between = times[1] + (times[2] - times[1]) / 2;
    assert!(between > times[1] && between < times[2]);
    let out = env.mira(&[
        "audit",
        "replay",
        "--as-of",
        &between.to_rfc3339(),
        "--aggregate",
        &id.to_string(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["sequence"], 2);
    assert_eq!(v["state"]["status"], "queued");
    assert_eq!(v["state"]["attempt"], 1);
    assert_eq!(v["state"]["worker_id"], serde_json::Value::Null);
    // After the third event the job is running, by worker w-7.
    let out = env.mira(&[
        "audit",
        "replay",
        "--as-of",
        &Utc::now().to_rfc3339(),
        "--aggregate",
        &id.to_string(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        (v["state"]["status"].as_str(), v["state"]["worker_id"].as_str()),
        (Some("running"), Some("w-7"))
    );
    // Before the first event there is nothing.
    let before = (times[0] - chrono::Duration::seconds(1)).to_rfc3339();
    let out = env.mira(&["audit", "replay", "--as-of", &before, "--aggregate", &id.to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let out = env.mira(&["audit", "replay", "--as-of", "yesterday"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("RFC 3339"));
}

fn python() -> String {
    std::env::var("MIRA_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test]
async fn verify_checkpoint_and_an_export_that_reverifies_outside_mira() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url).keys();
    let c = commands(&db, &env.dir);
    for _ in 0..3 {
        let id = JobId::new();
        c.job(
            &ctx(),
            id,
            JobCommand::Submit {
                slide_id: SlideId::new(),
                spec: mira_events::JobSpec::Preprocess(Default::default()),
                max_attempts: 3,
                priority: mira_aggregates::Priority::Routine,
            },
        )
        .await
        .unwrap();
        c.job(&ctx(), id, JobCommand::Queue { now: Utc::now() }).await.unwrap();
    }
    // A slide, so the export also carries sealed patient data.
    let slide = SlideId::new();
    c.slide(
        &ctx(),
        slide,
        mira_aggregates::SlideCommand::Register {
            slide_id: slide,
            name: "Jane Roe, left breast".into(),
            file_name: Some("roe.svs".into()),
            size_bytes: 42,
            content_type: "image/tiff".into(),
            sha256: None,
            object_key: format!("uploads/lab/{slide}"),
        },
    )
    .await
    .unwrap();
    settle(&db.pool).await;
    let ck = env.mira(&["audit", "checkpoint", "--json"]);
    assert!(ck.status.success(), "{}", stderr(&ck));
    let info: serde_json::Value = serde_json::from_str(stdout(&ck).trim()).unwrap();
    assert_eq!(info["event_count"], 7);
    let ok = env.mira(&["audit", "verify"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(
        stdout(&ok).contains("7 events") && stdout(&ok).contains("events/s"),
        "{}",
        stdout(&ok)
    );

    let export = env.dir.join("export.jsonl");
    let out = env.mira(&["audit", "export", "--out", export.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(
        !text.contains("Jane Roe") && !text.contains("roe.svs"),
        "patient data leaked into the export"
    );
    let pubkey = env.dir.join("audit.key.pub");
    let check = |path: &Path| {
        Command::new(python())
            .arg("../tools/verify_export.py")
            .arg(path)
            .arg(&pubkey)
            .output()
            .unwrap()
    };
    let good = check(&export);
    assert!(good.status.success(), "{}{}", stdout(&good), stderr(&good));
    assert!(
        stdout(&good).contains("OK: 7 events, 1 checkpoints"),
        "{}",
        stdout(&good)
    );

    // The outside verifier catches a changed payload and a dropped event.
    let lines: Vec<&str> = text.lines().collect();
    let tampered = env.dir.join("tampered.jsonl");
    std::fs::write(
        &tampered,
        text.replacen("\"tile_size\\\":254", "\"tile_size\\\":255", 1),
    )
    .unwrap();
    assert_ne!(std::fs::read_to_string(&tampered).unwrap(), text);
    let bad = check(&tampered);
    assert_eq!(bad.status.code(), Some(1), "{}", stdout(&bad));
    assert!(stdout(&bad).contains("hash mismatch"), "{}", stdout(&bad));
    let dropped = env.dir.join("dropped.jsonl");
    let mut kept: Vec<&str> = lines.clone();
    kept.remove(3);
    std::fs::write(&dropped, kept.join("\n") + "\n").unwrap();
    let bad = check(&dropped);
    assert_eq!(bad.status.code(), Some(1), "{}", stdout(&bad));

    // And `mira audit verify` fails with exit 1, naming the event, once the log is altered.
    let pos: i64 = sqlx::query_scalar("SELECT min(global_position) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    mira_eventlog::testing::tamper(
        &db.owner,
        &format!("UPDATE events SET payload = replace(payload, '254', '255') WHERE global_position = {pos}"),
    )
    .await;
    let bad = env.mira(&["audit", "verify"]);
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));
    assert!(stderr(&bad).contains(&format!("position {pos}")), "{}", stderr(&bad));
    assert_eq!(stderr(&bad).trim_end().lines().count(), 1);
}

#[tokio::test]
async fn bench_append_runs_real_commands() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url).keys();
    let out = env.mira(&["bench", "append", "--commands", "50", "--concurrency", "4", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(r["commands"], 50);
    assert!(r["commands_per_second"].as_f64().unwrap() > 0.0);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant_id = 'bench'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 50);
    let succeeded: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'JobSucceeded'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(succeeded, 10);
    settle(&db.pool).await;
    assert!(env.mira(&["audit", "checkpoint"]).status.success());
    assert!(env.mira(&["audit", "verify"]).status.success());
}

// ---- keys, witness and roles ------------------------------------------------------------

/// Asserts a one-line failure with `code` whose line names every one of `names`.
fn assert_fails_naming(out: &Output, code: i32, names: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    for n in names {
        assert!(err.contains(n), "the error should name {n}: {err}");
    }
}

#[tokio::test]
async fn keys_are_created_by_keys_init_and_nowhere_else() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url);
    // Before `mira keys init`: every command that needs a key fails, naming the setting, and
    // creates nothing.
    assert_fails_naming(
        &env.mira(&["audit", "checkpoint"]),
        2,
        &["Audit__SigningKeyFile", "mira keys init"],
    );
    assert_fails_naming(
        &env.mira(&["bench", "append", "--commands", "5"]),
        2,
        &["Keyring__LocalDir", "mira keys init"],
    );
    assert_fails_naming(&env.mira(&["audit", "verify"]), 2, &["Audit__SigningKeyFile"]);
    assert!(!env.dir.join("audit.key").exists() && !env.dir.join("keyring").exists());
    let init = env.mira(&["keys", "init", "--json"]);
    assert!(init.status.success(), "{}", stderr(&init));
    let report: serde_json::Value = serde_json::from_str(stdout(&init).trim()).unwrap();
    let lines = report["lines"].to_string();
    assert!(lines.contains("created"), "{lines}");
    let secret = std::fs::read_to_string(env.dir.join("audit.key")).unwrap();
    assert_eq!(
        std::fs::read_to_string(env.dir.join("audit.key.pub")).unwrap(),
        report["public_key"].as_str().unwrap()
    );
    // A second init keeps everything.
    let again = env.mira(&["keys", "init"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(!stdout(&again).contains("(created)"), "{}", stdout(&again));
    assert_eq!(std::fs::read_to_string(env.dir.join("audit.key")).unwrap(), secret);
    let ck = env.mira(&["audit", "checkpoint"]);
    assert!(ck.status.success(), "{}", stderr(&ck));
    assert!(env.mira(&["audit", "verify"]).status.success());
    // Without a witness, verification fails and names both settings.
    let no_witness = env
        .command(&["audit", "verify"])
        .env_remove("Audit__WitnessDir")
        .output()
        .unwrap();
    assert_fails_naming(&no_witness, 1, &["Audit__WitnessBucket", "Audit__WitnessDir"]);
    // A keyring directory that is not one (a typo, another host's empty mount) is refused.
    let stray = env.dir.join("not-a-keyring");
    std::fs::create_dir_all(&stray).unwrap();
    let out = env
        .command(&["bench", "append", "--commands", "5"])
        .env("Keyring__LocalDir", &stray)
        .output()
        .unwrap();
    assert_fails_naming(&out, 2, &["Keyring__LocalDir", "not a Mira keyring"]);
}

/// Rewrites the payload of the event at `pos` and re-hashes the rest of its stream, as a
/// superuser would.
async fn rewrite_and_rehash(db: &TestDb, pos: i64) {
    let log = EventLog::new(db.pool.clone());
    let (t, id): (String, String) =
        sqlx::query_as("SELECT aggregate_type, aggregate_id FROM events WHERE global_position = $1")
            .bind(pos)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let mut events = log.read_stream(None, &t, &id, 0).await.unwrap();
    let k = events.iter().position(|e| e.global_position == pos).unwrap();
    events[k].payload = events[k].payload.replace("254", "255");
    let mut tx = db.owner.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    for i in k..events.len() {
        if i > 0 {
            events[i].prev_hash = events[i - 1].hash;
        }
        events[i].hash = events[i].recompute_hash();
        sqlx::query("UPDATE events SET payload = $1, prev_hash = $2, hash = $3 WHERE global_position = $4")
            .bind(&events[i].payload)
            .bind(&events[i].prev_hash[..])
            .bind(&events[i].hash[..])
            .bind(events[i].global_position)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

async fn submit_jobs(db: &TestDb, env: &Env, n: usize) {
    submit_jobs_as(db, env, n, &ctx()).await
}

/// `n` jobs submitted and queued by `cx`.
async fn submit_jobs_as(db: &TestDb, env: &Env, n: usize, cx: &CommandContext) {
    let c = commands(db, &env.dir);
    for _ in 0..n {
        let id = JobId::new();
        let submit = JobCommand::Submit {
            slide_id: SlideId::new(),
            spec: mira_events::JobSpec::Preprocess(Default::default()),
            max_attempts: 3,
            priority: mira_aggregates::Priority::Routine,
        };
        c.job(cx, id, submit).await.unwrap();
        c.job(cx, id, JobCommand::Queue { now: Utc::now() }).await.unwrap();
    }
    settle(&db.pool).await;
}

#[tokio::test]
async fn verify_catches_deleted_checkpoints_through_the_witness() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url).keys();
    submit_jobs(&db, &env, 3).await;
    assert!(env.mira(&["audit", "checkpoint"]).status.success());
    let first_end: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    submit_jobs(&db, &env, 2).await;
    assert!(env.mira(&["audit", "checkpoint"]).status.success());
    assert!(env.mira(&["audit", "verify"]).status.success());
    let tamper = |sql: String| {
        let owner = db.owner.clone();
        async move {
            let mut tx = owner.begin().await.unwrap();
            sqlx::query("SET LOCAL session_replication_role = replica")
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::raw_sql(&sql).execute(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
        }
    };

    // The trailing checkpoint and the events after the one before it, gone.
    tamper(format!(
        "BEGIN; DELETE FROM checkpoints WHERE seq = 2; DELETE FROM events WHERE global_position > {first_end}; COMMIT"
    ))
    .await;
    let out = env.mira(&["audit", "verify"]);
    assert_fails_naming(&out, 1, &["checkpoint 2", "missing from the database"]);

    // Every checkpoint gone, and an event rewritten with its stream re-hashed: the chains hold,
    // no signature is left to disagree, and the witness still says what was there.
    tamper("DELETE FROM checkpoints".into()).await;
    let first: i64 = sqlx::query_scalar("SELECT min(global_position) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    rewrite_and_rehash(&db, first).await;
    let out = env.mira(&["audit", "verify"]);
    // Every record counts: the first of them is the first named.
    assert_fails_naming(&out, 1, &["checkpoint 1 of epoch", "missing from the database"]);
}

/// `mira migrate` runs as the owner and makes each process's login: the one its
/// `Database__Logins__…` URL names, with that password, else `mira_svc_<process>`; each holds
/// its process's role and no other. A process on another's login is refused at start, with the
/// setting named.
#[tokio::test]
async fn migrate_makes_each_process_login_holding_its_role_only() {
    let db = TestDb::empty().await;
    let worker = format!("t_worker_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let password = "pa:ss@w'rd";
    let worker_url = mira_eventlog::testing::with_user(&db.owner_url, &worker, "pa%3Ass%40w'rd");
    let env = Env::new(&db.owner_url)
        .set("Database__MigrationUrl", &db.owner_url)
        .set("Database__Logins__Worker", &worker_url);
    let out = env.mira(&["migrate", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let logins: Vec<(String, String, bool)> = v["logins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["role"].as_str().unwrap().to_owned(),
                l["group"].as_str().unwrap().to_owned(),
                l["password_set"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        logins,
        [
            ("mira_svc_api".to_owned(), "mira_api".to_owned(), false),
            ("mira_svc_relay".to_owned(), "mira_relay".to_owned(), false),
            ("mira_svc_projector".to_owned(), "mira_projector".to_owned(), false),
            ("mira_svc_handlers".to_owned(), "mira_handlers".to_owned(), false),
            (worker.clone(), "mira_worker".to_owned(), true),
        ]
    );
    // The worker's login connects with its password and holds mira_worker alone.
    let pool = mira_eventlog::db::connect(&worker_url, 1, std::time::Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("the worker's login connects with {password:?}: {e}"));
    let held: Vec<String> = sqlx::query_scalar(
        "SELECT r FROM unnest(ARRAY['mira_app','mira_api','mira_relay','mira_projector','mira_handlers','mira_worker']) r \
         WHERE pg_has_role(current_user, r, 'USAGE') ORDER BY r",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(held, ["mira_worker"]);
    pool.close().await;
    let owner: String = sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = 'events'")
        .fetch_one(&db.owner)
        .await
        .unwrap();
    assert_ne!(owner, worker);
    // Again: nothing to apply, the logins stand.
    let out = env.mira(&["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!(
        "login {worker} for the worker (holds mira_worker, password set)"
    )));
    // The worker's login serving the API and the relay: refused at start, the setting named.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Env::new(&worker_url)
        .set("Messaging__Provider", "InMemory")
        .set("AWS__Cognito__Issuer", "urn:test")
        .set("AWS__Cognito__ClientId", "test")
        .set("AWS__Cognito__JwksUrl", "http://127.0.0.1:9/jwks.json")
        .keys()
        .mira(&["serve", "--with", "relay", "--listen", &format!("127.0.0.1:{port}")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not hold mira_relay: set Database__Logins__Relay"),
        "{}",
        stderr(&out)
    );
    // …and the owner, connecting as DATABASE_URL, is told it should not.
    let out = Env::new(&db.owner_url).keys().mira(&["projections", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("owns the event log"), "{}", stderr(&out));
    sqlx::raw_sql(&format!("DROP OWNED BY {worker}; DROP ROLE {worker}"))
        .execute(&db.owner)
        .await
        .unwrap();
}

/// One image, its roles chosen by a setting: `mira serve` with `Roles__Enabled` runs the relay,
/// the projector and the handlers beside the API, and a job goes through them.
#[tokio::test]
async fn serve_runs_the_roles_that_roles_enabled_names() {
    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::new(&db.url)
        .set("Roles__Enabled", "relay,projector,handlers")
        .set("Messaging__Provider", "InMemory")
        .set("AWS__Cognito__Issuer", "urn:test")
        .set("AWS__Cognito__ClientId", "test")
        .set("AWS__Cognito__JwksUrl", "http://127.0.0.1:9/jwks.json")
        .keys();
    let mut serve = env
        .command(&["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("Storage__LocalDir", env.dir.join("blobs"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A job on a slide that does not exist: the relay publishes it, the handlers fail it, the
    // projector shows it failed.
    let c = commands(&db, &env.dir);
    let id = JobId::new();
    let submit = JobCommand::Submit {
        slide_id: SlideId::new(),
        spec: mira_events::JobSpec::Preprocess(Default::default()),
        max_attempts: 3,
        priority: mira_aggregates::Priority::Routine,
    };
    c.job(&ctx(), id, submit).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT status, failure FROM rm.jobs WHERE job_id = $1")
                .bind(id.as_uuid())
                .fetch_optional(&db.owner)
                .await
                .unwrap();
        if let Some((s, failure)) = &status {
            if s == "failed" {
                assert!(failure.as_deref().unwrap_or_default().contains("slide"), "{status:?}");
                break;
            }
        }
        assert!(serve.try_wait().unwrap().is_none(), "mira serve exited");
        assert!(
            std::time::Instant::now() < deadline,
            "the job did not go through: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let term = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert_eq!(serve.wait().unwrap().code(), Some(0), "SIGTERM drains, then exits 0");
    // A role that does not exist is refused at start, naming the setting.
    let out = env
        .set("Roles__Enabled", "relay,worker")
        .mira(&["serve", "--listen", "127.0.0.1:0"]);
    assert_fails_naming(&out, 2, &["Roles__Enabled", "worker"]);
}

// ---- fan-out ----------------------------------------------------------------------------

fn moto() -> String {
    std::env::var("MIRA_TEST_AWS_ENDPOINT")
        .expect("MIRA_TEST_AWS_ENDPOINT names the moto server; run the tests through scripts/test, which starts one")
}

#[tokio::test]
async fn bus_init_is_idempotent_and_the_relay_publishes_checkpoints_and_stops_on_sigterm() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url)
        .on_moto(&moto())
        .set("Audit__CheckpointEveryEvents", "4")
        .keys();
    let first = env.mira(&["bus", "init", "--json"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let again = env.mira(&["bus", "init", "--json"]);
    assert!(again.status.success(), "{}", stderr(&again));
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&stdout(&first)).unwrap(),
        serde_json::from_str(&stdout(&again)).unwrap(),
    );
    assert_eq!(a, b, "a second init converges on the same topology");
    assert_eq!(a["queues"].as_array().unwrap().len(), 5);
    assert!(a["queues"][1]["url"].as_str().unwrap().ends_with("gpu-jobs.fifo"));
    assert!(a["queues"][1]["dlq_url"]
        .as_str()
        .unwrap()
        .ends_with("gpu-jobs-dlq.fifo"));

    let c = commands(&db, &env.dir);
    for _ in 0..4 {
        let id = JobId::new();
        let submit = JobCommand::Submit {
            slide_id: SlideId::new(),
            spec: mira_events::JobSpec::Preprocess(Default::default()),
            max_attempts: 3,
            priority: mira_aggregates::Priority::Routine,
        };
        c.job(&ctx(), id, submit).await.unwrap();
        c.job(&ctx(), id, JobCommand::Queue { now: Utc::now() }).await.unwrap();
    }
    let mut relay = env
        .command(&["relay"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let published: Option<i64> = sqlx::query_scalar("SELECT published FROM relay_cursor")
            .fetch_optional(&db.pool)
            .await
            .unwrap();
        let checkpoints: i64 = sqlx::query_scalar("SELECT count(*) FROM checkpoints")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if published == Some(8) && checkpoints >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "relay published {published:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let term = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = relay.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM drains, then exits 0");
    // What the relay published is on the queues.
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(moto())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .load()
        .await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    // No slide was uploaded: the verifier's queue holds nothing; the jobs were routine.
    for (i, expected) in [(0, "8"), (1, "4"), (2, "8"), (3, "0"), (4, "0")] {
        let url = a["queues"][i]["url"].as_str().unwrap();
        let attrs = sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .unwrap();
        let n =
            attrs.attributes().unwrap()[&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages].clone();
        assert_eq!(n, expected, "queue {url}");
    }
    let ok = env.mira(&["audit", "verify"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let list = env.mira(&["dlq", "list", "--json"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let v: serde_json::Value = serde_json::from_str(&stdout(&list)).unwrap();
    assert_eq!(v["parked"].as_array().unwrap().len(), 0);
    assert_eq!(v["dead_letters"].as_array().unwrap().len(), 5);
}

fn assert_config_error(out: &Output, setting: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(setting), "expected {setting} in: {err}");
}

#[tokio::test]
async fn bad_bus_configuration_names_the_setting() {
    let db = TestDb::new().await;
    // A topic that was never created.
    let env = Env::new(&db.url).on_moto(&moto());
    assert_config_error(&env.mira(&["relay"]), "AWS__SNS__TopicName");
    assert_config_error(&env.mira(&["dlq", "list"]), "AWS__SNS__TopicName");
    // An unreachable endpoint.
    let env = Env::new(&db.url).on_moto("http://127.0.0.1:1");
    assert_config_error(&env.mira(&["bus", "init"]), "AWS_ENDPOINT_URL");
    assert_config_error(&env.mira(&["relay"]), "AWS_ENDPOINT_URL");
    // No credentials at all.
    let env = Env::new(&db.url)
        .on_moto(&moto())
        .unset("AWS_ACCESS_KEY_ID")
        .unset("AWS_SECRET_ACCESS_KEY");
    assert_config_error(&env.mira(&["bus", "init"]), "AWS_ACCESS_KEY_ID");
    // The in-memory bus cannot be relayed from a process of its own.
    let env = Env::new(&db.url)
        .on_moto(&moto())
        .set("Messaging__Provider", "InMemory");
    assert_config_error(&env.mira(&["relay"]), "Messaging__Provider");
    // A topic name that is not FIFO.
    let env = Env::new(&db.url).on_moto(&moto()).set("AWS__SNS__TopicName", "events");
    assert_config_error(&env.mira(&["bus", "init"]), "AWS__SNS__TopicName");
}

#[tokio::test]
async fn wrong_credentials_name_the_setting() {
    // A moto server of its own that checks credentials like AWS does.
    let python = std::env::var("MIRA_PYTHON").unwrap_or_else(|_| "python3".into());
    let server = Path::new(&python).with_file_name("moto_server");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut moto = Command::new(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server from the test virtualenv");
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let db = TestDb::new().await;
    let env = Env::new(&db.url)
        .on_moto(&endpoint)
        .set("AWS_ACCESS_KEY_ID", "AKIANOBODY")
        .set("AWS_SECRET_ACCESS_KEY", "wrong");
    let out = env.mira(&["bus", "init"]);
    let _ = moto.kill();
    let _ = moto.wait();
    assert_config_error(&out, "AWS_ACCESS_KEY_ID");
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));
}

// ---- projections ------------------------------------------------------------------------

#[tokio::test]
async fn projections_list_status_and_rebuild() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url);
    let c = commands(&db, &env.dir);
    for _ in 0..3 {
        let submit = JobCommand::Submit {
            slide_id: SlideId::new(),
            spec: mira_events::JobSpec::Preprocess(Default::default()),
            max_attempts: 3,
            priority: mira_aggregates::Priority::Routine,
        };
        c.job(&ctx(), JobId::new(), submit).await.unwrap();
    }
    settle(&db.pool).await;
    let list = env.mira(&["projections", "list", "--json"]);
    assert!(stdout(&list).contains("read_models"), "{}", stdout(&list));
    let status = env.mira(&["projections", "status", "--json"]);
    assert!(status.status.success(), "{}", stderr(&status));
    let v: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(
        (v[0]["position"].as_i64(), v[0]["lag_events"].as_i64()),
        (Some(0), Some(3)),
        "{v}"
    );
    assert!(v[0]["lag_seconds"].as_f64().unwrap() >= 0.0);
    // Nothing projected yet: --verify finds the live model missing the three jobs and keeps it.
    let verify = env.mira(&["projections", "rebuild", "read_models", "--verify"]);
    assert_eq!(verify.status.code(), Some(1), "{}", stderr(&verify));
    assert_eq!(
        stdout(&verify)
            .lines()
            .filter(|l| l.contains("only in the rebuilt model"))
            .count(),
        6,
        "{}",
        stdout(&verify)
    );
    let rebuild = env.mira(&["projections", "rebuild", "read_models"]);
    assert!(rebuild.status.success(), "{}", stderr(&rebuild));
    assert!(stdout(&rebuild).contains("3 events"), "{}", stdout(&rebuild));
    assert!(
        stderr(&rebuild).contains("events/s"),
        "progress is shown: {}",
        stderr(&rebuild)
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rm.jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 3);
    let again = env.mira(&["projections", "rebuild", "read_models", "--verify"]);
    assert!(again.status.success(), "{}", stdout(&again));
    let unknown = env.mira(&["projections", "rebuild", "nope"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(stderr(&unknown).contains("no projection named"));
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn slide_upload_url(body: &serde_json::Value) -> String {
    body["upload"]["url"]
        .as_str()
        .expect("a single-PUT upload URL")
        .to_owned()
}

/// A `mira dev` of a test: stopped with two Ctrl-Cs (everything at once) when the test ends,
/// passed or not, so that no platform outlives its test.
#[derive(Debug)]
struct Dev(std::process::Child);

impl std::ops::Deref for Dev {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Dev {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let pid = self.0.id().to_string();
            for _ in 0..2 {
                let _ = Command::new("kill").args(["-INT", &pid]).status();
                std::thread::sleep(Duration::from_millis(500));
            }
            for _ in 0..50 {
                if !matches!(self.0.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A `mira dev` started as a person would, with `extra` in its environment; returns it, its
/// URL and its banner once it is up, or its stderr if it exits first.
fn start_dev(dir: &Path, data: &Path, extra: &[(&str, &str)]) -> Result<(Dev, String, String), String> {
    use std::io::BufRead;
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("XDG_RUNTIME_DIR", &runtime)
        .envs(extra.iter().copied())
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let mut url = None;
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                printed.push(line.clone());
                if let Some(u) = line.strip_prefix("Mira is running at ") {
                    url = Some(u.to_owned());
                }
                if line.contains("Ctrl-C") {
                    break;
                }
            }
            _ => {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                let _ = child.wait();
                return Err(err);
            }
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("mira dev: {l}");
        }
    });
    Ok((Dev(child), url.expect("mira dev prints its URL"), printed.join("\n")))
}

/// Ctrl-C, as a terminal sends it; returns how long `mira dev` took to exit.
fn interrupt_dev(child: &mut Dev) -> Duration {
    let t0 = std::time::Instant::now();
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "Ctrl-C ends mira dev cleanly: {status:?}");
    t0.elapsed()
}

async fn dev_token(url: &str) -> String {
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("{url}/dev/sign-in"))
        .json(&serde_json::json!({"user": "ada", "tenant": "lab-dev", "roles": ["pathologist"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["id_token"].as_str().unwrap().to_owned()
}

/// Keys are made on a data directory's first start only: with its signing key gone, `mira
/// dev` refuses to start, names the file, and makes nothing.
#[tokio::test]
async fn mira_dev_refuses_to_remake_a_missing_signing_key() {
    let dir = std::env::temp_dir().join(format!("mira-dev-keys-{}", uuid::Uuid::new_v4()));
    let data = dir.join(".mira");
    let (mut child, _, _) = start_dev(&dir, &data, &[]).unwrap();
    interrupt_dev(&mut child);
    let key = data.join("audit-signing.key");
    assert!(key.is_file());
    std::fs::remove_file(&key).unwrap();
    let err = start_dev(&dir, &data, &[]).expect_err("mira dev refuses to start");
    let last = err.trim_end().lines().last().unwrap_or_default().to_owned();
    assert!(
        last.contains(&key.display().to_string()) && last.contains("mira keys init"),
        "{err}"
    );
    assert!(!key.exists(), "no new key was made");
    // The witness and keyring are checked the same way.
    std::fs::write(&key, "restored").unwrap();
    std::fs::remove_dir_all(data.join("witness")).unwrap();
    let err = start_dev(&dir, &data, &[]).expect_err("mira dev refuses to start");
    assert!(err.contains(&data.join("witness").display().to_string()), "{err}");
    assert!(!data.join("witness").exists());
    // A non-loopback address without --expose-sign-in: refused, naming the flag, nothing made.
    let elsewhere = dir.join("exposed");
    let o = Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(["dev", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(&elsewhere)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--expose-sign-in"), "{}", stderr(&o));
    assert!(!elsewhere.exists(), "nothing was made");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A DATABASE_URL left in the shell (it may name a shared database) is not migrated: mira dev
/// says so and uses its own cluster.
#[tokio::test]
async fn mira_dev_leaves_a_database_url_of_the_shell_untouched() {
    let other = TestDb::empty().await;
    let tables = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
        )
        .fetch_one(&other.owner)
        .await
        .unwrap()
    };
    assert_eq!(tables().await, 0);
    let dir = std::env::temp_dir().join(format!("mira-dev-env-{}", uuid::Uuid::new_v4()));
    let data = dir.join(".mira");
    let (mut child, url, printed) = start_dev(
        &dir,
        &data,
        &[
            ("DATABASE_URL", &other.owner_url),
            ("Database__MigrationUrl", &other.owner_url),
        ],
    )
    .unwrap();
    assert!(
        printed.contains("DATABASE_URL is set in this shell; mira dev ignores it"),
        "{printed}"
    );
    assert!(printed.contains("private PostgreSQL cluster"), "{printed}");
    let t = dev_token(&url).await;
    let r = reqwest::Client::new()
        .get(format!("{url}/api/slides"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    interrupt_dev(&mut child);
    assert_eq!(tables().await, 0, "the shell's database was not migrated");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Registers and uploads `slide`, then submits a preprocessing job on it; returns its id.
async fn submit_cmu_job(http: &reqwest::Client, url: &str, t: &str, slide: &[u8]) -> String {
    let r: serde_json::Value = http
        .post(format!("{url}/api/slides"))
        .bearer_auth(t)
        .json(&serde_json::json!({"name": "long", "size_bytes": slide.len(), "content_type": "image/tiff"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = r["slide_id"].as_str().unwrap().to_owned();
    let up = http
        .put(slide_upload_url(&r))
        .header("content-type", "image/tiff")
        .body(slide.to_vec())
        .send()
        .await
        .unwrap();
    assert!(up.status().is_success());
    let done = http
        .post(format!("{url}/api/slides/{id}/uploaded"))
        .bearer_auth(t)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let job: serde_json::Value = http
        .post(format!("{url}/api/jobs"))
        .bearer_auth(t)
        .json(&serde_json::json!({"slide_id": id, "kind": "wsi.preprocess"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    job["job_id"].as_str().unwrap().to_owned()
}

fn cmu_bytes() -> Vec<u8> {
    std::fs::read(
        Path::new(&std::env::var("MIRA_TESTDATA").expect("MIRA_TESTDATA: run through scripts/test"))
            .join("CMU-1-Small-Region.svs"),
    )
    .unwrap()
}

/// Waits until the job is running.
async fn until_running(http: &reqwest::Client, url: &str, t: &str, job_id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let j: serde_json::Value = match http.get(format!("{url}/api/jobs/{job_id}")).bearer_auth(t).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        if j["status"] == "running" {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the job never ran: {j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pid a `mira dev` banner gives after `label`, e.g. `mira-worker (pid `.
fn banner_pid(printed: &str, label: &str) -> u32 {
    printed
        .split(label)
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the banner names {label}: {printed}"))
}

/// Uploads are verified by `mira dev`'s verifier, a process of its own on the CPU, as on AWS
/// where no upload wakes a GPU node: with the jobs' worker killed, an upload is verified, and
/// its job is queued and waits for a worker.
#[tokio::test]
async fn an_upload_in_mira_dev_is_verified_while_the_worker_is_stopped() {
    let dir = std::env::temp_dir().join(format!("mira-dev-verifier-{}", uuid::Uuid::new_v4()));
    let data = dir.join(".mira");
    let (mut child, url, printed) = start_dev(&dir, &data, &[]).unwrap();
    let worker_pid = banner_pid(&printed, "mira-worker (pid ");
    let verifier_pid = banner_pid(&printed, "mira-worker verify (pid ");
    assert_ne!(worker_pid, verifier_pid);
    assert!(Command::new("kill")
        .args(["-KILL", &worker_pid.to_string()])
        .status()
        .unwrap()
        .success());
    let gone = || {
        let stat = std::fs::read_to_string(format!("/proc/{worker_pid}/stat")).unwrap_or_default();
        stat.is_empty() || stat.contains(") Z")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gone() {
        assert!(std::time::Instant::now() < deadline, "the worker was not killed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let http = reqwest::Client::new();
    let t = dev_token(&url).await;
    let job_id = submit_cmu_job(&http, &url, &t, &cmu_bytes()).await;
    let get = |path: String| {
        let (http, t) = (http.clone(), t.clone());
        async move {
            match http.get(path).bearer_auth(&t).send().await {
                Ok(r) => r.json::<serde_json::Value>().await.unwrap_or_default(),
                Err(_) => serde_json::Value::Null,
            }
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    // The job's read model follows its command: wait for it to name its slide.
    let slide_id = loop {
        let job = get(format!("{url}/api/jobs/{job_id}")).await;
        if let Some(s) = job["slide_id"].as_str() {
            break s.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "the job never showed: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        let s = get(format!("{url}/api/slides/{slide_id}")).await;
        let j = get(format!("{url}/api/jobs/{job_id}")).await;
        if s["status"] == "verified" && j["status"] == "queued" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slide was not verified without the worker: {s} {j}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone(), "the worker stayed down");
    // No worker took the job.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get(format!("{url}/api/jobs/{job_id}")).await["status"], "queued");
    interrupt_dev(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second Ctrl-C stops everything at once: the worker in the middle of its job (whatever
/// its drain) and PostgreSQL.
#[tokio::test]
async fn a_second_ctrl_c_stops_everything_at_once() {
    let dir = std::env::temp_dir().join(format!("mira-dev-twice-{}", uuid::Uuid::new_v4()));
    let data = dir.join(".mira");
    let slow = [("Worker__BandPauseMillis", "15000"), ("Worker__DrainSeconds", "300")];
    let (mut child, url, printed) = start_dev(&dir, &data, &slow).unwrap();
    let worker_pid = banner_pid(&printed, "mira-worker (pid ");
    let verifier_pid = banner_pid(&printed, "mira-worker verify (pid ");
    let pg = printed
        .lines()
        .find_map(|l| l.split("cluster in ").nth(1))
        .and_then(|r| r.split(" (port").next())
        .map(PathBuf::from)
        .expect("the banner names the cluster");
    let http = reqwest::Client::new();
    let t = dev_token(&url).await;
    let job_id = submit_cmu_job(&http, &url, &t, &cmu_bytes()).await;
    until_running(&http, &url, &t, &job_id).await;
    let t0 = std::time::Instant::now();
    let int = || {
        assert!(Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success())
    };
    int();
    std::thread::sleep(Duration::from_secs(1));
    int();
    let status = child.wait().unwrap();
    let took = t0.elapsed();
    eprintln!("mira dev stopped {took:?} after two Ctrl-Cs (drain 300 s)");
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!pg.join("postmaster.pid").exists(), "PostgreSQL stopped");
    std::thread::sleep(Duration::from_millis(500));
    for pid in [worker_pid, verifier_pid] {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "the worker {pid} is gone: {stat}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ctrl-C in the middle of a long job: mira dev is gone within the worker's drain bound and a
/// few seconds; the abandoned attempt's lease runs out and the job is retried after a restart.
#[tokio::test]
async fn ctrl_c_during_a_long_job_stops_within_the_drain_and_the_job_is_retried() {
    let dir = std::env::temp_dir().join(format!("mira-dev-drain-{}", uuid::Uuid::new_v4()));
    let data = dir.join(".mira");
    let slide = cmu_bytes();
    let slow = [
        // The CMU slide is a few bands: paused this long after each, the job takes a minute.
        ("Worker__BandPauseMillis", "15000"),
        ("Worker__LeaseSeconds", "5"),
        ("Worker__DrainSeconds", "2"),
    ];
    let (mut child, url, _) = start_dev(&dir, &data, &slow).unwrap();
    let http = reqwest::Client::new();
    let t = dev_token(&url).await;
    let job_id = submit_cmu_job(&http, &url, &t, &slide).await;

    let job_now = |url: String, t: String| {
        let http = http.clone();
        let job_id = job_id.clone();
        async move {
            http.get(format!("{url}/api/jobs/{job_id}"))
                .bearer_auth(&t)
                .send()
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let j = job_now(url.clone(), t.clone()).await.unwrap_or_default();
        if j["status"] == "running" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the job never ran: {j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = interrupt_dev(&mut child);
    eprintln!("mira dev stopped {took:?} after Ctrl-C with a job running (drain 2 s)");
    assert!(
        took < Duration::from_secs(2 + 8),
        "stopped within the drain and a few seconds: {took:?}"
    );

    let (mut child, url, _) = start_dev(&dir, &data, &[("Worker__LeaseSeconds", "5")]).unwrap();
    let t = dev_token(&url).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let j = loop {
        let j = job_now(url.clone(), t.clone()).await.unwrap_or_default();
        if j["status"] == "succeeded" {
            break j;
        }
        assert!(
            !["failed", "cancelled"].contains(&j["status"].as_str().unwrap_or("")),
            "{j}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the job was not retried to success: {j}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(j["attempt"].as_i64().unwrap() >= 2, "a second attempt did it: {j}");
    interrupt_dev(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `mira dev` with no DATABASE_URL, started as the README says: it prints its URL and how to
/// sign in; its tokens work; Ctrl-C stops it and its private PostgreSQL; a second start keeps
/// the data.
#[tokio::test]
async fn mira_dev_runs_on_a_private_cluster_stops_cleanly_and_keeps_its_data() {
    let dir = std::env::temp_dir().join(format!("mira-dev-{}", uuid::Uuid::new_v4()));
    let data = dir.join(".mira");
    // Where `mira dev` records itself, so `mira dev token` finds it from anywhere.
    let runtime = dir.join("run");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let start = || start_dev(&dir, &data, &[]).unwrap();
    let token = || {
        let o = Command::new(env!("CARGO_BIN_EXE_mira"))
            .args(["dev", "token", "--tenant", "lab-dev", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).trim().to_owned()
    };
    // `mira dev token` with no --data-dir, from a directory with no .mira of its own.
    let token_from_elsewhere = || {
        Command::new(env!("CARGO_BIN_EXE_mira"))
            .args(["dev", "token", "--tenant", "lab-dev"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("XDG_RUNTIME_DIR", &runtime)
            .current_dir(&elsewhere)
            .output()
            .unwrap()
    };
    let interrupt = |mut child: Dev| {
        interrupt_dev(&mut child);
    };
    let cluster_dir = |printed: &str| -> PathBuf {
        let line = printed
            .lines()
            .find(|l| l.contains("private PostgreSQL cluster in"))
            .unwrap();
        let rest = line.split("cluster in ").nth(1).unwrap();
        PathBuf::from(rest.split(" (port").next().unwrap())
    };

    let (child, url, printed) = start();
    assert!(printed.contains("mira dev token --data-dir"), "{printed}");
    let http = reqwest::Client::new();
    let t = token();
    // The banner's token command works from any directory: it finds the running mira dev.
    let found = token_from_elsewhere();
    assert!(found.status.success(), "{}", stderr(&found));
    let r = http
        .get(format!("{url}/api/slides"))
        .bearer_auth(stdout(&found).trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a token found from elsewhere is accepted");
    assert!(!elsewhere.join(".mira").exists(), "no key was created where it ran");
    let slide = http
        .post(format!("{url}/api/slides"))
        .bearer_auth(&t)
        .json(&serde_json::json!({"name": "kept", "size_bytes": 3, "content_type": "image/tiff"}))
        .send()
        .await
        .unwrap();
    assert_eq!(slide.status(), 201);
    let slide_body: serde_json::Value = slide.json().await.unwrap();
    // Without a token, 401: the local identity provider is the only way in.
    assert_eq!(
        http.get(format!("{url}/api/slides")).send().await.unwrap().status(),
        401
    );
    let pg = cluster_dir(&printed);
    assert!(pg.join("postmaster.pid").exists());
    // Every process of mira dev (the gateway and the worker) connects as the role that owns
    // nothing; the keys and the witness were made by its `keys init`.
    let port: u16 = printed
        .split("(port ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .expect("the banner names the cluster's port");
    // Every login needs the password: without it, refused; `mira dev url` gives one that works.
    let no_password = mira_eventlog::db::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/mira"),
        1,
        Duration::from_secs(5),
    )
    .await;
    assert!(no_password.is_err(), "a login without the password is refused");
    let dev_url = Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(["dev", "url", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(dev_url.status.success(), "{}", stderr(&dev_url));
    let owner_url = stdout(&dev_url).trim().to_owned();
    assert!(
        owner_url.starts_with("postgres://postgres:") && owner_url.ends_with(&format!(":{port}/mira")),
        "{owner_url}"
    );
    let admin = mira_eventlog::db::connect(&owner_url, 1, Duration::from_secs(5))
        .await
        .unwrap();
    // Another local user reads nothing mira dev keeps and cannot log in (it would need the
    // password, which only this user can read).
    {
        let up = http
            .put(slide_upload_url(&slide_body))
            .header("content-type", "image/tiff")
            .body(&b"abc"[..])
            .send()
            .await
            .unwrap();
        assert!(up.status().is_success(), "{}", up.status());
    }
    if is_root() && Path::new("/usr/sbin/runuser").exists() {
        let as_nobody = |args: &[&str]| {
            Command::new("/usr/sbin/runuser")
                .args(["-u", "nobody", "--"])
                .args(args)
                .env("PGCONNECT_TIMEOUT", "5")
                .output()
                .unwrap()
        };
        let mut files = Vec::new();
        let mut dirs = vec![data.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p == pg {
                    continue;
                }
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    files.push(p);
                }
            }
        }
        let blobs: Vec<_> = files.iter().filter(|f| f.starts_with(data.join("blobs"))).collect();
        assert!(!blobs.is_empty(), "the uploaded slide is a blob file");
        for f in files.iter().filter(|f| f.extension().is_none_or(|x| x != "pub")) {
            let o = as_nobody(&["cat", f.to_str().unwrap()]);
            assert!(!o.status.success(), "nobody read {}", f.display());
        }
        let o = as_nobody(&["ls", data.join("blobs").to_str().unwrap()]);
        assert!(!o.status.success(), "nobody listed the blobs");
        let psql = as_nobody(&[
            "psql",
            "-w",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "mira",
            "-c",
            "select 1",
        ]);
        assert!(!psql.status.success(), "nobody logged in: {}", stdout(&psql));
        assert!(
            stderr(&psql).contains("password"),
            "refused for want of the password: {}",
            stderr(&psql)
        );
    } else {
        eprintln!("not root (or no runuser): the other-user checks are skipped");
    }
    let users: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT usename::text FROM pg_stat_activity WHERE datname = 'mira' AND pid <> pg_backend_pid() AND usename IS NOT NULL",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    // Each process as its own login: none as the owner, none as another's.
    assert!(users.iter().all(|u| u.starts_with("mira_svc_")), "{users:?}");
    for login in [
        "mira_svc_api",
        "mira_svc_relay",
        "mira_svc_projector",
        "mira_svc_handlers",
    ] {
        assert!(users.iter().any(|u| u == login), "{login} is connected: {users:?}");
    }
    admin.close().await;
    assert!(
        printed
            .contains("each process connects as its own login (mira_svc_api, mira_svc_worker, …), which owns nothing"),
        "{printed}"
    );
    let signing_key = std::fs::read_to_string(data.join("audit-signing.key")).unwrap();
    assert!(data.join("keyring/KEYRING").is_file() && data.join("witness").is_dir());
    interrupt(child);
    assert!(
        !pg.join("postmaster.pid").exists(),
        "the private PostgreSQL stopped with it"
    );

    let (child, url, _) = start();
    assert_eq!(
        std::fs::read_to_string(data.join("audit-signing.key")).unwrap(),
        signing_key,
        "a restart keeps the signing key"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list: serde_json::Value = http
            .get(format!("{url}/api/slides"))
            .bearer_auth(token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if list["items"]
            .as_array()
            .is_some_and(|i| i.iter().any(|s| s["name"] == "kept"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slide survives a restart: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    interrupt(child);
    // With no mira dev running, it fails with one line saying where it looked, and creates
    // nothing.
    let none = token_from_elsewhere();
    assert!(!none.status.success());
    let err = stderr(&none);
    assert!(
        err.contains("no mira dev found") && err.contains("mira-dev.json"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!elsewhere.join(".mira").exists());
    let empty = dir.join("empty");
    let o = Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(["dev", "token", "--data-dir"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has no identity key"), "{}", stderr(&o));
    assert!(!empty.join("identity-rsa.pem").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bench_e2e_measures_post_to_websocket_latency() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url);
    let out = env.mira(&["bench", "e2e", "--jobs", "5", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(r["jobs"], 5, "{r}");
    assert_eq!(r["bus"], "in-memory");
    assert!(
        r["p50_ms"].as_f64().unwrap() > 0.0 && r["p99_ms"].as_f64() >= r["p50_ms"].as_f64(),
        "{r}"
    );
    let submitted: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'JobSubmitted'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(submitted, 5);
}

// ---- the witness counts every checkpoint (ADR 0019) ---------------------------------------

async fn owner_tamper(db: &TestDb, sql: &str) {
    mira_eventlog::testing::tamper(&db.owner, sql).await;
}

/// The attack of a superuser who deletes the tail and a checkpoint, then lets the log run on.
async fn deleted_tail_then_more_checkpoints(db: &TestDb, env: &Env) {
    let ok = |args: &[&str]| {
        let out = env.mira(args);
        assert!(out.status.success(), "mira {args:?}: {}", stderr(&out));
        out
    };
    ok(&["bench", "append", "--commands", "100"]);
    ok(&["audit", "checkpoint"]);
    let first_end: i64 = sqlx::query_scalar("SELECT upto_position FROM checkpoints WHERE seq = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    ok(&["bench", "append", "--commands", "100"]);
    ok(&["audit", "checkpoint"]);
    ok(&["audit", "verify"]);
    owner_tamper(
        db,
        &format!("DELETE FROM events WHERE global_position > {first_end}; DELETE FROM checkpoints WHERE seq = 2"),
    )
    .await;
    assert_fails_naming(
        &env.mira(&["audit", "verify"]),
        1,
        &["checkpoint 2 of epoch", "missing from the database"],
    );
    for _ in 0..2 {
        ok(&["bench", "append", "--commands", "20"]);
        let out = env.mira(&["audit", "checkpoint"]);
        assert_fails_naming(
            &out,
            1,
            &["WITNESS CONFLICT at checkpoint 2", "no checkpoint was written"],
        );
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM checkpoints")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(rows, 1, "a conflict leaves no checkpoint row");
    }
    assert_fails_naming(
        &env.mira(&["audit", "verify"]),
        1,
        &[
            &format!("at position {}:", first_end + 1),
            "checkpoint 2 of epoch",
            "missing from the database",
        ],
    );
}

#[tokio::test]
async fn the_deleted_tail_attack_is_caught_for_good_on_a_witness_directory() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url).keys();
    deleted_tail_then_more_checkpoints(&db, &env).await;
}

#[tokio::test]
async fn the_deleted_tail_attack_is_caught_for_good_on_an_object_lock_bucket() {
    let db = TestDb::new().await;
    let bucket = format!("mira-cli-witness-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    // moto checks no signatures: a plain PUT makes the bucket, versioned with Object Lock.
    let made = Command::new("curl")
        .args(["-sSf", "-X", "PUT", "-H", "x-amz-bucket-object-lock-enabled: true"])
        .arg(format!("{}/{bucket}", moto()))
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let env = Env::new(&db.url)
        .on_moto(&moto())
        .set("Messaging__Provider", "InMemory")
        .set("Audit__WitnessBucket", &bucket)
        .keys();
    deleted_tail_then_more_checkpoints(&db, &env).await;
}

#[tokio::test]
async fn a_restore_recorded_with_new_epoch_verifies_and_names_both_epochs() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url).keys();
    let ok = |args: &[&str]| {
        let out = env.mira(args);
        assert!(out.status.success(), "mira {args:?}: {}", stderr(&out));
        stdout(&out)
    };
    ok(&["bench", "append", "--commands", "10"]);
    ok(&["audit", "checkpoint"]);
    ok(&["bench", "append", "--commands", "10"]);
    ok(&["audit", "checkpoint"]);
    // What a point-in-time restore to checkpoint 1 leaves.
    owner_tamper(
        &db,
        "DELETE FROM events WHERE global_position > (SELECT upto_position FROM checkpoints WHERE seq = 1); \
         DELETE FROM checkpoints WHERE seq = 2",
    )
    .await;
    ok(&["bench", "append", "--commands", "5"]);
    assert_eq!(env.mira(&["audit", "checkpoint"]).status.code(), Some(1));
    let out = env.mira(&["audit", "new-epoch", "--reason", " "]);
    assert!(
        !out.status.success() && stderr(&out).contains("--reason"),
        "{}",
        stderr(&out)
    );
    let said = ok(&[
        "audit",
        "new-epoch",
        "--reason",
        "restored to 09:00 after disk loss, ticket OPS-7",
    ]);
    assert!(said.contains("after checkpoint 1"), "{said}");
    ok(&["audit", "checkpoint"]);
    let report = ok(&["audit", "verify"]);
    assert!(report.starts_with("log intact:"), "{report}");
    assert!(
        report.contains("1 of them numbered past where the log left the epoch"),
        "{report}"
    );
    assert!(
        report.contains("(current)") && report.contains("ticket OPS-7"),
        "{report}"
    );
    let v: serde_json::Value = serde_json::from_str(ok(&["audit", "verify", "--json"]).trim()).unwrap();
    assert_eq!(v["report"]["epochs"].as_array().unwrap().len(), 2, "{v}");
}

#[tokio::test]
async fn a_catch_up_of_fifty_thousand_events_witnesses_every_checkpoint_it_writes() {
    let db = TestDb::new().await;
    let env = Env::new(&db.url).keys();
    let out = env.mira(&["bench", "seed", "--jobs", "10000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.mira(&["audit", "checkpoint", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        (info["written"].as_i64(), info["new_events"].as_i64()),
        (Some(3), Some(50_000)),
        "{info}"
    );
    let epoch = info["epoch"].as_str().unwrap();
    let mut records: Vec<String> = std::fs::read_dir(env.dir.join("witness").join(epoch))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    records.sort();
    assert_eq!(
        records,
        [
            "checkpoint-00000000000000000001.json",
            "checkpoint-00000000000000000002.json",
            "checkpoint-00000000000000000003.json",
            "epoch.json"
        ]
    );
    let v: serde_json::Value = serde_json::from_str(stdout(&env.mira(&["audit", "verify", "--json"])).trim()).unwrap();
    assert_eq!(v["report"]["witness_records"], 3, "{v}");
}

/// `mira audit verify --json`'s peak resident memory, in KiB, and its events/s.
fn verify_memory(env: &Env) -> (u64, f64) {
    let out = env.mira(&["audit", "verify", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    (
        v["peak_rss_kib"].as_u64().expect("Linux reports VmHWM"),
        v["report"]["events_per_second"].as_f64().unwrap(),
    )
}

#[tokio::test]
async fn verify_memory_does_not_grow_with_the_number_of_checkpoints() {
    // One log of 100,000 events, copied, checkpointed once in 1,000 checkpoints and once in
    // 100,000 (witness directories on tmpfs where there is one: 100,000 fsyncs are not what
    // is measured).
    let a = TestDb::new().await;
    let env_a = Env::new(&a.url).keys();
    let out = env_a.mira(&["bench", "seed", "--jobs", "20000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let b_name = format!("{}_copy", a.name);
    let admin = mira_eventlog::db::connect(&mira_eventlog::testing::admin_url(), 1, Duration::from_secs(10))
        .await
        .unwrap();
    a.pool.close().await;
    a.owner.close().await;
    sqlx::query(&format!("CREATE DATABASE {b_name} TEMPLATE {}", a.name))
        .execute(&admin)
        .await
        .unwrap();
    let b_url = a.url.replace(&a.name, &b_name);
    let shm = Path::new("/dev/shm");
    let witness = |tag: &str| {
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("mira-witness-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let (wa, wb) = (witness("1k"), witness("100k"));
    let env_a = env_a.set("Audit__WitnessDir", &wa.display().to_string());
    let env_b = Env::new(&b_url)
        .set("Audit__WitnessDir", &wb.display().to_string())
        .keys();
    // The same signing key for both copies.
    for f in ["audit.key", "audit.key.pub"] {
        std::fs::copy(env_a.dir.join(f), env_b.dir.join(f)).unwrap();
    }
    let n = |env: &Env, span: &str| {
        let out = env.mira(&["bench", "seed", "--jobs", "0", "--checkpoint-span", span, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(stdout(&out).trim()).unwrap()["checkpoints"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(n(&env_a, "100"), 1_000);
    assert_eq!(n(&env_b, "1"), 100_000);
    let (small, small_rate) = verify_memory(&env_a);
    let (large, large_rate) = verify_memory(&env_b);
    eprintln!(
        "verify: 1,000 checkpoints {small} KiB peak, {small_rate:.0} events/s; 100,000 checkpoints {large} KiB peak, {large_rate:.0} events/s"
    );
    assert!(
        large < small + 8 * 1024,
        "100,000 checkpoints took {large} KiB at peak, 1,000 took {small} KiB"
    );
    sqlx::query(&format!("DROP DATABASE {b_name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(wa);
    let _ = std::fs::remove_dir_all(wb);
}

/// A cluster an older `mira dev` made (every login trusted, no passwords) is given passwords
/// on its next start, and then refuses a login without one.
#[tokio::test]
async fn an_older_trusting_dev_cluster_is_given_passwords() {
    let dir = std::env::temp_dir().join(format!("mira-dev-trust-{}", uuid::Uuid::new_v4()));
    let data = dir.join(".mira");
    let (mut child, _, printed) = start_dev(&dir, &data, &[]).unwrap();
    interrupt_dev(&mut child);
    let pg = printed
        .lines()
        .find_map(|l| l.split("cluster in ").nth(1))
        .and_then(|r| r.split(" (port").next())
        .map(PathBuf::from)
        .unwrap();
    // As an older mira dev left it.
    std::fs::write(
        pg.join("pg_hba.conf"),
        "host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n",
    )
    .unwrap();
    std::fs::remove_file(data.join("postgres.passwords")).unwrap();
    let (mut child, url, printed) = start_dev(&dir, &data, &[]).unwrap();
    let port: u16 = printed
        .split("(port ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert!(data.join("postgres.passwords").is_file());
    let trusted = mira_eventlog::db::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/mira"),
        1,
        Duration::from_secs(5),
    )
    .await;
    assert!(trusted.is_err(), "a login without the password is refused now");
    let t = dev_token(&url).await;
    let r = reqwest::Client::new()
        .get(format!("{url}/api/slides"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the platform runs on the secured cluster");
    interrupt_dev(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An OTLP/HTTP receiver (`http/json`) on a thread of its own: keeps every span it is sent,
/// with its service's name.
fn otlp_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let spans: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    let kept = spans.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let kept = kept.clone();
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(conn);
                loop {
                    let mut len = None;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse::<usize>().ok();
                        }
                    }
                    let mut body = vec![0; len.unwrap_or(0)];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    kept.lock().unwrap().extend(mira_telemetry::otlp_json_spans(&body));
                    let conn = r.get_mut();
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}");
                }
            });
        }
    });
    (url, spans)
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The samples of `/metrics` at `addr`, read with a Prometheus text parser: by name and labels,
/// a histogram as its count.
async fn role_metrics(addr: &str) -> Vec<(String, std::collections::HashMap<String, String>, f64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        if let Ok(r) = reqwest::get(format!("http://{addr}/metrics")).await {
            if r.status() == 200 {
                break r.text().await.unwrap();
            }
        }
        assert!(std::time::Instant::now() < deadline, "no /metrics at {addr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("{addr}: not the Prometheus text format ({e}):\n{text}"));
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            (
                s.metric,
                s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                v,
            )
        })
        .collect()
}

fn value(
    samples: &[(String, std::collections::HashMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| *v)
}

/// The trace crosses real SNS and SQS (moto): the relay, the projector and the handlers run
/// as processes of their own, each restores the job's trace from the stored event it is told
/// of, and each serves its own /metrics (`--metrics-listen`), where SQS's counts and send
/// times show.
#[tokio::test]
async fn the_trace_crosses_sns_and_sqs_and_each_role_serves_its_metrics() {
    const TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    const PARENT: &str = "10f067aa0ba902b7";
    let db = TestDb::new().await;
    let (otlp, spans) = otlp_receiver();
    let env = Env::new(&db.url)
        .on_moto(&moto())
        .set("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .set("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .set("OTEL_BSP_SCHEDULE_DELAY", "100")
        .keys();
    let init = env.mira(&["bus", "init"]);
    assert!(init.status.success(), "{}", stderr(&init));
    let mut cx = ctx();
    cx.traceparent = format!("00-{TRACE}-{PARENT}-01");
    submit_jobs_as(&db, &env, 1, &cx).await;
    let addrs: Vec<(&str, String)> = ["relay", "projector", "handlers"]
        .into_iter()
        .map(|r| (r, free_addr()))
        .collect();
    let mut roles: Vec<std::process::Child> = addrs
        .iter()
        .map(|(role, addr)| {
            env.command(&[role, "--metrics-listen", addr])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let in_trace = |name: &str, consumer: Option<&str>| -> Vec<serde_json::Value> {
        spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| {
                s["traceId"] == TRACE
                    && s["name"] == name
                    && consumer.is_none_or(|c| {
                        s["attributes"].as_array().is_some_and(|a| {
                            a.iter()
                                .any(|a| a["key"] == "consumer" && a["value"]["stringValue"] == c)
                        })
                    })
            })
            .cloned()
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let projected = in_trace("consume.event", Some("projections")).len();
        let handled = in_trace("consume.event", Some("handlers")).len();
        let linked = spans.lock().unwrap().iter().any(|s| {
            s["name"] == "relay.publish"
                && s["links"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|l| l["traceId"] == TRACE))
        });
        if projected >= 2 && handled >= 1 && linked {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "projector {projected}, handlers {handled}, relay linked {linked}: {:#?}",
            spans
                .lock()
                .unwrap()
                .iter()
                .map(|s| (s["name"].clone(), s["service"].clone(), s["traceId"].clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each consumer's span is the child of the span that issued the command, in its own service.
    for (consumer, service) in [("projections", "mira-projector"), ("handlers", "mira-handlers")] {
        for s in in_trace("consume.event", Some(consumer)) {
            assert_eq!(s["parentSpanId"], PARENT, "{s}");
            assert_eq!(s["service"], service, "{s}");
        }
    }

    // Their metrics: the relay's batches and SQS's counts, the consumers' apply and receive
    // times (from SQS's SentTimestamp).
    let m = |role: &str| addrs.iter().find(|(r, _)| *r == role).unwrap().1.clone();
    let relay = role_metrics(&m("relay")).await;
    assert!(
        value(&relay, "mira_relay_published_events_total", &[]).unwrap_or(0.0) >= 2.0,
        "{relay:?}"
    );
    for q in ["projections", "projections-dlq", "gpu-jobs", "handlers-dlq"] {
        assert!(
            value(&relay, "mira_queue_messages", &[("queue", q), ("state", "visible")]).is_some(),
            "{q}: {relay:?}"
        );
    }
    assert!(
        value(&relay, "mira_witness_last_success_timestamp_seconds", &[]).is_some(),
        "{relay:?}"
    );
    let projector = role_metrics(&m("projector")).await;
    assert_eq!(
        value(
            &projector,
            "mira_consumer_apply_seconds",
            &[("consumer", "projections"), ("outcome", "applied")]
        ),
        Some(2.0),
        "{projector:?}"
    );
    assert_eq!(
        value(
            &projector,
            "mira_consumer_receive_delay_seconds",
            &[("queue", "projections")]
        ),
        Some(2.0),
        "{projector:?}"
    );
    let handlers = role_metrics(&m("handlers")).await;
    assert!(
        value(&handlers, "mira_consumer_apply_seconds", &[("consumer", "handlers")]).unwrap_or(0.0) >= 1.0,
        "{handlers:?}"
    );
    for r in &mut roles {
        let _ = Command::new("kill").args(["-TERM", &r.id().to_string()]).status();
    }
    for mut r in roles {
        let _ = r.wait();
    }
}
