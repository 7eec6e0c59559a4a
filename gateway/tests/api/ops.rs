//! Operations: health, readiness, metrics, the OpenAPI document, fan-out and the in-memory bus.

use super::*;

// ---------------------------------------------------------------------------------------------
// Operations

#[tokio::test]
async fn health_readiness_metrics_and_the_openapi_document() {
    // A commit of digits alone stays text.
    let app = spawn_app_with(Storage::Local, &[("MIRA_COMMIT", "0123456")]).await;
    let get = |p: &str| app.send(app.http.get(format!("{}{p}", app.base)));
    assert_eq!(get("/healthz").await.status, StatusCode::OK);
    // What a deployment polls (through CloudFront's /api path) until its commit answers:
    // anonymous, and never cached on the way.
    let version = get("/api/version").await;
    assert_eq!(version.status, StatusCode::OK, "{}", version.body);
    assert_eq!(
        version.body,
        json!({"version": env!("CARGO_PKG_VERSION"), "commit": "0123456"})
    );
    assert_eq!(version.headers["cache-control"], "no-store");
    assert!(
        version.content_type.starts_with("application/json"),
        "{}",
        version.content_type
    );
    let ready = get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    assert_eq!(ready.body["checks"]["database"], "ok");
    // Every documented operation is routed.
    let doc = get("/api/openapi.json").await.body;
    assert_eq!(doc["openapi"], "3.1.0");
    // What is served is the golden document, whole.
    let golden: Value = serde_json::from_str(include_str!("../../openapi.json")).unwrap();
    assert!(doc == golden, "the served document is not gateway/openapi.json");
    let t = app.token("lab-a", &["pathologist"]);
    let id = uuid::Uuid::now_v7().to_string();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let url = format!(
                "{}{}",
                app.base,
                path.replace("{id}", &id)
                    .replace("{key}", "k")
                    .replace("{path}", "slide.dzi")
            );
            let req = app
                .http
                .request(method.to_uppercase().parse().unwrap(), url)
                .bearer_auth(&t);
            let r = app.send(req).await;
            assert!(
                !(r.status == StatusCode::NOT_FOUND && r.body["detail"] == "no such endpoint")
                    && r.status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not routed"
            );
        }
    }
    // Every API route is documented, with each method it takes.
    for (route, allow) in mira_gateway::api::allowed_methods() {
        if !route.starts_with("/api/") {
            continue;
        }
        let path = route.replace("{*", "{");
        for method in allow.split(", ").filter(|m| *m != "HEAD") {
            assert!(
                doc["paths"][&path][method.to_lowercase()].is_object(),
                "{method} {route} is routed but not documented"
            );
        }
    }
    // A dependency down: readiness says which, and nothing of why (an anonymous caller reads
    // it; the reason is in the log).
    std::fs::remove_dir_all(app.dir.join("blobs")).unwrap();
    let down = get("/readyz").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE, "{}", down.body);
    assert_eq!(
        down.body,
        json!({"ready": false, "checks": {"database": "ok", "blob_store": "down", "bus": "ok"}})
    );
    app.stop().await;
}

