//! Objects written as they are made (`ObjectStream`), on moto's S3 over a real connection and
//! on the local store: several parts with the first one held, patched and sent last; one PUT
//! for an object smaller than a part; the same hashes from both stores; nothing left behind
//! after an abort or a failure.
//!
//! `scripts/test` starts moto with `S3_UPLOAD_PART_MIN_SIZE=65536`, so 64 KiB parts stand in for
//! S3's 5 MiB ones and moto still refuses a smaller part anywhere but last.

use mira_blobs::stream::{hash_of_parts, StreamSettings};
use mira_blobs::{BlobError, ObjectStore};
use sha2::{Digest, Sha256};

const PART: u64 = 64 << 10;

fn moto() -> String {
    std::env::var("MIRA_TEST_AWS_ENDPOINT")
        .expect("MIRA_TEST_AWS_ENDPOINT names the moto server; run the tests through scripts/test, which starts one")
}

async fn bucket() -> (aws_sdk_s3::Client, ObjectStore) {
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
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
    let client = mira_blobs::s3_client(&sdk, Some("us-east-1"));
    let name = format!("stream-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    client.create_bucket().bucket(&name).send().await.unwrap();
    (client.clone(), ObjectStore::S3 { client, bucket: name })
}

/// Bytes that differ at every offset, with a placeholder header the patch fills in.
fn payload(len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    v[8..16].copy_from_slice(&[0; 8]);
    v
}

const PATCH: [u8; 8] = *b"IFD@END!";

fn patched(mut v: Vec<u8>) -> Vec<u8> {
    v[8..16].copy_from_slice(&PATCH);
    v
}

async fn get(client: &aws_sdk_s3::Client, store: &ObjectStore, key: &str) -> Option<Vec<u8>> {
    let ObjectStore::S3 { bucket, .. } = store else {
        unreachable!()
    };
    match client.get_object().bucket(bucket).key(key).send().await {
        Ok(o) => Some(o.body.collect().await.unwrap().into_bytes().to_vec()),
        Err(_) => None,
    }
}

async fn uploads(client: &aws_sdk_s3::Client, store: &ObjectStore) -> usize {
    let ObjectStore::S3 { bucket, .. } = store else {
        unreachable!()
    };
    let out = client.list_multipart_uploads().bucket(bucket).send().await.unwrap();
    out.uploads().len()
}

/// Writes `data` in uneven pieces (so parts are cut inside a write), then finishes with the
/// header patch.
async fn stream(
    store: &ObjectStore,
    key: &str,
    data: &[u8],
    settings: StreamSettings,
) -> Result<mira_blobs::stream::Streamed, BlobError> {
    let mut s = store.stream(key, settings).await?;
    for piece in data.chunks(10_007) {
        s.write(piece).await?;
    }
    assert_eq!(s.written(), data.len() as u64);
    s.finish(Some((8, &PATCH))).await
}

/// A directory of the test's own, removed when it ends.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("mira-stream-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(parallel: usize) -> StreamSettings {
    StreamSettings {
        part_size: PART,
        parallel,
    }
}

