//! Sign-in and tokens: Cognito ID tokens, every way a token is refused, roles, and tenants kept apart.

use super::*;

// ---------------------------------------------------------------------------------------------
// Authentication (DESIGN §7) against moto's Cognito

#[tokio::test]
async fn a_cognito_id_token_with_a_role_passes() {
    let app = spawn_app(Storage::Local).await;
    let t = app.cognito.sign_in("lab-a", &["pathologist"]).await;
    let r = app.get(&t.id, "/api/jobs").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // And the test key's tokens pass too, so the refusals below are about what they test.
    let r = app.get(&app.token("lab-a", &["pathologist"]), "/api/jobs").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    app.stop().await;
}

#[tokio::test]
async fn an_access_token_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let t = app.cognito.sign_in("lab-a", &["pathologist"]).await;
    assert_refused(&app.get(&t.access, "/api/jobs").await, &t.access, "not an ID token");
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let mut c = claims(&app.cognito, "lab-a", &["pathologist"]);
    let past = Utc::now().timestamp() - 7200;
    c["iat"] = json!(past - 3600);
    c["exp"] = json!(past);
    let token = sign(&c, TEST_KID);
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "expired");
}

#[tokio::test]
async fn a_wrong_issuer_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let mut c = claims(&app.cognito, "lab-a", &["pathologist"]);
    c["iss"] = json!("https://cognito-idp.us-east-1.amazonaws.com/us-east-1_someoneelse");
    let token = sign(&c, TEST_KID);
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "wrong issuer");
}

#[tokio::test]
async fn a_wrong_audience_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let mut c = claims(&app.cognito, "lab-a", &["pathologist"]);
    c["aud"] = json!("another-app-client");
    let token = sign(&c, TEST_KID);
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "wrong audience");
}

#[tokio::test]
async fn alg_none_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let c = claims(&app.cognito, "lab-a", &["pathologist"]);
    let token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": TEST_KID})),
        b64(&c)
    );
    // "none" is no algorithm at all to the decoder: the header itself is refused.
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "malformed token");
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() {
    use hmac::Mac;
    let app = spawn_app(Storage::Local).await;
    let c = claims(&app.cognito, "lab-a", &["pathologist"]);
    // The classic confusion: the public key (as the JWKS publishes it) used as an HMAC secret.
    let public = include_str!("../fixtures/test-idp-jwks.json");
    let signing_input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "typ": "JWT", "kid": TEST_KID})),
        b64(&c)
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(public.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    use base64::Engine;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    let token = format!("{signing_input}.{sig}");
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "bad signature");
}

#[tokio::test]
async fn an_unknown_kid_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let c = claims(&app.cognito, "lab-a", &["pathologist"]);
    let token = sign(&c, "rotated-away");
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "unknown key");
}

#[tokio::test]
async fn a_tampered_payload_is_refused() {
    let app = spawn_app(Storage::Local).await;
    let t = app.cognito.sign_in("lab-a", &["pathologist"]).await;
    let mut parts: Vec<String> = t.id.split('.').map(str::to_owned).collect();
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut payload: Value = serde_json::from_slice(&engine.decode(&parts[1]).unwrap()).unwrap();
    assert_eq!(
        payload["custom:tenant"], "lab-a",
        "moto's ID token carries the tenant: {payload}"
    );
    payload["custom:tenant"] = json!("lab-b");
    parts[1] = engine.encode(payload.to_string());
    let token = parts.join(".");
    assert_refused(&app.get(&token, "/api/jobs").await, &token, "bad signature");
    // Untouched, the same token passes.
    assert_eq!(app.get(&t.id, "/api/jobs").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_missing_role_is_403_and_no_token_is_401() {
    let app = spawn_app(Storage::Local).await;
    let t = app.cognito.sign_in("lab-a", &[]).await;
    assert_problem(&app.get(&t.id, "/api/jobs").await, StatusCode::FORBIDDEN);
    // An auditor reads but does not submit.
    let auditor = app.token("lab-a", &["auditor"]);
    assert_eq!(app.get(&auditor, "/api/jobs").await.status, StatusCode::OK);
    let r = app
        .post(
            &auditor,
            "/api/slides",
            json!({"name": "s", "size_bytes": 1, "content_type": "image/tiff"}),
        )
        .await;
    assert_problem(&r, StatusCode::FORBIDDEN);
    // Pathologists do not read the audit trail.
    let p = app.token("lab-a", &["pathologist"]);
    assert_problem(&app.get(&p, "/api/audit/events").await, StatusCode::FORBIDDEN);
    let r = app.send(app.http.get(format!("{}/api/jobs", app.base))).await;
    assert_problem(&r, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers["www-authenticate"], "Bearer",
        "no error code without a token (RFC 6750 §3.1)"
    );
    // The running version needs no token; without MIRA_COMMIT its commit is unknown.
    let r = app.send(app.http.get(format!("{}/api/version", app.base))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"version": env!("CARGO_PKG_VERSION"), "commit": "unknown"})
    );
}

