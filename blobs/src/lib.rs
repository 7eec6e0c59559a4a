//! `mira-blobs`: blob storage for slides and results. Two providers behind one trait: S3
//! (presigned URLs, single PUT or multipart, server-side copies) and the local store of `mira
//! dev`, which issues URLs of the same shape that the gateway signs and verifies itself
//! (HMAC-SHA256 over method, key, expiry, part, type and size limit), so a client uploads the
//! same way to both. [`s3_client`] is the one way Mira's processes make an S3 client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod layers;
pub mod stream;

/// An S3 client for Mira's buckets (slides, results, the witness): in `region` when given,
/// and with an emulator endpoint (`AWS_ENDPOINT_URL`) path-style addressing, since
/// virtual-hosted buckets need DNS an emulator does not have.
pub fn s3_client(sdk: &aws_config::SdkConfig, region: Option<&str>) -> aws_sdk_s3::Client {
    let mut b = aws_sdk_s3::config::Builder::from(sdk);
    if sdk.endpoint_url().is_some() {
        b = b.force_path_style(true);
    }
    if let Some(r) = region {
        b = b.region(aws_sdk_s3::config::Region::new(r.to_owned()));
    }
    aws_sdk_s3::Client::from_conf(b.build())
}

/// Reading and writing whole objects, for the worker: the store's directory in `mira dev` (the
/// directory the gateway's local store writes), or a bucket.
#[derive(Clone, Debug)]
pub enum ObjectStore {
    Local(PathBuf),
    S3 { client: aws_sdk_s3::Client, bucket: String },
}

impl ObjectStore {
    pub fn s3(sdk: &aws_config::SdkConfig, region: Option<&str>, bucket: String) -> Self {
        Self::S3 {
            client: s3_client(sdk, region),
            bucket,
        }
    }

    /// A local path holding the object (downloaded into `scratch` when it lives in S3): the
    /// version `version_id` when given (a versioned bucket), else the newest.
    pub async fn fetch(&self, key: &str, version_id: Option<&str>, scratch: &Path) -> Result<PathBuf, BlobError> {
        self.fetch_as(key, version_id, scratch, "slide").await
    }

    /// As [`ObjectStore::fetch`], an object from S3 landing in `scratch` as `name`.
    pub async fn fetch_as(
        &self,
        key: &str,
        version_id: Option<&str>,
        scratch: &Path,
        name: &str,
    ) -> Result<PathBuf, BlobError> {
        if !valid_key(key) {
            return Err(BlobError::Storage(format!("invalid object key {key:?}")));
        }
        match self {
            Self::Local(dir) => {
                let path = dir.join(key);
                match tokio::fs::metadata(&path).await {
                    Ok(m) if m.is_file() => Ok(path),
                    Ok(_) => Err(BlobError::Storage(format!("the object {key} is not a file"))),
                    Err(e) => Err(BlobError::Storage(format!("the object {key} cannot be read: {e}"))),
                }
            }
            Self::S3 { client, bucket } => {
                let path = scratch.join(name);
                let obj = client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .set_version_id(version_id.map(str::to_owned))
                    .send()
                    .await
                    .map_err(s3err)?;
                let mut body = obj.body.into_async_read();
                let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
                tokio::io::copy(&mut body, &mut file).await.map_err(io)?;
                Ok(path)
            }
        }
    }

    /// Writes `bytes` as `key`, whole or not at all.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), BlobError> {
        if !valid_key(key) {
            return Err(BlobError::Storage(format!("invalid object key {key:?}")));
        }
        match self {
            Self::Local(dir) => {
                let path = dir.join(key);
                if let Some(p) = path.parent() {
                    tokio::fs::create_dir_all(p).await.map_err(io)?;
                }
                let tmp = path.with_extension(format!("part-{}", uuid::Uuid::new_v4().simple()));
                tokio::fs::write(&tmp, bytes).await.map_err(io)?;
                tokio::fs::rename(&tmp, &path).await.map_err(io)
            }
            Self::S3 { client, bucket } => {
                client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .body(bytes.into())
                    .send()
                    .await
                    .map_err(s3err)?;
                Ok(())
            }
        }
    }
}

/// How the client uploads a slide: one signed `PUT`, or a multipart upload.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum UploadPlan {
    #[schema(title = "Single")]
    Single {
        #[schema(value_type = String, pattern = "^PUT$")]
        method: String,
        url: String,
        headers: BTreeMap<String, String>,
        expires_at: DateTime<Utc>,
    },
    #[schema(title = "Multipart")]
    Multipart { multipart: MultipartPlan },
}

/// A multipart upload, and the signed URLs of one page of its parts: the first page when the
/// slide is registered, the others as the client asks for them
/// (`GET /api/slides/{id}/upload/parts?upload_id=&from=`), so that a declared size never
/// makes an answer larger than a page.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = PartPage)]
pub struct MultipartPlan {
    pub upload_id: String,
    pub part_size: u64,
    /// How many parts the upload has; the last one holds what is left.
    #[schema(minimum = 1, maximum = 10000)]
    pub part_count: u32,
    /// Parts `from` to at most `from + PART_URL_PAGE - 1`.
    #[schema(max_items = 100)]
    pub parts: Vec<PartUrl>,
    pub expires_at: DateTime<Utc>,
}

