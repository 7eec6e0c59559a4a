//! The production key sources against moto's KMS, Secrets Manager and S3, over real
//! connections: data keys generated and unwrapped by KMS and kept wrapped in PostgreSQL, the
//! signing key in Secrets Manager, and the checkpoint witness in an Object Lock bucket.

use std::sync::Arc;

use mira_config::Settings;
use mira_eventlog::testing::TestDb;
use mira_eventlog::witness::{Witness, WitnessError, WitnessRecord};
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
}

fn record(seq: i64, digest: &str) -> WitnessRecord {
    WitnessRecord {
        seq,
        epoch: uuid::Uuid::nil(),
        created_at_micros: 1,
        upto_tx: 2,
        upto_position: 3,
        event_count: 4,
        prev_digest: "00".repeat(32),
        digest: digest.repeat(32),
        key_id: "k".into(),
        signature: "00".repeat(64),
    }
}

#[tokio::test]
async fn the_witness_bucket_keeps_each_checkpoint_once() {
    let mut env = aws_env();
    let bucket = format!("mira-witness-{}", tag());
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk().await)
            .force_path_style(true)
            .build(),
    );
    s3.create_bucket()
        .bucket(&bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .unwrap();
    env.push(("Audit__WitnessBucket".into(), bucket.clone()));
    let settings = Settings::load(None, env).unwrap();
    let w: Arc<dyn Witness> = mira_keys::witness(&settings).await.unwrap();
    assert!(w.describe().starts_with(&format!("s3://{bucket}/checkpoints/")));
    assert_eq!(w.newest().await.unwrap(), None);
    for seq in [3, 12, 7] {
        w.put(&record(seq, "aa")).await.unwrap();
    }
    w.put(&record(12, "aa")).await.unwrap();
    assert_eq!(w.newest().await.unwrap(), Some(record(12, "aa")));
    assert!(matches!(
        w.put(&record(12, "bb")).await,
        Err(WitnessError::Conflict { seq: 12, .. })
    ));
    let listed = s3.list_objects_v2().bucket(&bucket).send().await.unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.contains(&"checkpoints/checkpoint-00000000000000000012.json"));
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
