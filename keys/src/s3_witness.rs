//! The witness in S3 (`Audit__WitnessBucket`): one object per checkpoint under
//! `Audit__WitnessPrefix`. In production the bucket has Object Lock with a default retention
//! (compliance mode), so no one, the account's root included, can delete or replace a
//! witnessed checkpoint before the retention ends (pulumi/ sets it up).

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use mira_eventlog::witness::{Witness, WitnessError, WitnessRecord};

#[derive(Debug, Clone)]
pub struct S3Witness {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl S3Witness {
    pub fn new(sdk: &aws_config::SdkConfig, region: Option<&str>, bucket: String, prefix: String) -> Self {
        Self {
            client: mira_blobs::s3_client(sdk, region),
            bucket,
            prefix,
        }
    }

    fn io<E: std::error::Error + 'static>(&self, e: aws_sdk_s3::error::SdkError<E>) -> WitnessError {
        WitnessError::Io {
            witness: self.describe(),
            reason: DisplayErrorContext(&e).to_string(),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<WitnessRecord>, WitnessError> {
        match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => {
                let bytes = out.body.collect().await.map_err(|e| WitnessError::Io {
                    witness: self.describe(),
                    reason: e.to_string(),
                })?;
                WitnessRecord::from_bytes(&format!("s3://{}/{key}", self.bucket), &bytes.into_bytes()).map(Some)
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }
}

#[async_trait::async_trait]
impl Witness for S3Witness {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn put(&self, record: &WitnessRecord) -> Result<(), WitnessError> {
        let key = format!("{}{}", self.prefix, WitnessRecord::name(record.seq));
        if let Some(existing) = self.get(&key).await? {
            return record.same_as(&existing, &self.describe());
        }
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(record.to_bytes()))
            .send()
            .await
            .map_err(|e| self.io(e))?;
        Ok(())
    }

    async fn newest(&self) -> Result<Option<WitnessRecord>, WitnessError> {
        let mut best: Option<(i64, String)> = None;
        let mut token = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| self.io(e))?;
            for o in out.contents() {
                let Some(key) = o.key() else { continue };
                let name = key.strip_prefix(&self.prefix).unwrap_or(key);
                if let Some(seq) = WitnessRecord::parse_name(name) {
                    if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                        best = Some((seq, key.to_owned()));
                    }
                }
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        match best {
            Some((_, key)) => self.get(&key).await,
            None => Ok(None),
        }
    }
}
