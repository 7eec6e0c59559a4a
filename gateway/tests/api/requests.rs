//! Bad input and repeated requests: problem+json for every malformed request, and idempotency keys.

use super::*;

// ---------------------------------------------------------------------------------------------
// Bad input and idempotency

#[tokio::test]
async fn bad_input_gets_problem_json_4xx() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    // A NUL character in a query value (PostgreSQL's text refuses it) is the caller's error.
    let auditor = app.token("lab-a", &["auditor"]);
    for path in [
        "/api/audit/events?actor=a%00b",
        "/api/jobs?submitted_by=%00",
        "/api/audit/events?aggregate_id=%00",
    ] {
        let r = app.get(if path.contains("audit") { &auditor } else { &t }, path).await;
        assert_problem(&r, StatusCode::BAD_REQUEST);
        assert!(r.body["detail"].as_str().unwrap().contains("NUL"), "{path}: {}", r.body);
    }
    let url = format!("{}/api/jobs", app.base);
    let send = |body: String, ct: &'static str| {
        app.http
            .post(&url)
            .bearer_auth(&t)
            .header("content-type", ct)
            .body(body)
    };
    assert_problem(
        &app.send(send("{\"slide_id\": ".into(), "application/json")).await,
        StatusCode::BAD_REQUEST,
    );
    assert_problem(
        &app.send(send("{\"kind\": }".into(), "application/json")).await,
        StatusCode::BAD_REQUEST,
    );
    let huge =
        json!({"slide_id": uuid::Uuid::now_v7(), "kind": "wsi.preprocess", "params": {"pad": "x".repeat(10_000)}});
    assert_problem(
        &app.send(send(huge.to_string(), "application/json")).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    let unknown = json!({"slide_id": uuid::Uuid::now_v7(), "kind": "wsi.preprocess", "priority": 9});
    let r = app.send(send(unknown.to_string(), "application/json")).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body["detail"].as_str().unwrap().contains("priority"), "{}", r.body);
    let bad_param = json!({"slide_id": uuid::Uuid::now_v7(), "kind": "wsi.preprocess", "params": {"tile_sise": 256}});
    assert_problem(
        &app.send(send(bad_param.to_string(), "application/json")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    let not_uuid = json!({"slide_id": "slide-1", "kind": "wsi.preprocess"});
    assert_problem(
        &app.send(send(not_uuid.to_string(), "application/json")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    assert_problem(
        &app.send(send("{}".into(), "text/plain")).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
    );
    for path in ["/api/jobs/42", "/api/slides/not-a-uuid", "/api/jobs/x/events"] {
        let r = app.get(&t, path).await;
        assert_problem(&r, StatusCode::BAD_REQUEST);
        assert!(r.body["detail"].as_str().unwrap().contains("UUID"), "{}", r.body);
    }
    assert_problem(
        &app.post(&t, "/api/jobs/x/cancel", json!({})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_problem(&app.get(&t, "/api/jobs?limit=100000").await, StatusCode::BAD_REQUEST);
    assert_problem(&app.get(&t, "/api/jobs?status=done").await, StatusCode::BAD_REQUEST);
    assert_problem(&app.get(&t, "/api/jobs?cursor=garbage").await, StatusCode::BAD_REQUEST);
    assert_problem(&app.get(&t, "/api/nothing-here").await, StatusCode::NOT_FOUND);
    let r = app
        .post(
            &t,
            "/api/slides",
            json!({"name": "", "size_bytes": 0, "content_type": "tiff"}),
        )
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    // Only what Mira can open: never a type a browser would render.
    for (ct, opens) in [
        ("text/html", false),
        ("image/svg+xml", false),
        ("application/pdf", false),
        ("image/tiff", true),
        ("application/octet-stream", true),
        ("Image/TIFF", true),
    ] {
        let slide = json!({"name": "s", "size_bytes": 10, "content_type": ct});
        let r = app.post(&t, "/api/slides", slide).await;
        if opens {
            assert_eq!(r.status, StatusCode::CREATED, "{ct}: {}", r.body);
        } else {
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(r.body["detail"].as_str().unwrap().contains("image/tiff"), "{}", r.body);
        }
    }
    // A wrong method is problem+json too, with the methods the endpoint takes.
    let r = app.send(app.http.delete(&url).bearer_auth(&t)).await;
    assert_problem(&r, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "GET, HEAD, POST");
    assert!(
        r.body["detail"].as_str().unwrap().contains("GET, HEAD, POST"),
        "{}",
        r.body
    );
    // Every route's `Allow` is what its router takes: each other method is a 405 naming it,
    // each listed one is not a 405.
    for (route, allow) in mira_gateway::api::allowed_methods() {
        let path = route
            .replace("{id}", &uuid::Uuid::now_v7().to_string())
            .replace("{*path}", "x")
            .replace("{*key}", "x");
        for method in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"] {
            let r = app
                .http
                .request(method.parse().unwrap(), format!("{}{path}", app.base))
                .send()
                .await
                .unwrap();
            let listed = allow.split(", ").any(|m| m == method);
            assert_eq!(
                r.status() == StatusCode::METHOD_NOT_ALLOWED,
                !listed,
                "{method} {route}: {}",
                r.status()
            );
            if !listed {
                assert_eq!(r.headers()["allow"], *allow, "{method} {route}");
            }
        }
    }
    // Every response carries a request id; a sane one from the caller is kept.
    let r = app
        .send(
            app.http
                .get(format!("{}/healthz", app.base))
                .header("x-request-id", "req-123"),
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "req-123");
    let r = app.get(&t, "/api/jobs/42").await;
    assert!(r.headers.contains_key("x-request-id"));
    app.stop().await;
}

/// What the document says is refused is refused: a `null` where it documents a string, a body
/// that is not an object, and a negative audit position (found by schemathesis's negative-data
/// check).
#[tokio::test]
async fn nulls_and_negative_positions_the_document_does_not_allow_are_refused() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let auditor = app.token("lab-a", &["auditor"]);
    let slide = json!({"name": "n", "size_bytes": 3, "content_type": "image/tiff"});
    for (field, value) in [("sha256", Value::Null), ("file_name", Value::Null)] {
        let mut body = slide.clone();
        body[field] = value;
        let r = app.post(&t, "/api/slides", body).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            r.body["detail"].as_str().unwrap().contains(field),
            "{field}: {}",
            r.body
        );
    }
    // Absent is fine, as before.
    let r = app.post(&t, "/api/slides", slide).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let id = r.body["slide_id"].as_str().unwrap().to_owned();
    let r = app
        .post(&t, &format!("/api/slides/{id}/uploaded"), json!({"upload_id": null}))
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    let job = submit_job(&app, &t, &id).await;
    let r = app
        .post(
            &t,
            "/api/jobs",
            json!({"slide_id": id, "kind": "wsi.preprocess", "priority": null}),
        )
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body["detail"].as_str().unwrap().contains("priority"), "{}", r.body);
    let r = app
        .post(&t, &format!("/api/jobs/{job}/cancel"), json!({"reason": null}))
        .await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body["detail"].as_str().unwrap().contains("reason"), "{}", r.body);
    // A body of another JSON type than an object is refused, however its struct would read it
    // (an empty array reads as every default).
    for body in [json!([]), json!(["wrong slide"]), json!("x"), json!(7)] {
        let r = app.post(&t, &format!("/api/jobs/{job}/cancel"), body.clone()).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            r.body["detail"].as_str().unwrap().contains("object"),
            "{body}: {}",
            r.body
        );
    }
    // `null` is no body only where the body may be left out (the document says so: nullable);
    // a job's body may not be.
    let r = app.post(&t, "/api/jobs", json!(null)).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body["detail"].as_str().unwrap().contains("object"), "{}", r.body);
    // The job was not cancelled by the refused requests; a proper one cancels it, and so does
    // one without a body (`null`) on another job.
    let r = app
        .post(&t, &format!("/api/jobs/{job}/cancel"), json!({"reason": "wrong slide"}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let other = submit_job(&app, &t, &id).await;
    let r = app.post(&t, &format!("/api/jobs/{other}/cancel"), json!(null)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let r = app.get(&auditor, "/api/audit/events?after=-1").await;
    assert_problem(&r, StatusCode::BAD_REQUEST);
    assert!(r.body["detail"].as_str().unwrap().contains("after"), "{}", r.body);
    let r = app.get(&auditor, "/api/audit/events?after=0").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(!r.body["items"].as_array().unwrap().is_empty(), "{}", r.body);
}

#[tokio::test]
async fn an_idempotency_key_gives_one_job_and_refuses_a_different_body() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, b"bytes").await;
    let submit = |key: &'static str, params: Value| {
        let req = app
            .http
            .post(format!("{}/api/jobs", app.base))
            .bearer_auth(&t)
            .header("idempotency-key", key)
            .json(&json!({"slide_id": slide, "kind": "wsi.preprocess", "params": params}));
        app.send(req)
    };
    let first = submit("k-1", json!({"tile_size": 254})).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    // The same request, with the defaults spelled differently, is the same job.
    let second = submit("k-1", json!({})).await;
    assert_eq!(second.status, StatusCode::ACCEPTED, "{}", second.body);
    assert_eq!(first.body["job_id"], second.body["job_id"]);
    let other = submit("k-1", json!({"normalize": "macenko"})).await;
    assert_problem(&other, StatusCode::UNPROCESSABLE_ENTITY);
    // Ten concurrent repeats: still one job.
    let many = futures_join_all((0..10).map(|_| submit("k-2", Value::Null))).await;
    let ids: std::collections::BTreeSet<_> = many.iter().map(|r| r.body["job_id"].to_string()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'JobSubmitted'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
    // Slides too: the same key and body give the same slide (with fresh upload URLs), another
    // body is refused.
    let register = |name: &'static str| {
        let req = app
            .http
            .post(format!("{}/api/slides", app.base))
            .bearer_auth(&t)
            .header("idempotency-key", "s-1")
            .json(&json!({"name": name, "size_bytes": 10, "content_type": "image/tiff"}));
        app.send(req)
    };
    let a = register("same").await;
    let b = register("same").await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["slide_id"], b.body["slide_id"]);
    assert!(b.body["upload"]["url"].is_string(), "{}", b.body);
    assert_problem(&register("other").await, StatusCode::UNPROCESSABLE_ENTITY);
    app.stop().await;
}

