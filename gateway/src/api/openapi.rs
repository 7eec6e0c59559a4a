//! The OpenAPI 3.1 document served at `/api/openapi.json`. The paths are written here next to
//! the routes (a test checks that every route of the router is described and nothing else);
//! the schemas of what the read models return (`Job`, `Slide`, `TimelineEntry`) and of the job
//! kinds' parameters are derived from those types, so a column or a parameter is described
//! where it is defined. `gateway/openapi.json` is the golden copy of the whole document; a
//! test fails on any difference.

use axum::Json;
use mira_aggregates::JobStatus;
use mira_events::params::{JobSpec, PreprocessParams};
use mira_projections::views::{JobView, SlideView, TimelineEntry};
use serde_json::{json, Value};
use utoipa::OpenApi;

/// The schemas derived from Mira's types.
#[derive(OpenApi)]
#[openapi(components(schemas(JobView, SlideView, TimelineEntry, PreprocessParams)))]
struct Derived;

fn derived_schemas() -> serde_json::Map<String, Value> {
    let doc = serde_json::to_value(Derived::openapi()).unwrap_or_default();
    let mut schemas = match doc.pointer("/components/schemas") {
        Some(Value::Object(m)) => m.clone(),
        _ => serde_json::Map::new(),
    };
    // Whether a ready job waits for the handlers' admission: the API adds it to the view
    // (`api::jobs::shown`; ADR 0027).
    if let Some(p) = schemas
        .get_mut("Job")
        .and_then(|s| s.get_mut("properties"))
        .and_then(Value::as_object_mut)
    {
        p.insert(
            "waiting_for_admission".into(),
            json!({"type": "boolean", "description": "Ready to run (its slide verified, or its retry due) and waiting for the lifecycle handlers to admit it to a GPU queue: tenants take turns, and a few routine jobs at a time are queued (Jobs__AdmissionWindow)."}),
        );
    }
    // The API shows jobs and slides without the log's global position (`api::public_view`).
    for name in ["Job", "Slide"] {
        if let Some(s) = schemas.get_mut(name) {
            if let Some(p) = s.get_mut("properties").and_then(Value::as_object_mut) {
                p.remove("position");
            }
            if let Some(r) = s.get_mut("required").and_then(Value::as_array_mut) {
                r.retain(|f| f != "position");
            }
        }
    }
    schemas
}

fn statuses() -> Vec<&'static str> {
    JobStatus::SHOWN.iter().map(|s| s.as_str()).collect()
}

fn problem_responses(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        m.insert(
            (*c).to_owned(),
            json!({"description": "Problem", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}),
        );
    }
    Value::Object(m)
}

/// `ok` and the problems listed, and 429, which any client past `Api__RequestsPerSecond` gets.
fn with(mut ok: Value, problems: &[&str]) -> Value {
    let mut problems = problems.to_vec();
    problems.push("429");
    if let (Some(o), Value::Object(p)) = (ok.as_object_mut(), problem_responses(&problems)) {
        o.extend(p);
    }
    ok
}

fn json_body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn ok(code: &str, schema: &str) -> Value {
    json!({code: {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}}})
}

fn id_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}})
}

fn idempotency() -> Value {
    json!({"name": "Idempotency-Key", "in": "header", "required": false,
           "schema": {"type": "string", "pattern": "^[!-~]{1,255}$", "description": "1 to 255 visible ASCII characters."},
           "description": "The same key with the same body returns the same resource; with another body, 422."})
}

/// Text in a query string: anything but a NUL character, which no value of Mira's holds and
/// which the API refuses (400).
fn query_text() -> Value {
    json!({"type": "string", "pattern": "^[^\\u0000]*$"})
}

fn query_params(params: &[(&str, Value)]) -> Value {
    params
        .iter()
        .map(|(n, schema)| json!({"name": n, "in": "query", "required": false, "schema": schema}))
        .collect()
}