#[tokio::test]
async fn each_refused_token_says_which_check_failed() {
    let app = spawn_app(Storage::Local).await;
    let c = claims(&app.cognito, "lab-a", &["pathologist"]);
    let now = Utc::now().timestamp();
    let mut future = c.clone();
    future["nbf"] = json!(now + 3600);
    let mut no_tenant = c.clone();
    no_tenant.as_object_mut().unwrap().remove("custom:tenant");
    let mut number_tenant = c.clone();
    number_tenant["custom:tenant"] = json!(42);
    let mut bad_tenant = c.clone();
    bad_tenant["custom:tenant"] = json!("Lab A/../b");
    let no_kid = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &c, &test_key()).unwrap();
    for (token, reason) in [
        (sign(&future, TEST_KID), "not yet valid"),
        (sign(&no_tenant, TEST_KID), "no tenant"),
        (sign(&number_tenant, TEST_KID), "no tenant"),
        (sign(&bad_tenant, TEST_KID), "no tenant"),
        (no_kid, "unknown key"),
        ("not.a.token".to_owned(), "malformed token"),
    ] {
        assert_refused(&app.get(&token, "/api/jobs").await, &token, reason);
    }
    // The WebSocket says the same.
    let token = sign(&future, TEST_KID);
    let url = format!("{}/ws?access_token={token}", app.base.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status(), 401);
            assert_eq!(
                res.headers()["www-authenticate"],
                "Bearer error=\"invalid_token\", error_description=\"not yet valid\""
            );
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn another_tenants_resources_are_404() {
    let app = spawn_app(Storage::Local).await;
    let a = app.cognito.sign_in("lab-a", &["pathologist"]).await.id;
    let b = app.cognito.sign_in("lab-b", &["pathologist", "auditor"]).await.id;
    let slide = app.upload_slide(&a, b"not really a slide").await;
    let job = app
        .post(&a, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    assert_eq!(job.status, StatusCode::ACCEPTED, "{}", job.body);
    let job_id = job.body["job_id"].as_str().unwrap().to_owned();
    // Visible to A once projected.
    eventually("the job in A's read model", || async {
        (app.get(&a, &format!("/api/jobs/{job_id}")).await.status == StatusCode::OK).then_some(Value::Null)
    })
    .await;
    for path in [
        format!("/api/jobs/{job_id}"),
        format!("/api/jobs/{job_id}/events"),
        format!("/api/slides/{slide}"),
    ] {
        assert_problem(&app.get(&b, &path).await, StatusCode::NOT_FOUND);
    }
    assert_problem(
        &app.post(&b, &format!("/api/jobs/{job_id}/cancel"), json!({})).await,
        StatusCode::NOT_FOUND,
    );
    let r = app
        .post(&b, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    assert_problem(&r, StatusCode::NOT_FOUND);
    // B's lists and audit trail are empty of A's rows.
    assert_eq!(app.get(&b, "/api/jobs").await.body["items"], json!([]));
    assert_eq!(app.get(&b, "/api/slides").await.body["items"], json!([]));
    assert_eq!(app.get(&b, "/api/audit/events").await.body["items"], json!([]));
    app.stop().await;
}

/// Every table with a tenant_id, except the log itself, is under forced row-level security.
#[tokio::test]
async fn every_tenant_table_but_the_log_is_under_forced_row_level_security() {
    let db = TestDb::new().await;
    let tables: Vec<(String, String, bool, bool)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, c.relrowsecurity, c.relforcerowsecurity \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attname = 'tenant_id' AND NOT a.attisdropped AND c.relkind IN ('r', 'p') \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
    )
    .fetch_all(&db.owner)
    .await
    .unwrap();
    let names: Vec<String> = tables.iter().map(|(n, t, _, _)| format!("{n}.{t}")).collect();
    for expected in [
        "public.api_idempotency",
        "public.handler_waiting",
        "public.events",
        "rm.jobs",
        "rm.slides",
    ] {
        assert!(names.contains(&expected.to_owned()), "{names:?}");
    }
    let unguarded: Vec<&String> = tables
        .iter()
        .zip(&names)
        .filter(|((_, _, rls, forced), name)| name.as_str() != "public.events" && !(*rls && *forced))
        .map(|(_, name)| name)
        .collect();
    assert!(unguarded.is_empty(), "tenant tables without forced RLS: {unguarded:?}");
}