/// The most part URLs in one answer.
pub const PART_URL_PAGE: u32 = 100;

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct PartUrl {
    pub part_number: u32,
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletedPart {
    #[schema(minimum = 1, maximum = 10000)]
    pub part_number: u32,
    pub etag: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The client's fault: a part list that does not match what was uploaded, and the like.
    #[error("{0}")]
    Rejected(String),
    #[error("blob storage failed: {0}")]
    Storage(String),
}

/// Sizes that decide between one PUT and a multipart upload.
#[derive(Debug, Clone, Copy)]
pub struct UploadPolicy {
    pub expires: Duration,
    /// Uploads larger than this are multipart.
    pub multipart_threshold: u64,
    /// The part size asked for; raised when a file would need more than 10,000 parts.
    pub part_size: u64,
    /// Objects up to this size are copied with one CopyObject (S3 allows 5 GiB); larger ones
    /// part by part.
    pub copy_single_max: u64,
}

impl UploadPolicy {
    /// The part size for `size` bytes: S3 allows at most 10,000 parts.
    pub fn part_size_for(&self, size: u64) -> u64 {
        self.part_size.max(size.div_ceil(10_000))
    }
}

/// What a copy made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub size: u64,
    /// The copy's version id in a versioned bucket; none on the local store or an unversioned
    /// bucket.
    pub version_id: Option<String>,
}

#[async_trait::async_trait]
pub trait BlobStore: Send + Sync {
    /// `s3` or `local`.
    fn provider(&self) -> &'static str;
    /// URLs for uploading `size` bytes to `key`.
    async fn plan_upload(&self, key: &str, size: u64, content_type: &str) -> Result<UploadPlan, BlobError>;
    /// The page of part URLs from part `from` of the multipart upload `upload_id` of `key`,
    /// for an object of `size` bytes. `from` must be 1 to the upload's part count.
    async fn part_page(&self, key: &str, upload_id: &str, size: u64, from: u32) -> Result<MultipartPlan, BlobError> {
        let part_size = self.policy().part_size_for(size);
        let part_count = size.div_ceil(part_size).max(1) as u32;
        if from == 0 || from > part_count {
            return Err(BlobError::Rejected(format!(
                "from: the upload has parts 1 to {part_count}"
            )));
        }
        let last = part_count.min(from.saturating_add(PART_URL_PAGE - 1));
        let mut parts = Vec::with_capacity((last - from + 1) as usize);
        for n in from..=last {
            parts.push(PartUrl {
                part_number: n,
                url: self.part_url(key, upload_id, n, part_size).await?,
            });
        }
        Ok(MultipartPlan {
            upload_id: upload_id.to_owned(),
            part_size,
            part_count,
            parts,
            expires_at: expires_at(self.policy().expires),
        })
    }
    /// The signed URL of part `n` of an upload.
    async fn part_url(&self, key: &str, upload_id: &str, n: u32, part_size: u64) -> Result<String, BlobError>;
    /// The sizes and expiry this store plans uploads with.
    fn policy(&self) -> &UploadPolicy;
    /// Multipart uploads in progress for `key`, newest last.
    async fn uploads_in_progress(&self, key: &str) -> Result<Vec<String>, BlobError>;
    /// Assembles a multipart upload from its parts.
    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[CompletedPart]) -> Result<(), BlobError>;
    /// The object's size, or `None` when it does not exist.
    async fn size_of(&self, key: &str) -> Result<Option<u64>, BlobError>;
    /// Copies `from` to `to` (replacing it) and returns the copy's size and version; `None`
    /// when `from` does not exist. `mira dev`'s store and S3 both copy server-side.
    async fn copy(&self, from: &str, to: &str) -> Result<Option<Copied>, BlobError>;
    /// A short-lived URL to download the result object `key` (from the results bucket, where
    /// one is set apart).
    async fn download_url(&self, key: &str) -> Result<String, BlobError>;
    /// `len` bytes from `start` of the result object `key` (one ranged GET on S3); `None` when
    /// the object does not exist. A range past the object's end is an error.
    async fn read_result_range(&self, key: &str, start: u64, len: u64) -> Result<Option<Vec<u8>>, BlobError>;
    /// The whole result object `key` (a manifest); `None` when it does not exist.
    async fn read_result(&self, key: &str) -> Result<Option<Vec<u8>>, BlobError>;
    /// Is the store reachable (for `/readyz`)?
    async fn ready(&self) -> Result<(), BlobError>;
}

fn expires_at(d: Duration) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::minutes(15))
}

// ---------------------------------------------------------------------------------------------
// S3

pub struct S3Blobs {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// Where results are read from (`AWS__S3__ResultsBucketName`); `bucket` unless set.
    results_bucket: String,
    policy: UploadPolicy,
}

