//! The witness in S3 (`Audit__WitnessBucket`): one object per record under
//! `Audit__WitnessPrefix` (layout in `mira_eventlog::witness`). In production the bucket is
//! versioned with Object Lock and a default retention (compliance mode), so no one, the
//! account's root included, can delete or replace a record's version before the retention
//! ends, and its policy refuses a `PutObject` without `If-None-Match: *`, so a writer cannot add
//! a second version either (pulumi/ sets both up). What Object Lock still allows, a delete
//! marker that hides a record from a plain listing, `verify` sees: it lists every version.
//!
//! Every call has a deadline (`Audit__WitnessTimeoutSeconds`): a bucket that accepts a
//! connection and never answers delays a checkpoint, never the relay.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use mira_eventlog::witness::{Created, Listed, Witness, WitnessError};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct S3Witness {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl S3Witness {
    pub fn new(
        sdk: &aws_config::SdkConfig,
        region: Option<&str>,
        bucket: String,
        prefix: String,
        timeout: Duration,
    ) -> Self {
        let mut b = aws_sdk_s3::config::Builder::from(sdk);
        if sdk.endpoint_url().is_some() {
            b = b.force_path_style(true);
        }
        if let Some(r) = region {
            b = b.region(aws_sdk_s3::config::Region::new(r.to_owned()));
        }
        b = b.timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .operation_attempt_timeout(timeout)
                .operation_timeout(timeout)
                .build(),
        );
        Self {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket,
            prefix,
        }
    }

    fn io(&self, reason: impl ToString) -> WitnessError {
        WitnessError::Io {
            witness: self.describe(),
            reason: reason.to_string(),
        }
    }

    fn sdk<E: std::error::Error + 'static>(&self, e: aws_sdk_s3::error::SdkError<E>) -> WitnessError {
        self.io(DisplayErrorContext(&e))
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn folder(&self, folder: Option<Uuid>) -> String {
        match folder {
            Some(e) => format!("{}{e}/", self.prefix),
            None => self.prefix.clone(),
        }
    }
}

#[async_trait::async_trait]
impl Witness for S3Witness {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn create(&self, name: &str, bytes: &[u8]) -> Result<Created, WitnessError> {
        let r = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(name))
            .content_type("application/json")
            .if_none_match("*")
            .body(ByteStream::from(bytes.to_vec()))
            .send()
            .await;
        match r {
            Ok(_) => Ok(Created::New),
            // 412: something is there. What it is decides (ours from before a crash, or not).
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => match self.get(name).await? {
                Some(existing) => Ok(Created::Exists(existing)),
                None => Err(self.io(format!(
                    "{name}: refused as existing, yet nothing can be read there (a delete marker over it?)"
                ))),
            },
            Err(e) => Err(self.sdk(e)),
        }
    }

    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, WitnessError> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(name))
            .send()
            .await
        {
            Ok(out) => {
                let bytes = out.body.collect().await.map_err(|e| self.io(e))?;
                Ok(Some(bytes.into_bytes().to_vec()))
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
            Err(e) => Err(self.sdk(e)),
        }
    }

    async fn epochs(&self) -> Result<Vec<Uuid>, WitnessError> {
        // Versions, not objects: an epoch whose every record sits under a delete marker is
        // still one the witness holds.
        let mut out = Vec::new();
        let (mut key_marker, mut version_marker) = (None, None);
        loop {
            let page = self
                .client
                .list_object_versions()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .delimiter("/")
                .set_key_marker(key_marker)
                .set_version_id_marker(version_marker)
                .send()
                .await
                .map_err(|e| self.sdk(e))?;
            for p in page.common_prefixes() {
                let name = p
                    .prefix()
                    .unwrap_or_default()
                    .strip_prefix(&self.prefix)
                    .unwrap_or_default();
                if let Ok(e) = Uuid::parse_str(name.trim_end_matches('/')) {
                    if !out.contains(&e) {
                        out.push(e);
                    }
                }
            }
            if page.is_truncated() != Some(true) {
                return Ok(out);
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            version_marker = page.next_version_id_marker().map(str::to_owned);
        }
    }

    async fn list(&self, folder: Option<Uuid>, after: &str, limit: usize) -> Result<Vec<Listed>, WitnessError> {
        let prefix = self.folder(folder);
        let mut names: BTreeMap<String, Listed> = BTreeMap::new();
        let mut key_marker = (!after.is_empty()).then(|| format!("{prefix}{after}"));
        let mut version_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_object_versions()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .delimiter("/")
                .set_key_marker(key_marker.clone())
                .set_version_id_marker(version_marker.clone())
                .max_keys(1000)
                .send()
                .await
                .map_err(|e| self.sdk(e))?;
            let mut entry = |key: Option<&str>, marker: bool| {
                let Some(name) = key.and_then(|k| k.strip_prefix(&prefix)) else {
                    return;
                };
                if name <= after {
                    return;
                }
                let l = names.entry(name.to_owned()).or_insert_with(|| Listed {
                    name: name.to_owned(),
                    versions: 0,
                    delete_markers: 0,
                });
                if marker {
                    l.delete_markers += 1;
                } else {
                    l.versions += 1;
                }
            };
            for v in page.versions() {
                entry(v.key(), false);
            }
            for m in page.delete_markers() {
                entry(m.key(), true);
            }
            let truncated = page.is_truncated() == Some(true);
            // A name's versions may continue on the next page: only names before the page's
            // end are complete.
            if !truncated || names.len() > limit {
                let mut out: Vec<Listed> = names.into_values().collect();
                if truncated {
                    out.pop();
                }
                out.truncate(limit);
                return Ok(out);
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            version_marker = page.next_version_id_marker().map(str::to_owned);
        }
    }
}
