//! The WebSocket: pushes, resumption from a position, fairness, and oversized messages.

use super::*;

#[tokio::test]
async fn the_websocket_pushes_the_tenants_changes_and_resumes_from_a_position() {
    let app = spawn_app(Storage::Local).await;
    let a = app.token("lab-a", &["pathologist"]);
    let b = app.token("lab-b", &["pathologist"]);
    let mut sa = connect(&app, &a, None).await;
    let hello = next_json(&mut sa).await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["tenant"], "lab-a");
    // B connects with the token in the query string instead.
    let (mut sb, _) =
        tokio_tungstenite::connect_async(format!("{}/ws?access_token={b}", app.base.replace("http://", "ws://")))
            .await
            .unwrap();
    assert_eq!(next_json(&mut sb).await["type"], "hello");

    let slide = app.upload_slide(&a, b"bytes").await;
    let job = app
        .post(&a, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    let job_id = job.body["job_id"].as_str().unwrap().to_owned();
    // Changes of different aggregates may arrive in either order.
    let (mut uploaded, mut submitted, mut last) = (None, None, None);
    while uploaded.is_none() || submitted.is_none() {
        let m = next_json(&mut sa).await;
        // Each message carries an opaque cursor, never the log's global position.
        assert!(m.get("position").is_none(), "{m}");
        let cursor = m["cursor"].as_str().expect("a cursor").to_owned();
        assert!(cursor.parse::<i64>().is_err(), "{cursor}");
        last = Some(cursor);
        if m["type"] == "slide.updated" && m["slide"]["status"] == "uploaded" {
            assert_eq!(m["slide"]["slide_id"], slide.as_str());
            uploaded = Some(m);
        } else if m["type"] == "job.updated" {
            assert_eq!(m["job"]["job_id"], job_id.as_str());
            submitted = Some(m);
        }
    }
    let seen = last.unwrap();

    // B's first change is its own: nothing of A's was sent to it.
    app.upload_slide(&b, b"b's bytes").await;
    let m = next_json(&mut sb).await;
    assert_eq!(m["type"], "slide.updated", "{m}");
    assert_ne!(m["slide"]["slide_id"], slide.as_str());
    let b_cursor = m["cursor"].as_str().unwrap().to_owned();

    // A cursor opens only for its tenant, unchanged; a bare position is not a cursor.
    let mut flipped = seen.clone().into_bytes();
    flipped[20] = if flipped[20] == b'A' { b'B' } else { b'A' };
    for since in [b_cursor.clone(), String::from_utf8(flipped).unwrap(), "7".to_owned()] {
        let url = format!(
            "{}/ws?access_token={a}&since={since}",
            app.base.replace("http://", "ws://")
        );
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 400, "{since}"),
            other => panic!("expected a 400 for since={since}, got {other:?}"),
        }
    }

    // A goes away; meanwhile its job is cancelled; A comes back from the position it saw.
    drop(sa);
    let r = app.post(&a, &format!("/api/jobs/{job_id}/cancel"), json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let projected = eventually("the cancellation in the read model", || async {
        let j = app.get(&a, &format!("/api/jobs/{job_id}")).await.body;
        (j["status"] == "cancelled").then_some(j)
    })
    .await;
    let mut again = connect(&app, &a, Some(&seen)).await;
    assert_eq!(next_json(&mut again).await["type"], "hello");
    let m = until(&mut again, "the missed cancellation", |m| {
        m["type"] == "job.updated" && m["job"]["status"] == "cancelled"
    })
    .await;
    assert_eq!(m["job"]["updated_at"], projected["updated_at"]);
    // Views carry no global position, live or read.
    assert!(
        m["job"].get("position").is_none() && projected.get("position").is_none(),
        "{m}"
    );

    // A bad token never gets a socket.
    let bad = format!("{}/ws?access_token=not.a.token", app.base.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(bad).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("expected a 401, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn a_long_job_does_not_hold_back_anyone_elses_updates() {
    let app = spawn_app(Storage::Local).await;
    // Eight CMU regions high: the worker reads it in several bands, pausing after each.
    let bytes = tall_slide(&app.dir, 8);
    let _worker = spawn_worker(&app, &[("Worker__BandPauseMillis", "1800")]);
    let (a, b) = (
        app.token("lab-a", &["pathologist"]),
        app.token("lab-b", &["pathologist"]),
    );
    let mut wa = connect(&app, &a, None).await;
    let mut wb = connect(&app, &b, None).await;
    assert_eq!(next_json(&mut wa).await["type"], "hello");
    assert_eq!(next_json(&mut wb).await["type"], "hello");
    let slide = app.upload_slide(&a, &bytes).await;
    eventually("the tall slide verified", || async {
        let s = app.get(&a, &format!("/api/slides/{slide}")).await.body;
        (s["status"] == "verified").then_some(s)
    })
    .await;
    let job = app
        .post(&a, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    assert_eq!(job.status, StatusCode::ACCEPTED, "{}", job.body);
    let job = job.body["job_id"].as_str().unwrap().to_owned();

    // The job's start, then its progress, arrive while it runs.
    let running = until(&mut wa, "the job running", |m| {
        m["type"] == "job.updated" && m["job"]["job_id"] == job.as_str() && m["job"]["status"] == "running"
    })
    .await;
    let started = Instant::now();
    assert!(
        running["job"]["progress"]["done"].as_i64().unwrap_or(0)
            < running["job"]["progress"]["total"].as_i64().unwrap_or(1),
        "{running}"
    );
    let progressed = until(&mut wa, "progress while running", |m| {
        m["type"] == "job.updated"
            && m["job"]["job_id"] == job.as_str()
            && m["job"]["progress"]["done"].as_i64() > Some(0)
    })
    .await;
    assert_eq!(progressed["job"]["status"], "running", "{progressed}");

    // Meanwhile another tenant registers a slide: it reaches the read model and that tenant's
    // socket at once.
    let sent = Instant::now();
    let r = app
        .post(
            &b,
            "/api/slides",
            json!({"name": "during the job", "size_bytes": 10, "content_type": "image/tiff"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let other = r.body["slide_id"].as_str().unwrap().to_owned();
    let m = tokio::time::timeout(Duration::from_secs(2), next_json(&mut wb))
        .await
        .expect("lab-b's slide on its socket within 2 s while lab-a's job runs");
    assert_eq!(m["slide"]["slide_id"], other.as_str(), "{m}");
    let delivered = sent.elapsed();
    assert_eq!(
        app.get(&b, &format!("/api/slides/{other}")).await.status,
        StatusCode::OK
    );
    let still = app.get(&a, &format!("/api/jobs/{job}")).await.body;
    assert_eq!(still["status"], "running", "the job was still running: {still}");
    // And the running job holds no transaction open: nothing in this database has been in one
    // for more than a couple of seconds.
    let long: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT pid, state, left(query, 120) FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND xact_start < clock_timestamp() - interval '3 seconds'",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert!(long.is_empty(), "transactions open during the job: {long:?}");

    let seen = statuses_until(&mut wa, &job, "succeeded").await;
    assert_eq!(seen.last().map(String::as_str), Some("succeeded"), "{seen:?}");
    let ran = started.elapsed();
    eprintln!("another tenant's slide delivered in {delivered:?} while a job ran for {ran:?}");
    assert!(
        ran >= Duration::from_secs(15),
        "the job ran {ran:?}: start and progress came at its end"
    );
    app.stop().await;
}

/// The socket only pushes: a client message beyond a few kilobytes closes it.
#[tokio::test]
async fn the_websocket_closes_on_an_oversized_client_message() {
    use futures_util::{SinkExt, StreamExt};
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let mut ws = connect(&app, &t, None).await;
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    // A small message is ignored, and the socket stays.
    ws.send(tokio_tungstenite::tungstenite::Message::Text("ping".into()))
        .await
        .unwrap();
    let big = "x".repeat(1 << 20);
    let _ = ws.send(tokio_tungstenite::tungstenite::Message::Text(big.into())).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a 1 MiB client message did not close the socket");
    app.stop().await;
}