/// Every problem an authenticated operation can answer: no or a bad token (401), a missing
/// role (403); with a body, a malformed (400), oversized (413), non-JSON (415) or ill-fitting
/// (422) one; with an id in the path, a malformed (400) or unknown (404) one; 503 when a
/// dependency it needs is down. The fuzzer in CI fails on any other status.
fn problems(body: bool, id: bool, extra: &[&'static str]) -> Vec<&'static str> {
    let mut codes = vec!["400", "401", "403", "503"];
    if body {
        codes.extend(["413", "415", "422"]);
    }
    if id {
        codes.push("404");
    }
    codes.extend(extra);
    codes.sort();
    codes.dedup();
    codes
}

/// The slide types Mira opens (`content_type` of a new slide).
fn slide_types() -> Value {
    json!(super::slides::SLIDE_CONTENT_TYPES)
}

pub fn spec() -> Value {
    let mut doc = hand_written();
    if let Some(Value::Object(schemas)) = doc.pointer_mut("/components/schemas") {
        schemas.extend(derived_schemas());
    }
    doc
}

fn hand_written() -> Value {
    let page_limit = json!({"type": "integer", "minimum": 1, "maximum": 500});
    let time = json!({"type": "string", "format": "date-time"});
    let text = json!({"type": "string", "minLength": 1, "maxLength": 255});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Mira API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Whole-slide image processing on an audit-grade event log. Errors are RFC 9457 problem+json."},
        "security": [{"cognito": []}],
        "paths": {
            "/api/slides": {
                "post": {"summary": "Register a slide and get its upload URLs", "parameters": [idempotency()],
                         "requestBody": json_body("NewSlide"),
                         "responses": with(ok("201", "SlideCreated"), &problems(true, false, &[]))},
                "get": {"summary": "List slides, newest first",
                        "parameters": query_params(&[("limit", page_limit.clone()), ("cursor", query_text())]),
                        "responses": with(ok("200", "SlidePage"), &problems(false, false, &[]))}
            },
            "/api/slides/{id}": {
                "get": {"summary": "One slide", "parameters": [id_param("id")],
                        "responses": with(ok("200", "Slide"), &problems(false, true, &[]))}
            },
            "/api/slides/{id}/uploaded": {
                "post": {"summary": "Complete the upload: copies it to the slide's immutable key, checks its size, then records it",
                         "parameters": [id_param("id")],
                         "requestBody": {"required": false, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Uploaded"}}}},
                         "responses": with(ok("200", "SlideStatus"), &problems(true, true, &["409"]))}
            },
            "/api/slides/{id}/upload/parts": {
                "get": {"summary": "The next page of part URLs of the slide's multipart upload (at most 100 each)",
                        "parameters": [id_param("id"),
                                       {"name": "upload_id", "in": "query", "required": true, "schema": query_text()},
                                       {"name": "from", "in": "query", "required": true, "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
                        "responses": with(ok("200", "PartPage"), &problems(false, true, &["409", "422"]))}
            },
            "/api/jobs": {
                "post": {"summary": "Submit a job", "parameters": [idempotency()], "requestBody": json_body("NewJob"),
                         "responses": with(ok("202", "JobStatus"), &problems(true, false, &["404", "409"]))},
                "get": {"summary": "List jobs, newest first",
                        "parameters": query_params(&[
                            ("status", json!({"type": "string", "enum": statuses()})),
                            ("slide_id", json!({"type": "string", "format": "uuid"})),
                            ("submitted_by", query_text()),
                            ("since", time.clone()),
                            ("until", time.clone()),
                            ("limit", page_limit.clone()),
                            ("cursor", query_text()),
                        ]),
                        "responses": with(ok("200", "JobPage"), &problems(false, false, &[]))}
            },
            "/api/jobs/{id}": {
                "get": {"summary": "One job, with progress and attempts", "parameters": [id_param("id")],
                        "responses": with(ok("200", "Job"), &problems(false, true, &[]))}
            },
            "/api/jobs/{id}/cancel": {
                "post": {"summary": "Cancel a job", "parameters": [id_param("id")],
                         "requestBody": {"required": false, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Cancel"}}}},
                         "responses": with(ok("202", "JobStatus"), &problems(true, true, &["409"]))}
            },
            "/api/jobs/{id}/retry": {
                "post": {"summary": "Run a failed or cancelled job again", "parameters": [id_param("id")],
                         "responses": with(ok("202", "JobStatus"), &problems(false, true, &["409"]))}
            },
            "/api/jobs/{id}/events": {
                "get": {"summary": "The job's history with actors and hashes", "parameters": [id_param("id")],
                        "responses": with(ok("200", "Timeline"), &problems(false, true, &[]))}
            },
            "/api/jobs/{id}/verify": {
                "get": {"summary": "Whether the log verifies for the job's events (the checks of mira audit verify one stream can answer)",
                        "parameters": [id_param("id")],
                        "responses": with(ok("200", "StreamVerification"), &problems(false, true, &[]))}
            },
            "/api/jobs/{id}/results/{path}": {
                "get": {"summary": "A result object of a succeeded job (manifest.json, slide.dzi, slide_files/…): a redirect to a short-lived URL",
                        "parameters": [id_param("id"), {"name": "path", "in": "path", "required": true, "schema": {"type": "string"}}],
                        "responses": with(json!({"307": {"description": "redirect to the object", "headers": {"Location": {"schema": {"type": "string"}}}}}),
                                          &problems(false, true, &["409"]))}
            },
            "/api/audit/events": {
                "get": {"summary": "The tenant's events from the log (auditor)",
                        "parameters": query_params(&[
                            ("after", json!({"type": "integer", "minimum": 0, "maximum": i64::MAX})),
                            ("from", time.clone()),
                            ("to", time),
                            ("aggregate_id", query_text()),
                            ("actor", query_text()),
                            ("limit", page_limit),
                        ]),
                        "responses": with(ok("200", "AuditPage"), &problems(false, false, &[]))}
            },
            "/api/openapi.json": {"get": {"summary": "This document", "security": [], "responses": with(json!({"200": {"description": "OpenAPI"}}), &[])}},
            "/api/app-config": {"get": {"summary": "How the browser app signs in, and its WebSocket URL", "security": [],
                                        "responses": with(ok("200", "AppConfig"), &[])}},
            "/api/version": {"get": {"summary": "The running version and the commit it was built from (MIRA_COMMIT, else unknown)", "security": [],
                                     "responses": with(ok("200", "Version"), &[])}},
            "/dev/sign-in": {"post": {"summary": "mira dev only: an ID token for any user, tenant and roles (loopback clients only unless Web__AllowRemoteDevSignIn)",
                                      "security": [], "requestBody": json_body("DevSignIn"),
                                      "responses": with(ok("200", "DevToken"), &["400", "403", "404", "413", "422"])}},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness: which of the database, blob store and bus is down", "security": [],
                                "responses": {"200": {"description": "ready", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
                                              "503": {"description": "not ready", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics: here only with Api__MetricsToken as a bearer token (404 without it); operators scrape Api__MetricsListen", "security": [],
                                 "responses": with(json!({"200": {"description": "text format"}}), &["401", "404", "503"])}},
            "/blobs/{key}": {
                "put": {"summary": "Upload to a signed URL of the local blob store (mira dev)", "security": [],
                        "parameters": [{"name": "key", "in": "path", "required": true, "schema": {"type": "string"}}],
                        "responses": with(json!({"200": {"description": "stored; ETag header"}}), &["400", "403", "413", "415"])},
                "get": {"summary": "Download from a signed URL of the local blob store (mira dev)", "security": [],
                        "parameters": [{"name": "key", "in": "path", "required": true, "schema": {"type": "string"}}],
                        "responses": with(json!({"200": {"description": "the object"}}), &["400", "403", "404"])}
            },
        },
        "components": {
            "securitySchemes": {"cognito": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                            "description": "A Cognito ID token (token_use id) with custom:tenant and cognito:groups."}},
            "schemas": {
                "Problem": {"type": "object", "required": ["type", "title", "status"],
                            "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"}}},
                "NewSlide": {"type": "object", "additionalProperties": false, "required": ["name", "size_bytes", "content_type"],
                             "properties": {"name": text.clone(), "size_bytes": {"type": "integer", "minimum": 1, "maximum": 5_497_558_138_880u64},
                                            "content_type": {"enum": slide_types()}, "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                                            "file_name": text}},
                "SlideCreated": {"type": "object", "required": ["slide_id", "status", "upload"],
                                 "properties": {"slide_id": {"type": "string", "format": "uuid"}, "status": {"type": "string"},
                                 "upload": {"oneOf": [
                                     {"type": "object", "additionalProperties": false, "required": ["method", "url", "headers", "expires_at"],
                                      "properties": {"method": {"const": "PUT"}, "url": {"type": "string"},
                                                     "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                                                     "expires_at": {"type": "string", "format": "date-time"}}},
                                     {"type": "object", "additionalProperties": false, "required": ["multipart"],
                                      "properties": {"multipart": {"$ref": "#/components/schemas/PartPage"}}},
                                     {"type": "null"}]}}},
                "PartPage": {"type": "object", "required": ["upload_id", "part_size", "part_count", "parts", "expires_at"],
                             "description": "A multipart upload and the URLs of one page of its parts (at most 100); ask for the rest from GET /api/slides/{id}/upload/parts",
                             "properties": {
                                 "upload_id": {"type": "string"}, "part_size": {"type": "integer"}, "part_count": {"type": "integer", "minimum": 1, "maximum": 10000},
                                 "expires_at": {"type": "string", "format": "date-time"},
                                 "parts": {"type": "array", "maxItems": 100, "items": {"type": "object", "required": ["part_number", "url"],
                                           "properties": {"part_number": {"type": "integer"}, "url": {"type": "string"}}}}}},
                "Uploaded": {"type": "object", "additionalProperties": false,
                             "properties": {"upload_id": {"type": "string"},
                                            "parts": {"type": "array", "items": {"type": "object", "required": ["part_number", "etag"],
                                                      "properties": {"part_number": {"type": "integer", "minimum": 1, "maximum": 10000}, "etag": {"type": "string"}}}}}},
                "SlideStatus": {"type": "object", "required": ["slide_id", "status"],
                                "properties": {"slide_id": {"type": "string"}, "status": {"type": "string"}, "size_bytes": {"type": "integer"}}},
                "SlidePage": {"type": "object", "required": ["items"],
                              "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Slide"}}, "next": {"type": ["string", "null"]}}},
                "NewJob": {"type": "object", "additionalProperties": false, "required": ["slide_id", "kind"],
                           "properties": {"slide_id": {"type": "string", "format": "uuid"}, "kind": {"type": "string", "enum": JobSpec::KINDS},
                                          "params": {"oneOf": [{"$ref": "#/components/schemas/PreprocessParams"}, {"type": "null"}],
                                                     "description": "The kind's parameters; absent or null means every default."},
                                          "priority": {"type": "string", "enum": ["routine", "stat"], "default": "routine",
                                                       "description": "A STAT job is taken before every routine job waiting; a running job is not stopped for it. Who may ask for STAT is a setting (Jobs__StatGroups; pathologists by default): anyone else gets 403."}}},
                "Cancel": {"type": "object", "additionalProperties": false, "properties": {"reason": {"type": "string", "maxLength": 1000}}},
                "JobStatus": {"type": "object", "required": ["job_id", "status"],
                              "properties": {"job_id": {"type": "string"}, "status": {"type": "string"}}},
                "JobPage": {"type": "object", "required": ["items"],
                            "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}, "next": {"type": ["string", "null"]}}},
                "Timeline": {"type": "object", "required": ["job_id", "events"],
                             "properties": {"job_id": {"type": "string"}, "events": {"type": "array", "items": {"$ref": "#/components/schemas/TimelineEntry"}}}},
                "AuditPage": {"type": "object", "required": ["items"],
                              "properties": {"items": {"type": "array", "items": {"type": "object"}}, "next": {"type": ["integer", "null"]}}},
                "AppConfig": {"type": "object", "required": ["auth", "ws_url"],
                              "properties": {"auth": {"oneOf": [
                                  {"type": "object", "required": ["mode"], "properties": {"mode": {"enum": ["dev", "none"]}}},
                                  {"type": "object", "required": ["mode", "domain", "client_id", "redirect_url"],
                                   "properties": {"mode": {"const": "cognito"}, "domain": {"type": "string"},
                                                  "client_id": {"type": "string"}, "redirect_url": {"type": "string"}}}]},
                                             "ws_url": {"type": ["string", "null"]}}},
                "DevSignIn": {"type": "object", "additionalProperties": false, "required": ["user", "tenant", "roles"],
                              "properties": {"user": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "\\S",
                                                      "description": "Surrounding white space is dropped."},
                                             "tenant": {"type": "string", "pattern": "^[a-z0-9-]{1,64}$"},
                                             "roles": {"type": "array", "items": {"enum": ["pathologist", "auditor", "admin"]}}}},
                "StreamVerification": {"type": "object", "required": ["job_id", "verified"],
                                       "properties": {"job_id": {"type": "string"}, "verified": {"type": "boolean"},
                                                      "events": {"type": "integer"}, "checkpointed": {"type": "integer"},
                                                      "checkpoints": {"type": "integer"}, "witnessed_checkpoint": {"type": ["integer", "null"]},
                                                      "reason": {"type": "string"}, "position": {"type": "integer"},
                                                      "event_id": {"type": ["string", "null"]}}},
                "DevToken": {"type": "object", "required": ["id_token", "expires_at"],
                             "properties": {"id_token": {"type": "string"}, "expires_at": {"type": "string", "format": "date-time"}}},
                "Version": {"type": "object", "additionalProperties": false, "required": ["version", "commit"],
                            "properties": {"version": {"type": "string"}, "commit": {"type": "string"}}},
                "Readiness": {"type": "object", "required": ["ready", "checks"],
                              "properties": {"ready": {"type": "boolean"},
                                             "checks": {"type": "object", "additionalProperties": {"enum": ["ok", "down"]}}}}
            }
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}

/// The document as the golden file holds it: pretty JSON, keys sorted, a final newline.
pub fn golden_text() -> String {
    let mut text = serde_json::to_string_pretty(&spec()).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    /// The golden document: exactly what `/api/openapi.json` serves. Any change to the API's
    /// description shows here as a diff under review; `MIRA_UPDATE_OPENAPI=1` rewrites it (the
    /// deliberate step), and the browser app's types are generated from it.
    const GOLDEN: &str = include_str!("../../openapi.json");

    fn golden_path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json")
    }

    fn object(v: &Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn names(v: Option<&Value>) -> BTreeSet<String> {
        match v {
            Some(Value::Object(m)) => m.keys().cloned().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
            _ => BTreeSet::new(),
        }
    }

    /// What a property allows, as far as this comparison goes: its enum or const, or its
    /// reference, or its items' reference.
    fn shape(p: &Value) -> String {
        let pick = |k: &str| p.get(k).map(|v| v.to_string()).unwrap_or_default();
        format!(
            "{}|{}|{}|{}",
            pick("enum"),
            pick("const"),
            pick("$ref"),
            p.pointer("/items/$ref").map(|v| v.to_string()).unwrap_or_default()
        )
    }

    /// The differences between two documents in paths, operations, response statuses and
    /// schemas (names, properties, required properties, and what each property allows).
    fn differences(before: &Value, after: &Value) -> Vec<String> {
        let mut out = Vec::new();
        let (bp, ap) = (object(&before["paths"]), object(&after["paths"]));
        for path in names(before.get("paths")).union(&names(after.get("paths"))) {
            let (bo, ao) = (bp.get(path), ap.get(path));
            for method in names(bo).union(&names(ao)) {
                let b = bo.and_then(|o| o.get(method));
                let a = ao.and_then(|o| o.get(method));
                match (b, a) {
                    (Some(b), Some(a)) => {
                        let (bs, as_) = (names(b.get("responses")), names(a.get("responses")));
                        for s in bs.difference(&as_) {
                            out.push(format!("{method} {path}: status {s} removed"));
                        }
                        for s in as_.difference(&bs) {
                            out.push(format!("{method} {path}: status {s} added"));
                        }
                    }
                    (Some(_), None) => out.push(format!("{method} {path} removed")),
                    (None, Some(_)) => out.push(format!("{method} {path} added")),
                    (None, None) => {}
                }
            }
        }
        let (bs, as_) = (
            object(&before["components"]["schemas"]),
            object(&after["components"]["schemas"]),
        );
        for name in names(before["components"].get("schemas")).union(&names(after["components"].get("schemas"))) {
            let (b, a) = match (bs.get(name), as_.get(name)) {
                (Some(b), Some(a)) => (b, a),
                (Some(_), None) => {
                    out.push(format!("schema {name} removed"));
                    continue;
                }
                (None, Some(_)) => {
                    out.push(format!("schema {name} added"));
                    continue;
                }
                (None, None) => continue,
            };
            let (bprops, aprops) = (object(&b["properties"]), object(&a["properties"]));
            for p in names(b.get("properties")).union(&names(a.get("properties"))) {
                match (bprops.get(p), aprops.get(p)) {
                    (Some(_), None) => out.push(format!("schema {name}: property {p} removed")),
                    (None, Some(_)) => out.push(format!("schema {name}: property {p} added")),
                    (Some(x), Some(y)) if shape(x) != shape(y) => {
                        out.push(format!("schema {name}: property {p}: enum changed"))
                    }
                    _ => {}
                }
            }
            let (br, ar) = (names(b.get("required")), names(a.get("required")));
            for r in br.difference(&ar) {
                out.push(format!("schema {name}: required {r} removed"));
            }
            for r in ar.difference(&br) {
                out.push(format!("schema {name}: required {r} added"));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn the_served_document_is_the_golden_one() {
        let served = super::golden_text();
        if std::env::var("MIRA_UPDATE_OPENAPI").as_deref() == Ok("1") {
            std::fs::write(golden_path(), &served).unwrap();
            return;
        }
        if served != GOLDEN {
            let golden: Value = serde_json::from_str(GOLDEN).unwrap();
            let line = served
                .lines()
                .zip(GOLDEN.lines())
                .position(|(a, b)| a != b)
                .map(|i| i + 1)
                .unwrap_or(served.lines().count().min(GOLDEN.lines().count()) + 1);
            panic!(
                "the OpenAPI document differs from gateway/openapi.json from line {line}: {:?}; \
                 if the change is meant, run MIRA_UPDATE_OPENAPI=1 cargo nextest run -p mira-gateway \
                 the_served_document_is_the_golden_one, review the diff and commit it (then \
                 npm run gen:api in web/)",
                differences(&golden, &super::spec())
            );
        }
    }

    #[test]
    fn the_comparison_sees_a_status_a_property_and_an_enum() {
        let before: Value = serde_json::from_str(GOLDEN).unwrap();
        let mut after = before.clone();
        after["paths"]["/api/jobs"]["post"]["responses"]
            .as_object_mut()
            .unwrap()
            .remove("409");
        after["components"]["schemas"]["Cancel"]["properties"]["why"] = serde_json::json!({});
        after["components"]["schemas"]["NewSlide"]["properties"]["content_type"]["enum"] = serde_json::json!(["x"]);
        assert_eq!(
            differences(&before, &after),
            vec![
                "post /api/jobs: status 409 removed".to_string(),
                "schema Cancel: property why added".into(),
                "schema NewSlide: property content_type: enum changed".into(),
            ]
        );
    }

    #[test]
    fn statuses_and_kinds_come_from_their_types() {
        let doc = super::spec();
        let shown: Vec<&str> = mira_aggregates::JobStatus::SHOWN.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            doc["components"]["schemas"]["Job"]["properties"]["status"]["enum"],
            serde_json::json!(shown)
        );
        let filter = doc["paths"]["/api/jobs"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "status")
            .unwrap();
        assert_eq!(filter["schema"]["enum"], serde_json::json!(shown));
        assert_eq!(
            doc["components"]["schemas"]["NewJob"]["properties"]["kind"]["enum"],
            serde_json::json!(mira_events::params::JobSpec::KINDS)
        );
        let params = &doc["components"]["schemas"]["PreprocessParams"];
        assert_eq!(params["properties"]["tile_size"]["minimum"], 16, "{params}");
        // An inline enum with a default comes wrapped in a one-element `oneOf`.
        let format = &params["properties"]["format"];
        let values = format.get("enum").unwrap_or(&format["oneOf"][0]["enum"]);
        assert_eq!(values, &serde_json::json!(["jpeg", "png"]), "{params}");
        assert_eq!(format["default"], "jpeg", "{params}");
        assert_eq!(params["additionalProperties"], false, "{params}");
    }
}