#[tokio::test]
async fn a_layer_of_several_parts_is_stored_whole_with_its_header_patched_last() {
    let (client, store) = bucket().await;
    let data = payload((3 * PART + 12_345) as usize);
    let done = stream(&store, "r/slide.tiff", &data, settings(2)).await.unwrap();
    let want = patched(data);
    assert_eq!(
        get(&client, &store, "r/slide.tiff").await.as_deref(),
        Some(&want[..]),
        "the object is the patched bytes"
    );
    // Parts of 64 KiB and what is left: four, the first held back and sent last.
    let sizes: Vec<u64> = done.parts.iter().map(|p| p.bytes).collect();
    assert_eq!(sizes, vec![PART, PART, PART, 12_345]);
    for (p, chunk) in done.parts.iter().zip(want.chunks(PART as usize)) {
        assert_eq!(
            p.sha256,
            hex::encode(Sha256::digest(chunk)),
            "each part's hash is of its stored bytes"
        );
    }
    assert_eq!(done.bytes, want.len() as u64);
    assert_eq!(done.sha256_of_parts, hash_of_parts(&done.parts).unwrap());
    // S3's own composite checksum of the object is the same hash of the parts' digests.
    let ObjectStore::S3 { bucket, .. } = &store else {
        unreachable!()
    };
    let attrs = client
        .get_object_attributes()
        .bucket(bucket)
        .key("r/slide.tiff")
        .object_attributes(aws_sdk_s3::types::ObjectAttributes::Checksum)
        .send()
        .await;
    let composite = match attrs {
        Ok(a) => a
            .checksum()
            .and_then(|c| c.checksum_sha256())
            .expect("S3 keeps the checksum")
            .to_owned(),
        // moto's Last-Modified header is one the SDK cannot parse; its body is S3's.
        Err(aws_sdk_s3::error::SdkError::ServiceError(se)) if se.raw().status().is_success() => {
            let body = String::from_utf8_lossy(se.raw().body().bytes().unwrap()).into_owned();
            let from = body.find("<ChecksumSHA256>").expect("S3 keeps the checksum") + "<ChecksumSHA256>".len();
            body[from..from + body[from..].find('<').unwrap()].to_owned()
        }
        Err(e) => panic!("{e:?}"),
    };
    use base64::Engine as _;
    let ours = base64::engine::general_purpose::STANDARD.encode(hex::decode(&done.sha256_of_parts).unwrap());
    assert_eq!(
        composite.split('-').next(),
        Some(ours.as_str()),
        "S3 reports {composite}"
    );
    assert_eq!(uploads(&client, &store).await, 0, "no upload is left open");

    // The local store cuts the same parts: the same hashes, the same bytes.
    let dir = Scratch::new();
    let local = ObjectStore::Local(dir.path().to_path_buf());
    let there = stream(
        &local,
        "r/slide.tiff",
        &payload((3 * PART + 12_345) as usize),
        settings(2),
    )
    .await
    .unwrap();
    assert_eq!(there.parts, done.parts);
    assert_eq!(there.sha256_of_parts, done.sha256_of_parts);
    assert_eq!(std::fs::read(dir.path().join("r/slide.tiff")).unwrap(), want);
    assert_eq!(
        std::fs::read_dir(dir.path().join("r")).unwrap().count(),
        1,
        "no temporary file is left"
    );
}

#[tokio::test]
async fn an_object_smaller_than_a_part_is_one_put_and_parts_below_the_minimum_are_refused() {
    let (client, store) = bucket().await;
    let data = payload(1000);
    let done = stream(&store, "r/small.tiff", &data, settings(4)).await.unwrap();
    assert_eq!(done.parts.len(), 1);
    assert_eq!(get(&client, &store, "r/small.tiff").await.unwrap(), patched(data));
    assert_eq!(uploads(&client, &store).await, 0);

    // moto enforces the smallest part, as S3 does: 1 KiB parts are refused at completion, and
    // the refused upload is aborted rather than left open.
    let e = stream(
        &store,
        "r/tiny-parts.tiff",
        &payload(5000),
        StreamSettings {
            part_size: 1024,
            parallel: 4,
        },
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("EntityTooSmall"), "{e}");
    assert_eq!(get(&client, &store, "r/tiny-parts.tiff").await, None);
    assert_eq!(uploads(&client, &store).await, 0, "the refused upload was aborted");
}

#[tokio::test]
async fn an_abort_a_drop_or_a_bad_patch_leaves_nothing_behind() {
    let (client, store) = bucket().await;
    let data = payload((4 * PART) as usize);

    let mut s = store.stream("r/aborted.tiff", settings(2)).await.unwrap();
    s.write(&data).await.unwrap();
    assert_eq!(uploads(&client, &store).await, 1, "parts went up while writing");
    s.abort().await;
    assert_eq!(uploads(&client, &store).await, 0);
    assert_eq!(get(&client, &store, "r/aborted.tiff").await, None);

    // Dropped unfinished (a cancelled task): aborted in the background.
    let mut s = store.stream("r/dropped.tiff", settings(2)).await.unwrap();
    s.write(&data).await.unwrap();
    drop(s);
    let mut left = 1;
    for _ in 0..50 {
        left = uploads(&client, &store).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "the dropped upload was aborted");

    // A patch past the first part would change bytes already sent: refused, and aborted.
    let mut s = store.stream("r/patched.tiff", settings(2)).await.unwrap();
    s.write(&data).await.unwrap();
    let e = s.finish(Some((PART - 4, &PATCH))).await.unwrap_err();
    assert!(e.to_string().contains("outside the first part"), "{e}");
    assert_eq!(uploads(&client, &store).await, 0);
    assert_eq!(get(&client, &store, "r/patched.tiff").await, None);

    // The local store: no object and no temporary file.
    let dir = Scratch::new();
    let local = ObjectStore::Local(dir.path().to_path_buf());
    let mut s = local.stream("r/aborted.tiff", settings(2)).await.unwrap();
    s.write(&data).await.unwrap();
    s.abort().await;
    let mut s = local.stream("r/dropped.tiff", settings(2)).await.unwrap();
    s.write(&data).await.unwrap();
    drop(s);
    assert_eq!(
        std::fs::read_dir(dir.path().join("r")).unwrap().count(),
        0,
        "nothing is left"
    );
}