impl std::fmt::Debug for S3Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Blobs").field("bucket", &self.bucket).finish()
    }
}

fn s3err<E: std::error::Error + 'static>(e: aws_sdk_s3::error::SdkError<E>) -> BlobError {
    BlobError::Storage(aws_sdk_s3::error::DisplayErrorContext(&e).to_string())
}

impl S3Blobs {
    /// A client for `bucket` ([`s3_client`]).
    pub fn new(sdk: &aws_config::SdkConfig, region: Option<&str>, bucket: String, policy: UploadPolicy) -> Self {
        Self {
            client: s3_client(sdk, region),
            results_bucket: bucket.clone(),
            bucket,
            policy,
        }
    }

    /// Results live in `bucket` (the worker writes them there).
    pub fn with_results_bucket(mut self, bucket: Option<String>) -> Self {
        if let Some(b) = bucket {
            self.results_bucket = b;
        }
        self
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Starts a multipart upload of `key`; returns its id.
    async fn create_multipart(&self, key: &str, content_type: Option<&str>) -> Result<String, BlobError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_content_type(content_type.map(str::to_owned))
            .send()
            .await
            .map_err(s3err)?;
        created
            .upload_id()
            .map(str::to_owned)
            .ok_or_else(|| BlobError::Storage("CreateMultipartUpload returned no upload id".into()))
    }

    /// The object's size and version id; `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<Copied>, BlobError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(h) => Ok(Some(Copied {
                size: h.content_length().unwrap_or(0).max(0) as u64,
                version_id: h
                    .version_id()
                    .filter(|v| !v.is_empty() && *v != "null")
                    .map(str::to_owned),
            })),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(s3err(e)),
        }
    }

    /// A server-side copy of an object larger than one CopyObject may be (5 GiB), part by part.
    async fn copy_in_parts(&self, source: &str, to: &str, size: u64) -> Result<(), BlobError> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart as S3Part};
        let upload_id = self.create_multipart(to, None).await?;
        let part = self.policy.part_size_for(size);
        let mut parts = Vec::new();
        let result: Result<(), BlobError> = async {
            for (i, start) in (0..size).step_by(part as usize).enumerate() {
                let end = (start + part).min(size) - 1;
                let out = self
                    .client
                    .upload_part_copy()
                    .bucket(&self.bucket)
                    .key(to)
                    .upload_id(&upload_id)
                    .part_number(i as i32 + 1)
                    .copy_source(source)
                    .copy_source_range(format!("bytes={start}-{end}"))
                    .send()
                    .await
                    .map_err(s3err)?;
                let etag = out
                    .copy_part_result()
                    .and_then(|r| r.e_tag())
                    .ok_or_else(|| BlobError::Storage("UploadPartCopy returned no ETag".into()))?;
                parts.push(S3Part::builder().part_number(i as i32 + 1).e_tag(etag).build());
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(to)
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
                .map(|_| ())
                .or_else(|e| match e {
                    // As in complete_multipart: a 2xx with a body the SDK cannot parse; the
                    // caller checks the copy's size.
                    aws_sdk_s3::error::SdkError::ServiceError(se) if se.raw().status().is_success() => Ok(()),
                    e => Err(s3err(e)),
                })
        }
        .await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(to)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    fn presigning(&self) -> Result<aws_sdk_s3::presigning::PresigningConfig, BlobError> {
        aws_sdk_s3::presigning::PresigningConfig::expires_in(self.policy.expires)
            .map_err(|e| BlobError::Storage(e.to_string()))
    }
}

