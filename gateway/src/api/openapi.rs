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

fn query_params(names: &[&str]) -> Value {
    names
        .iter()
        .map(|n| json!({"name": n, "in": "query", "schema": {"type": "string"}}))
        .collect()
}

pub fn spec() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Mira API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Whole-slide image processing on an audit-grade event log. Errors are RFC 9457 problem+json."},
        "security": [{"cognito": []}],
        "paths": {
            "/api/slides": {
                "post": {"summary": "Register a slide and get its upload URLs", "parameters": [idempotency()],
                         "requestBody": json_body("NewSlide"),
                         "responses": with(ok("201", "SlideCreated"), &["400", "401", "403", "413", "415", "422"])},
                "get": {"summary": "List slides, newest first",
                        "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer"}},
                                       {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
                        "responses": with(ok("200", "SlidePage"), &["400", "401", "403"])}
            },
            "/api/slides/{id}": {
                "get": {"summary": "One slide", "parameters": [id_param("id")],
                        "responses": with(ok("200", "Slide"), &["400", "401", "403", "404"])}
            },
            "/api/slides/{id}/uploaded": {
                "post": {"summary": "Complete the upload: checks the object and its size, then records it",
                         "parameters": [id_param("id")],
                         "requestBody": {"required": false, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Uploaded"}}}},
                         "responses": with(ok("200", "SlideStatus"), &["400", "401", "403", "404", "409", "422"])}
            },
            "/api/jobs": {
                "post": {"summary": "Submit a job", "parameters": [idempotency()], "requestBody": json_body("NewJob"),
                         "responses": with(ok("202", "JobStatus"), &["400", "401", "403", "404", "409", "413", "415", "422"])},
                "get": {"summary": "List jobs, newest first",
                        "parameters": query_params(&["status", "slide_id", "submitted_by", "since", "until", "limit", "cursor"]),
                        "responses": with(ok("200", "JobPage"), &["400", "401", "403"])}
            },
            "/api/jobs/{id}": {
                "get": {"summary": "One job, with progress and attempts", "parameters": [id_param("id")],
                        "responses": with(ok("200", "Job"), &["400", "401", "403", "404"])}
            },
            "/api/jobs/{id}/cancel": {
                "post": {"summary": "Cancel a job", "parameters": [id_param("id")],
                         "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "properties": {"reason": {"type": "string"}}, "additionalProperties": false}}}},
                         "responses": with(ok("202", "JobStatus"), &["400", "401", "403", "404", "409"])}
            },
            "/api/jobs/{id}/retry": {
                "post": {"summary": "Run a failed or cancelled job again", "parameters": [id_param("id")],
                         "responses": with(ok("202", "JobStatus"), &["400", "401", "403", "404", "409"])}
            },
            "/api/jobs/{id}/events": {
                "get": {"summary": "The job's history with actors and hashes", "parameters": [id_param("id")],
                        "responses": with(ok("200", "Timeline"), &["400", "401", "403", "404"])}
            },
            "/api/jobs/{id}/results/{path}": {
                "get": {"summary": "A result object of a succeeded job (manifest.json, slide.dzi, slide_files/…): a redirect to a short-lived URL",
                        "parameters": [id_param("id"), {"name": "path", "in": "path", "required": true, "schema": {"type": "string"}}],
                        "responses": with(json!({"307": {"description": "redirect to the object"}}), &["400", "401", "403", "404", "409"])}
            },
            "/api/audit/events": {
                "get": {"summary": "The tenant's events from the log (auditor)",
                        "parameters": query_params(&["after", "from", "to", "aggregate_id", "actor", "limit"]),
                        "responses": with(ok("200", "AuditPage"), &["400", "401", "403"])}
            },
            "/api/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI"}}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness: database, blob store, bus", "security": [],
                                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": {"description": "text format"}}}},
            "/blobs/{key}": {
                "put": {"summary": "Upload to a signed URL of the local blob store (mira dev)", "security": [],
                        "parameters": [{"name": "key", "in": "path", "required": true, "schema": {"type": "string"}}],
                        "responses": with(json!({"200": {"description": "stored; ETag header"}}), &["400", "403"])},
                "get": {"summary": "Download from a signed URL of the local blob store (mira dev)", "security": [],
                        "parameters": [{"name": "key", "in": "path", "required": true, "schema": {"type": "string"}}],
                        "responses": with(json!({"200": {"description": "the object"}}), &["403", "404"])}
            },
        },
        "components": {
            "securitySchemes": {"cognito": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                            "description": "A Cognito ID token (token_use id) with custom:tenant and cognito:groups."}},
            "schemas": {
                "Problem": {"type": "object", "required": ["type", "title", "status"],
                            "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"}}},
                "NewSlide": {"type": "object", "additionalProperties": false, "required": ["name", "size_bytes", "content_type"],
                             "properties": {"name": {"type": "string", "maxLength": 255}, "size_bytes": {"type": "integer", "minimum": 1},
                                            "content_type": {"type": "string"}, "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                                            "file_name": {"type": "string"}}},
                "SlideCreated": {"type": "object", "properties": {"slide_id": {"type": "string", "format": "uuid"}, "status": {"type": "string"},
                                 "upload": {"oneOf": [
                                     {"type": "object", "properties": {"method": {"type": "string"}, "url": {"type": "string"}, "headers": {"type": "object"}, "expires_at": {"type": "string", "format": "date-time"}}},
                                     {"type": "object", "properties": {"multipart": {"type": "object", "properties": {
                                         "upload_id": {"type": "string"}, "part_size": {"type": "integer"}, "expires_at": {"type": "string"},
                                         "parts": {"type": "array", "items": {"type": "object", "properties": {"part_number": {"type": "integer"}, "url": {"type": "string"}}}}}}}},
                                     {"type": "null"}]}}},
                "Uploaded": {"type": "object", "additionalProperties": false,
                             "properties": {"upload_id": {"type": "string"},
                                            "parts": {"type": "array", "items": {"type": "object", "required": ["part_number", "etag"],
                                                      "properties": {"part_number": {"type": "integer"}, "etag": {"type": "string"}}}}}},
                "SlideStatus": {"type": "object", "properties": {"slide_id": {"type": "string"}, "status": {"type": "string"}, "size_bytes": {"type": "integer"}}},
                "Slide": {"type": "object", "properties": {"slide_id": {"type": "string"}, "status": {"enum": ["registered", "uploaded", "verified", "rejected", "deleted"]},
                          "name": {"type": ["string", "null"]}, "size_bytes": {"type": "integer"}, "content_type": {"type": "string"},
                          "metadata": {"type": ["object", "null"]}, "rejection": {"type": ["string", "null"]}, "position": {"type": "integer"}}},
                "SlidePage": {"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Slide"}}, "next": {"type": ["string", "null"]}}},
                "NewJob": {"type": "object", "additionalProperties": false, "required": ["slide_id", "kind"],
                           "properties": {"slide_id": {"type": "string", "format": "uuid"}, "kind": {"const": "wsi.preprocess"},
                                          "params": {"type": "object", "additionalProperties": false, "properties": {
                                              "tile_size": {"type": "integer", "default": 254}, "overlap": {"type": "integer", "default": 1},
                                              "format": {"enum": ["jpeg", "png"], "default": "jpeg"}, "quality": {"type": "integer", "default": 80},
                                              "tissue": {"type": "boolean", "default": true}, "normalize": {"enum": ["none", "macenko", "reinhard"], "default": "none"}}}}},
                "JobStatus": {"type": "object", "properties": {"job_id": {"type": "string"}, "status": {"type": "string"}}},
                "Job": {"type": "object", "properties": {"job_id": {"type": "string"}, "slide_id": {"type": "string"}, "kind": {"type": "string"}, "params": {"type": "object"},
                        "status": {"enum": ["submitted", "queued", "running", "retry_scheduled", "cancel_requested", "succeeded", "failed", "cancelled"]},
                        "attempt": {"type": "integer"}, "max_attempts": {"type": "integer"}, "progress": {"type": ["object", "null"]},
                        "failure": {"type": ["string", "null"]}, "position": {"type": "integer"}}},
                "JobPage": {"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}, "next": {"type": ["string", "null"]}}},
                "Timeline": {"type": "object", "properties": {"job_id": {"type": "string"}, "events": {"type": "array", "items": {"type": "object", "properties": {
                    "sequence": {"type": "integer"}, "event_id": {"type": "string"}, "event_type": {"type": "string"}, "actor_kind": {"type": "string"},
                    "actor_id": {"type": "string"}, "recorded_at": {"type": "string"}, "hash": {"type": "string"}, "position": {"type": "integer"}}}}}},
                "AuditPage": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object"}}, "next": {"type": ["integer", "null"]}}}
            }
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}
