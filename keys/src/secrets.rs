//! The checkpoint signing key in AWS Secrets Manager (`Audit__SigningKeySecretId`): the secret
//! string is the key's 32 secret bytes as 64 hex digits.

use anyhow::Context;
use aws_sdk_secretsmanager::error::DisplayErrorContext;
use mira_eventlog::checkpoint::AuditKey;

pub fn client(sdk: &aws_config::SdkConfig) -> aws_sdk_secretsmanager::Client {
    aws_sdk_secretsmanager::Client::new(sdk)
}

/// The key, or `None` when the secret does not exist.
async fn fetch(sm: &aws_sdk_secretsmanager::Client, id: &str) -> anyhow::Result<Option<AuditKey>> {
    match sm.get_secret_value().secret_id(id).send().await {
        Ok(out) => {
            let s = out
                .secret_string()
                .context("the secret has no string value (expected 64 hex digits)")?;
            Ok(Some(AuditKey::from_hex("the secret", s)?))
        }
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            Ok(None)
        }
        Err(e) => Err(anyhow::anyhow!("{}", DisplayErrorContext(&e))),
    }
}

/// The key; a missing secret is an error (`mira keys init` creates it).
pub async fn load(sm: &aws_sdk_secretsmanager::Client, id: &str) -> anyhow::Result<AuditKey> {
    fetch(sm, id)
        .await?
        .context("the secret does not exist (run `mira keys init`)")
}

/// `mira keys init`: the key, creating the secret when it does not exist.
pub async fn init(sm: &aws_sdk_secretsmanager::Client, id: &str) -> anyhow::Result<(AuditKey, bool)> {
    if let Some(key) = fetch(sm, id).await? {
        return Ok((key, false));
    }
    let key = AuditKey::generate()?;
    sm.create_secret()
        .name(id)
        .description("Mira: the Ed25519 key that signs the event log's checkpoints (hex)")
        .secret_string(key.secret_hex())
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the secret: {}", DisplayErrorContext(&e)))?;
    Ok((key, true))
}
