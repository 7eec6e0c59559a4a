//! The browser app as served, and mira dev's sign-in.

use super::*;

#[tokio::test]
async fn the_app_is_served_with_its_policy_and_mira_dev_signs_people_in() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("mira-web-{}", uuid::Uuid::new_v4()));
    let web = dir.join("app");
    std::fs::create_dir_all(web.join("assets")).unwrap();
    std::fs::write(web.join("index.html"), "<!doctype html><title>Mira</title>").unwrap();
    std::fs::write(web.join("assets/app-1a2b3c.js"), "console.log('mira')").unwrap();
    std::fs::write(dir.join("secret.txt"), "outside the app").unwrap();
    std::os::unix::fs::symlink(dir.join("secret.txt"), web.join("leak.txt")).unwrap();
    let (base, addr, stop, task) = dev_gateway(&db, &dir, |settings| settings.web.dir = Some(web.clone())).await;
    let http = reqwest::Client::new();
    let get = |p: &str| http.get(format!("{base}{p}")).send();

    let index = get("/").await.unwrap();
    assert_eq!(index.status(), StatusCode::OK);
    let h = index.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let csp = h["content-security-policy"].to_str().unwrap().to_owned();
    assert!(
        csp.contains("script-src 'self';") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(index.text().await.unwrap().contains("<title>Mira</title>"));

    let asset = get("/assets/app-1a2b3c.js").await.unwrap();
    assert_eq!(asset.status(), StatusCode::OK);
    assert_eq!(asset.headers()["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(asset.headers()["cache-control"], "public, max-age=31536000, immutable");

    // A client route is the app; a missing file is not.
    let route = get("/jobs/0190d2a4").await.unwrap();
    assert_eq!(route.status(), StatusCode::OK);
    assert!(route.text().await.unwrap().contains("<title>Mira</title>"));
    assert_eq!(get("/assets/missing.js").await.unwrap().status(), StatusCode::NOT_FOUND);
    // Nothing outside the directory: not through a link, not through `..` as sent.
    assert_eq!(get("/leak.txt").await.unwrap().status(), StatusCode::NOT_FOUND);
    for path in [
        "/assets/../../secret.txt",
        "/../secret.txt",
        "/assets/..%2f..%2fsecret.txt",
    ] {
        let (status, body) = raw_get(addr, path).await;
        assert!(status.contains(" 404 "), "{path}: {status}");
        assert!(!body.contains("outside the app"), "{path}: {body}");
    }
    // The API's own paths never fall back to the app.
    let unknown = get("/api/nothing").await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(unknown.headers()["content-type"], "application/problem+json");

    let config: Value = get("/api/app-config").await.unwrap().json().await.unwrap();
    assert_eq!(config["auth"]["mode"], "dev", "{config}");

    // mira dev's sign-in: a token the API takes, for the tenant and roles asked.
    let signed: Value = http
        .post(format!("{base}/dev/sign-in"))
        .json(&json!({"user": "ada", "tenant": "lab-a", "roles": ["pathologist"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = signed["id_token"].as_str().expect("a token").to_owned();
    let jobs = http
        .get(format!("{base}/api/jobs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(jobs.status(), StatusCode::OK);
    let audit = http
        .get(format!("{base}/api/audit/events"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(audit.status(), StatusCode::FORBIDDEN, "a pathologist is no auditor");
    let refused = http
        .post(format!("{base}/dev/sign-in"))
        .json(&json!({"user": "ada", "tenant": "lab-a", "roles": ["root"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // A user name is up to 128 characters as the document says, not 128 bytes; white space
    // alone is no name.
    for (user, expect) in [
        ("é".repeat(128), StatusCode::OK),
        ("é".repeat(129), StatusCode::UNPROCESSABLE_ENTITY),
        ("\u{c} ".into(), StatusCode::UNPROCESSABLE_ENTITY),
        // 129 characters as sent, though 128 once trimmed.
        (format!(" {}", "é".repeat(128)), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = http
            .post(format!("{base}/dev/sign-in"))
            .json(&json!({"user": user, "tenant": "lab-a", "roles": ["pathologist"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), expect, "{user:?}");
    }
    // A body is a JSON object, here as everywhere (an array would read as a struct).
    let r = http
        .post(format!("{base}/dev/sign-in"))
        .json(&json!(["ada", "lab-a", ["admin"]]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // DNS rebinding: a page of another site reaches 127.0.0.1 under its own name. Sent over a
    // raw socket, so that no client rewrites the headers.
    let port = addr.port();
    let body = r#"{"user": "ada", "tenant": "lab-b", "roles": ["admin"]}"#;
    for (host, origin, content_type, expect) in [
        (
            format!("rebind.attacker.example:{port}"),
            Some(format!("http://rebind.attacker.example:{port}")),
            "text/plain",
            " 403 ",
        ),
        (
            format!("rebind.attacker.example:{port}"),
            None,
            "application/json",
            " 403 ",
        ),
        (
            format!("127.0.0.1:{port}"),
            Some("http://evil.example".to_owned()),
            "application/json",
            " 403 ",
        ),
        (format!("127.0.0.1:{port}"), None, "text/plain", " 403 "),
        (
            format!("localhost:{port}"),
            Some(format!("http://localhost:{port}")),
            "application/json",
            " 200 ",
        ),
        (format!("[::1]:{port}"), None, "application/json", " 200 "),
        // A loopback name with another port: a rebound name pointing at 127.0.0.1 with the
        // page's own port, or another local server's origin.
        (
            format!("127.0.0.1:{}", port.wrapping_add(1)),
            None,
            "application/json",
            " 403 ",
        ),
        (
            "localhost".to_owned(),
            Some("http://localhost".to_owned()),
            "application/json",
            " 403 ",
        ),
    ] {
        let (status, answer) = raw_post(addr, "/dev/sign-in", &host, origin.as_deref(), content_type, body).await;
        assert!(
            status.contains(expect),
            "{host} {origin:?} {content_type}: {status} {answer}"
        );
        assert_eq!(answer.contains("id_token"), expect == " 200 ", "{answer}");
    }
    // The JWKS, a GET, takes the same care about names and ports.
    for (host, expect) in [
        (format!("127.0.0.1:{port}"), " 200 "),
        (format!("rebind.attacker.example:{port}"), " 403 "),
        (format!("127.0.0.1:{}", port.wrapping_add(1)), " 403 "),
    ] {
        let (status, answer) = raw_exchange(
            addr,
            &format!("GET /dev/jwks.json HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(status.contains(expect), "{host}: {status} {answer}");
        assert_eq!(answer.contains("\"keys\""), expect == " 200 ", "{answer}");
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A gateway on loopback with `mira dev`'s identity provider, its keys in `dir`; `edit` changes
/// its settings first.
async fn dev_gateway(
    db: &TestDb,
    dir: &std::path::Path,
    edit: impl FnOnce(&mut Settings),
) -> (
    String,
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let mut settings = local_settings(db, dir).await;
    settings.aws.cognito.issuer = Some(mira_gateway::dev::ISSUER.to_owned());
    settings.aws.cognito.client_id = Some(mira_gateway::dev::AUDIENCE.to_owned());
    settings.aws.cognito.jwks_url = Some(format!("{base}{}", mira_gateway::api::DEV_JWKS_PATH));
    edit(&mut settings);
    let idp = Arc::new(mira_gateway::dev::DevIdp::open_or_create(dir).unwrap());
    let options = mira_gateway::server::Options {
        dev_identity: Some(idp),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let (s, pool) = (stop.clone(), db.pool.clone());
    let task = tokio::spawn(async move { mira_gateway::server::run(&settings, pool, listener, &options, s).await });
    (base, addr, stop, task)
}

/// ADR 0032 under `mira dev`: the sign-in sets a sealed, HttpOnly cookie; a reload (a client
/// with the cookie and no token) gets a fresh token from `/api/session/refresh`; activity moves
/// the idle deadline; with no activity for `Web__IdleSignOutSeconds` the refresh is refused and
/// the cookie cleared; requests from another origin or not in JSON never reach the session.
#[tokio::test]
async fn a_browser_session_survives_a_reload_and_ends_when_idle() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("mira-session-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (base, _, stop, task) = dev_gateway(&db, &dir, |s| s.web.idle_sign_out_seconds = 5).await;
    let http = reqwest::Client::new();
    let origin = base.clone();
    let config: Value = http
        .get(format!("{base}/api/app-config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["idle_sign_out_seconds"], 5, "{config}");
    assert_eq!(
        config["auth"]["user"], "dev-user",
        "mira dev token's own defaults: {config}"
    );

    let signed = http
        .post(format!("{base}/dev/sign-in"))
        .json(&json!({"user": "ada", "tenant": "lab-a", "roles": ["pathologist"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), StatusCode::OK);
    let set = signed.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.starts_with("mira-dev-session=")
            && set.contains("; HttpOnly")
            && set.contains("; SameSite=Strict")
            && set.contains("; Path=/api/session"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_owned();
    let session = |path: &str, cookie: Option<&str>, origin: Option<&str>, json: bool| {
        let mut r = http.post(format!("{base}/api/session/{path}"));
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        if json {
            r = r.header("content-type", "application/json").body("{}");
        } else {
            r = r.header("content-type", "text/plain").body("{}");
        }
        r.send()
    };

    // A reload: the cookie alone gets a token the API takes.
    let r = session("refresh", Some(&cookie), Some(&origin), true).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: Value = r.json().await.unwrap();
    let token = body["id_token"].as_str().unwrap();
    let jobs = http
        .get(format!("{base}/api/jobs"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(jobs.status(), StatusCode::OK);
    // The cookie is no bearer token: an API route without the header is 401.
    let no_bearer = http
        .get(format!("{base}/api/jobs"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(no_bearer.status(), StatusCode::UNAUTHORIZED);
    // No Origin, another origin, another port, not JSON: refused before the session is read.
    for (o, json) in [
        (None, true),
        (Some("http://evil.example"), true),
        (Some("http://127.0.0.1:1"), true),
        (Some(origin.as_str()), false),
    ] {
        let r = session("refresh", Some(&cookie), o, json).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{o:?} json={json}");
    }
    // A cookie that is not this gateway's, or was altered, is no session.
    let forged = format!("{}A", cookie);
    let r = session("refresh", Some(&forged), Some(&origin), true).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Activity every 2 s for 6 s keeps the session past its first 5 s.
    let mut cookie = cookie;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = session("activity", Some(&cookie), Some(&origin), true).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        cookie = r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
    }
    let r = session("refresh", Some(&cookie), Some(&origin), true).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "6 s after signing in, with activity");
    // Left alone past the deadline: 401, and the cookie cleared.
    tokio::time::sleep(Duration::from_millis(5200)).await;
    let r = session("refresh", Some(&cookie), Some(&origin), true).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let cleared = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cleared.starts_with("mira-dev-session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    let body: Value = r.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("without activity"), "{body}");
    // Signing out clears it too.
    let r = session("end", Some(&cookie), Some(&origin), true).await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    stop.cancel();
    task.await.unwrap().unwrap();
}