#[async_trait::async_trait]
impl BlobStore for S3Blobs {
    fn provider(&self) -> &'static str {
        "s3"
    }

    async fn plan_upload(&self, key: &str, size: u64, content_type: &str) -> Result<UploadPlan, BlobError> {
        if size <= self.policy.multipart_threshold {
            let req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_type(content_type)
                .presigned(self.presigning()?)
                .await
                .map_err(s3err)?;
            let headers = req
                .headers()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            return Ok(UploadPlan::Single {
                method: req.method().to_owned(),
                url: req.uri().to_owned(),
                headers,
                expires_at: expires_at(self.policy.expires),
            });
        }
        let upload_id = self.create_multipart(key, Some(content_type)).await?;
        Ok(UploadPlan::Multipart {
            multipart: self.part_page(key, &upload_id, size, 1).await?,
        })
    }

    async fn part_url(&self, key: &str, upload_id: &str, n: u32, _part_size: u64) -> Result<String, BlobError> {
        let req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(n as i32)
            .presigned(self.presigning()?)
            .await
            .map_err(s3err)?;
        Ok(req.uri().to_owned())
    }

    fn policy(&self) -> &UploadPolicy {
        &self.policy
    }

    async fn uploads_in_progress(&self, key: &str) -> Result<Vec<String>, BlobError> {
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(key)
            .send()
            .await
            .map_err(s3err)?;
        let mut ups: Vec<_> = out
            .uploads()
            .iter()
            .filter(|u| u.key() == Some(key))
            .filter_map(|u| Some((u.initiated().map(|t| t.secs()), u.upload_id()?.to_owned())))
            .collect();
        ups.sort();
        Ok(ups.into_iter().map(|(_, id)| id).collect())
    }

    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[CompletedPart]) -> Result<(), BlobError> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart as S3Part};
        let parts = parts
            .iter()
            .map(|p| {
                let etag = if p.etag.starts_with('"') {
                    p.etag.clone()
                } else {
                    format!("\"{}\"", p.etag)
                };
                S3Part::builder().part_number(p.part_number as i32).e_tag(etag).build()
            })
            .collect();
        let res = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            // A 2xx whose body the SDK cannot parse: S3 completed the upload. (moto answers
            // with a `CompleteMultipartUploadResponse` root; the caller checks the object's
            // size next, so a completion that did not happen cannot pass unnoticed.)
            Err(aws_sdk_s3::error::SdkError::ServiceError(se)) if se.raw().status().is_success() => {
                tracing::debug!(error = ?se.err(), "CompleteMultipartUpload answered 2xx with an unexpected body");
                Ok(())
            }
            Err(e) => {
                let code = e.as_service_error().and_then(|s| {
                    use aws_sdk_s3::error::ProvideErrorMetadata;
                    s.code().map(str::to_owned)
                });
                match code.as_deref() {
                    Some(
                        c @ ("InvalidPart" | "InvalidPartOrder" | "EntityTooSmall" | "NoSuchUpload" | "MalformedXML"),
                    ) => Err(BlobError::Rejected(format!("S3 refused to complete the upload: {c}"))),
                    _ => Err(s3err(e)),
                }
            }
        }
    }

    async fn size_of(&self, key: &str) -> Result<Option<u64>, BlobError> {
        Ok(self.head(key).await?.map(|c| c.size))
    }

    async fn copy(&self, from: &str, to: &str) -> Result<Option<Copied>, BlobError> {
        let Some(size) = self.size_of(from).await? else {
            return Ok(None);
        };
        let source = format!("{}/{}", self.bucket, from);
        if size <= self.policy.copy_single_max {
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .key(to)
                .copy_source(&source)
                .send()
                .await
                .map_err(s3err)?;
        } else {
            self.copy_in_parts(&source, to, size).await?;
        }
        // The version the copy made: the gateway serialises the copies of one slide, and no
        // URL is ever issued for the copy's key, so the newest version is this copy.
        self.head(to)
            .await?
            .ok_or_else(|| BlobError::Storage(format!("the copy {to} is missing after copying")))
            .map(Some)
    }

    async fn download_url(&self, key: &str) -> Result<String, BlobError> {
        let req = self
            .client
            .get_object()
            .bucket(&self.results_bucket)
            .key(key)
            .response_content_type(content_type_of(key))
            .presigned(self.presigning()?)
            .await
            .map_err(s3err)?;
        Ok(req.uri().to_owned())
    }

    async fn read_result(&self, key: &str) -> Result<Option<Vec<u8>>, BlobError> {
        let got = self
            .client
            .get_object()
            .bucket(&self.results_bucket)
            .key(key)
            .send()
            .await;
        let obj = match got {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(s3err(e)),
        };
        let bytes = obj
            .body
            .collect()
            .await
            .map_err(|e| BlobError::Storage(format!("reading {key}: {e}")))?;
        Ok(Some(bytes.into_bytes().to_vec()))
    }

    async fn read_result_range(&self, key: &str, start: u64, len: u64) -> Result<Option<Vec<u8>>, BlobError> {
        if len == 0 {
            return Ok(Some(Vec::new()));
        }
        let got = self
            .client
            .get_object()
            .bucket(&self.results_bucket)
            .key(key)
            .range(format!("bytes={start}-{}", start + len - 1))
            .send()
            .await;
        let obj = match got {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(s3err(e)),
        };
        let bytes = obj
            .body
            .collect()
            .await
            .map_err(|e| BlobError::Storage(format!("reading {key}: {e}")))?
            .into_bytes();
        if bytes.len() as u64 != len {
            return Err(BlobError::Storage(format!(
                "{key}: {} bytes at {start} asked, {} read",
                len,
                bytes.len()
            )));
        }
        Ok(Some(bytes.to_vec()))
    }

    async fn ready(&self) -> Result<(), BlobError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(s3err)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The local store

/// `mira dev`'s blob store: files under a directory, uploaded through URLs on the gateway
/// (`/blobs/<key>`) that carry an expiry and an HMAC the gateway checks.
pub struct LocalBlobs {
    dir: PathBuf,
    base_url: String,
    secret: [u8; 32],
    policy: UploadPolicy,
}

impl std::fmt::Debug for LocalBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBlobs").field("dir", &self.dir).finish()
    }
}

