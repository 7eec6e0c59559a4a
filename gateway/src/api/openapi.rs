//! The OpenAPI 3.1 document served at `/api/openapi.json`. Each operation is declared once, by
//! its handler's `#[utoipa::path]`; [`operations`] collects them as it builds the router,
//! so the document, the routes and the `Allow` of a 405 come from the same declarations. The
//! request and response types derive their schemas; what no operation names (the problem
//! document, the job kinds' parameters, the security scheme) is in [`base`].
//! `gateway/openapi.json` is the golden copy of the whole document; a test fails on any
//! difference.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::Json;
use mira_events::params::JobSpec;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathItem};

use axum::extract::DefaultBodyLimit;
use utoipa_axum::router::OpenApiRouter;

use super::problem::{Limited, Problem};
use super::state::AppState;
use super::{audit, blobs, jobs, ops, session, slides, web, ws};
use utoipa_axum::routes;

/// What the operations do not declare: the title, the default security (a Cognito ID token),
/// and the schemas every operation or kind refers to.
pub fn base() -> OpenApi {
    let info = InfoBuilder::new()
        .title("Mira API")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "Whole-slide image processing on an audit-grade event log. Errors are RFC 9457 problem+json.",
        ))
        .build();
    let cognito = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT")
        .description(Some(
            "A Cognito ID token (token_use id) with custom:tenant and cognito:groups.",
        ))
        .build();
    let components = ComponentsBuilder::new()
        .security_scheme("cognito", SecurityScheme::Http(cognito))
        .schema_from::<Problem>()
        .schemas_from_iter(JobSpec::params_schemas())
        .build();
    OpenApiBuilder::new()
        .info(info)
        .security(Some([SecurityRequirement::new("cognito", Vec::<String>::new())]))
        .components(Some(components))
        .build()
}

/// The methods each route takes, for the `Allow` of a 405 (axum adds none to routes wrapped
/// in layers), keyed by the route as axum matches it (`/api/jobs/{id}/results/{*path}`): a
/// `GET` route takes `HEAD` too.
pub fn methods_of(doc: &OpenApi) -> BTreeMap<String, String> {
    doc.paths
        .paths
        .iter()
        .map(|(path, item)| (path.clone(), methods(item).join(", ")))
        .collect()
}

fn methods(item: &PathItem) -> Vec<&'static str> {
    let mut m = Vec::new();
    let ops = [
        ("DELETE", &item.delete),
        ("GET", &item.get),
        ("HEAD", &item.head),
        ("OPTIONS", &item.options),
        ("PATCH", &item.patch),
        ("POST", &item.post),
        ("PUT", &item.put),
        ("TRACE", &item.trace),
    ];
    for (name, op) in ops {
        if op.is_some() {
            m.push(name);
        }
    }
    if item.get.is_some() && item.head.is_none() {
        m.push("HEAD");
    }
    m.sort_unstable();
    m
}

/// Every operation of the HTTP surface, each declared once by its handler's `#[utoipa::path]`
/// and registered by its resource's `routes()`, next to it: the routes, and the OpenAPI
/// document ([`openapi`]) and the `Allow` table they make. Adding an endpoint to a resource is
/// its handler and its name in that module's `routes()`. The API's bodies are limited to
/// `max_body_bytes`; the local blob store's are streamed to disk, unlimited.
pub fn operations(max_body_bytes: usize) -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::with_openapi(base())
        .merge(slides::routes())
        .merge(jobs::routes())
        .merge(audit::routes())
        .merge(web::routes())
        .merge(session::routes())
        .merge(ops::routes())
        .merge(routes())
        .layer(DefaultBodyLimit::max(max_body_bytes));
    let blobs = blobs::routes().layer(DefaultBodyLimit::disable());
    api.merge(blobs).merge(ws::routes())
}

/// The methods each route takes, keyed by the route as axum matches it: the `Allow` of its 405.
pub fn allowed_methods() -> std::collections::BTreeMap<String, String> {
    methods_of(&operations(0).split_for_parts().1)
}

/// The document as served: axum's catch-all segments (`{*path}`) read as OpenAPI's (`{path}`).
pub fn spec() -> Value {
    static DOC: LazyLock<Value> = LazyLock::new(|| {
        let (_, doc) = operations(0).split_for_parts();
        let mut v = serde_json::to_value(doc).unwrap_or_default();
        if let Some(Value::Object(paths)) = v.get_mut("paths") {
            let renamed: serde_json::Map<String, Value> = std::mem::take(paths)
                .into_iter()
                .map(|(k, item)| (k.replace("{*", "{"), item))
                .collect();
            *paths = renamed;
        }
        v
    });
    DOC.clone()
}
/// This document's own endpoint.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(document))
}

#[utoipa::path(get, operation_id = "openapi", path = "/api/openapi.json", summary = "This document", security(),
    responses((status = 200, description = "OpenAPI", content_type = "application/json"), Limited))]
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

    /// Generated clients name their functions after `operationId`: each is there, and unique
    /// (the handlers' names are not: `slides::list`, `jobs::list`).
    #[test]
    fn every_operation_has_its_own_id() {
        let doc = super::spec();
        let mut seen = BTreeSet::new();
        for (path, item) in object(&doc["paths"]) {
            for (method, op) in object(&item) {
                let id = op["operationId"].as_str().unwrap_or_default().to_owned();
                assert!(!id.is_empty(), "{method} {path} has no operationId");
                assert!(seen.insert(id.clone()), "{method} {path}: operationId {id} is taken");
            }
        }
        assert_eq!(
            seen.len(),
            super::allowed_methods()
                .values()
                .map(|m| m.split(", ").filter(|m| *m != "HEAD").count())
                .sum::<usize>()
        );
    }

    #[test]
    fn statuses_and_kinds_come_from_their_types() {
        let doc = super::spec();
        let shown: Vec<&str> = mira_aggregates::JobStatus::SHOWN.iter().map(|s| s.as_str()).collect();
        // A job as shown is the read model's view and whether it waits for its admission.
        let job = &doc["components"]["schemas"]["Job"]["allOf"];
        assert_eq!(
            job[0]["properties"]["status"]["enum"],
            serde_json::json!(shown),
            "{job}"
        );
        assert!(job[0]["properties"].get("position").is_none(), "{job}");
        assert_eq!(
            job[1]["required"],
            serde_json::json!(["waiting_for_admission"]),
            "{job}"
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
