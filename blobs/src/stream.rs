//! Writing an object while it is being made (issue 40, ADR 0036): a pyramid layer is uploaded
//! as the worker writes it, in parts, instead of from a finished file.
//!
//! A layer's header is final only at its end (the TIFF's first-directory offset is written
//! last), and S3 wants every part but the last to be at least 5 MiB. So the first part (itself a
//! whole part, the header inside it) is held in memory, patched by [`ObjectStream::finish`]
//! and uploaded last; the parts after it go up as they fill, a bounded number at a time; the
//! completion lists the parts in ascending order. An object smaller than one part is a single
//! PUT. The upload is aborted on failure, on [`ObjectStream::abort`], and when the stream is
//! dropped unfinished. The local store of `mira dev` gets the same writer: a temporary file
//! renamed into place when finished, removed otherwise.
//!
//! Every part's SHA-256 is computed here and sent with the part (S3 checks it); the object's
//! hash is the SHA-256 of the parts' digests in order, which is what S3 itself reports as a
//! multipart object's composite `ChecksumSHA256` (before its `-N` suffix). Both stores cut the
//! parts at the same places, so the same bytes give the same hashes on either.

use std::path::PathBuf;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::{io, s3err, valid_key, BlobError, ObjectStore};

/// S3's smallest part but the last.
pub const S3_MIN_PART: u64 = 5 << 20;
/// S3's largest part count.
pub const MAX_PARTS: u64 = 10_000;

/// How an object is streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    /// Every part's size but the last (at least 5 MiB on S3; tests lower it with moto's
    /// `S3_UPLOAD_PART_MIN_SIZE`).
    pub part_size: u64,
    /// Parts uploading at once, besides the one filling and the first one held.
    pub parallel: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            part_size: 8 << 20,
            parallel: 4,
        }
    }
}

/// One part of a streamed object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartHash {
    pub bytes: u64,
    /// Hex.
    pub sha256: String,
}

/// A streamed object, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    pub key: String,
    pub bytes: u64,
    /// Its parts in order, the first included.
    pub parts: Vec<PartHash>,
    /// The SHA-256 of the parts' digests in order (hex).
    pub sha256_of_parts: String,
}

/// The SHA-256 of the parts' digests in order: what [`Streamed::sha256_of_parts`] holds, for
/// whoever checks an object read back.
pub fn hash_of_parts(parts: &[PartHash]) -> Result<String, BlobError> {
    let mut h = Sha256::new();
    for p in parts {
        let d = hex::decode(&p.sha256).map_err(|e| BlobError::Storage(format!("a part's hash is not hex: {e}")))?;
        h.update(d);
    }
    Ok(hex::encode(h.finalize()))
}

/// An upload in progress: [`ObjectStream::write`] the bytes in order, then
/// [`ObjectStream::finish`] (or [`ObjectStream::abort`]).
pub struct ObjectStream {
    key: String,
    settings: StreamSettings,
    /// The first part, held until the end.
    first: Vec<u8>,
    /// The part being filled after it.
    filling: Vec<u8>,
    written: u64,
    /// Parts 2.. as they were cut.
    parts: Vec<PartHash>,
    target: Target,
}

enum Target {
    Local {
        tmp: PathBuf,
        path: PathBuf,
        file: Option<tokio::fs::File>,
    },
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        /// Started once the object outgrows one part.
        upload_id: Option<String>,
        uploading: tokio::task::JoinSet<Result<Uploaded, BlobError>>,
        /// (part number, ETag, base64 SHA-256) of the parts uploaded.
        done: Vec<Uploaded>,
    },
    /// Finished or aborted: nothing left to clean up.
    Closed,
}

