//! A job's events verified against the log, and a tampered one named.

use super::*;

#[tokio::test]
async fn a_jobs_events_verify_and_a_tampered_one_is_named() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, b"bytes").await;
    let r = app
        .post(&t, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    let id = r.body["job_id"].as_str().unwrap().to_owned();
    app.post(&t, &format!("/api/jobs/{id}/cancel"), json!({})).await;
    let path = format!("/api/jobs/{id}/verify");
    let ok = eventually("the job in the read model", || async {
        let r = app.get(&t, &path).await;
        (r.status == StatusCode::OK).then_some(r.body)
    })
    .await;
    assert_eq!(ok["verified"], true, "{ok}");
    assert!(ok["events"].as_u64().unwrap() >= 2, "{ok}");
    // Another tenant's job is not found, as everywhere.
    let other = app.token("lab-b", &["pathologist"]);
    assert_problem(&app.get(&other, &path).await, StatusCode::NOT_FOUND);
    // A changed byte, as a superuser with the guards off would make it.
    let pos: i64 = sqlx::query_scalar("SELECT global_position FROM events WHERE aggregate_id = $1 AND sequence = 2")
        .bind(&id)
        .fetch_one(&app.db.owner)
        .await
        .unwrap();
    mira_eventlog::testing::tamper(
        &app.db.owner,
        &format!("UPDATE events SET payload = overlay(payload placing 'X' from 3 for 1) WHERE global_position = {pos}"),
    )
    .await;
    let bad = app.get(&t, &path).await;
    assert_eq!(bad.status, StatusCode::OK, "{}", bad.body);
    assert_eq!(bad.body["verified"], false, "{}", bad.body);
    assert_eq!(bad.body["position"], pos, "{}", bad.body);
    assert!(bad.body["reason"].as_str().unwrap().contains("altered"), "{}", bad.body);
    app.stop().await;
}

