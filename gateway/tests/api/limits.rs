//! The listener's limits: slow and idle connections, the connection cap, the per-client rate, caching headers.

use super::*;

#[tokio::test]
async fn slow_and_idle_connections_are_cut_and_a_full_listener_still_serves() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(
        Storage::Local,
        &[
            ("Api__HeaderReadTimeoutSeconds", "2"),
            ("Api__IdleTimeoutSeconds", "3"),
            ("Api__MaxConnections", "600"),
        ],
    )
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    app.answering().await;
    // A slowloris client: a header byte every half second is cut off at the header timeout.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let t0 = Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(8), Some(b"X")).await,
        "a client dripping its headers is cut off"
    );
    eprintln!("slowloris cut after {:?}", t0.elapsed());
    // A connection that sends nothing at all.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(8), None).await);
    // A keep-alive connection left idle after its request.
    let mut kept = tokio::net::TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(
        closed_within(&mut kept, Duration::from_secs(10), None).await,
        "an idle keep-alive connection is closed"
    );

    // 500 idle connections open: a normal request is still served.
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let t = app.token("lab-a", &["pathologist"]);
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), app.get(&t, "/api/slides"))
        .await
        .expect("served while 500 connections idle");
    assert_eq!(r.status, StatusCode::OK);
    eprintln!("a request beside 500 idle connections took {:?}", t0.elapsed());
    drop(idle);
    app.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_new_clients_wait_until_the_timeouts_make_room() {
    let app = spawn_app_with(
        Storage::Local,
        &[("Api__HeaderReadTimeoutSeconds", "2"), ("Api__MaxConnections", "5")],
    )
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    app.answering().await;
    let mut hogs = Vec::new();
    for _ in 0..5 {
        hogs.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // A new client (not the pooled connection above) waits in the backlog until a hog is cut
    // at the header timeout, then is served.
    let t0 = Instant::now();
    let fresh = reqwest::Client::new();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        fresh.get(format!("{}/healthz", app.base)).send(),
    )
    .await
    .expect("served once the hogs are cut")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "it waited for room: {:?}",
        t0.elapsed()
    );
    drop(hogs);
    app.stop().await;
}

#[tokio::test]
async fn a_client_past_its_rate_gets_429_and_health_checks_never_do() {
    let app = spawn_app_with(Storage::Local, &[("Api__RequestsPerSecond", "5")]).await;
    app.answering().await;
    let mut limited = None;
    for _ in 0..40 {
        let r = app.send(app.http.get(format!("{}/api/version", app.base))).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("a burst past twice the rate is limited");
    assert!(
        r.content_type.starts_with("application/problem+json"),
        "{}",
        r.content_type
    );
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    for _ in 0..40 {
        let r = app.http.get(format!("{}/healthz", app.base)).send().await.unwrap();
        assert_eq!(r.status(), 200, "health checks are not limited");
    }
    app.stop().await;
}

#[tokio::test]
async fn answers_are_not_sniffed_and_authenticated_ones_not_stored() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    for path in ["/api/slides", "/api/jobs", "/api/jobs/not-an-id", "/api/nope"] {
        let r = app.get(&t, path).await;
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(r.headers["cache-control"], "no-store", "{path}: {}", r.status);
    }
    // Refusals too, and a blob of the local store.
    let r = app.send(app.http.get(format!("{}/api/slides", app.base))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["cache-control"], "no-store");
    let r = app
        .send(app.http.get(format!("{}/blobs/slides/x?X-Mira-Expires=1", app.base)))
        .await;
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    // /api/version keeps its own policy.
    let r = app.send(app.http.get(format!("{}/api/version", app.base))).await;
    assert_eq!(r.headers["cache-control"], "no-store");
    app.stop().await;
}
