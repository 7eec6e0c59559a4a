//! The production key sources against moto's KMS, Secrets Manager and S3, over real
//! connections: data keys generated and unwrapped by KMS and kept wrapped in PostgreSQL, the
//! signing key in Secrets Manager, and the checkpoint witness in an Object Lock bucket.

use std::sync::Arc;

use mira_config::Settings;
use mira_eventlog::testing::TestDb;
use mira_eventlog::witness::{checkpoint_file, Created, Listed, Witness, WitnessError, WitnessRecord};
use mira_eventlog::NewEvent;
use mira_events::KeyringError;

fn moto() -> String {
    std::env::var("MIRA_TEST_AWS_ENDPOINT")
        .expect("MIRA_TEST_AWS_ENDPOINT names the moto server; run the tests through scripts/test, which starts one")
}

fn aws_env() -> Vec<(String, String)> {
    // The SDK reads its endpoint and credentials from the process environment.
    for (k, v) in [
        ("AWS_ENDPOINT_URL", moto()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ] {
        // Every test sets the same values.
        std::env::set_var(k, v);
    }
    vec![("AWS__Region".into(), "us-east-1".into())]
}

fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

async fn sdk() -> aws_config::SdkConfig {
    mira_bus::aws::sdk_config(Some("us-east-1")).await
}

#[tokio::test]
async fn kms_generates_and_unwraps_data_keys_and_the_database_holds_only_wrapped_ones() {
    let env = aws_env();
    let db = TestDb::new().await;
    let kms = aws_sdk_kms::Client::new(&sdk().await);
    let key_id = kms
        .create_key()
        .description("mira test")
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .key_id()
        .to_owned();
    let mut env = env;
    env.push(("AWS__KMS__KeyId".into(), key_id.clone()));
    let settings = Settings::load(None, env).unwrap();
    let ring = mira_keys::keyring(&settings, &db.pool).await.unwrap();
    mira_keys::kms::check(&mira_keys::kms::client(&sdk().await), &key_id)
        .await
        .unwrap();
    assert_eq!(ring.existing_key("slide:1").await.unwrap(), None);
    let k1 = ring.key_for("slide:1").await.unwrap();
    assert_eq!(ring.key_for("slide:1").await.unwrap(), k1, "the same key on reuse");
    assert_ne!(ring.key_for("slide:2").await.unwrap(), k1);
    let sealed = mira_events::seal::seal(ring.as_ref(), "slide:1", "name", "Jane Roe")
        .await
        .unwrap();
    // Another process (a new keyring on the same database and KMS key) opens it.
    let other = mira_keys::keyring(&settings, &db.pool).await.unwrap();
    assert_eq!(
        mira_events::seal::open(other.as_ref(), &sealed, "name").await.unwrap(),
        "Jane Roe"
    );
    let (stored_key, wrapped): (String, Vec<u8>) =
        sqlx::query_as("SELECT kms_key_id, wrapped FROM data_keys WHERE subject = 'slide:1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored_key, key_id);
    assert!(
        wrapped.len() > 32 && !wrapped.windows(32).any(|w| w == k1),
        "only the wrapped key is stored"
    );
    // Erasure destroys the key: what was sealed under it no longer opens.
    ring.erase("slide:1").await.unwrap();
    assert!(matches!(
        mira_events::seal::open(other.as_ref(), &sealed, "name").await,
        Err(KeyringError::Erased(_))
    ));
}

#[tokio::test]
async fn the_signing_key_lives_in_secrets_manager_and_is_never_made_by_a_load() {
    let mut env = aws_env();
    let id = format!("mira/test/{}", tag());
    env.push(("Audit__SigningKeySecretId".into(), id.clone()));
    let settings = Settings::load(None, env).unwrap();
    let err = mira_keys::signing_key(&settings).await.unwrap_err();
    let line = format!("{err:#}");
    assert!(
        line.contains("Audit__SigningKeySecretId") && line.contains("mira keys init"),
        "{line}"
    );
    let sm = mira_keys::secrets::client(&sdk().await);
    let (made, created) = mira_keys::secrets::init(&sm, &id).await.unwrap();
    assert!(created);
    let (kept, created) = mira_keys::secrets::init(&sm, &id).await.unwrap();
    assert!(!created);
    assert_eq!(kept.verifying_key(), made.verifying_key());
    let loaded = mira_keys::signing_key(&settings).await.unwrap();
    assert_eq!(loaded.verifying_key(), made.verifying_key());
    // A verifier without a key file derives the public half from the secret.
    assert_eq!(
        mira_keys::verifying_key(&settings, None).await.unwrap(),
        made.verifying_key()
    );
    // One that must not read the secret is given the public key itself.
    let public = hex::encode(made.verifying_key().as_bytes());
    let given = Settings::load(None, vec![("Audit__PublicKey".to_owned(), public)]).unwrap();
    assert_eq!(
        mira_keys::verifying_key(&given, None).await.unwrap(),
        made.verifying_key()
    );
    let err = Settings::load(None, vec![("Audit__PublicKey".to_owned(), "00ff".to_owned())]).unwrap_err();
    assert!(err.to_string().contains("Audit__PublicKey"), "{err}");
}

async fn s3() -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk().await)
            .force_path_style(true)
            .build(),
    )
}