/// `tools/verify_export.py` on `path` with the app's public key: (exit 0, its output).
fn verify_export(app: &App, path: &std::path::Path) -> (bool, String) {
    let python = std::env::var("MIRA_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .arg("../tools/verify_export.py")
        .arg(path)
        .arg(app.dir.join("audit.key.pub"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn a_tenants_export_verifies_and_holds_no_other_tenants_events() {
    let app = spawn_app(Storage::Local).await;
    let a = app.token("lab-a", &["pathologist"]);
    let b = app.token("lab-b", &["pathologist"]);
    let slide_a = app.upload_slide(&a, b"bytes of a").await;
    let slide_b = app.upload_slide(&b, b"bytes of b").await;
    for (t, s) in [(&a, &slide_a), (&b, &slide_b), (&a, &slide_a)] {
        let r = app
            .post(t, "/api/jobs", json!({"slide_id": s, "kind": "wsi.preprocess"}))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    }
    let key = mira_eventlog::checkpoint::AuditKey::load(&app.dir.join("audit.key")).unwrap();
    let witness = mira_eventlog::witness::DirWitness::open(&app.dir.join("witness")).unwrap();
    mira_eventlog::checkpoint::write(&app.db.owner, &key, &witness)
        .await
        .unwrap();
    // One more event of lab-a after the checkpoint: exported, not under a checkpoint.
    app.post(&a, "/api/jobs", json!({"slide_id": slide_a, "kind": "wsi.preprocess"}))
        .await;

    let auditor = app.token("lab-a", &["auditor"]);
    // Only an auditor exports.
    assert_problem(&app.get(&a, "/api/audit/export").await, StatusCode::FORBIDDEN);
    let r = app
        .http
        .get(format!("{}/api/audit/export", app.base))
        .bearer_auth(&auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["kind"], "header");
    assert_eq!(lines[0]["tenant"], "lab-a");
    let events: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "event").collect();
    let a_events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE tenant_id = 'lab-a'")
        .fetch_one(&app.db.owner)
        .await
        .unwrap();
    assert_eq!(events.len() as i64, a_events, "every event of lab-a, none other");
    assert!(events.iter().all(|e| e["tenant_id"] == "lab-a"));
    assert!(
        !text.contains(&slide_b) && !text.contains("lab-b"),
        "lab-b's ids are not in lab-a's export"
    );
    assert_eq!(lines.iter().filter(|l| l["kind"] == "checkpoint").count(), 1);

    let dir = app.dir.join("exports");
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.jsonl");
    std::fs::write(&good, &text).unwrap();
    let (ok, out) = verify_export(&app, &good);
    assert!(ok, "{out}");
    let covered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE tenant_id = 'lab-a' \
         AND global_position <= (SELECT max(upto_position) FROM checkpoints)",
    )
    .fetch_one(&app.db.owner)
    .await
    .unwrap();
    assert_eq!(covered, a_events - 1, "all but the event after the checkpoint");
    assert!(
        out.contains(&format!(
            "OK: {a_events} events, 1 checkpoints verified ({covered} of the events"
        )),
        "{out}"
    );

    // One byte of a payload changed fails.
    let mut changed = lines.clone();
    let i = changed.iter().position(|l| l["kind"] == "event").unwrap();
    let p = changed[i]["payload"].as_str().unwrap().replacen("wsi", "wsj", 1);
    let p = if p == changed[i]["payload"] {
        p.replacen('{', "{ ", 1)
    } else {
        p
    };
    changed[i]["payload"] = json!(p);
    let bad = dir.join("changed.jsonl");
    std::fs::write(&bad, changed.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let (ok, out) = verify_export(&app, &bad);
    assert!(!ok && out.contains("hash mismatch"), "{out}");

    // An event of lab-b slipped in (its own hashes intact) fails: it is not the tenant's.
    let foreign: (i64, String) = sqlx::query_as(
        "SELECT global_position, event_id::text FROM events WHERE tenant_id = 'lab-b' ORDER BY global_position LIMIT 1",
    )
    .fetch_one(&app.db.owner)
    .await
    .unwrap();
    let mut with_b = lines.clone();
    let mut e = with_b[i].clone();
    e["tenant_id"] = json!("lab-b");
    e["global_position"] = json!(foreign.0);
    with_b.insert(i + 1, e);
    let bad = dir.join("foreign.jsonl");
    std::fs::write(&bad, with_b.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let (ok, out) = verify_export(&app, &bad);
    assert!(!ok && out.contains("of tenant 'lab-b'"), "{out}");

    // A dropped first event leaves a stream starting at 2. (A dropped last event of a stream
    // reads as another tenant's leaf: ADR 0033 says why the tenant's export cannot tell, and
    // the operator's complete export can.)
    let mut dropped = lines.clone();
    dropped.remove(i);
    let bad = dir.join("dropped.jsonl");
    std::fs::write(&bad, dropped.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let (ok, out) = verify_export(&app, &bad);
    assert!(!ok && out.contains("stream starts at 2"), "{out}");
    app.stop().await;
}

#[tokio::test]
async fn the_audit_filters_take_short_ids_slides_and_event_types_in_any_case() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, b"one").await;
    let other_slide = app.upload_slide(&t, b"two").await;
    let job = app
        .post(&t, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await
        .body["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other_job = app
        .post(
            &t,
            "/api/jobs",
            json!({"slide_id": other_slide, "kind": "wsi.preprocess"}),
        )
        .await
        .body["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.post(&t, &format!("/api/jobs/{job}/cancel"), json!({})).await;
    let auditor = app.token("lab-a", &["auditor"]);
    let ids = |r: &Res| -> Vec<(String, String)> {
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["aggregate_id"].as_str().unwrap().to_owned(),
                    e["event_type"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    // The short id (the last 8 hex digits, in either case) finds the job's events and no other's.
    let short = job[job.len() - 8..].to_uppercase();
    let r = app
        .get(&auditor, &format!("/api/audit/events?aggregate_id={short}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let found = ids(&r);
    assert!(found.len() >= 2 && found.iter().all(|(id, _)| *id == job), "{found:?}");
    // The event type in another case.
    let r = app.get(&auditor, "/api/audit/events?event_type=jobsubmitted").await;
    let found = ids(&r);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().all(|(_, ty)| ty == "JobSubmitted"));
    // A slide: its own events and its job's, not the other slide's or its job's.
    let r = app
        .get(
            &auditor,
            &format!("/api/audit/events?slide={}", &slide[slide.len() - 8..]),
        )
        .await;
    let found = ids(&r);
    assert!(found.iter().any(|(id, _)| *id == slide), "{found:?}");
    assert!(
        found.iter().any(|(id, ty)| *id == job && ty == "JobCancelRequested"),
        "{found:?}"
    );
    assert!(
        !found.iter().any(|(id, _)| *id == other_slide || *id == other_job),
        "{found:?}"
    );
    // The list of types to choose from.
    let types = app.get(&auditor, "/api/audit/event-types").await;
    assert_eq!(types.status, StatusCode::OK);
    let types = types.body["event_types"].as_array().unwrap().clone();
    assert!(types.contains(&json!("JobSubmitted")) && types.contains(&json!("SlideRegistered")));
    assert_problem(&app.get(&t, "/api/audit/event-types").await, StatusCode::FORBIDDEN);
    app.stop().await;
}