impl ObjectStore {
    /// Starts writing `key` as it is made.
    pub async fn stream(&self, key: &str, settings: StreamSettings) -> Result<ObjectStream, BlobError> {
        if !valid_key(key) {
            return Err(BlobError::Storage(format!("invalid object key {key:?}")));
        }
        if settings.part_size == 0 || settings.parallel == 0 {
            return Err(BlobError::Storage(
                "a stream needs a part size and one part at a time at least".into(),
            ));
        }
        let target = match self {
            Self::Local(dir) => {
                let path = dir.join(key);
                if let Some(p) = path.parent() {
                    tokio::fs::create_dir_all(p).await.map_err(io)?;
                }
                let tmp = path.with_extension(format!("part-{}", uuid::Uuid::new_v4().simple()));
                let file = tokio::fs::File::create(&tmp).await.map_err(io)?;
                Target::Local {
                    tmp,
                    path,
                    file: Some(file),
                }
            }
            Self::S3 { client, bucket } => Target::S3 {
                client: client.clone(),
                bucket: bucket.clone(),
                upload_id: None,
                uploading: tokio::task::JoinSet::new(),
                done: Vec::new(),
            },
        };
        Ok(ObjectStream {
            key: key.to_owned(),
            settings,
            first: Vec::new(),
            filling: Vec::new(),
            written: 0,
            parts: Vec::new(),
            target,
        })
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl ObjectStream {
    /// The bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `bytes`.
    pub async fn write(&mut self, mut bytes: &[u8]) -> Result<(), BlobError> {
        let result = async {
            let part = self.settings.part_size as usize;
            while !bytes.is_empty() {
                let (buf, full) = if self.first.len() < part {
                    (&mut self.first, false)
                } else {
                    (&mut self.filling, true)
                };
                let n = (part - buf.len()).min(bytes.len());
                buf.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                self.written += n as u64;
                if full && self.filling.len() == part {
                    let data = std::mem::take(&mut self.filling);
                    self.cut(data).await?;
                }
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            self.close().await;
        }
        result
    }

    /// A part after the first is complete: sent on.
    async fn cut(&mut self, data: Vec<u8>) -> Result<(), BlobError> {
        // Part 1 is the held one; this is part 2 onwards.
        let number = self.parts.len() as u64 + 2;
        if number > MAX_PARTS {
            return Err(BlobError::Storage(format!(
                "{} would need more than {MAX_PARTS} parts of {} bytes",
                self.key, self.settings.part_size
            )));
        }
        let d = digest(&data);
        self.parts.push(PartHash {
            bytes: data.len() as u64,
            sha256: hex::encode(d),
        });
        let key = self.key.clone();
        let parallel = self.settings.parallel;
        match &mut self.target {
            Target::Local { file, .. } => {
                use tokio::io::AsyncWriteExt;
                let f = file.as_mut().expect("open until closed");
                if number == 2 {
                    // The local file is written in order: the first part goes in now and is
                    // patched in place at the end.
                    f.write_all(&self.first).await.map_err(io)?;
                }
                f.write_all(&data).await.map_err(io)
            }
            Target::S3 {
                client,
                bucket,
                upload_id,
                uploading,
                done,
            } => {
                let id = match upload_id {
                    Some(id) => id.clone(),
                    None => {
                        let created = client
                            .create_multipart_upload()
                            .bucket(bucket.as_str())
                            .key(&key)
                            .content_type(crate::content_type_of(&key))
                            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
                            .send()
                            .await
                            .map_err(s3err)?;
                        let id = created
                            .upload_id()
                            .map(str::to_owned)
                            .ok_or_else(|| BlobError::Storage("CreateMultipartUpload returned no upload id".into()))?;
                        *upload_id = Some(id.clone());
                        id
                    }
                };
                while uploading.len() >= parallel {
                    done.push(joined(uploading.join_next().await)?);
                }
                uploading.spawn(upload_part(
                    client.clone(),
                    bucket.clone(),
                    key,
                    id,
                    number as i32,
                    data,
                    d,
                ));
                Ok(())
            }
            Target::Closed => Err(BlobError::Storage(format!("the upload of {key} was already ended"))),
        }
    }

    /// Writes `patch` over the bytes at its offset (they must lie in the first part, or in the
    /// object when it is smaller than one part), sends the first part and what is left, and
    /// completes the object.
    pub async fn finish(mut self, patch: Option<(u64, &[u8])>) -> Result<Streamed, BlobError> {
        let result = self.complete(patch).await;
        if result.is_err() {
            self.close().await;
        }
        result
    }

    async fn complete(&mut self, patch: Option<(u64, &[u8])>) -> Result<Streamed, BlobError> {
        if let Some((at, bytes)) = patch {
            let end = at as usize + bytes.len();
            if end > self.first.len() {
                return Err(BlobError::Storage(format!(
                    "a patch of {} bytes at {at} lies outside the first part ({} bytes) of {}",
                    bytes.len(),
                    self.first.len(),
                    self.key
                )));
            }
            self.first[at as usize..end].copy_from_slice(bytes);
        }
        // What is left after the last full part is the last part.
        let single = self.parts.is_empty() && self.filling.is_empty();
        if !self.filling.is_empty() {
            let data = std::mem::take(&mut self.filling);
            self.cut(data).await?;
        }
        let d1 = digest(&self.first);
        let mut parts = vec![PartHash {
            bytes: self.first.len() as u64,
            sha256: hex::encode(d1),
        }];
        parts.append(&mut self.parts);
        let key = self.key.clone();
        let first = std::mem::take(&mut self.first);
        match std::mem::replace(&mut self.target, Target::Closed) {
            Target::Local { tmp, path, file } => {
                use tokio::io::{AsyncSeekExt, AsyncWriteExt};
                let mut f = file.expect("open until closed");
                let done = async {
                    if single {
                        f.write_all(&first).await?;
                    } else {
                        f.seek(std::io::SeekFrom::Start(0)).await?;
                        f.write_all(&first).await?;
                    }
                    f.flush().await?;
                    f.sync_all().await?;
                    drop(f);
                    tokio::fs::rename(&tmp, &path).await
                }
                .await;
                if let Err(e) = done {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(io(e));
                }
            }
            Target::S3 {
                client,
                bucket,
                upload_id,
                mut uploading,
                mut done,
            } => {
                let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
                match upload_id {
                    None => {
                        let put = client
                            .put_object()
                            .bucket(&bucket)
                            .key(&key)
                            .content_type(crate::content_type_of(&key))
                            .checksum_sha256(b64(&d1))
                            .body(first.into())
                            .send()
                            .await;
                        if let Err(e) = put {
                            return Err(s3err(e));
                        }
                    }
                    Some(id) => {
                        // Put back so that a failure below aborts it.
                        let restore = |uploading, done| Target::S3 {
                            client: client.clone(),
                            bucket: bucket.clone(),
                            upload_id: Some(id.clone()),
                            uploading,
                            done,
                        };
                        uploading.spawn(upload_part(
                            client.clone(),
                            bucket.clone(),
                            key.clone(),
                            id.clone(),
                            1,
                            first,
                            d1,
                        ));
                        let mut failed = None;
                        while let Some(j) = uploading.join_next().await {
                            match joined(Some(j)) {
                                Ok(p) => done.push(p),
                                Err(e) => failed = failed.or(Some(e)),
                            }
                        }
                        if let Some(e) = failed {
                            self.target = restore(uploading, done);
                            return Err(e);
                        }
                        done.sort_by_key(|p| p.0);
                        if done.len() != parts.len() {
                            self.target = restore(uploading, done);
                            return Err(BlobError::Storage(format!("{key}: parts went missing on the way")));
                        }
                        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
                        let listed: Vec<_> = done
                            .iter()
                            .map(|(n, etag, sha)| {
                                CompletedPart::builder()
                                    .part_number(*n)
                                    .e_tag(etag)
                                    .checksum_sha256(sha)
                                    .build()
                            })
                            .collect();
                        let completed = client
                            .complete_multipart_upload()
                            .bucket(&bucket)
                            .key(&key)
                            .upload_id(&id)
                            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(listed)).build())
                            .send()
                            .await;
                        match completed {
                            Ok(_) => {}
                            // A 2xx whose body the SDK cannot parse (moto's): checked by size below.
                            Err(aws_sdk_s3::error::SdkError::ServiceError(se)) if se.raw().status().is_success() => {}
                            Err(e) => {
                                self.target = restore(tokio::task::JoinSet::new(), done);
                                return Err(s3err(e));
                            }
                        }
                        let head = client
                            .head_object()
                            .bucket(&bucket)
                            .key(&key)
                            .send()
                            .await
                            .map_err(s3err)?;
                        if head.content_length() != Some(self.written as i64) {
                            return Err(BlobError::Storage(format!(
                                "{key} was stored with {:?} bytes, not the {} written",
                                head.content_length(),
                                self.written
                            )));
                        }
                    }
                }
            }
            Target::Closed => return Err(BlobError::Storage(format!("the upload of {key} was already ended"))),
        }
        Ok(Streamed {
            key,
            bytes: self.written,
            sha256_of_parts: hash_of_parts(&parts)?,
            parts,
        })
    }

    /// Ends the upload without an object: the multipart upload is aborted, the local
    /// temporary file removed.
    pub async fn abort(mut self) {
        self.close().await;
    }

    async fn close(&mut self) {
        match std::mem::replace(&mut self.target, Target::Closed) {
            Target::Local { tmp, file, .. } => {
                drop(file);
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            Target::S3 {
                client,
                bucket,
                upload_id,
                mut uploading,
                ..
            } => {
                uploading.abort_all();
                while uploading.join_next().await.is_some() {}
                if let Some(id) = upload_id {
                    abort_upload(&client, &bucket, &self.key, &id).await;
                }
            }
            Target::Closed => {}
        }
    }
}

impl Drop for ObjectStream {
    /// Dropped unfinished (a cancelled task, a panic): nothing is left behind.
    fn drop(&mut self) {
        match std::mem::replace(&mut self.target, Target::Closed) {
            Target::Local { tmp, .. } => {
                let _ = std::fs::remove_file(tmp);
            }
            Target::S3 {
                client,
                bucket,
                upload_id: Some(id),
                uploading,
                ..
            } => {
                drop(uploading);
                let key = self.key.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move { abort_upload(&client, &bucket, &key, &id).await });
                } else {
                    tracing::warn!(
                        key,
                        upload_id = id,
                        "an unfinished upload is left to the bucket's abort-incomplete rule"
                    );
                }
            }
            _ => {}
        }
    }
}

