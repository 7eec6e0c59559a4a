//! Per-subject data keys from AWS KMS (`AWS__KMS__KeyId`). KMS generates each subject's data
//! key; the database keeps only the wrapped key (`data_keys`), bound to its subject by the
//! encryption context; every use unwraps it through KMS. Erasure deletes the wrapped key.

use aws_sdk_kms::error::DisplayErrorContext;
use aws_sdk_kms::primitives::Blob;
use mira_events::{Keyring, KeyringError};
use sqlx::PgPool;

pub fn client(sdk: &aws_config::SdkConfig) -> aws_sdk_kms::Client {
    aws_sdk_kms::Client::new(sdk)
}

/// Checks that the key exists and is enabled (`mira keys init`).
pub async fn check(client: &aws_sdk_kms::Client, key_id: &str) -> anyhow::Result<()> {
    let out = client
        .describe_key()
        .key_id(key_id)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}", DisplayErrorContext(&e)))?;
    let enabled = out.key_metadata().is_some_and(|m| m.enabled());
    anyhow::ensure!(enabled, "the KMS key is not enabled");
    Ok(())
}

#[derive(Debug, Clone)]
pub struct KmsKeyring {
    client: aws_sdk_kms::Client,
    key_id: String,
    pool: PgPool,
}

fn service<E: std::error::Error + 'static>(e: aws_sdk_kms::error::SdkError<E>) -> KeyringError {
    KeyringError::Service(format!("KMS: {}", DisplayErrorContext(&e)))
}

fn db(e: sqlx::Error) -> KeyringError {
    KeyringError::Service(format!("data_keys: {e}"))
}

fn key32(subject: &str, b: Option<&Blob>) -> Result<[u8; 32], KeyringError> {
    b.and_then(|b| <[u8; 32]>::try_from(b.as_ref()).ok())
        .ok_or_else(|| KeyringError::Corrupt(subject.to_owned()))
}

impl KmsKeyring {
    pub fn new(client: aws_sdk_kms::Client, key_id: String, pool: PgPool) -> Self {
        Self { client, key_id, pool }
    }

    async fn unwrap_key(&self, subject: &str, wrapped: Vec<u8>) -> Result<[u8; 32], KeyringError> {
        let out = self
            .client
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(wrapped))
            .encryption_context("mira:subject", subject)
            .send()
            .await
            .map_err(service)?;
        key32(subject, out.plaintext())
    }
}

#[async_trait::async_trait]
impl Keyring for KmsKeyring {
    async fn key_for(&self, subject: &str) -> Result<[u8; 32], KeyringError> {
        if let Some(k) = self.existing_key(subject).await? {
            return Ok(k);
        }
        let out = self
            .client
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256)
            .encryption_context("mira:subject", subject)
            .send()
            .await
            .map_err(service)?;
        let wrapped = out
            .ciphertext_blob()
            .ok_or_else(|| KeyringError::Service("KMS returned no wrapped key".into()))?;
        let inserted = sqlx::query(
            "INSERT INTO data_keys (subject, kms_key_id, wrapped) VALUES ($1, $2, $3) ON CONFLICT (subject) DO NOTHING",
        )
        .bind(subject)
        .bind(&self.key_id)
        .bind(wrapped.as_ref())
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        if inserted == 1 {
            return key32(subject, out.plaintext());
        }
        // Another process created the subject's key first: use that one.
        self.existing_key(subject)
            .await?
            .ok_or_else(|| KeyringError::Erased(subject.to_owned()))
    }

    async fn existing_key(&self, subject: &str) -> Result<Option<[u8; 32]>, KeyringError> {
        let wrapped: Option<Vec<u8>> = sqlx::query_scalar("SELECT wrapped FROM data_keys WHERE subject = $1")
            .bind(subject)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        match wrapped {
            Some(w) => Ok(Some(self.unwrap_key(subject, w).await?)),
            None => Ok(None),
        }
    }

    async fn erase(&self, subject: &str) -> Result<(), KeyringError> {
        sqlx::query("DELETE FROM data_keys WHERE subject = $1")
            .bind(subject)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }
}
