//! Slides: uploads through presigned S3 URLs and the local store, their verification, and slides that lie.

use super::*;

#[tokio::test]
async fn uploads_through_presigned_s3_urls_single_and_multipart() {
    // Slides over 6 MiB are copied to their immutable key part by part (UploadPartCopy).
    let app = spawn_app_with(Storage::S3, &[("Storage__CopySingleMaxBytes", "6291456")]).await;
    upload_flows(&app).await;
    // The objects really are in the bucket with their sizes.
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk().await)
            .force_path_style(true)
            .build(),
    );
    let list = s3
        .list_objects_v2()
        .bucket(app.bucket.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    let mut sizes: Vec<(String, i64)> = list
        .contents()
        .iter()
        .filter_map(|o| Some((o.key()?.split('/').next()?.to_owned(), o.size()?)))
        .collect();
    sizes.sort();
    // The uploads, and the immutable copies of the two whose size was right.
    let big = 11 * 1024 * 1024;
    let expected = [
        ("immutable", 100_000),
        ("immutable", big),
        ("slides", 999),
        ("slides", 100_000),
        ("slides", big),
    ];
    assert_eq!(
        sizes,
        expected.iter().map(|(p, n)| (p.to_string(), *n)).collect::<Vec<_>>()
    );
    // The multipart copy has the upload's bytes.
    let mut bodies = Vec::new();
    for prefix in ["slides/", "immutable/"] {
        let key = list
            .contents()
            .iter()
            .find(|o| o.size() == Some(big) && o.key().is_some_and(|k| k.starts_with(prefix)))
            .and_then(|o| o.key())
            .unwrap()
            .to_owned();
        let o = s3
            .get_object()
            .bucket(app.bucket.as_deref().unwrap())
            .key(key)
            .send()
            .await
            .unwrap();
        bodies.push(o.body.collect().await.unwrap().into_bytes());
    }
    assert!(bodies[0] == bodies[1], "the copy differs from the upload");
    app.stop().await;
}

