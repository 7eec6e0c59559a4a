//! `mira-keys`: where Mira's keys and its checkpoint witness come from, chosen by settings
//! (DESIGN §2, §3, §4.3).
//!
//! * The checkpoint signing key: `Audit__SigningKeySecretId` (AWS Secrets Manager) when set,
//!   else the file `Audit__SigningKeyFile`.
//! * The per-subject data keys of patient data: KMS when `AWS__KMS__KeyId` is set (data keys
//!   generated and unwrapped by KMS, kept wrapped in the database), else the local keyring
//!   directory `Keyring__LocalDir`.
//! * The witness: `Audit__WitnessBucket` (S3, Object Lock in production) or
//!   `Audit__WitnessDir`.
//!
//! Keys are never created silently. `mira keys init` creates what is missing ([`init`]); every
//! other command fails with one line naming the setting when a key is missing.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use ed25519_dalek::VerifyingKey;
use mira_config::Settings;
use mira_eventlog::checkpoint::{self, AuditKey, Checkpointer};
use mira_eventlog::witness::{DirWitness, Witness};
use mira_events::{Keyring, LocalKeyring};
use sqlx::PgPool;

pub mod kms;
pub mod s3_witness;
pub mod secrets;

/// The AWS configuration every key source shares (region from `AWS__Region`; endpoint and
/// credentials from the SDK's own variables, `AWS_ENDPOINT_URL` for an emulator).
pub async fn aws(settings: &Settings) -> aws_config::SdkConfig {
    mira_bus::aws::sdk_config(settings.aws.region.as_deref()).await
}

/// The checkpoint signing key. Fails, naming the setting, when it is missing.
pub async fn signing_key(settings: &Settings) -> anyhow::Result<AuditKey> {
    if let Some(id) = &settings.audit.signing_key_secret_id {
        let sm = secrets::client(&aws(settings).await);
        return secrets::load(&sm, id)
            .await
            .with_context(|| format!("Audit__SigningKeySecretId {id}"));
    }
    let path = &settings.audit.signing_key_file;
    AuditKey::load(path).with_context(|| format!("Audit__SigningKeyFile {}", path.display()))
}

/// The trusted public key for verification: `flag`, else `Audit__PublicKey`, else
/// `Audit__PublicKeyFile`, else the public half of the Secrets Manager key when `Audit__SigningKeySecretId` is set, else the
/// `.pub` beside `Audit__SigningKeyFile`.
pub async fn verifying_key(settings: &Settings, flag: Option<&Path>) -> anyhow::Result<VerifyingKey> {
    if let Some(p) = flag {
        return checkpoint::load_verifying_key(p).with_context(|| format!("--public-key {}", p.display()));
    }
    if let Some(k) = &settings.audit.public_key {
        let bytes: [u8; 32] = hex::decode(k)
            .ok()
            .and_then(|b| b.try_into().ok())
            .context("Audit__PublicKey is not 64 hex digits")?;
        return VerifyingKey::from_bytes(&bytes).context("Audit__PublicKey is not an Ed25519 public key");
    }
    if let Some(p) = &settings.audit.public_key_file {
        return checkpoint::load_verifying_key(p).with_context(|| format!("Audit__PublicKeyFile {}", p.display()));
    }
    if settings.audit.signing_key_secret_id.is_some() {
        return Ok(signing_key(settings).await?.verifying_key());
    }
    let p = checkpoint::public_key_path(&settings.audit.signing_key_file);
    checkpoint::load_verifying_key(&p).with_context(|| {
        format!(
            "Audit__SigningKeyFile's public half {} (or set Audit__PublicKeyFile)",
            p.display()
        )
    })
}

/// The witness checkpoints are copied to. Fails naming both settings when neither is set.
pub async fn witness(settings: &Settings) -> anyhow::Result<Arc<dyn Witness>> {
    let a = &settings.audit;
    match (&a.witness_bucket, &a.witness_dir) {
        (Some(bucket), _) => Ok(Arc::new(s3_witness::S3Witness::new(
            &aws(settings).await,
            settings.aws.s3.region.as_deref(),
            bucket.clone(),
            a.witness_prefix.clone(),
            std::time::Duration::from_secs(a.witness_timeout_seconds),
        ))),
        (None, Some(dir)) => Ok(Arc::new(
            DirWitness::open(dir).with_context(|| format!("Audit__WitnessDir {}", dir.display()))?,
        )),
        (None, None) => anyhow::bail!(
            "no checkpoint witness: set Audit__WitnessBucket (S3, Object Lock) or Audit__WitnessDir (a directory); without one, deleted checkpoints go unnoticed"
        ),
    }
}

/// What a verification needs: the trusted public key and the witness.
pub struct AuditVerifier {
    pub key: VerifyingKey,
    pub witness: Arc<dyn Witness>,
}