/// Idempotency fingerprints cover bodies with patient data: they are keyed (HMAC with the
/// keyring's key), expire, and are confined to their tenant by row-level security.
#[tokio::test]
async fn idempotency_fingerprints_are_keyed_expire_and_stay_in_their_tenant() {
    use hmac::Mac;
    use sha2::Digest;
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let body = json!({"name": "Jane Roe, left breast", "size_bytes": 10, "content_type": "image/tiff"});
    let register = |key: &'static str, body: Value| {
        app.send(
            app.http
                .post(format!("{}/api/slides", app.base))
                .bearer_auth(&t)
                .header("idempotency-key", key)
                .json(&body),
        )
    };
    let first = register("k-phi", body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let stored: String = sqlx::query_scalar("SELECT request_hmac FROM api_idempotency WHERE key = 'k-phi'")
        .fetch_one(&app.db.owner)
        .await
        .unwrap();
    // Not a plain hash of anything the request held…
    // The request as the gateway understood it, fields in its own order.
    let canonical =
        br#"{"name":"Jane Roe, left breast","size_bytes":10,"content_type":"image/tiff","sha256":null,"file_name":null}"#
            .to_vec();
    for plain in [
        canonical.clone(),
        serde_json::to_vec(&body).unwrap(),
        b"Jane Roe, left breast".to_vec(),
    ] {
        assert_ne!(stored, hex::encode(sha2::Sha256::digest(&plain)));
    }
    // …but an HMAC under the keyring's idempotency key.
    let ring = mira_events::LocalKeyring::open(app.dir.join("keyring")).unwrap();
    let key = mira_events::Keyring::key_for(&ring, mira_gateway::api::idempotency::KEY_SUBJECT)
        .await
        .unwrap();
    assert_eq!(stored.len(), 64);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(b"mira.idempotency.v1\nslides\n");
    mac.update(&canonical);
    assert_eq!(
        stored,
        hex::encode(mac.finalize().into_bytes()),
        "keyed with the keyring's key"
    );

    // Another tenant's gateway transaction sees none of lab-a's rows.
    let mut tx = app.db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE mira_api").execute(&mut *tx).await.unwrap();
    sqlx::query("SELECT set_config('mira.tenant_id', 'lab-b', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM api_idempotency")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(seen, 0);
    tx.rollback().await.unwrap();

    // Within the retention a different body is refused; after it, the key is free again.
    let changed = json!({"name": "another", "size_bytes": 10, "content_type": "image/tiff"});
    assert_problem(
        &register("k-phi", changed.clone()).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    sqlx::query("UPDATE api_idempotency SET created_at = now() - interval '25 hours' WHERE key = 'k-phi'")
        .execute(&app.db.owner)
        .await
        .unwrap();
    let reused = register("k-phi", changed).await;
    assert_eq!(reused.status, StatusCode::CREATED, "{}", reused.body);
    assert_ne!(reused.body["slide_id"], first.body["slide_id"]);
    // And the sweeper deletes what expired.
    register("k-old", body.clone()).await;
    sqlx::query("UPDATE api_idempotency SET created_at = now() - interval '25 hours' WHERE key = 'k-old'")
        .execute(&app.db.owner)
        .await
        .unwrap();
    let swept = mira_gateway::api::idempotency::sweep(&app.db.pool, Duration::from_secs(24 * 3600))
        .await
        .unwrap();
    assert_eq!(swept, 1);
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM api_idempotency ORDER BY key")
        .fetch_all(&app.db.owner)
        .await
        .unwrap();
    assert_eq!(left, ["k-phi"]);
    app.stop().await;
}

#[tokio::test]
async fn a_very_long_subject_with_an_idempotency_key_is_served() {
    let app = spawn_app(Storage::Local).await;
    let mut c = claims(&app.cognito, "lab-a", &["pathologist"]);
    c["sub"] = json!("s".repeat(3000));
    let t = sign(&c, TEST_KID);
    let register = || {
        app.send(
            app.http
                .post(format!("{}/api/slides", app.base))
                .bearer_auth(&t)
                .header("idempotency-key", "long-subject")
                .json(&json!({"name": "long", "size_bytes": 10, "content_type": "image/tiff"})),
        )
    };
    let a = register().await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let b = register().await;
    assert_eq!(a.body["slide_id"], b.body["slide_id"], "the key still names one slide");
    // The row is keyed by the digest the migration computes in SQL, too.
    let (sql, rust): (Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT sha256(convert_to('mira.idempotency-key.v1' || E'\\n' \
           || octet_length(tenant_id) || ':' || tenant_id || E'\\n' \
           || octet_length(subject) || ':' || subject || E'\\n' \
           || octet_length(scope) || ':' || scope || E'\\n' \
           || octet_length(key) || ':' || key || E'\\n', 'UTF8')), key_digest \
         FROM api_idempotency WHERE key = 'long-subject'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(sql, rust);
    assert_eq!(
        rust,
        mira_gateway::api::idempotency::key_digest("lab-a", &"s".repeat(3000), "slides", "long-subject")
    );
    app.stop().await;
}