#[tokio::test]
async fn uploads_through_the_local_store_single_and_multipart() {
    let app = spawn_app(Storage::Local).await;
    upload_flows(&app).await;
    // A URL whose signature or key was changed is refused.
    let t = app.token("lab-a", &["pathologist"]);
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "x", "size_bytes": 3, "content_type": "image/tiff"}),
        )
        .await;
    let url = r.body["upload"]["url"].as_str().unwrap().to_owned();
    let x_id = r.body["slide_id"].as_str().unwrap().to_owned();
    let forged = url.replace("X-Mira-Signature=", "X-Mira-Signature=00");
    let res = app.http.put(&forged).body("abc").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let other = url.replacen("/blobs/slides/", "/blobs/slides/x", 1);
    assert_eq!(
        app.http.put(&other).body("abc").send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    // The upload must carry the type the slide was registered with; the signed type cannot be
    // swapped in the URL either.
    for ct in [None, Some("text/html")] {
        let mut req = app.http.put(&url).body("abc");
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = app.send(req).await;
        assert_problem(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(r.body["detail"].as_str().unwrap().contains("image/tiff"), "{}", r.body);
    }
    let retyped = url.replace("X-Mira-Content-Type=image/tiff", "X-Mira-Content-Type=text/html");
    assert_ne!(retyped, url);
    let r = app
        .send(app.http.put(&retyped).header("content-type", "text/html").body("abc"))
        .await;
    assert_problem(&r, StatusCode::FORBIDDEN);
    // More bytes than the slide declared are refused, whether the length is announced or the
    // body is chunked, and nothing is kept.
    let r = app
        .send(app.http.put(&url).header("content-type", "image/tiff").body("abcd"))
        .await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE);
    let target = url.split_once(&app.base).unwrap().1;
    let chunked = raw_request(
        &app,
        &format!(
            "PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Type: image/tiff\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
        ),
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    let r = app.post(&t, &format!("/api/slides/{x_id}/uploaded"), json!({})).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.body["detail"].as_str().unwrap().contains("never uploaded"),
        "{}",
        r.body
    );
    let r = app
        .send(app.http.put(&url).header("content-type", "image/tiff").body("abc"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    app.stop().await;
}

/// The upload URL still works after `uploaded` (until it expires), and a declared checksum
/// must hold: the worker verifies and processes the copy taken at `uploaded`, never the upload
/// key, and refuses bytes that are not the declared ones.
/// A completion the server refuses lets go of the slide's copy claim before it answers: the
/// client's immediate retry is never told another completion is in progress.
#[tokio::test]
async fn a_refused_completion_does_not_hold_the_slide_against_an_immediate_retry() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "retried", "size_bytes": 1024, "content_type": "image/tiff"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let id = r.body["slide_id"].as_str().unwrap().to_owned();
    // Refused under the claim (an empty part list), thirty times back to back; after each
    // answer no session holds the claim (its advisory lock).
    for i in 0..30 {
        let r = app
            .post(&t, &format!("/api/slides/{id}/uploaded"), json!({"parts": []}))
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "try {i}: {}", r.body);
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)",
        )
        .bind(format!("mira.slide-copy:{id}"))
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        assert_eq!(held, 0, "try {i}: the answer came while the claim was still held");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_replaced_upload_is_never_processed_and_a_declared_checksum_is_checked() {
    use sha2::Digest;
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let bytes = cmu_slide();
    let register = |name: &'static str, sha: String| {
        app.post(
            &t,
            "/api/slides",
            json!({"name": name, "size_bytes": bytes.len(), "content_type": "image/tiff", "sha256": sha}),
        )
    };
    let right = hex::encode(sha2::Sha256::digest(&bytes));
    let zeros = vec![0u8; bytes.len()];
    // A: the declared checksum is right; after `uploaded`, the upload is overwritten with zeros
    // through the same, still valid URL, before any worker looks at it.
    let a = register("replaced", right.clone()).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let a_id = a.body["slide_id"].as_str().unwrap().to_owned();
    put_upload(&app.http, &a.body["upload"], &bytes).await;
    let done = app.post(&t, &format!("/api/slides/{a_id}/uploaded"), json!({})).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    put_upload(&app.http, &a.body["upload"], &zeros).await;
    // B: the declared checksum is not the uploaded bytes'.
    let b = register("mislabelled", hex::encode(sha2::Sha256::digest(&zeros))).await;
    let b_id = b.body["slide_id"].as_str().unwrap().to_owned();
    put_upload(&app.http, &b.body["upload"], &bytes).await;
    let done = app.post(&t, &format!("/api/slides/{b_id}/uploaded"), json!({})).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);

    let mut worker = spawn_worker(&app, &[]);
    let a_now = eventually("A verified", || async {
        let s = app.get(&t, &format!("/api/slides/{a_id}")).await.body;
        // A verdict: not the registration nor the upload, either of which the read model may
        // still show right after `uploaded` answered.
        (!matches!(s["status"].as_str(), Some("registered" | "uploaded"))).then_some(s)
    })
    .await;
    assert_eq!(
        a_now["status"], "verified",
        "the worker read the replaced upload: {a_now}"
    );
    assert_eq!(a_now["metadata"]["width"], 2220);
    let b_now = eventually("B rejected", || async {
        let s = app.get(&t, &format!("/api/slides/{b_id}")).await.body;
        // A verdict: not the registration nor the upload, either of which the read model may
        // still show right after `uploaded` answered.
        (!matches!(s["status"].as_str(), Some("registered" | "uploaded"))).then_some(s)
    })
    .await;
    assert_eq!(b_now["status"], "rejected", "{b_now}");
    assert!(
        b_now["rejection"].as_str().unwrap_or_default().contains("SHA-256"),
        "{b_now}"
    );

    // A job on A runs on the verified bytes.
    let r = app
        .post(
            &t,
            "/api/jobs",
            json!({"slide_id": a_id, "kind": "wsi.preprocess", "params": {"format": "png"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let job = r.body["job_id"].as_str().unwrap().to_owned();
    let detail = eventually("the job on A finishes", || async {
        let d = app.get(&t, &format!("/api/jobs/{job}")).await.body;
        matches!(d["status"].as_str(), Some("succeeded" | "failed")).then_some(d)
    })
    .await;
    assert_eq!(detail["status"], "succeeded", "{detail}");
    let _ = worker.kill().await;
    app.stop().await;
}

#[tokio::test]
async fn a_huge_declared_slide_gets_its_part_urls_a_page_at_a_time() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let five_tib: u64 = 5 * 1024 * 1024 * 1024 * 1024;
    let r = app
        .http
        .post(format!("{}/api/slides", app.base))
        .bearer_auth(&t)
        .json(&json!({"name": "huge", "size_bytes": five_tib, "content_type": "image/tiff"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let text = r.text().await.unwrap();
    assert!(text.len() < 64 * 1024, "the answer is a page, not {} bytes", text.len());
    let body: Value = serde_json::from_str(&text).unwrap();
    let id = body["slide_id"].as_str().unwrap();
    let mp = &body["upload"]["multipart"];
    assert_eq!(mp["part_count"], 10_000);
    assert_eq!(mp["parts"].as_array().unwrap().len(), 100);
    assert_eq!(mp["parts"][99]["part_number"], 100);
    let upload_id = mp["upload_id"].as_str().unwrap();
    let page = |from: &str, upload: &str| {
        let path = format!("/api/slides/{id}/upload/parts?upload_id={upload}&from={from}");
        let (app, t) = (&app, &t);
        async move { app.get(t, &path).await }
    };
    let p = page("9950", upload_id).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    let parts = p.body["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 51);
    assert_eq!(parts[0]["part_number"], 9950);
    assert_eq!(parts[50]["part_number"], 10_000);
    assert_eq!(p.body["part_size"], mp["part_size"]);
    assert_problem(&page("10001", upload_id).await, StatusCode::BAD_REQUEST);
    assert_problem(&page("0", upload_id).await, StatusCode::BAD_REQUEST);
    assert_problem(
        &page("1", "0190aaaabbbbccccdddd").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    // Another tenant does not see the slide.
    let other = app.token("lab-b", &["pathologist"]);
    let r = app
        .get(
            &other,
            &format!("/api/slides/{id}/upload/parts?upload_id={upload_id}&from=1"),
        )
        .await;
    assert_problem(&r, StatusCode::NOT_FOUND);
    // A page's URL uploads that part.
    let url = parts[0]["url"].as_str().unwrap();
    assert!(url.contains("partNumber=9950"), "{url}");
    app.stop().await;
}

/// Three tiny TIFFs that declare huge slides (tiles shared between positions) are rejected at
/// verification, before a pixel is decoded, with a reason a person understands; the worker's
/// memory stays small, and an honest slide is still verified.
#[tokio::test]
async fn slides_that_lie_about_their_size_are_rejected_at_verification() {
    let app = spawn_app(Storage::Local).await;
    let worker = spawn_worker(&app, &[]);
    let pid = worker.id().unwrap();
    let t = app.token("lab-a", &["pathologist"]);
    for (name, bytes) in lying_tiffs(&app.dir) {
        let id = app.upload_slide(&t, &bytes).await;
        let started = Instant::now();
        let s = eventually("the lying slide judged", || async {
            let s = app.get(&t, &format!("/api/slides/{id}")).await.body;
            matches!(s["status"].as_str(), Some("rejected" | "verified")).then_some(s)
        })
        .await;
        assert_eq!(s["status"], "rejected", "{name}: {s}");
        let reason = s["rejection"].as_str().unwrap();
        assert!(
            reason.starts_with("the slide is refused: it declares") && reason.contains("pixels per byte"),
            "{name}: {reason}"
        );
        eprintln!(
            "{name} ({} bytes): rejected within {:?}: {reason}",
            bytes.len(),
            started.elapsed()
        );
    }
    let peak = peak_rss(pid);
    eprintln!("the worker's peak resident memory: {} MiB", peak >> 20);
    assert!(peak < 1 << 30, "the worker peaked at {peak} bytes");
    let honest = app.upload_slide(&t, &tall_slide(&app.dir, 2)).await;
    let s = eventually("the honest slide verified", || async {
        let s = app.get(&t, &format!("/api/slides/{honest}")).await.body;
        matches!(s["status"].as_str(), Some("rejected" | "verified")).then_some(s)
    })
    .await;
    assert_eq!(s["status"], "verified", "{s}");
    drop(worker);
    app.stop().await;
}

/// Two completions of one upload with a byte swap between them: the second, while the first
/// copies, is refused (409); once the first is recorded, a completion after other bytes were
/// PUT through the still-valid URL copies nothing; and a copy changed behind the log's back
/// is refused by the job, for good, with both hashes.
#[tokio::test]
async fn a_swapped_upload_is_never_processed_on_the_local_store() {
    use sha2::Digest;
    let app = spawn_app(Storage::Local).await;
    let _worker = spawn_worker(&app, &[]);
    let t = app.token("lab-a", &["pathologist"]);
    let bytes = blank_slide(&app.dir);
    let mut other = bytes.clone();
    let n = other.len();
    other[n - 1] ^= 0xff;
    let (slide, upload) = registered_and_put(&app, &t, &bytes).await;
    let done = format!("/api/slides/{slide}/uploaded");
    let claim = hold_copy_claim(&app, &slide).await;
    let r = app.post(&t, &done, json!({})).await;
    assert_problem(&r, StatusCode::CONFLICT);
    assert!(r.body["detail"].as_str().unwrap().contains("in progress"), "{}", r.body);
    sqlx::Connection::close(claim).await.unwrap();
    let r = app.post(&t, &done, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(put_upload(&app.http, &upload, &other).await.is_none());
    let r = app.post(&t, &done, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let copy = app
        .dir
        .join("blobs")
        .join(mira_aggregates::copy_key(&format!("slides/lab-a/{slide}")));
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        bytes,
        "the copy is the first upload's bytes"
    );
    app.verified(&t, &slide).await;
    let j = job_on(&app, &t, &slide).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    // The copy changes behind the log's back: the next job refuses it.
    std::fs::write(&copy, &other).unwrap();
    let j = job_on(&app, &t, &slide).await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["attempt"], 1, "not retried: {j}");
    let failure = j["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("the slide's bytes changed after it was verified (verified SHA-256 ")
            && failure.contains(&hex::encode(sha2::Sha256::digest(&bytes)))
            && failure.contains(&hex::encode(sha2::Sha256::digest(&other))),
        "{failure}"
    );
    app.stop().await;
}

/// On S3 (moto, a versioned bucket): a second completion while the first copies is refused,
/// the copy's version is recorded with `SlideUploaded`, and a completion after a byte swap
/// through the still-valid URL makes no new version of the copy.
#[tokio::test]
async fn a_swapped_upload_makes_no_new_copy_on_s3() {
    let app = spawn_app(Storage::S3).await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk().await)
            .force_path_style(true)
            .build(),
    );
    let bucket = app.bucket.clone().unwrap();
    s3.put_bucket_versioning()
        .bucket(&bucket)
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let t = app.token("lab-a", &["pathologist"]);
    let bytes = b"the first upload's bytes".to_vec();
    let other = b"the other upload's bytes".to_vec();
    let (slide, upload) = registered_and_put(&app, &t, &bytes).await;
    let done = format!("/api/slides/{slide}/uploaded");
    let claim = hold_copy_claim(&app, &slide).await;
    assert_problem(&app.post(&t, &done, json!({})).await, StatusCode::CONFLICT);
    sqlx::Connection::close(claim).await.unwrap();
    // Completions racing, then more after other bytes were PUT through the still-valid URL:
    // each is done (200), refused while another copies (409) or told the server is busy (503),
    // and only one copy is ever made.
    let burst = |n: usize| {
        let (app, t, done) = (&app, &t, &done);
        async move {
            let statuses = futures_util::future::join_all((0..n).map(|_| app.post(t, done, json!({})))).await;
            let statuses: Vec<StatusCode> = statuses.into_iter().map(|r| r.status).collect();
            assert!(
                statuses
                    .iter()
                    .all(|s| [StatusCode::OK, StatusCode::CONFLICT, StatusCode::SERVICE_UNAVAILABLE].contains(s)),
                "{statuses:?}"
            );
            statuses
        }
    };
    let first = burst(8).await;
    assert!(first.contains(&StatusCode::OK), "{first:?}");
    assert!(put_upload(&app.http, &upload, &other).await.is_none());
    burst(8).await;
    assert_eq!(app.post(&t, &done, json!({})).await.status, StatusCode::OK);
    let recorded: String = sqlx::query_scalar(
        "SELECT payload::jsonb ->> 'version_id' FROM events WHERE aggregate_id = $1 AND event_type = 'SlideUploaded'",
    )
    .bind(&slide)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let versions = s3
        .list_object_versions()
        .bucket(&bucket)
        .prefix("immutable/")
        .send()
        .await
        .unwrap();
    let versions: Vec<_> = versions
        .versions()
        .iter()
        .filter(|v| v.key().is_some_and(|k| k.contains(&slide)))
        .collect();
    assert_eq!(versions.len(), 1, "one copy, never replaced: {versions:?}");
    assert_eq!(versions[0].version_id(), Some(recorded.as_str()));
    let copy = s3
        .get_object()
        .bucket(&bucket)
        .key(versions[0].key().unwrap())
        .version_id(&recorded)
        .send()
        .await
        .unwrap();
    assert_eq!(copy.body.collect().await.unwrap().into_bytes().as_ref(), &bytes[..]);
    app.stop().await;
}

/// A slide whose copy cannot be read for 20 s is verified once it can be, without an
/// operator: its verification is tried again from the due-time table with backoff, never
/// redelivered into the dead-letter queue, and nothing is parked.
#[tokio::test]
async fn a_copy_unreadable_for_a_while_is_verified_once_readable() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let (slide, copy, hidden) = uploaded_with_copy_hidden(&app, &t, &blank_slide(&app.dir)).await;
    let hid = Instant::now();
    let _verifier = spawn_verifier(
        &app,
        &[
            ("Messaging__SlowRetryFirstSeconds", "1"),
            ("Messaging__SlowRetryMaxSeconds", "4"),
            ("Messaging__SlowRetryAttempts", "15"),
        ],
    );
    // The failed verification waits in the due-time table, and /metrics counts it.
    eventually("the verification waiting for a retry", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM due_work WHERE kind = 'slow-work:verify'")
            .fetch_one(&app.db.owner)
            .await
            .unwrap();
        (n == 1).then_some(Value::Null)
    })
    .await;
    let text = app.metrics().await;
    assert_eq!(
        metric(&text, "mira_consumer_slow_work_retrying{consumer=\"verify\"}"),
        1.0,
        "{text}"
    );
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(hid.elapsed())).await;
    assert_eq!(slide_status(&app, &t, &slide).await, "uploaded");
    std::fs::rename(&hidden, &copy).unwrap();
    eventually("the slide verified once its copy is readable", || async {
        (slide_status(&app, &t, &slide).await == "verified").then_some(Value::Null)
    })
    .await;
    assert_eq!(parked_for(&app, &slide).await, None);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM due_work WHERE kind = 'slow-work:verify'")
        .fetch_one(&app.db.owner)
        .await
        .unwrap();
    assert_eq!(left, 0, "the retry is done with");
    app.stop().await;
}