impl std::fmt::Debug for AuditVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditVerifier")
            .field("witness", &self.witness.describe())
            .finish()
    }
}

impl AuditVerifier {
    /// One aggregate's events verified (`mira_eventlog::verify::verify_stream`).
    pub async fn verify_stream(
        &self,
        pool: &PgPool,
        tenant: &mira_events::TenantId,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<mira_eventlog::verify::StreamReport, mira_eventlog::verify::VerifyError> {
        mira_eventlog::verify::verify_stream(
            pool,
            &self.key,
            self.witness.as_ref(),
            Some(tenant),
            aggregate_type,
            aggregate_id,
        )
        .await
    }
}

/// The public key and the witness from the settings, as `mira audit verify` reads them.
pub async fn audit_verifier(settings: &Settings) -> anyhow::Result<AuditVerifier> {
    Ok(AuditVerifier {
        key: verifying_key(settings, None).await?,
        witness: witness(settings).await?,
    })
}

/// The signing key and the witness, for the relay and `mira audit checkpoint`.
pub async fn checkpointer(settings: &Settings) -> anyhow::Result<Checkpointer> {
    Ok(Checkpointer::new(
        Arc::new(signing_key(settings).await?),
        witness(settings).await?,
    ))
}

/// The keyring for patient data. Fails naming the setting when the local keyring is missing.
pub async fn keyring(settings: &Settings, pool: &PgPool) -> anyhow::Result<Arc<dyn Keyring>> {
    if let Some(key_id) = &settings.aws.kms.key_id {
        let client = kms::client(&aws(settings).await);
        return Ok(Arc::new(kms::KmsKeyring::new(client, key_id.clone(), pool.clone())));
    }
    let dir = &settings.keyring.local_dir;
    Ok(Arc::new(
        LocalKeyring::open(dir).with_context(|| format!("Keyring__LocalDir {}", dir.display()))?,
    ))
}

/// What `mira keys init` did, one line each.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitReport {
    pub lines: Vec<String>,
    /// The public audit key (hex), for verifiers.
    pub public_key: String,
}

/// `mira keys init`: creates the signing key, the local keyring and the witness directory where
/// the settings name them and they do not exist yet; keeps what exists. With KMS or a witness
/// bucket, checks that they answer.
pub async fn init(settings: &Settings) -> anyhow::Result<InitReport> {
    let mut lines = Vec::new();
    let key = match &settings.audit.signing_key_secret_id {
        Some(id) => {
            let sm = secrets::client(&aws(settings).await);
            let (key, created) = secrets::init(&sm, id)
                .await
                .with_context(|| format!("Audit__SigningKeySecretId {id}"))?;
            lines.push(format!(
                "signing key: secret {id} ({})",
                if created { "created" } else { "kept" }
            ));
            key
        }
        None => {
            let path = &settings.audit.signing_key_file;
            let (key, created) =
                AuditKey::init(path).with_context(|| format!("Audit__SigningKeyFile {}", path.display()))?;
            lines.push(format!(
                "signing key: {} ({}); public key {}",
                path.display(),
                if created { "created" } else { "kept" },
                checkpoint::public_key_path(path).display()
            ));
            key
        }
    };
    match &settings.aws.kms.key_id {
        Some(key_id) => {
            let client = kms::client(&aws(settings).await);
            kms::check(&client, key_id)
                .await
                .with_context(|| format!("AWS__KMS__KeyId {key_id}"))?;
            lines.push(format!("keyring: KMS key {key_id} (answers)"));
        }
        None => {
            let dir = &settings.keyring.local_dir;
            let (_, created) =
                LocalKeyring::init(dir).with_context(|| format!("Keyring__LocalDir {}", dir.display()))?;
            lines.push(format!(
                "keyring: {} ({})",
                dir.display(),
                if created { "created" } else { "kept" }
            ));
        }
    }
    match (&settings.audit.witness_bucket, &settings.audit.witness_dir) {
        (Some(_), _) => {
            let w = witness(settings).await?;
            let epochs = w.epochs().await.with_context(|| "Audit__WitnessBucket")?;
            lines.push(format!("witness: {} (answers; {} epochs)", w.describe(), epochs.len()));
        }
        (None, Some(dir)) => {
            let existed = dir.is_dir();
            DirWitness::create_dir(dir).with_context(|| format!("Audit__WitnessDir {}", dir.display()))?;
            lines.push(format!(
                "witness: directory {} ({})",
                dir.display(),
                if existed { "kept" } else { "created" }
            ));
        }
        (None, None) => lines.push(
            "witness: none set (Audit__WitnessBucket or Audit__WitnessDir); the relay and `mira audit` need one"
                .to_owned(),
        ),
    }
    let public_key = hex::encode(key.verifying_key().as_bytes());
    lines.push(format!("public audit key: {public_key}"));
    Ok(InitReport { lines, public_key })
}