/// Query parameters of a local signed URL.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SignedQuery {
    #[serde(rename = "X-Mira-Expires")]
    pub expires: Option<i64>,
    #[serde(rename = "X-Mira-Signature")]
    pub signature: Option<String>,
    #[serde(rename = "uploadId")]
    pub upload_id: Option<String>,
    #[serde(rename = "partNumber")]
    pub part_number: Option<u32>,
    /// The type the slide was registered with: a single PUT must carry it (signed).
    #[serde(rename = "X-Mira-Content-Type")]
    pub content_type: Option<String>,
    /// The most bytes a PUT may carry: the declared size, or the part size (signed).
    #[serde(rename = "X-Mira-Max-Bytes")]
    pub max_bytes: Option<u64>,
}

/// The media type an object is served with, from its key's extension: a job's results
/// (`.dzi`, tiles, the mask, the manifest and statistics) are served as what they are, so a
/// viewer can use them straight from the store; anything else is octet-stream.
pub fn content_type_of(key: &str) -> &'static str {
    let ext = key.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("dzi") => "application/xml",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        _ => "application/octet-stream",
    }
}

/// A key is a relative path of safe segments; nothing can climb out of the store.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 1024
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && !seg.starts_with(".mira")
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.=".contains(&b))
        })
}

fn valid_upload_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// What a local URL's signature covers: every field in a fixed order, each present or absent
/// (`-`) and length-prefixed, so no value can be moved into another field and still verify
/// (a size limit folded into the content type, say).
fn signed_string(
    method: &str,
    key: &str,
    expires: i64,
    part: Option<(&str, u32)>,
    ct: Option<&str>,
    max: Option<u64>,
) -> Vec<u8> {
    let expires = expires.to_string();
    let part_number = part.map(|(_, n)| n.to_string());
    let max = max.map(|m| m.to_string());
    let fields: [(&str, Option<&str>); 7] = [
        ("method", Some(method)),
        ("key", Some(key)),
        ("expires", Some(&expires)),
        ("upload-id", part.map(|(id, _)| id)),
        ("part-number", part_number.as_deref()),
        ("content-type", ct),
        ("max-bytes", max.as_deref()),
    ];
    let mut out = b"mira-blob-v2\n".to_vec();
    for (name, value) in fields {
        match value {
            Some(v) => out.extend_from_slice(format!("{name}+{}:{v}\n", v.len()).as_bytes()),
            None => out.extend_from_slice(format!("{name}-\n").as_bytes()),
        }
    }
    out
}

impl LocalBlobs {
    /// Opens (creating) the store in `dir`; the signing secret lives in `dir/.mira-secret`.
    pub fn open(dir: impl AsRef<Path>, base_url: impl Into<String>, policy: UploadPolicy) -> std::io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(dir.join(".mira-multipart"))?;
        let secret_file = dir.join(".mira-secret");
        let secret = match std::fs::read_to_string(&secret_file) {
            Ok(s) => {
                let bytes = hex::decode(s.trim())
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", secret_file.display())))?;
                <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| std::io::Error::other(format!("{}: not a 32-byte key", secret_file.display())))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                getrandom::getrandom(&mut k).map_err(|e| std::io::Error::other(e.to_string()))?;
                write_private(&secret_file, hex::encode(k).as_bytes())?;
                k
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            dir,
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            secret,
            policy,
        })
    }

    fn mac(
        &self,
        method: &str,
        key: &str,
        expires: i64,
        part: Option<(&str, u32)>,
        ct: Option<&str>,
        max: Option<u64>,
    ) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(&signed_string(method, key, expires, part, ct, max));
        mac
    }

    fn url(&self, method: &str, key: &str, part: Option<(&str, u32)>, ct: Option<&str>, max: Option<u64>) -> String {
        let expires = expires_at(self.policy.expires).timestamp();
        let sig = hex::encode(self.mac(method, key, expires, part, ct, max).finalize().into_bytes());
        let mut url = format!(
            "{}/blobs/{key}?X-Mira-Expires={expires}&X-Mira-Signature={sig}",
            self.base_url
        );
        if let Some((id, n)) = part {
            url.push_str(&format!("&uploadId={id}&partNumber={n}"));
        }
        if let Some(ct) = ct {
            // Registered types are tokens (letters, digits, `/.+-`); `+` would read as a space.
            url.push_str(&format!("&X-Mira-Content-Type={}", ct.replace('+', "%2B")));
        }
        if let Some(max) = max {
            url.push_str(&format!("&X-Mira-Max-Bytes={max}"));
        }
        url
    }

    /// Checks a signed request. The error says what is wrong, for a 403.
    pub fn check(&self, method: &str, key: &str, q: &SignedQuery) -> Result<(), String> {
        if !valid_key(key) {
            return Err("invalid object key".into());
        }
        let (Some(expires), Some(sig)) = (q.expires, q.signature.as_deref()) else {
            return Err("the URL is not signed".into());
        };
        let part = match (&q.upload_id, q.part_number) {
            (Some(id), Some(n)) if valid_upload_id(id) => Some((id.as_str(), n)),
            (None, None) => None,
            _ => return Err("uploadId and partNumber go together".into()),
        };
        let given = hex::decode(sig).map_err(|_| "bad signature".to_string())?;
        self.mac(method, key, expires, part, q.content_type.as_deref(), q.max_bytes)
            .verify_slice(&given)
            .map_err(|_| "bad signature".to_string())?;
        if Utc::now().timestamp() > expires {
            return Err("the URL has expired".into());
        }
        Ok(())
    }

    pub fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    fn upload_dir(&self, upload_id: &str) -> PathBuf {
        self.dir.join(".mira-multipart").join(upload_id)
    }

    /// Where a PUT to a signed URL writes: the object itself, or one part of an upload.
    pub fn put_target(&self, key: &str, q: &SignedQuery) -> Result<PathBuf, String> {
        match (&q.upload_id, q.part_number) {
            (Some(id), Some(n)) => {
                let dir = self.upload_dir(id);
                let owner = std::fs::read_to_string(dir.join("key")).map_err(|_| "no such upload".to_string())?;
                if owner != key {
                    return Err("the upload belongs to another object".into());
                }
                if n == 0 || n > 10_000 {
                    return Err("partNumber must be 1 to 10000".into());
                }
                Ok(dir.join(format!("part-{n:05}")))
            }
            _ => Ok(self.path_of(key)),
        }
    }

    /// Writes an uploaded stream to `target` atomically (temporary file, then rename) and
    /// returns its ETag: the hex SHA-256 of the bytes, quoted. A body longer than `max` is
    /// refused as soon as it passes it, and nothing is kept.
    pub async fn write_stream<S, E>(&self, target: &Path, mut body: S, max: Option<u64>) -> Result<String, WriteError>
    where
        S: futures_core::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use tokio::io::AsyncWriteExt;
        let other = |e: std::io::Error| WriteError::Other(e.to_string());
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(other)?;
        }
        let tmp = target.with_extension(format!("upload-{}", uuid::Uuid::new_v4().simple()));
        let mut file = tokio::fs::File::create(&tmp).await.map_err(other)?;
        let mut hash = Sha256::new();
        let mut written = 0u64;
        let result: Result<(), WriteError> = async {
            while let Some(chunk) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_next(cx)).await {
                let chunk = chunk.map_err(|e| WriteError::Other(format!("upload interrupted: {e}")))?;
                written += chunk.len() as u64;
                if let Some(max) = max.filter(|m| written > *m) {
                    return Err(WriteError::TooLarge(max));
                }
                hash.update(&chunk);
                file.write_all(&chunk).await.map_err(other)?;
            }
            file.sync_all().await.map_err(other)?;
            Ok(())
        }
        .await;
        drop(file);
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, target).await.map_err(other)?;
        Ok(format!("\"{}\"", hex::encode(hash.finalize())))
    }
}