#[tokio::test]
async fn metrics_export_projection_lag_and_the_watermark_lag() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    // Hold the watermark: an appender stays open, never committing, while events are
    // appended (only appenders hold it; see the fan-out tests below).
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (event_id, tenant_id, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, recorded_at, payload, metadata, prev_hash, hash) \
         VALUES (gen_random_uuid(), 'lab-a', 'Hold', 'h', 1, 'Hold', '1', now(), '{}', '{}', \
         decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'))",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    app.upload_slide(&t, b"bytes").await;
    let metrics = eventually("a held watermark in /metrics", || async {
        let text = app.metrics().await;
        (metric(&text, "mira_log_watermark_lag_events") >= 2.0 && metric(&text, "mira_log_watermark_lag_seconds") > 0.0)
            .then_some(Value::String(text))
    })
    .await;
    let text = metrics.as_str().unwrap();
    for name in [
        "mira_projection_position{projection=\"read_models\"}",
        "mira_projection_lag_events{projection=\"read_models\"}",
        "mira_projection_lag_seconds{projection=\"read_models\"}",
        "mira_http_requests_total{route=\"/api/slides\",status=\"201\"} 1",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    // While the watermark is held the projector cannot see the new events: lag in events.
    let lag = text
        .lines()
        .find(|l| l.starts_with("mira_projection_lag_events"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse::<f64>()
        .unwrap();
    assert!(lag >= 2.0, "{text}");
    holder.rollback().await.unwrap();
    eventually("the projection to catch up", || async {
        let text = app.metrics().await;
        text.lines()
            .any(|l| l == "mira_projection_lag_events{projection=\"read_models\"} 0")
            .then_some(Value::Null)
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn the_relay_exports_how_its_witness_fares() {
    let app = spawn_app_with(
        Storage::Local,
        &[
            ("Audit__CheckpointEveryEvents", "1"),
            ("Audit__CheckpointEverySeconds", "1"),
        ],
    )
    .await;
    let t = app.token("lab-a", &["pathologist"]);
    app.upload_slide(&t, b"bytes").await;
    let metrics = eventually("a witnessed checkpoint in /metrics", || async {
        let text = app.metrics().await;
        (metric(&text, "mira_witness_last_success_timestamp_seconds") > 1.7e9).then_some(Value::String(text))
    })
    .await;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("# TYPE mira_witness_conflicts_total counter"), "{text}");
    assert_eq!(metric(text, "mira_witness_conflicts_total"), 0.0, "{text}");
    app.stop().await;
}

#[tokio::test]
async fn long_transactions_here_and_in_another_database_do_not_delay_fan_out() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    // A report, a migration, a psql session left open: transactions with ids that are not
    // appenders, in this database and in another one on the same cluster.
    let other = TestDb::empty().await;
    let mut here = app.db.pool.begin().await.unwrap();
    let mut there = other.pool.begin().await.unwrap();
    for tx in [&mut here, &mut there] {
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(&mut **tx)
            .await
            .unwrap();
    }
    let held = Instant::now();
    let (mut latencies, mut lags) = (Vec::new(), Vec::new());
    let mut n = 0;
    while held.elapsed() < Duration::from_secs(30) {
        n += 1;
        let r = app
            .post(
                &t,
                "/api/slides",
                json!({"name": format!("s-{n}"), "size_bytes": 10, "content_type": "image/tiff"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let committed = Instant::now();
        let id = r.body["slide_id"].as_str().unwrap().to_owned();
        loop {
            let g = app.get(&t, &format!("/api/slides/{id}")).await;
            if g.status == StatusCode::OK {
                break;
            }
            assert!(
                committed.elapsed() < Duration::from_secs(2),
                "slide {n} not in the read model within 2 s of its commit, with long transactions open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies.push(committed.elapsed());
        let text = app.metrics().await;
        let lag = metric(&text, "mira_log_watermark_lag_seconds");
        assert!((0.0..2.0).contains(&lag), "watermark lag {lag} s at sample {n}");
        lags.push(lag);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    latencies.sort();
    eprintln!(
        "{n} slides with 30 s transactions open: read-model latency median {:?}, max {:?}; watermark lag max {:.3} s",
        latencies[latencies.len() / 2],
        latencies.last().unwrap(),
        lags.iter().cloned().fold(0.0, f64::max)
    );
    assert!(n >= 20, "only {n} samples in 30 s");
    here.rollback().await.unwrap();
    there.rollback().await.unwrap();
    app.stop().await;
}

/// What the in-memory bus held when its process stopped is not lost: the next process
/// publishes the log again and consumers skip what they had applied.
#[tokio::test]
async fn events_the_in_memory_bus_held_at_shutdown_reach_the_projection_after_a_restart() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("mira-restart-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let settings = local_settings(&db, &dir).await;
    let start = |roles: Vec<mira_gateway::server::Role>| {
        let (settings, pool, stop) = (settings.clone(), db.pool.clone(), CancellationToken::new());
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let options = mira_gateway::server::Options {
                roles,
                ..Default::default()
            };
            mira_gateway::server::run(&settings, pool, listener, &options, s).await
        });
        (stop, task)
    };
    // A process with a relay and no projector: the event is published into its bus, and the
    // relay's cursor moves past it, but nothing consumes it before the process stops.
    let (stop, task) = start(vec![mira_gateway::server::Role::Relay]);
    let commands = mira_gateway::commands::Commands::new(
        mira_eventlog::EventLog::new(db.pool.clone()),
        Arc::new(mira_events::LocalKeyring::open(dir.join("keyring")).unwrap()),
    );
    let slide = mira_events::SlideId::new();
    let ctx = mira_events::CommandContext::new(
        mira_events::TenantId::parse("lab").unwrap(),
        mira_events::Actor::user("u-1"),
    );
    commands
        .slide(
            &ctx,
            slide,
            mira_aggregates::SlideCommand::Register {
                slide_id: slide,
                name: "in flight".into(),
                file_name: None,
                size_bytes: 1,
                content_type: "image/tiff".into(),
                sha256: None,
                object_key: format!("slides/lab/{slide}"),
            },
        )
        .await
        .unwrap();
    eventually("the relay to publish it", || async {
        let p: Option<i64> = sqlx::query_scalar("SELECT position FROM relay_cursor WHERE name = 'in-memory'")
            .fetch_optional(&db.pool)
            .await
            .unwrap();
        (p.unwrap_or(0) > 0).then_some(Value::Null)
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM rm.slides")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(count().await, 0, "never projected by the first process");
    // The next process, with everything: the slide reaches the read model.
    let (stop, task) = start(vec![
        mira_gateway::server::Role::Relay,
        mira_gateway::server::Role::Projector,
        mira_gateway::server::Role::Handlers,
    ]);
    eventually("the slide in the read model after the restart", || async {
        (count().await == 1).then_some(Value::Null)
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// `mira dev`'s in-memory bus keeps nothing it does not deliver: only the projector's and the
/// handlers' queues exist in the gateway (the worker runs its own bus), and after 20,000
/// commands every queue has drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_bus_has_only_consumed_queues_and_they_drain() {
    use mira_gateway::server::Role;
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("mira-drain-{}", uuid::Uuid::new_v4()));
    let settings = local_settings(&db, &dir).await;
    let roles = vec![Role::Relay, Role::Projector, Role::Handlers];
    let bus = mira_gateway::server::in_memory_bus(&roles);
    assert_eq!(
        bus.groups(),
        [mira_bus::Group::Projections, mira_bus::Group::Handlers],
        "no queue without a consumer"
    );
    let stop = CancellationToken::new();
    let options = mira_gateway::server::Options {
        roles,
        bus: Some(bus.clone()),
        ..Default::default()
    };
    let (s, pool) = (stop.clone(), db.pool.clone());
    let task = tokio::spawn(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        mira_gateway::server::run(&settings, pool, listener, &options, s).await
    });
    let commands = mira_gateway::commands::Commands::new(
        mira_eventlog::EventLog::new(db.pool.clone()),
        Arc::new(mira_events::LocalKeyring::open(dir.join("keyring")).unwrap()),
    );
    let r = mira_gateway::bench::append(&commands, 20_000, 4).await.unwrap();
    assert_eq!(r.commands, 20_000);
    // A deadline, not a speed: on a loaded machine 20 000 events take minutes to drain.
    let deadline = Instant::now() + Duration::from_secs(420);
    loop {
        let depths: Vec<usize> = bus.groups().iter().map(|g| bus.memory_queue(*g).depth()).collect();
        let projected: i64 = sqlx::query_scalar("SELECT coalesce(max(last_position), 0) FROM projection_positions")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let last: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if depths.iter().all(|d| *d == 0) && projected == last {
            break;
        }
        assert!(Instant::now() < deadline, "queues still hold {depths:?} messages");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn metrics_answer_only_their_token_here_and_anyone_on_their_own_listener() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let app = spawn_app_with(Storage::Local, &[("Api__MetricsListen", &listen)]).await;
    let scraped = eventually("/metrics on its own listener", || async {
        let r = reqwest::get(format!("http://{listen}/metrics")).await.ok()?;
        (r.status() == 200).then_some(json!(r.text().await.ok()?))
    })
    .await;
    assert!(scraped.as_str().unwrap().contains("mira_"), "{scraped}");
    // Its own listener serves nothing else.
    let r = reqwest::get(format!("http://{listen}/api/version")).await.unwrap();
    assert_eq!(r.status(), 404);
    // On the API's listener: a tenant's token is not the metrics token.
    let t = app.token("lab-a", &["admin"]);
    assert_problem(&app.get(&t, "/metrics").await, StatusCode::UNAUTHORIZED);
    assert_problem(
        &app.send(app.http.get(format!("{}/metrics", app.base))).await,
        StatusCode::UNAUTHORIZED,
    );
    assert!(app.metrics().await.contains("mira_"));
    app.stop().await;
    // Without a token, /metrics is not on the API's listener at all.
    let plain = spawn_app_with(Storage::Local, &[("Api__MetricsToken", "")]).await;
    let r = eventually("the gateway answers", || async {
        let r = plain.http.get(format!("{}/metrics", plain.base)).send().await.ok()?;
        Some(json!(r.status().as_u16()))
    })
    .await;
    assert_eq!(r, 404);
    plain.stop().await;
}

/// `projections rebuild --verify` compares without holding back live delivery: while its
/// comparison is held open, a new slide reaches the read model and the WebSocket.
#[tokio::test]
async fn a_verifying_rebuild_does_not_hold_back_live_delivery() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let first = app.upload_slide(&t, b"before the rebuild").await;
    eventually("the first slide in the read model", || async {
        (app.get(&t, &format!("/api/slides/{first}")).await.status == StatusCode::OK).then_some(Value::Null)
    })
    .await;
    let mut socket = connect(&app, &t, None).await;
    assert_eq!(next_json(&mut socket).await["type"], "hello");
    let (comparing, is_comparing) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let pool = app.db.pool.clone();
    let rebuild = tokio::spawn(async move {
        mira_projections::rebuild::rebuild_with(&pool, true, |_| {}, async move {
            comparing.send(()).unwrap();
            released.await.unwrap();
        })
        .await
    });
    tokio::time::timeout(Duration::from_secs(60), is_comparing)
        .await
        .expect("the rebuild reaches its comparison")
        .unwrap();
    let second = app.upload_slide(&t, b"during the comparison").await;
    eventually(
        "the second slide in the read model while the rebuild compares",
        || async {
            (app.get(&t, &format!("/api/slides/{second}")).await.status == StatusCode::OK).then_some(Value::Null)
        },
    )
    .await;
    until(&mut socket, "the second slide on the WebSocket", |m| {
        m.to_string().contains(&second)
    })
    .await;
    assert!(!rebuild.is_finished(), "the comparison is still held open");
    release.send(()).unwrap();
    let report = rebuild.await.unwrap().unwrap();
    assert!(
        report.swapped && report.differences.is_empty(),
        "{:?}",
        report.differences
    );
    for slide in [&first, &second] {
        assert_eq!(
            app.get(&t, &format!("/api/slides/{slide}")).await.status,
            StatusCode::OK
        );
    }
    app.stop().await;
}