async fn abort_upload(client: &aws_sdk_s3::Client, bucket: &str, key: &str, id: &str) {
    if let Err(e) = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(id)
        .send()
        .await
    {
        // The bucket's rule removes it after 7 days.
        tracing::warn!(key, upload_id = id, error = %aws_sdk_s3::error::DisplayErrorContext(&e), "cannot abort an upload");
    }
}

/// A part uploaded: its number, ETag and base64 SHA-256.
type Uploaded = (i32, String, String);

fn joined(j: Option<Result<Result<Uploaded, BlobError>, tokio::task::JoinError>>) -> Result<Uploaded, BlobError> {
    match j {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(BlobError::Storage(format!("a part's upload ended: {e}"))),
        None => Err(BlobError::Storage("no part was uploading".into())),
    }
}

async fn upload_part(
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    upload_id: String,
    number: i32,
    data: Vec<u8>,
    d: [u8; 32],
) -> Result<Uploaded, BlobError> {
    let sha = base64::engine::general_purpose::STANDARD.encode(d);
    let out = client
        .upload_part()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .part_number(number)
        .checksum_sha256(&sha)
        .body(data.into())
        .send()
        .await
        .map_err(s3err)?;
    let etag = out
        .e_tag()
        .ok_or_else(|| BlobError::Storage("UploadPart returned no ETag".into()))?
        .to_owned();
    Ok((number, etag, sha))
}
