//! The OpenAPI 3.1 document served at `/api/openapi.json`. Written by hand next to the
//! routes; a test checks that every route of the router is described and nothing else.

use axum::Json;
use serde_json::{json, Value};

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

fn with(mut ok: Value, problems: &[&str]) -> Value {
    if let (Some(o), Value::Object(p)) = (ok.as_object_mut(), problem_responses(problems)) {
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
    json!({"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 255},
           "description": "The same key with the same body returns the same resource; with another body, 422."})
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
                        "parameters": query_params(&[("limit", page_limit.clone()), ("cursor", json!({"type": "string"}))]),
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
            "/api/jobs": {
                "post": {"summary": "Submit a job", "parameters": [idempotency()], "requestBody": json_body("NewJob"),
                         "responses": with(ok("202", "JobStatus"), &problems(true, false, &["404", "409"]))},
                "get": {"summary": "List jobs, newest first",
                        "parameters": query_params(&[
                            ("status", json!({"enum": super::jobs::STATUSES})),
                            ("slide_id", json!({"type": "string", "format": "uuid"})),
                            ("submitted_by", json!({"type": "string"})),
                            ("since", time.clone()),
                            ("until", time.clone()),
                            ("limit", page_limit.clone()),
                            ("cursor", json!({"type": "string"})),
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
            "/api/jobs/{id}/results/{path}": {
                "get": {"summary": "A result object of a succeeded job (manifest.json, slide.dzi, slide_files/…): a redirect to a short-lived URL",
                        "parameters": [id_param("id"), {"name": "path", "in": "path", "required": true, "schema": {"type": "string"}}],
                        "responses": with(json!({"307": {"description": "redirect to the object", "headers": {"Location": {"schema": {"type": "string"}}}}}),
                                          &problems(false, true, &["409"]))}
            },
            "/api/audit/events": {
                "get": {"summary": "The tenant's events from the log (auditor)",
                        "parameters": query_params(&[
                            ("after", json!({"type": "integer", "minimum": 0})),
                            ("from", time.clone()),
                            ("to", time),
                            ("aggregate_id", json!({"type": "string"})),
                            ("actor", json!({"type": "string"})),
                            ("limit", page_limit),
                        ]),
                        "responses": with(ok("200", "AuditPage"), &problems(false, false, &[]))}
            },
            "/api/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI"}}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness: which of the database, blob store and bus is down", "security": [],
                                "responses": {"200": {"description": "ready", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
                                              "503": {"description": "not ready", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [],
                                 "responses": with(json!({"200": {"description": "text format"}}), &["503"])}},
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
                                      "properties": {"multipart": {"type": "object", "required": ["upload_id", "part_size", "parts", "expires_at"], "properties": {
                                         "upload_id": {"type": "string"}, "part_size": {"type": "integer"}, "expires_at": {"type": "string", "format": "date-time"},
                                         "parts": {"type": "array", "items": {"type": "object", "required": ["part_number", "url"],
                                                   "properties": {"part_number": {"type": "integer"}, "url": {"type": "string"}}}}}}}},
                                     {"type": "null"}]}}},
                "Uploaded": {"type": "object", "additionalProperties": false,
                             "properties": {"upload_id": {"type": "string"},
                                            "parts": {"type": "array", "items": {"type": "object", "required": ["part_number", "etag"],
                                                      "properties": {"part_number": {"type": "integer", "minimum": 1, "maximum": 10000}, "etag": {"type": "string"}}}}}},
                "SlideStatus": {"type": "object", "required": ["slide_id", "status"],
                                "properties": {"slide_id": {"type": "string"}, "status": {"type": "string"}, "size_bytes": {"type": "integer"}}},
                "Slide": {"type": "object", "required": ["slide_id", "status", "size_bytes", "content_type", "position"],
                          "properties": {"slide_id": {"type": "string"}, "status": {"enum": ["registered", "uploaded", "verified", "rejected", "deleted"]},
                          "name": {"type": ["string", "null"]}, "size_bytes": {"type": "integer"}, "content_type": {"type": "string"},
                          "metadata": {"type": ["object", "null"]}, "rejection": {"type": ["string", "null"]}, "position": {"type": "integer"}}},
                "SlidePage": {"type": "object", "required": ["items"],
                              "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Slide"}}, "next": {"type": ["string", "null"]}}},
                "NewJob": {"type": "object", "additionalProperties": false, "required": ["slide_id", "kind"],
                           "properties": {"slide_id": {"type": "string", "format": "uuid"}, "kind": {"const": "wsi.preprocess"},
                                          "params": {"type": ["object", "null"], "additionalProperties": false, "properties": {
                                              "tile_size": {"type": "integer", "minimum": 16, "maximum": 4096, "default": 254},
                                              "overlap": {"type": "integer", "minimum": 0, "default": 1},
                                              "format": {"enum": ["jpeg", "png"], "default": "jpeg"},
                                              "quality": {"type": "integer", "minimum": 1, "maximum": 100, "default": 80},
                                              "tissue": {"type": "boolean", "default": true}, "normalize": {"enum": ["none", "macenko", "reinhard"], "default": "none"}}}}},
                "Cancel": {"type": "object", "additionalProperties": false, "properties": {"reason": {"type": "string", "maxLength": 1000}}},
                "JobStatus": {"type": "object", "required": ["job_id", "status"],
                              "properties": {"job_id": {"type": "string"}, "status": {"type": "string"}}},
                "Job": {"type": "object", "required": ["job_id", "slide_id", "kind", "status", "attempt", "max_attempts", "position"],
                        "properties": {"job_id": {"type": "string"}, "slide_id": {"type": "string"}, "kind": {"type": "string"}, "params": {"type": "object"},
                        "status": {"enum": super::jobs::STATUSES},
                        "attempt": {"type": "integer"}, "max_attempts": {"type": "integer"}, "progress": {"type": ["object", "null"]},
                        "failure": {"type": ["string", "null"]}, "position": {"type": "integer"}}},
                "JobPage": {"type": "object", "required": ["items"],
                            "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}, "next": {"type": ["string", "null"]}}},
                "Timeline": {"type": "object", "required": ["job_id", "events"],
                             "properties": {"job_id": {"type": "string"}, "events": {"type": "array", "items": {"type": "object", "properties": {
                    "sequence": {"type": "integer"}, "event_id": {"type": "string"}, "event_type": {"type": "string"}, "actor_kind": {"type": "string"},
                    "actor_id": {"type": "string"}, "recorded_at": {"type": "string"}, "hash": {"type": "string"}, "position": {"type": "integer"}}}}}},
                "AuditPage": {"type": "object", "required": ["items"],
                              "properties": {"items": {"type": "array", "items": {"type": "object"}}, "next": {"type": ["integer", "null"]}}},
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
