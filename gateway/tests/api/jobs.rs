//! Jobs through the API: list, detail, cancel, retry, history, results, STAT submissions.

use super::*;

// ---------------------------------------------------------------------------------------------
// Jobs through the API

#[tokio::test]
async fn jobs_list_detail_cancel_retry_and_history() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let slide = app.upload_slide(&t, b"bytes").await;
    let r = app
        .post(&t, "/api/jobs", json!({"slide_id": slide, "kind": "wsi.preprocess"}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.body["status"], "submitted");
    let id = r.body["job_id"].as_str().unwrap().to_owned();
    let r = app
        .post(&t, &format!("/api/jobs/{id}/cancel"), json!({"reason": "wrong slide"}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["status"], "cancelled");
    // Cancelling twice is a conflict, not a second event.
    assert_problem(
        &app.post(&t, &format!("/api/jobs/{id}/cancel"), json!({})).await,
        StatusCode::CONFLICT,
    );
    let r = app.post(&t, &format!("/api/jobs/{id}/retry"), json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["status"], "submitted");
    let history = eventually("the whole history in the read model", || async {
        let r = app.get(&t, &format!("/api/jobs/{id}/events")).await;
        (r.status == StatusCode::OK && r.body["events"].as_array().map(Vec::len) == Some(4)).then_some(r.body)
    })
    .await;
    let detail = app.get(&t, &format!("/api/jobs/{id}")).await.body;
    assert_eq!(detail["status"], "submitted", "{detail}");
    assert_eq!(detail["params"]["tile_size"], 254, "defaults are stored: {detail}");
    let types: Vec<_> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "JobSubmitted",
            "JobCancelRequested",
            "JobCancelled",
            "JobRetryRequested"
        ]
    );
    assert!(history["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["hash"].as_str().unwrap().len() == 64));
    let list = app
        .get(&t, &format!("/api/jobs?status=submitted&slide_id={slide}"))
        .await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1, "{}", list.body);
    assert_eq!(app.get(&t, "/api/jobs?status=cancelled").await.body["items"], json!([]));
    // The auditor sees the same events straight from the log, with hashes and actors.
    let auditor = app.token("lab-a", &["auditor"]);
    let audit = app.get(&auditor, &format!("/api/audit/events?aggregate_id={id}")).await;
    assert_eq!(audit.status, StatusCode::OK, "{}", audit.body);
    let items = audit.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["prev_hash"], "0".repeat(64));
    assert_eq!(items[1]["prev_hash"], items[0]["hash"]);
    assert_eq!(items[0]["metadata"]["actor"]["kind"], "user");
    app.stop().await;
}