/// A versioned bucket with Object Lock, as production's witness, and settings naming it.
async fn witness_bucket() -> (aws_sdk_s3::Client, String, Settings) {
    let mut env = aws_env();
    let bucket = format!("mira-witness-{}", tag());
    let s3 = s3().await;
    s3.create_bucket()
        .bucket(&bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .unwrap();
    env.push(("Audit__WitnessBucket".into(), bucket.clone()));
    env.push(("Audit__WitnessTimeoutSeconds".into(), "2".into()));
    (s3, bucket, Settings::load(None, env).unwrap())
}

fn names(v: &[Listed]) -> Vec<(&str, u32, u32)> {
    v.iter()
        .map(|l| (l.name.as_str(), l.versions, l.delete_markers))
        .collect()
}

#[tokio::test]
async fn the_witness_bucket_creates_each_record_once_and_lists_every_version() {
    let (s3, bucket, settings) = witness_bucket().await;
    let w: Arc<dyn Witness> = mira_keys::witness(&settings).await.unwrap();
    assert!(w.describe().starts_with(&format!("s3://{bucket}/checkpoints/")));
    let epoch = uuid::Uuid::new_v4();
    assert!(w.epochs().await.unwrap().is_empty());
    for seq in [3, 12, 7] {
        let r = w.create(&WitnessRecord::name(epoch, seq), b"a").await.unwrap();
        assert_eq!(r, Created::New, "{seq}");
    }
    // If-None-Match: * — the second write of a name changes nothing and says what is there.
    assert_eq!(
        w.create(&WitnessRecord::name(epoch, 12), b"b").await.unwrap(),
        Created::Exists(b"a".to_vec())
    );
    assert_eq!(w.get(&WitnessRecord::name(epoch, 12)).await.unwrap().unwrap(), b"a");
    assert_eq!(w.epochs().await.unwrap(), [epoch]);
    let (c3, c7, c12) = (checkpoint_file(3), checkpoint_file(7), checkpoint_file(12));
    assert_eq!(
        names(&w.list(Some(epoch), "", 1000).await.unwrap()),
        [(c3.as_str(), 1, 0), (c7.as_str(), 1, 0), (c12.as_str(), 1, 0)]
    );
    assert_eq!(names(&w.list(Some(epoch), "", 1).await.unwrap()), [(c3.as_str(), 1, 0)]);
    assert_eq!(
        names(&w.list(Some(epoch), &c3, 1).await.unwrap()),
        [(c7.as_str(), 1, 0)]
    );
    // What Object Lock still lets a writer do is visible: a second version, a delete marker.
    s3.put_object()
        .bucket(&bucket)
        .key(format!("checkpoints/{}", WitnessRecord::name(epoch, 7)))
        .body(b"c".to_vec().into())
        .send()
        .await
        .unwrap();
    s3.delete_object()
        .bucket(&bucket)
        .key(format!("checkpoints/{}", WitnessRecord::name(epoch, 12)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        names(&w.list(Some(epoch), "", 1000).await.unwrap()),
        [(c3.as_str(), 1, 0), (c7.as_str(), 2, 0), (c12.as_str(), 1, 1)]
    );
    assert!(w.list(None, "", 1000).await.unwrap().is_empty());
}

/// A witness bucket and a signing key file of the test's own, and settings naming both.
async fn signed_witness_bucket() -> (aws_sdk_s3::Client, String, Settings, std::path::PathBuf) {
    let (s3, bucket, _) = witness_bucket().await;
    let dir = std::env::temp_dir().join(format!("mira-witness-keys-{}", tag()));
    let key_file = dir.join("audit.key");
    mira_eventlog::checkpoint::AuditKey::init(&key_file).unwrap();
    let mut env: Vec<(String, String)> = aws_env();
    env.push(("Audit__WitnessBucket".into(), bucket.clone()));
    env.push(("Audit__SigningKeyFile".into(), key_file.display().to_string()));
    (s3, bucket, Settings::load(None, env).unwrap(), dir)
}

/// Jobs' worth of events: `n` aggregates of three.
async fn append(db: &TestDb, n: usize) {
    let log = mira_eventlog::EventLog::new(db.pool.clone());
    let t = mira_events::TenantId::parse("lab").unwrap();
    for _ in 0..n {
        let id = uuid::Uuid::new_v4().to_string();
        let events: Vec<NewEvent> = (1..=3)
            .map(|s| NewEvent {
                aggregate_type: "Test".into(),
                aggregate_id: id.clone(),
                sequence: s,
                event_type: "Tick".into(),
                event_version: "1".into(),
                payload: "{}".into(),
                metadata: "{}".into(),
            })
            .collect();
        log.append(&t, &events).await.unwrap();
    }
    mira_eventlog::testing::settle(&db.pool).await;
}

async fn tamper(db: &TestDb, sql: &str) {
    mira_eventlog::testing::tamper(&db.owner, sql).await;
}

async fn verify_fails(db: &TestDb, settings: &Settings) -> String {
    let v = mira_keys::audit_verifier(settings).await.unwrap();
    match mira_eventlog::verify::verify(&db.pool, &v.key, v.witness.as_ref()).await {
        Err(mira_eventlog::verify::VerifyError::Violation(v)) => v.to_string(),
        other => panic!("verify should fail, got {other:?}"),
    }
}

#[tokio::test]
async fn on_an_object_lock_bucket_deleted_checkpoints_stay_missing_and_hidden_records_are_found() {
    let (s3, bucket, settings, dir) = signed_witness_bucket().await;
    let db = TestDb::new().await;
    let c = mira_keys::checkpointer(&settings).await.unwrap();
    let v = mira_keys::audit_verifier(&settings).await.unwrap();
    append(&db, 10).await;
    assert_eq!(c.write(&db.pool).await.unwrap().seq, 1);
    let first_end: i64 = sqlx::query_scalar("SELECT upto_position FROM checkpoints WHERE seq = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    append(&db, 10).await;
    assert_eq!(c.write(&db.pool).await.unwrap().seq, 2);
    let r = mira_eventlog::verify::verify(&db.pool, &v.key, v.witness.as_ref())
        .await
        .unwrap();
    assert_eq!((r.checkpoints, r.witness_records), (2, 2));

    tamper(
        &db,
        &format!("DELETE FROM checkpoints WHERE seq = 2; DELETE FROM events WHERE global_position > {first_end}"),
    )
    .await;
    for _ in 0..2 {
        append(&db, 5).await;
        let err = c.write(&db.pool).await.unwrap_err();
        assert!(err.is_conflict(), "{err}");
    }
    assert_eq!(c.health.conflicts(), 2);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM checkpoints")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "a conflict leaves no checkpoint row");
    let line = verify_fails(&db, &settings).await;
    assert!(
        line.contains(&format!("position {}", first_end + 1)) && line.contains("missing from the database"),
        "{line}"
    );

    // A delete marker over a record hides it from a plain listing, not from verify.
    let epoch = mira_eventlog::checkpoint::db_epochs(&db.pool).await.unwrap()[0].epoch;
    s3.delete_object()
        .bucket(&bucket)
        .key(format!("checkpoints/{}", WitnessRecord::name(epoch, 2)))
        .send()
        .await
        .unwrap();
    let line = verify_fails(&db, &settings).await;
    assert!(
        line.contains("checkpoint 2 of epoch") && line.contains("1 delete markers"),
        "{line}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_delete_marker_over_the_newest_record_is_a_finding() {
    let (s3, bucket, settings, dir) = signed_witness_bucket().await;
    let db = TestDb::new().await;
    let c = mira_keys::checkpointer(&settings).await.unwrap();
    append(&db, 3).await;
    c.write(&db.pool).await.unwrap();
    let epoch = mira_eventlog::checkpoint::db_epochs(&db.pool).await.unwrap()[0].epoch;
    s3.delete_object()
        .bucket(&bucket)
        .key(format!("checkpoints/{}", WitnessRecord::name(epoch, 1)))
        .send()
        .await
        .unwrap();
    let line = verify_fails(&db, &settings).await;
    assert!(
        line.contains("checkpoint 1 of epoch") && line.contains("delete markers"),
        "{line}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_witness_bucket_that_never_answers_fails_within_its_deadline() {
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(format!("http://{addr}"))
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new("t", "t", None, None, "test"))
        .load()
        .await;
    let w = mira_keys::s3_witness::S3Witness::new(
        &sdk,
        None,
        "hangs".into(),
        "checkpoints/".into(),
        std::time::Duration::from_secs(1),
    );
    let started = std::time::Instant::now();
    let err = w.create("x/epoch.json", b"{}").await.unwrap_err();
    assert!(matches!(err, WitnessError::Io { .. }), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn missing_settings_are_named() {
    let settings = Settings::load(None, Vec::<(String, String)>::new()).unwrap();
    let err = mira_keys::witness(&settings).await.unwrap_err();
    let line = format!("{err:#}");
    assert!(
        line.contains("Audit__WitnessBucket") && line.contains("Audit__WitnessDir"),
        "{line}"
    );
    let dir = std::env::temp_dir().join(format!("mira-keys-{}", tag()));
    let env = vec![
        (
            "Audit__SigningKeyFile".to_owned(),
            dir.join("audit.key").display().to_string(),
        ),
        (
            "Audit__WitnessDir".to_owned(),
            dir.join("witness").display().to_string(),
        ),
        (
            "Keyring__LocalDir".to_owned(),
            dir.join("keyring").display().to_string(),
        ),
    ];
    let settings = Settings::load(None, env).unwrap();
    for line in [
        format!("{:#}", mira_keys::signing_key(&settings).await.unwrap_err()),
        format!("{:#}", mira_keys::witness(&settings).await.unwrap_err()),
    ] {
        assert!(
            line.contains("mira keys init") && line.contains(&dir.display().to_string()),
            "{line}"
        );
    }
    assert!(!dir.exists(), "nothing was created");
    let report = mira_keys::init(&settings).await.unwrap();
    assert!(
        report.lines.iter().filter(|l| l.contains("(created)")).count() >= 2,
        "{:?}",
        report.lines
    );
    assert!(mira_keys::signing_key(&settings).await.is_ok());
    assert!(mira_keys::witness(&settings).await.is_ok());
    std::fs::remove_dir_all(dir).unwrap();
}