/// Why an upload to the local store was not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The body passed the signed limit.
    TooLarge(u64),
    Other(String),
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)?.write_all(bytes)
}

fn io(e: std::io::Error) -> BlobError {
    BlobError::Storage(e.to_string())
}

#[async_trait::async_trait]
impl BlobStore for LocalBlobs {
    fn provider(&self) -> &'static str {
        "local"
    }

    async fn plan_upload(&self, key: &str, size: u64, content_type: &str) -> Result<UploadPlan, BlobError> {
        if !valid_key(key) {
            return Err(BlobError::Storage(format!("invalid object key {key:?}")));
        }
        if size <= self.policy.multipart_threshold {
            return Ok(UploadPlan::Single {
                method: "PUT".into(),
                url: self.url("PUT", key, None, Some(content_type), Some(size)),
                headers: BTreeMap::from([("content-type".to_owned(), content_type.to_owned())]),
                expires_at: expires_at(self.policy.expires),
            });
        }
        let upload_id = uuid::Uuid::now_v7().simple().to_string();
        let dir = self.upload_dir(&upload_id);
        tokio::fs::create_dir_all(&dir).await.map_err(io)?;
        tokio::fs::write(dir.join("key"), key).await.map_err(io)?;
        Ok(UploadPlan::Multipart {
            multipart: self.part_page(key, &upload_id, size, 1).await?,
        })
    }

    async fn part_url(&self, key: &str, upload_id: &str, n: u32, part_size: u64) -> Result<String, BlobError> {
        if !valid_upload_id(upload_id) {
            return Err(BlobError::Rejected("upload_id: not an upload of this store".into()));
        }
        Ok(self.url("PUT", key, Some((upload_id, n)), None, Some(part_size)))
    }

    fn policy(&self) -> &UploadPolicy {
        &self.policy
    }

    async fn uploads_in_progress(&self, key: &str) -> Result<Vec<String>, BlobError> {
        let mut out = Vec::new();
        let mut rd = tokio::fs::read_dir(self.dir.join(".mira-multipart"))
            .await
            .map_err(io)?;
        while let Some(e) = rd.next_entry().await.map_err(io)? {
            if tokio::fs::read_to_string(e.path().join("key")).await.ok().as_deref() == Some(key) {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        // Upload ids are UUIDv7: sorting them sorts by creation.
        out.sort();
        Ok(out)
    }

    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[CompletedPart]) -> Result<(), BlobError> {
        if !valid_upload_id(upload_id) {
            return Err(BlobError::Rejected("no such upload".into()));
        }
        let dir = self.upload_dir(upload_id);
        match tokio::fs::read_to_string(dir.join("key")).await {
            Ok(k) if k == key => {}
            _ => return Err(BlobError::Rejected("no such upload".into())),
        }
        if parts.is_empty() || parts.windows(2).any(|w| w[0].part_number >= w[1].part_number) {
            return Err(BlobError::Rejected(
                "parts must be listed in ascending part_number order".into(),
            ));
        }
        // Check every part before assembling anything.
        let mut files = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let f = dir.join(format!("part-{:05}", p.part_number));
            let bytes_len = match tokio::fs::metadata(&f).await {
                Ok(m) => m.len(),
                Err(_) => {
                    return Err(BlobError::Rejected(format!(
                        "part {} was never uploaded",
                        p.part_number
                    )))
                }
            };
            if i + 1 < parts.len() && bytes_len < 5 * 1024 * 1024 {
                return Err(BlobError::Rejected(format!(
                    "part {} is smaller than 5 MiB",
                    p.part_number
                )));
            }
            let etag = {
                let f = f.clone();
                tokio::task::spawn_blocking(move || -> std::io::Result<String> {
                    let mut h = Sha256::new();
                    let mut r = std::fs::File::open(f)?;
                    std::io::copy(&mut r, &mut h)?;
                    Ok(hex::encode(h.finalize()))
                })
                .await
                .map_err(|e| BlobError::Storage(e.to_string()))?
                .map_err(io)?
            };
            if etag != p.etag.trim_matches('"') {
                return Err(BlobError::Rejected(format!(
                    "part {}: the ETag does not match",
                    p.part_number
                )));
            }
            files.push(f);
        }
        let target = self.path_of(key);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let tmp = target.with_extension("assembling");
            let mut out = std::fs::File::create(&tmp)?;
            for f in files {
                std::io::copy(&mut std::fs::File::open(f)?, &mut out)?;
            }
            out.sync_all()?;
            std::fs::rename(&tmp, &target)
        })
        .await
        .map_err(|e| BlobError::Storage(e.to_string()))?
        .map_err(io)?;
        tokio::fs::remove_dir_all(&dir).await.map_err(io)?;
        Ok(())
    }

    async fn size_of(&self, key: &str) -> Result<Option<u64>, BlobError> {
        if !valid_key(key) {
            return Ok(None);
        }
        match tokio::fs::metadata(self.path_of(key)).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    async fn copy(&self, from: &str, to: &str) -> Result<Option<Copied>, BlobError> {
        if !valid_key(from) || !valid_key(to) {
            return Err(BlobError::Storage(format!("invalid object key {from:?} or {to:?}")));
        }
        let (src, dst) = (self.path_of(from), self.path_of(to));
        tokio::task::spawn_blocking(move || -> std::io::Result<Option<Copied>> {
            if !src.is_file() {
                return Ok(None);
            }
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            // A new file (never a hard link: the upload could be rewritten in place), synced,
            // then renamed into place.
            let tmp = dst.with_extension(format!("copy-{}", uuid::Uuid::new_v4().simple()));
            let mut out = std::fs::File::create(&tmp)?;
            let n = std::io::copy(&mut std::fs::File::open(&src)?, &mut out)?;
            out.sync_all()?;
            std::fs::rename(&tmp, &dst)?;
            Ok(Some(Copied {
                size: n,
                version_id: None,
            }))
        })
        .await
        .map_err(|e| BlobError::Storage(e.to_string()))?
        .map_err(io)
    }

    async fn download_url(&self, key: &str) -> Result<String, BlobError> {
        Ok(self.url("GET", key, None, None, None))
    }

    async fn read_result(&self, key: &str) -> Result<Option<Vec<u8>>, BlobError> {
        if !valid_key(key) {
            return Err(BlobError::Storage(format!("invalid object key {key:?}")));
        }
        match tokio::fs::read(self.path_of(key)).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    async fn read_result_range(&self, key: &str, start: u64, len: u64) -> Result<Option<Vec<u8>>, BlobError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        if !valid_key(key) {
            return Err(BlobError::Storage(format!("invalid object key {key:?}")));
        }
        let mut f = match tokio::fs::File::open(self.path_of(key)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        f.seek(std::io::SeekFrom::Start(start)).await.map_err(io)?;
        let mut out = vec![0u8; len as usize];
        f.read_exact(&mut out)
            .await
            .map_err(|e| BlobError::Storage(format!("{key}: {len} bytes at {start}: {e}")))?;
        Ok(Some(out))
    }

    async fn ready(&self) -> Result<(), BlobError> {
        tokio::fs::metadata(&self.dir).await.map(|_| ()).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn results_are_presigned_from_the_results_bucket() {
        let sdk = aws_config::SdkConfig::builder()
            .region(aws_config::Region::new("eu-west-1"))
            .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(
                aws_sdk_s3::config::Credentials::new("k", "s", None, None, "test"),
            ))
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        let policy = UploadPolicy {
            expires: Duration::from_secs(900),
            multipart_threshold: 1 << 30,
            part_size: 64 << 20,
            copy_single_max: 5 << 30,
        };
        let one = S3Blobs::new(&sdk, None, "lab-uploads".into(), policy);
        let url = one.download_url("results/lab/j/1/slide.dzi").await.unwrap();
        assert!(url.contains("lab-uploads"), "{url}");
        let two =
            S3Blobs::new(&sdk, None, "lab-uploads".into(), policy).with_results_bucket(Some("lab-results".into()));
        let url = two.download_url("results/lab/j/1/slide.dzi").await.unwrap();
        assert!(url.contains("lab-results") && !url.contains("lab-uploads"), "{url}");
    }

    fn store() -> (LocalBlobs, PathBuf) {
        let dir = std::env::temp_dir().join(format!("mira-blobs-{}", uuid::Uuid::new_v4()));
        let policy = UploadPolicy {
            expires: Duration::from_secs(60),
            multipart_threshold: 10,
            part_size: 5 * 1024 * 1024,
            copy_single_max: 5 << 30,
        };
        (LocalBlobs::open(&dir, "http://x", policy).unwrap(), dir)
    }

    fn query(url: &str) -> SignedQuery {
        let q = url.split_once('?').unwrap().1;
        axum::extract::Query::<SignedQuery>::try_from_uri(&format!("/?{q}").parse().unwrap())
            .unwrap()
            .0
    }

    #[test]
    fn signed_urls_verify_and_tampering_is_refused() {
        let (s, dir) = store();
        let url = s.url("PUT", "a/b", None, None, None);
        let q = query(&url);
        assert!(s.check("PUT", "a/b", &q).is_ok());
        assert!(s.check("GET", "a/b", &q).is_err(), "signed for PUT only");
        assert!(s.check("PUT", "a/c", &q).is_err(), "signed for that key only");
        let mut later = q.clone();
        later.expires = Some(q.expires.unwrap() + 3600);
        assert!(s.check("PUT", "a/b", &later).is_err(), "the expiry is signed");
        let mut old = q.clone();
        old.expires = Some(Utc::now().timestamp() - 10);
        old.signature = Some(hex::encode(
            s.mac("PUT", "a/b", old.expires.unwrap(), None, None, None)
                .finalize()
                .into_bytes(),
        ));
        assert_eq!(s.check("PUT", "a/b", &old).unwrap_err(), "the URL has expired");
        // The registered type is signed: a URL cannot be reused for another type.
        let typed = query(&s.url("PUT", "a/b", None, Some("image/tiff"), None));
        assert_eq!(typed.content_type.as_deref(), Some("image/tiff"));
        assert!(s.check("PUT", "a/b", &typed).is_ok());
        let mut retyped = typed.clone();
        retyped.content_type = Some("text/html".into());
        assert!(s.check("PUT", "a/b", &retyped).is_err(), "the type is signed");
        let mut untyped = typed.clone();
        untyped.content_type = None;
        assert!(s.check("PUT", "a/b", &untyped).is_err(), "the type cannot be dropped");
        // So is the size limit: it can be neither raised nor dropped.
        let capped = query(&s.url("PUT", "a/b", None, None, Some(100)));
        assert_eq!(capped.max_bytes, Some(100));
        assert!(s.check("PUT", "a/b", &capped).is_ok());
        for max in [Some(101), None] {
            let mut raised = capped.clone();
            raised.max_bytes = max;
            assert!(s.check("PUT", "a/b", &raised).is_err(), "the limit is signed ({max:?})");
        }
        // The fields cannot be moved into each other: a limit folded into the type, with the
        // limit itself dropped, signs differently.
        let both = query(&s.url("PUT", "a/b", None, Some("image/tiff"), Some(100)));
        assert!(s.check("PUT", "a/b", &both).is_ok());
        let mut folded = both.clone();
        folded.content_type = Some("image/tiff\nmax-bytes:100".into());
        folded.max_bytes = None;
        assert!(s.check("PUT", "a/b", &folded).is_err(), "a limit folded into the type");
        let mut shifted = both.clone();
        shifted.content_type = Some("image/tiff\nmax-bytes+3:100".into());
        shifted.max_bytes = None;
        assert!(
            s.check("PUT", "a/b", &shifted).is_err(),
            "a v2 field folded into the type"
        );
        // A reopened store keeps its secret, so URLs survive a restart.
        let again = LocalBlobs::open(&dir, "http://x", s.policy).unwrap();
        assert!(again.check("PUT", "a/b", &q).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn keys_cannot_escape_the_store() {
        assert!(valid_key("uploads/t1/0191-abc"));
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "a//b",
            "./a",
            ".mira-secret",
            "a/.mira-multipart/x",
            "a b",
        ] {
            assert!(!valid_key(bad), "{bad:?}");
        }
    }
}
