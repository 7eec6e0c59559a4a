//! Jobs run by a real worker: the whole path, cancellation, stalls, memory limits, leases, admission.

use super::*;
use sha2::{Digest, Sha256};

#[tokio::test]
async fn the_whole_path_over_http_and_the_websocket_with_a_real_slide() {
    let app = spawn_app(Storage::Local).await;
    let mut worker = spawn_worker(&app, &[]);
    let t = app.token("lab-a", &["pathologist"]);
    let mut ws = connect(&app, &t, None).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");

    // Register the slide, and submit a job on it before it is even uploaded.
    let bytes = cmu_slide();
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "CMU-1-Small-Region", "size_bytes": bytes.len(), "content_type": "image/tiff"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let slide = r.body["slide_id"].as_str().unwrap().to_owned();
    let submit = |key: &'static str| {
        app.send(
            app.http
                .post(format!("{}/api/jobs", app.base))
                .bearer_auth(&t)
                .header("idempotency-key", key)
                .json(&json!({"slide_id": slide, "kind": "wsi.preprocess", "params": {"format": "png"}})),
        )
    };
    let first = submit("whole-path-1").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    assert_eq!(
        submit("whole-path-1").await.body["job_id"],
        first.body["job_id"],
        "one job per key"
    );
    let job = first.body["job_id"].as_str().unwrap().to_owned();
    put_upload(&app.http, &r.body["upload"], &bytes).await;
    let done = app.post(&t, &format!("/api/slides/{slide}/uploaded"), json!({})).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);

    // It waits for the worker's verdict on the slide, then runs to the end.
    let seen = statuses_until(&mut ws, &job, "succeeded").await;
    assert_eq!(seen.first().map(String::as_str), Some("submitted"), "{seen:?}");
    let order = ["submitted", "queued", "running", "succeeded"];
    let positions: Vec<usize> = seen
        .iter()
        .map(|s| order.iter().position(|o| o == s).expect("a known status"))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
    assert!(seen.contains(&"running".to_owned()), "{seen:?}");
    let slide_now = app.get(&t, &format!("/api/slides/{slide}")).await.body;
    assert_eq!(slide_now["status"], "verified", "{slide_now}");
    assert_eq!(slide_now["metadata"]["width"], 2220);
    let detail = app.get(&t, &format!("/api/jobs/{job}")).await.body;
    let manifest_key = detail["manifest_key"].as_str().unwrap();
    assert!(manifest_key.ends_with("attempt-1/manifest.json"), "{detail}");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(app.dir.join("blobs").join(manifest_key)).unwrap()).unwrap();
    assert_eq!(manifest["deepzoom"]["levels"], 13);
    // The pyramid is one layer, streamed to the store as it was written (ADR 0036): its parts'
    // hashes are those of the stored object's bytes, and the layer's hash is of their digests.
    assert_eq!(manifest["format_version"], 2, "{manifest}");
    let layer = &manifest["layers"]["slide"];
    assert_eq!(layer["levels"].as_array().unwrap().len(), 13, "{layer}");
    let prefix = manifest_key.trim_end_matches("manifest.json");
    let stored = std::fs::read(app.dir.join("blobs").join(prefix).join("slide.tiff")).unwrap();
    assert_eq!(layer["bytes"], stored.len() as u64);
    let parts = layer["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 1, "a layer smaller than one part: {layer}");
    let digest = Sha256::digest(&stored);
    assert_eq!(parts[0]["sha256"], hex::encode(digest));
    assert_eq!(layer["sha256_of_parts"], hex::encode(Sha256::digest(digest)));
    assert!(
        !manifest["objects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["key"].as_str().unwrap().contains("_files/")),
        "no tile is an object of its own: {manifest}"
    );
    // The results through the API: the manifest as a redirect to a signed URL of the store, the
    // layer's DeepZoom form and its tiles read from the layer by the gateway.
    let mut fetched = std::collections::HashMap::new();
    for (path, media_type) in [
        ("results/manifest.json", "application/json"),
        ("layers/slide.dzi", "application/xml"),
        ("layers/slide_files/12/0_0.jpeg", "image/jpeg"),
        ("layers/slide_files/12/8_11.jpeg", "image/jpeg"),
        ("layers/slide_files/0/0_0.jpeg", "image/jpeg"),
    ] {
        let r = app
            .http
            .get(format!("{}/api/jobs/{job}/{path}", app.base))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()["content-type"], media_type, "{path}");
        fetched.insert(path, r.bytes().await.unwrap());
    }
    let dzi = String::from_utf8_lossy(&fetched["layers/slide.dzi"]).into_owned();
    assert!(
        dzi.contains("Width=\"2220\"") && dzi.contains("TileSize=\"256\"") && dzi.contains("Overlap=\"0\""),
        "{dzi}"
    );
    for path in [
        "layers/slide_files/12/0_0.jpeg",
        "layers/slide_files/12/8_11.jpeg",
        "layers/slide_files/0/0_0.jpeg",
    ] {
        let tile = &fetched[path];
        assert_eq!(&tile[..2], b"\xff\xd8", "{path} is a JPEG");
        assert_eq!(
            jpeg_size(tile),
            (256, 256),
            "{path}: every stored tile is 256×256, edges padded"
        );
        assert!(
            stored.windows(tile.len()).any(|w| w == &tile[..]),
            "{path} is the layer's own bytes"
        );
    }
    assert!(fetched["layers/slide_files/12/0_0.jpeg"] != fetched["layers/slide_files/12/8_11.jpeg"]);
    // Paths and tiles the layer does not have.
    for (path, status) in [
        ("layers/other.dzi", StatusCode::NOT_FOUND),
        ("layers/normalized.dzi", StatusCode::NOT_FOUND),
        ("layers/slide_files/12/9_0.jpeg", StatusCode::NOT_FOUND),
        ("layers/slide_files/13/0_0.jpeg", StatusCode::NOT_FOUND),
        ("layers/slide_files/12/0_0.png", StatusCode::BAD_REQUEST),
        ("layers/slide.tiff.dzi", StatusCode::BAD_REQUEST),
    ] {
        let r = app.get(&t, &format!("/api/jobs/{job}/{path}")).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
    }
    // Another tenant asks for the same job's layer and tiles: no such job.
    let other = app.token("lab-b", &["pathologist"]);
    for path in ["layers/slide.dzi", "layers/slide_files/12/0_0.jpeg"] {
        let r = app.get(&other, &format!("/api/jobs/{job}/{path}")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.body);
    }
    // The DeepZoom export, for anyone who wants files: the job's tile size, overlap and format,
    // in the geometry OpenSlide's DeepZoomGenerator gives the original slide.
    let export = app.dir.join("export");
    let out = worker_command(&app, "export", &[])
        .args(["--tenant", "lab-a", "--job", job.as_str(), "--dzi"])
        .arg(&export)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dzi = std::fs::read_to_string(export.join("slide.dzi")).unwrap();
    assert!(
        dzi.contains("TileSize=\"254\"") && dzi.contains("Overlap=\"1\"") && dzi.contains("Format=\"png\""),
        "{dzi}"
    );
    let reference = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys, openslide; from openslide.deepzoom import DeepZoomGenerator as G; \
             g = G(openslide.OpenSlide(sys.argv[1]), 254, 1); print(g.level_count); \
             [print(c, r) for c, r in g.level_tiles]",
        ])
        .arg(std::path::Path::new(&std::env::var("MIRA_TESTDATA").unwrap()).join("CMU-1-Small-Region.svs"))
        .output()
        .unwrap();
    assert!(
        reference.status.success(),
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let reference = String::from_utf8(reference.stdout).unwrap();
    let mut lines = reference.lines();
    let levels: usize = lines.next().unwrap().parse().unwrap();
    assert_eq!(std::fs::read_dir(export.join("slide_files")).unwrap().count(), levels);
    for (level, line) in lines.enumerate() {
        let (c, r) = line.split_once(' ').unwrap();
        let (c, r): (usize, usize) = (c.parse().unwrap(), r.parse().unwrap());
        let dir = export.join(format!("slide_files/{level}"));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), c * r, "level {level}");
        assert!(dir.join(format!("{}_{}.png", c - 1, r - 1)).exists(), "level {level}");
    }
    // The export refuses to write over an earlier one.
    let again = worker_command(&app, "export", &[])
        .args(["--tenant", "lab-a", "--job", job.as_str(), "--dzi"])
        .arg(&export)
        .output()
        .await
        .unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("exists"));
    // Another tenant's job is not found.
    let theirs = worker_command(&app, "export", &[])
        .args(["--tenant", "lab-b", "--job", job.as_str(), "--dzi"])
        .arg(app.dir.join("export-b"))
        .output()
        .await
        .unwrap();
    assert!(
        !theirs.status.success() && String::from_utf8_lossy(&theirs.stderr).contains("has no job"),
        "{}",
        String::from_utf8_lossy(&theirs.stderr)
    );

    // Climbing out of the results, sent byte for byte (an HTTP client would remove the `..`
    // before the request left it, and the handler would never see them).
    for path in [
        "../../secret",
        "slide_files/../../../../other-job/attempt-1/x",
        "%2e%2e/%2e%2e/secret",
    ] {
        let res = raw_request(
            &app,
            &format!(
                "GET /api/jobs/{job}/results/{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(
            res.starts_with("HTTP/1.1 400") && res.contains("not a result path"),
            "{path}: {res}"
        );
    }

    // Cancel one job before it runs, then retry it: it runs to the end.
    let second = submit("whole-path-2").await.body["job_id"].as_str().unwrap().to_owned();
    let c = app.post(&t, &format!("/api/jobs/{second}/cancel"), json!({})).await;
    assert_eq!(c.status, StatusCode::ACCEPTED, "{}", c.body);
    let st = c.body["status"].as_str().unwrap().to_owned();
    assert!(st == "cancelled" || st == "cancel_requested", "{}", c.body);
    statuses_until(&mut ws, &second, "cancelled").await;
    let r = app.post(&t, &format!("/api/jobs/{second}/retry"), json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    statuses_until(&mut ws, &second, "succeeded").await;

    // Macenko normalisation: a second pyramid beside the first, the mask and the statistics.
    let job_on = |slide: String, params: Value| {
        let (http, base, t) = (app.http.clone(), app.base.clone(), t.clone());
        async move {
            let r = http
                .post(format!("{base}/api/jobs"))
                .bearer_auth(&t)
                .json(&json!({"slide_id": slide, "kind": "wsi.preprocess", "params": params}))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body = r.json::<Value>().await.unwrap();
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
            body["job_id"].as_str().unwrap().to_owned()
        }
    };
    let normalised = job_on(slide.clone(), json!({"normalize": "macenko"})).await;
    statuses_until(&mut ws, &normalised, "succeeded").await;
    let detail = app.get(&t, &format!("/api/jobs/{normalised}")).await.body;
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(app.dir.join("blobs").join(detail["manifest_key"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["normalized"]["stains"]["method"], "macenko", "{manifest}");
    assert!(manifest["tissue"]["fraction"].as_f64().unwrap() > 0.1, "{manifest}");
    assert_eq!(
        manifest["layers"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["normalized", "slide"],
        "{manifest}"
    );
    for key in [
        "layers/normalized.dzi",
        "results/mask.png",
        "results/stats.json",
        "layers/normalized_files/12/0_0.jpeg",
    ] {
        let r = app
            .http
            .get(format!("{}/api/jobs/{normalised}/{key}", app.base))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{key}");
    }

    // A slide of blank glass is a valid slide, but has no stain to estimate: the job fails at
    // once, for good, with the reason, and no manifest points at anything it wrote.
    let blank_id = app.upload_slide(&t, &blank_slide(&app.dir)).await;
    let failing = job_on(blank_id, json!({"normalize": "macenko"})).await;
    let seen = statuses_until(&mut ws, &failing, "failed").await;
    assert!(!seen.contains(&"retry_scheduled".to_owned()), "not retried: {seen:?}");
    let detail = app.get(&t, &format!("/api/jobs/{failing}")).await.body;
    assert!(
        detail["failure"]
            .as_str()
            .unwrap_or_default()
            .contains("too few stained pixels"),
        "{detail}"
    );
    assert!(detail["manifest_key"].is_null(), "{detail}");
    assert_eq!(detail["attempt"], 1, "{detail}");
    let r = app.get(&t, &format!("/api/jobs/{failing}/results/slide.dzi")).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = app.get(&t, &format!("/api/jobs/{failing}/layers/slide.dzi")).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);

    // A truncated slide is rejected by the worker with OpenSlide's reason; the worker carries
    // on. A job submitted before the verdict fails without an attempt; one submitted after it
    // is refused with the slide's status. Which comes first is the worker's race to win.
    let cut_id = app.upload_slide(&t, &bytes[..bytes.len() / 3]).await;
    let job_on_cut = json!({"slide_id": cut_id, "kind": "wsi.preprocess", "params": {}});
    let r = app.post(&t, "/api/jobs", job_on_cut.clone()).await;
    match r.status {
        StatusCode::ACCEPTED => {
            let doomed = r.body["job_id"].as_str().unwrap().to_owned();
            statuses_until(&mut ws, &doomed, "failed").await;
            let detail = app.get(&t, &format!("/api/jobs/{doomed}")).await.body;
            assert!(
                detail["manifest_key"].is_null() && detail["failure"].is_string(),
                "{detail}"
            );
        }
        StatusCode::CONFLICT => assert!(
            r.body["detail"].as_str().unwrap_or_default().contains("rejected"),
            "{}",
            r.body
        ),
        other => panic!("a job on a truncated slide: {other} {}", r.body),
    }
    // Projections of different aggregates may land in either order: wait for the slide's.
    let slide_now = eventually("the truncated slide rejected in the read model", || async {
        let s = app.get(&t, &format!("/api/slides/{cut_id}")).await.body;
        (s["status"] == "rejected").then_some(s)
    })
    .await;
    let reason = slide_now["rejection"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "{slide_now}");
    // Mira's own check of the TIFF's tables finds the cut before OpenSlide does (ADR 0023).
    assert!(
        !reason.contains(&app.dir.display().to_string()) && reason.contains("the file is truncated or damaged"),
        "the reason names a path on the worker, or not the cut: {reason}"
    );
    // Once the verdict is in, a job on the slide is refused.
    let r = app.post(&t, "/api/jobs", job_on_cut).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap_or_default().contains("rejected"),
        "{}",
        r.body
    );
    assert!(worker.try_wait().unwrap().is_none(), "the worker is still running");

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &worker.id().unwrap().to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the worker stops cleanly on SIGTERM: {status:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_cancelled_running_job_stops_within_seconds_and_the_worker_takes_the_next() {
    let app = spawn_app(Storage::Local).await;
    let bytes = tall_slide(&app.dir, 8);
    let _worker = spawn_worker(&app, &[("Worker__BandPauseMillis", "1000")]);
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, &bytes).await;
    eventually("the tall slide verified", || async {
        let s = app.get(&t, &format!("/api/slides/{slide}")).await.body;
        (s["status"] == "verified").then_some(s)
    })
    .await;
    let submit = || app.post(&t, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}));
    let first = submit().await.body["job_id"].as_str().unwrap().to_owned();
    job_status_until(&app, &t, &first, &["running"], Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = Instant::now();
    let r = app
        .post(
            &t,
            &format!("/api/jobs/{first}/cancel"),
            json!({"reason": "wrong stain"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["status"], "cancel_requested");
    let j = job_status_until(
        &app,
        &t,
        &first,
        &["cancelled", "failed", "succeeded"],
        Duration::from_secs(60),
    )
    .await;
    let latency = asked.elapsed();
    eprintln!("cancelled {latency:?} after the request (bands paused 1 s)");
    assert_eq!(
        j["status"], "cancelled",
        "cancelled by the user, not ended otherwise: {j}"
    );
    // Nothing of that attempt follows the request but the cancellation itself.
    let events = job_events(&app, &first).await;
    let at = events
        .iter()
        .position(|e| e == "JobCancelRequested")
        .expect("the request is in the log");
    assert_eq!(events[at + 1..], ["JobCancelled"], "{events:?}");
    // The worker then takes the next job.
    let second = submit().await.body["job_id"].as_str().unwrap().to_owned();
    let j = job_status_until(
        &app,
        &t,
        &second,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(j["status"], "succeeded", "{j}");
    let events = job_events(&app, &second).await;
    // How long it ran depends on the machine's load (its bands pause 1 s each): the events
    // follow the heartbeats (progress every 10 s, the lease renewed every 20 s), never a band
    // or a second each.
    let at = |k: &str| chrono::DateTime::parse_from_rfc3339(j[k].as_str().unwrap()).unwrap();
    let ran = (at("updated_at") - at("submitted_at")).num_seconds().max(0) as usize;
    eprintln!(
        "a job of the tall slide: {} events in {ran} s: {events:?}",
        events.len()
    );
    assert!(
        events.len() <= 6 + ran / 5,
        "no event a second: {} in {ran} s: {events:?}",
        events.len()
    );
    app.stop().await;
}

/// A pipeline that stops making progress (the test hook stops the tall slide's third band for
/// ever; a one-band slide never gets there) is killed after `Worker__StallSeconds`, retried,
/// and fails for good when it stalls again; meanwhile the worker runs another tenant's job.
#[tokio::test]
async fn a_stalled_attempt_is_killed_and_retried_once_while_the_worker_runs_other_work() {
    let app = spawn_app(Storage::Local).await;
    let tall = tall_slide(&app.dir, 8);
    let worker = spawn_worker(&app, &[("Worker__TestHangAtBand", "3"), ("Worker__StallSeconds", "20")]);
    let worker_pid = worker.id().unwrap();
    let (a, b) = (
        app.token("lab-a", &["pathologist"]),
        app.token("lab-b", &["pathologist"]),
    );
    let (stuck_slide, small_slide) = (
        app.upload_slide(&a, &tall).await,
        app.upload_slide(&b, &cmu_slide()).await,
    );
    for (t, s) in [(&a, &stuck_slide), (&b, &small_slide)] {
        app.verified(t, s).await;
    }
    let stuck = submit_job(&app, &a, &stuck_slide).await;
    job_status_until(&app, &a, &stuck, &["running"], Duration::from_secs(60)).await;
    let other = submit_job(&app, &b, &small_slide).await;
    let o = job_status_until(
        &app,
        &b,
        &other,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(o["status"], "succeeded", "{o}");
    let j = job_status_until(
        &app,
        &a,
        &stuck,
        &["succeeded", "failed", "cancelled"],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["attempt"], 2, "retried once: {j}");
    let failure = j["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("no progress for 20 s in stage building the pyramid (tiles ")
            && failure.ends_with("it stalled before too, so it is not retried"),
        "{failure}"
    );
    let events = job_events(&app, &stuck).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(String::as_str)
        .filter(|e| ["JobAttemptFailed", "JobRetryScheduled", "JobFailed"].contains(e))
        .collect();
    assert_eq!(
        kinds,
        ["JobAttemptFailed", "JobRetryScheduled", "JobAttemptFailed", "JobFailed"],
        "{events:?}"
    );
    // The other tenant's job finished while the stuck one waited for its retry.
    let at = |job: &str, kind: &str| {
        let (job, kind) = (job.to_owned(), kind.to_owned());
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT global_position FROM events WHERE aggregate_id = $1 AND event_type = $2 ORDER BY global_position LIMIT 1",
            )
            .bind(job)
            .bind(kind)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(at(&other, "JobSucceeded").await < at(&stuck, "JobFailed").await);
    // The stalled attempts' processes were killed, not left behind.
    let left: Vec<String> = children_of(worker_pid)
        .into_iter()
        .filter(|c| c.contains(" process "))
        .collect();
    assert!(left.is_empty(), "attempt processes still there: {left:?}");
    drop(worker);
    app.stop().await;
}

/// A job whose slide is never uploaded fails after `Jobs__SlideWaitHours` (here 0.001 h,
/// 3.6 s) with a reason that says so.
#[tokio::test]
async fn a_job_for_a_slide_never_uploaded_fails_after_the_wait() {
    let app = spawn_app_with(Storage::Local, &[("Jobs__SlideWaitHours", "0.001")]).await;
    let t = app.token("lab-a", &["pathologist"]);
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "never sent", "size_bytes": 1000, "content_type": "image/tiff"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let slide = r.body["slide_id"].as_str().unwrap().to_owned();
    let submitted = Instant::now();
    let job = submit_job(&app, &t, &slide).await;
    let j = job_status_until(
        &app,
        &t,
        &job,
        &["failed", "queued", "cancelled"],
        Duration::from_secs(60),
    )
    .await;
    let waited = submitted.elapsed();
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["failure"], "the slide was never uploaded (waited 4 s)", "{j}");
    assert!(waited >= Duration::from_secs(3), "not before the wait: {waited:?}");
    app.stop().await;
}

/// A job whose estimated memory is over `Worker__MemoryBudgetBytes` fails before it starts,
/// for good and with the figures; the worker takes the next job, which fits.
#[tokio::test]
async fn a_job_over_the_memory_budget_fails_with_the_figures_and_the_next_one_runs() {
    let app = spawn_app(Storage::Local).await;
    let _worker = spawn_worker(&app, &[("Worker__MemoryBudgetBytes", "314572800")]);
    let t = app.token("lab-a", &["pathologist"]);
    let j = job_to_the_end(&app, &t, &cmu_slide()).await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["attempt"], 1, "not retried: {j}");
    let failure = j["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("the slide needs about ")
            && failure.contains("2220 pixels wide")
            && failure.ends_with("more than Worker__MemoryBudgetBytes (300.0 MiB)"),
        "{failure}"
    );
    let j = job_to_the_end(&app, &t, &blank_slide(&app.dir)).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    app.stop().await;
}

/// An attempt that allocates past its data limit (the test hook allocates 4 GiB under a
/// 1 GiB budget) fails for good with the allocation named; the worker, untouched, runs the
/// next job.
#[tokio::test]
async fn an_attempt_past_its_memory_limit_fails_and_the_worker_runs_the_next_job() {
    let app = spawn_app(Storage::Local).await;
    let mut worker = spawn_worker(
        &app,
        &[
            ("Worker__MemoryBudgetBytes", "1073741824"),
            ("Worker__TestAllocateBytes", "4294967296"),
        ],
    );
    let t = app.token("lab-a", &["pathologist"]);
    let j = job_to_the_end(&app, &t, &cmu_slide()).await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["attempt"], 1, "not retried: {j}");
    let failure = j["failure"].as_str().unwrap();
    assert!(
        failure.starts_with("the attempt ran out of memory (memory allocation of 4294967296 bytes failed"),
        "{failure}"
    );
    assert!(worker.try_wait().unwrap().is_none(), "the worker is still running");
    // Under a megapixel, the hook leaves the attempt alone.
    let j = job_to_the_end(&app, &t, &blank_slide(&app.dir)).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    app.stop().await;
}

// Each lease in a test of its own (a process of its own under nextest): two gateways in one
// process share its environment.
#[tokio::test]
async fn a_minute_long_job_keeps_a_short_lease_by_renewing_it() {
    let (j, events, ran) = minute_job("10").await;
    report(10, ran, &events);
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["attempt"], 1, "the lease was renewed, not lost: {j}");
    assert!(ran >= Duration::from_secs(48), "about a minute: {ran:?}");
    let renewals = events.iter().filter(|e| *e == "JobLeaseExtended").count();
    assert!(renewals >= 3, "a 10 s lease is renewed every ~3 s: {events:?}");
}

#[tokio::test]
async fn a_minute_long_job_writes_a_few_events_with_the_default_lease() {
    let (j, events, ran) = minute_job("60").await;
    report(60, ran, &events);
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["attempt"], 1, "{j}");
    assert!(ran >= Duration::from_secs(48), "about a minute: {ran:?}");
    // Submitted, queued, started and the outcome, progress every 10 s and a renewal every
    // 20 s at most: 13 for a minute, at most 15 as the issue asks; a loaded machine that
    // stretches the job may add one of each per 10 or 20 s more, and no more than that.
    let secs = ran.as_secs_f64();
    let cadence = 4 + (secs / 10.0).ceil() as usize + (secs / 20.0).ceil() as usize;
    assert!(
        events.len() <= cadence.max(15),
        "{} events in {ran:?}: {events:?}",
        events.len()
    );
}

/// One unreadable past the last try is parked with the reason, listed by `mira dlq list`,
/// and verified after `mira dlq redrive` once readable.
#[tokio::test]
async fn slow_work_past_its_last_try_is_parked_and_redriven() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let (slide, copy, hidden) = uploaded_with_copy_hidden(&app, &t, &blank_slide(&app.dir)).await;
    let _verifier = spawn_verifier(
        &app,
        &[
            ("Messaging__SlowRetryFirstSeconds", "1"),
            ("Messaging__SlowRetryMaxSeconds", "1"),
            ("Messaging__SlowRetryAttempts", "2"),
        ],
    );
    let reason = eventually("the slide's verification parked", || async {
        parked_for(&app, &slide).await.map(Value::String)
    })
    .await;
    let reason = reason.as_str().unwrap();
    assert!(
        reason.contains("SlideUploaded") && reason.contains("failed 2 times") && reason.contains("cannot be read"),
        "{reason}"
    );
    let mira = |args: &[&str]| {
        let out = std::process::Command::new(worker_binary().with_file_name("mira"))
            .args(args)
            .env("DATABASE_URL", &app.db.url)
            .env("Messaging__Provider", "InMemory")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mira {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed: Value = serde_json::from_str(&mira(&["dlq", "list", "--json"])).unwrap();
    let parked = listed["parked"].as_array().unwrap();
    assert!(
        parked
            .iter()
            .any(|p| p["consumer"] == "verify" && p["aggregate_id"] == slide.as_str() && p["reason"] == reason),
        "{listed}"
    );
    let text = app.metrics().await;
    assert_eq!(
        metric(&text, "mira_consumer_parked_aggregates{consumer=\"verify\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(slide_status(&app, &t, &slide).await, "uploaded");
    std::fs::rename(&hidden, &copy).unwrap();
    mira(&["dlq", "redrive", "--consumer", "verify", "--aggregate", &slide]);
    eventually("the slide verified after the redrive", || async {
        (slide_status(&app, &t, &slide).await == "verified").then_some(Value::Null)
    })
    .await;
    assert_eq!(parked_for(&app, &slide).await, None);
    app.stop().await;
}

/// With 50 routine jobs queued on one worker, a STAT job queued after them is the next job the
/// worker starts: no routine job starts between its queueing and its start.
#[tokio::test]
async fn a_stat_job_starts_before_fifty_routine_jobs_queued_ahead() {
    let app = spawn_app(Storage::Local).await;
    // Every job pauses after each band, so the routine jobs stay queued behind the one running.
    let _worker = spawn_worker(&app, &[("Worker__BandPauseMillis", "2000")]);
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, &blank_slide(&app.dir)).await;
    eventually("the slide verified", || async {
        let s = app.get(&t, &format!("/api/slides/{slide}")).await.body;
        (s["status"] == "verified").then_some(s)
    })
    .await;
    let mut routine = Vec::new();
    for _ in 0..50 {
        routine.push(submit_job(&app, &t, &slide).await);
    }
    // Each is ready: queued, or waiting for its admission (the handlers keep only
    // Jobs__AdmissionWindow routine jobs in the queue at once).
    let ready = |ids: Vec<String>| {
        let app = &app;
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(DISTINCT aggregate_id) FROM events WHERE event_type = 'JobQueued' AND aggregate_id = ANY($1)) \
                      + (SELECT count(*) FROM due_work WHERE kind = 'job.queue' AND key = ANY($1))",
            )
            .bind(&ids)
            .fetch_one(&app.db.owner)
            .await
            .unwrap();
            n
        }
    };
    eventually("the 50 routine jobs ready", || async {
        (ready(routine.clone()).await >= 50).then_some(Value::Null)
    })
    .await;
    let r = app
        .post(
            &t,
            "/api/jobs",
            json!({"slide_id": slide, "kind": "wsi.preprocess", "priority": "stat"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let stat = r.body["job_id"].as_str().unwrap().to_owned();
    job_status_until(&app, &t, &stat, &["running", "succeeded"], Duration::from_secs(120)).await;
    // The log says in which order the jobs were queued and started.
    let rows: Vec<(String, String, i64, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT aggregate_id, event_type, global_position, recorded_at FROM events \
         WHERE aggregate_type = 'Job' AND event_type IN ('JobQueued', 'JobStarted') ORDER BY global_position",
    )
    .fetch_all(&app.db.owner)
    .await
    .unwrap();
    let stat_queued = rows
        .iter()
        .find(|r| r.0 == stat && r.1 == "JobQueued")
        .expect("the STAT job was queued");
    // The STAT job starts next, unless the worker was already taking a routine job's lease
    // when it was queued (a message received a moment before, whose `JobStarted` lands just
    // after): at most that one routine job starts between the STAT job's queueing and its start.
    let starts_after: Vec<_> = rows
        .iter()
        .filter(|r| r.1 == "JobStarted" && r.2 > stat_queued.2)
        .collect();
    let at = starts_after
        .iter()
        .position(|r| r.0 == stat)
        .expect("the STAT job started");
    assert!(
        at <= 1,
        "the STAT job started next (or second, after a lease already being taken), not after {:?}",
        &starts_after[..at]
    );
    let first_start_after = starts_after[at];
    let started_before: usize = rows
        .iter()
        .filter(|r| r.1 == "JobStarted" && r.2 < first_start_after.2)
        .count();
    assert!(
        started_before <= 3,
        "at most the running job (and one whose lease was being taken when the STAT job was queued) went first: {started_before}"
    );
    eprintln!(
        "STAT job: queued to started in {} ms with {} routine jobs ready ahead of it (queued or waiting for admission)",
        (first_start_after.3 - stat_queued.3).num_milliseconds(),
        50 - started_before
    );
    app.stop().await;
}

/// Tenant A queues 40 jobs, then tenant B 2: with one worker, B's first job starts within the
/// next 3 jobs. Before B came, A alone had the worker: every A job was queued before the one
/// ahead of it ended, so the worker never waited for an admission. /metrics counts the jobs
/// waiting for admission (what the fleet scales on).
#[tokio::test]
async fn tenants_take_turns_and_a_lone_tenant_keeps_the_worker_busy() {
    let app = spawn_app(Storage::Local).await;
    let _worker = spawn_worker(&app, &[("Worker__BandPauseMillis", "1000")]);
    let (a, b) = (
        app.token("lab-a", &["pathologist"]),
        app.token("lab-b", &["pathologist"]),
    );
    let (slide_a, slide_b) = (
        app.upload_slide(&a, &blank_slide(&app.dir)).await,
        app.upload_slide(&b, &blank_slide(&app.dir)).await,
    );
    for (t, s) in [(&a, &slide_a), (&b, &slide_b)] {
        eventually("the slide verified", || async {
            let v = app.get(t, &format!("/api/slides/{s}")).await.body;
            (v["status"] == "verified").then_some(v)
        })
        .await;
    }
    let mut jobs_a = Vec::new();
    for _ in 0..40 {
        jobs_a.push(submit_job(&app, &a, &slide_a).await);
    }
    let succeeded = |ids: Vec<String>| {
        let pool = app.db.owner.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM events WHERE event_type = 'JobSucceeded' AND aggregate_id = ANY($1)",
            )
            .bind(ids)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    eventually("three of A's jobs done", || async {
        (succeeded(jobs_a.clone()).await >= 3).then_some(Value::Null)
    })
    .await;
    let waiting = metric(
        &app.metrics().await,
        "mira_jobs_waiting_admission{priority=\"routine\"}",
    );
    assert!(waiting >= 30.0, "A's jobs wait for admission: {waiting}");
    // The API shows which: A's last job waits, still `submitted`; the one running does not.
    let last = app.get(&a, &format!("/api/jobs/{}", jobs_a[39])).await.body;
    assert_eq!(
        (&last["status"], &last["waiting_for_admission"]),
        (&json!("submitted"), &json!(true)),
        "{last}"
    );
    let listed = app.get(&a, "/api/jobs?limit=100").await.body;
    let flags: Vec<bool> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["waiting_for_admission"].as_bool().expect("every job says"))
        .collect();
    assert!(flags.iter().filter(|w| **w).count() >= 30, "{listed}");
    assert!(flags.iter().any(|w| !*w), "{listed}");
    let jobs_b = [
        submit_job(&app, &b, &slide_b).await,
        submit_job(&app, &b, &slide_b).await,
    ];
    job_status_until(
        &app,
        &b,
        &jobs_b[0],
        &["running", "succeeded"],
        Duration::from_secs(120),
    )
    .await;
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, event_type, global_position FROM events \
         WHERE aggregate_type = 'Job' AND event_type IN ('JobSubmitted', 'JobQueued', 'JobStarted', 'JobSucceeded') \
         ORDER BY global_position",
    )
    .fetch_all(&app.db.owner)
    .await
    .unwrap();
    let at = |job: &str, kind: &str| rows.iter().find(|r| r.0 == job && r.1 == kind).map(|r| r.2);
    let b_submitted = at(&jobs_b[0], "JobSubmitted").unwrap();
    let b_started = at(&jobs_b[0], "JobStarted").unwrap();
    let starts_between = rows
        .iter()
        .filter(|r| r.1 == "JobStarted" && r.2 > b_submitted && r.2 < b_started)
        .count();
    eprintln!("B's first job started after {starts_between} of A's jobs started once B had submitted it");
    assert!(
        starts_between <= 2,
        "B's first job was among the next 3 to start: {starts_between}"
    );
    // A alone: each of A's jobs that started before B came was queued before the previous
    // one ended.
    let started_a: Vec<&String> = rows
        .iter()
        .filter(|r| r.1 == "JobStarted" && r.2 < b_submitted && jobs_a.contains(&r.0))
        .map(|r| &r.0)
        .collect();
    assert!(started_a.len() >= 3, "{started_a:?}");
    for pair in started_a.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        assert!(
            at(next, "JobQueued").unwrap() < at(prev, "JobSucceeded").unwrap(),
            "job {next} was queued before {prev} ended"
        );
    }
    app.stop().await;
}

/// A baseline JPEG's width and height, from its SOF0 marker.
fn jpeg_size(b: &[u8]) -> (u16, u16) {
    let mut i = 2;
    while i + 9 < b.len() {
        assert_eq!(b[i], 0xff, "a marker at {i}");
        let (marker, len) = (b[i + 1], u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize);
        if marker == 0xc0 {
            return (
                u16::from_be_bytes([b[i + 7], b[i + 8]]),
                u16::from_be_bytes([b[i + 5], b[i + 6]]),
            );
        }
        i += 2 + len;
    }
    panic!("no SOF0 marker");
}

/// A job on S3 (moto) with 64 KiB layer parts: the worker streams the layer in several parts,
/// the first (with the header) sent last, and the object S3 assembled is the layer: each part's
/// recorded hash is of the stored bytes at its place, no multipart upload is left open, and the
/// gateway serves its tiles with ranged reads of the object.
#[tokio::test]
async fn a_job_on_s3_streams_its_layer_in_parts_and_serves_tiles_from_it() {
    let app = spawn_app(Storage::S3).await;
    let bucket = app.bucket.clone().unwrap();
    let endpoint = endpoint();
    let _worker = spawn_worker(
        &app,
        &[
            ("Storage__Provider", "S3"),
            ("AWS__S3__BucketName", bucket.as_str()),
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("Worker__LayerPartBytes", "65536"),
            ("Worker__LayerUploadParallel", "3"),
        ],
    );
    let t = app.token("lab-a", &["pathologist"]);
    let mut ws = connect(&app, &t, None).await;
    let slide = app.upload_slide(&t, &cmu_slide()).await;
    let r = app
        .post(&t, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let job = r.body["job_id"].as_str().unwrap().to_owned();
    statuses_until(&mut ws, &job, "succeeded").await;

    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk().await)
            .force_path_style(true)
            .build(),
    );
    let get = |key: String| {
        let (s3, bucket) = (s3.clone(), bucket.clone());
        async move {
            let o = s3.get_object().bucket(bucket).key(&key).send().await.expect(&key);
            o.body.collect().await.unwrap().into_bytes().to_vec()
        }
    };
    let detail = app.get(&t, &format!("/api/jobs/{job}")).await.body;
    let manifest_key = detail["manifest_key"].as_str().unwrap().to_owned();
    let manifest: Value = serde_json::from_slice(&get(manifest_key.clone()).await).unwrap();
    let layer = &manifest["layers"]["slide"];
    let stored = get(format!("{}slide.tiff", manifest_key.trim_end_matches("manifest.json"))).await;
    assert_eq!(layer["bytes"], stored.len() as u64);
    let parts = layer["parts"].as_array().unwrap();
    assert!(parts.len() >= 3, "the layer spans several parts: {}", parts.len());
    let mut digests = Vec::new();
    for (i, (p, chunk)) in parts.iter().zip(stored.chunks(65536)).enumerate() {
        if i + 1 < parts.len() {
            assert_eq!(p["bytes"], 65536, "part {}", i + 1);
        }
        let d = Sha256::digest(chunk);
        assert_eq!(
            p["sha256"],
            hex::encode(d),
            "part {} is the stored bytes at its place",
            i + 1
        );
        digests.extend_from_slice(&d);
    }
    assert_eq!(layer["sha256_of_parts"], hex::encode(Sha256::digest(&digests)));
    // The header's first-directory offset, written last, points at a directory of the object.
    let first = u64::from_le_bytes(stored[8..16].try_into().unwrap());
    assert!(first > 65536 && first < stored.len() as u64, "{first}");
    let open = s3.list_multipart_uploads().bucket(&bucket).send().await.unwrap();
    assert!(open.uploads().is_empty(), "no upload is left open");

    for path in [
        "slide_files/12/0_0.jpeg",
        "slide_files/12/8_11.jpeg",
        "slide_files/3/0_0.jpeg",
    ] {
        let r = app
            .http
            .get(format!("{}/api/jobs/{job}/layers/{path}", app.base))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let tile = r.bytes().await.unwrap();
        assert_eq!(jpeg_size(&tile), (256, 256), "{path}");
        assert!(
            stored.windows(tile.len()).any(|w| w == &tile[..]),
            "{path} is the layer's own bytes"
        );
    }
}
