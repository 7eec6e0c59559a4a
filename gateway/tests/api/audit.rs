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