#[tokio::test]
async fn a_manifest_outside_the_jobs_attempt_prefix_is_never_served() {
    use cqrs_es::persist::PersistedEventStore;
    use mira_aggregates::{Job, JobCommand};
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let log = mira_eventlog::EventLog::new(app.db.pool.clone());
    let tenant = mira_events::TenantId::parse("lab-a").unwrap();
    let job = mira_events::JobId::new();
    let now = Utc::now();
    let forged_key = "results/lab-b/0190c1d2-0000-7000-8000-000000000000/attempt-1/manifest.json";
    // The command path refuses it...
    let commands = mira_eventlog::commands::Commands::new(
        log.clone(),
        Arc::new(mira_events::LocalKeyring::open(app.dir.join("keyring")).unwrap()),
    );
    let ctx = mira_events::CommandContext::new(tenant.clone(), mira_events::Actor::worker("w"));
    let succeed = |key: &str| JobCommand::Succeed {
        attempt: 1,
        manifest_key: key.into(),
        manifest_sha256: "0".repeat(64),
        usage: mira_events::Usage {
            device: "cpu".into(),
            device_seconds: 1.0,
            bytes_written: 1,
        },
    };
    // ...so it is written around it, as by someone with write access to the log.
    let raw: cqrs_es::CqrsFramework<Job, _> = cqrs_es::CqrsFramework::new(
        PersistedEventStore::<_, Job>::new_event_store(mira_eventlog::PgEventRepository::new(
            log.clone(),
            tenant.clone(),
        )),
        vec![],
        (),
    );
    for cmd in [
        JobCommand::Submit {
            slide_id: mira_events::SlideId::new(),
            spec: mira_events::JobSpec::Preprocess(Default::default()),
            max_attempts: 1,
            priority: mira_aggregates::Priority::Routine,
        },
        JobCommand::Queue { now },
        JobCommand::Start {
            attempt: 1,
            worker_id: "w".into(),
            lease_until: now + chrono::Duration::minutes(5),
            now,
        },
    ] {
        raw.execute_with_metadata(&job.to_string(), cmd, ctx.to_cqrs())
            .await
            .unwrap();
    }
    let refused = commands.job(&ctx, job, succeed(forged_key)).await;
    assert!(
        matches!(
            refused,
            Err(cqrs_es::AggregateError::UserError(mira_aggregates::JobError::Invalid(
                _
            )))
        ),
        "{refused:?}"
    );
    raw.execute_with_metadata(&job.to_string(), succeed(forged_key), ctx.to_cqrs())
        .await
        .unwrap();
    eventually("the forged success in the read model", || async {
        let j = app.get(&t, &format!("/api/jobs/{job}")).await.body;
        (j["status"] == "succeeded").then_some(j)
    })
    .await;
    // The other tenant's objects exist; no redirect to them may be signed.
    let theirs = app.dir.join("blobs").join(forged_key);
    std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
    std::fs::write(&theirs, b"{}").unwrap();
    std::fs::write(theirs.with_file_name("slide.dzi"), b"<Image/>").unwrap();
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["manifest.json", "slide.dzi"] {
        let r = app
            .send(
                no_redirects
                    .get(format!("{}/api/jobs/{job}/results/{path}", app.base))
                    .bearer_auth(&t),
            )
            .await;
        assert_problem(&r, StatusCode::NOT_FOUND);
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// STAT jobs (issue 33)

/// `priority` on `POST /api/jobs`: a pathologist may submit STAT (the default
/// `Jobs__StatGroups`), an admin may not and is told which setting says so, an unknown value
/// is a 422, and a job without one is routine; the job's JSON shows it.
#[tokio::test]
async fn stat_jobs_are_submitted_by_the_groups_the_setting_names() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let admin = app.token("lab-a", &["admin"]);
    let slide = app.upload_slide(&t, &blank_slide(&app.dir)).await;
    let post = |token: String, priority: Value| {
        let app = &app;
        let slide = slide.clone();
        async move {
            let mut body = json!({"slide_id": slide, "kind": "wsi.preprocess"});
            if !priority.is_null() {
                body["priority"] = priority;
            }
            app.post(&token, "/api/jobs", body).await
        }
    };
    let stat = post(t.clone(), json!("stat")).await;
    assert_eq!(stat.status, StatusCode::ACCEPTED, "{}", stat.body);
    let refused = post(admin.clone(), json!("stat")).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let detail = refused.body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("Jobs__StatGroups") && detail.contains("pathologist"),
        "{detail}"
    );
    // The admin may still submit a routine job.
    let routine = post(admin, Value::Null).await;
    assert_eq!(routine.status, StatusCode::ACCEPTED, "{}", routine.body);
    let bad = post(t.clone(), json!("urgent")).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    for (r, want) in [(&stat, "stat"), (&routine, "routine")] {
        let id = r.body["job_id"].as_str().unwrap().to_owned();
        let j = eventually("the job's view", || async {
            let j = app.get(&t, &format!("/api/jobs/{id}")).await.body;
            j.get("priority").is_some().then_some(j)
        })
        .await;
        assert_eq!(j["priority"], want, "{j}");
    }
    app.stop().await;
}

/// A job names its slide in the list and on its own (one query for a page's names), and a
/// slide's name that was never given reads as null, not as another slide's.
#[tokio::test]
async fn jobs_carry_their_slides_names() {
    let app = spawn_app(Storage::Local).await;
    let t = app.token("lab-a", &["pathologist"]);
    let first = app.upload_slide_named(&t, b"one", "CMU-1", None).await;
    let second = app.upload_slide_named(&t, b"two", "CMU-2 biopsy", None).await;
    let mut jobs = Vec::new();
    for s in [&first, &second, &first] {
        let r = app
            .post(&t, "/api/jobs", json!({"slide_id": s, "kind": "wsi.preprocess"}))
            .await;
        jobs.push(r.body["job_id"].as_str().unwrap().to_owned());
    }
    let list = eventually("three jobs in the list", || async {
        let r = app.get(&t, "/api/jobs").await;
        (r.body["items"].as_array().map_or(0, Vec::len) == 3).then_some(r.body)
    })
    .await;
    let named: std::collections::HashMap<String, Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["job_id"].as_str().unwrap().to_owned(), j["slide_name"].clone()))
        .collect();
    assert_eq!(named[&jobs[0]], "CMU-1");
    assert_eq!(named[&jobs[1]], "CMU-2 biopsy");
    assert_eq!(named[&jobs[2]], "CMU-1");
    let one = app.get(&t, &format!("/api/jobs/{}", jobs[1])).await;
    assert_eq!(one.body["slide_name"], "CMU-2 biopsy", "{}", one.body);
    // The short id (the last 8 hex digits, any case) finds the one job.
    let short = jobs[1][jobs[1].len() - 8..].to_uppercase();
    let found = app.get(&t, &format!("/api/jobs?id={short}")).await;
    let items = found.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", found.body);
    assert_eq!(items[0]["job_id"], jobs[1].as_str());
    assert_problem(&app.get(&t, "/api/jobs?id=nothex00").await, StatusCode::BAD_REQUEST);
    app.stop().await;
}
