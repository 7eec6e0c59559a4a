//! A succeeded job's result layers served as DeepZoom (ADR 0036): `{layer}.dzi` from the
//! manifest, and each tile `{layer}_files/{level}/{col}_{row}.jpeg` as stored in the layer's
//! one object, found through the level's tile index (read once, with one ranged read, where the
//! manifest says it lies) and read with one ranged read more. No TIFF is parsed at request time,
//! and nothing is signed: the bytes come through the gateway, for the caller's own tenant only.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use mira_aggregates::JobStatus;
use mira_events::JobId;

use super::auth::Identity;
use super::extract::parse_id;
use super::layercache::{JobLayers, TileIndex};
use super::problem::{ApiError, ApiResult, Problem, ReadsOne};
use super::state::{AppState, READERS};

/// A succeeded job of the caller's tenant: its id, attempt and results prefix. Only the
/// succeeded attempt's prefix is reachable, so objects of a failed attempt are never served.
pub async fn succeeded_results(state: &AppState, who: &Identity, raw: &str) -> ApiResult<(JobId, u32, String)> {
    let id = parse_id(raw, "job", JobId::parse)?;
    let row = state
        .read
        .job(&who.tenant, id.as_uuid())
        .await?
        .ok_or(ApiError::not_found("job"))?;
    let manifest = row
        .manifest_key
        .as_deref()
        .filter(|_| row.status == JobStatus::Succeeded)
        .ok_or_else(|| ApiError::conflict(format!("the job is {}: it has no results", row.status.as_str())))?;
    // The log refuses a manifest outside the job's own attempt prefix; a read model is checked
    // again all the same, so nothing outside the job is ever served.
    let attempt = u32::try_from(row.attempt).unwrap_or(0);
    if manifest != mira_aggregates::manifest_key(&who.tenant, id, attempt) {
        tracing::error!(job_id = %id, manifest, "a succeeded job names a manifest outside its attempt's prefix");
        return Err(ApiError::not_found("job results"));
    }
    Ok((id, attempt, mira_aggregates::results_prefix(&who.tenant, id, attempt)))
}

/// What a layer path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked<'a> {
    Dzi(&'a str),
    Tile {
        layer: &'a str,
        level: u32,
        col: u32,
        row: u32,
    },
}

fn parse_path(path: &str) -> Option<Asked<'_>> {
    let name_ok = |n: &str| (1..=32).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if let Some(layer) = path.strip_suffix(".dzi") {
        return name_ok(layer).then_some(Asked::Dzi(layer));
    }
    let (layer, rest) = path.split_once("_files/")?;
    let (level, file) = rest.split_once('/')?;
    let (col, row) = file.strip_suffix(".jpeg")?.split_once('_')?;
    let num = |s: &str| {
        (!s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    (name_ok(layer)).then_some(())?;
    Some(Asked::Tile {
        layer,
        level: num(level)?,
        col: num(col)?,
        row: num(row)?,
    })
}

/// `GET /api/jobs/{id}/layers/{path}`.
#[utoipa::path(get, operation_id = "job_layer", path = "/api/jobs/{id}/layers/{*path}",
    summary = "A result layer as DeepZoom: `{layer}.dzi`, and `{layer}_files/{level}/{col}_{row}.jpeg` tiles (256 pixels, no overlap, edge tiles padded to 256) read from the layer's one object",
    description = "`{layer}` is one the job's manifest lists (`slide`, and `normalized` for a stain-normalised job). \
        Results stored before layers (manifest format_version 1) are DeepZoom trees under `/api/jobs/{id}/results/`; \
        for them this answers 404.",
    params(("id" = uuid::Uuid, Path),
           ("path" = String, Path, pattern = "^[a-z_]{1,32}(\\.dzi|_files/[0-9]{1,9}/[0-9]{1,9}_[0-9]{1,9}\\.jpeg)$",
            description = "`{layer}.dzi` or `{layer}_files/{level}/{col}_{row}.jpeg`; anything else is a 400.")),
    responses((status = 200, description = "The `.dzi` (application/xml) or a tile (image/jpeg)", content(
                  (String = "application/xml"), (Vec<u8> = "image/jpeg"))),
              (status = 409, response = inline(Problem)), ReadsOne))]
pub async fn layer(
    State(state): State<AppState>,
    who: Identity,
    Path((raw, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    who.require(READERS)?;
    let asked = parse_path(&path).ok_or_else(|| {
        ApiError::bad_request("not a layer path: {layer}.dzi or {layer}_files/{level}/{col}_{row}.jpeg")
    })?;
    let (id, attempt, prefix) = succeeded_results(&state, &who, &raw).await?;
    let job = job_layers(&state, &who, id, attempt, prefix).await?;
    let name = match &asked {
        Asked::Dzi(l) | Asked::Tile { layer: l, .. } => *l,
    };
    let entry = job.layers.get(name).ok_or_else(|| ApiError::not_found("layer"))?;
    match asked {
        Asked::Dzi(_) => Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"))],
            entry.dzi(),
        )
            .into_response()),
        Asked::Tile { level, col, row, .. } => {
            let place = entry.deepzoom_level(level).ok_or_else(|| ApiError::not_found("tile"))?;
            if col >= place.columns || row >= place.rows {
                return Err(ApiError::not_found("tile"));
            }
            let ifd = entry.levels.len() - 1 - level as usize;
            let key = format!("{}{}", job.prefix, entry.key);
            let index = match job.index(name, ifd) {
                Some(i) => i,
                None => {
                    let n = place.tiles();
                    let read = |at: u64| {
                        let (state, key) = (state.clone(), key.clone());
                        async move {
                            let bytes = state
                                .blobs
                                .read_result_range(&key, at, n * 8)
                                .await
                                .map_err(ApiError::internal)?
                                .ok_or_else(|| ApiError::internal(format!("the layer {key} is missing")))?;
                            Ok::<_, ApiError>(
                                bytes
                                    .chunks_exact(8)
                                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                                    .collect::<Vec<u64>>(),
                            )
                        }
                    };
                    let (offsets, byte_counts) = tokio::try_join!(read(place.offsets_at), read(place.byte_counts_at))?;
                    let i = Arc::new(TileIndex { offsets, byte_counts });
                    job.keep_index(name, ifd, i.clone());
                    i
                }
            };
            let k = row as usize * place.columns as usize + col as usize;
            let (at, n) = (index.offsets[k], index.byte_counts[k]);
            // The index came from the worker's process: a tile is read only inside the layer.
            if at.checked_add(n).is_none_or(|end| end > entry.bytes) || n == 0 || n > 16 << 20 {
                tracing::error!(job_id = %id, layer = name, level, col, row, at, n, "a layer's tile index points outside it");
                return Err(ApiError::internal("the layer's tile index is damaged"));
            }
            let tile = state
                .blobs
                .read_result_range(&key, at, n)
                .await
                .map_err(ApiError::internal)?
                .ok_or_else(|| ApiError::internal(format!("the layer {key} is missing")))?;
            Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"))], tile).into_response())
        }
    }
}

/// The job's layers, from the cache or its manifest.
async fn job_layers(
    state: &AppState,
    who: &Identity,
    id: JobId,
    attempt: u32,
    prefix: String,
) -> ApiResult<Arc<JobLayers>> {
    let key = (who.tenant.as_str().to_owned(), id.as_uuid(), attempt);
    if let Some(j) = state.layers.get(&key) {
        return Ok(j);
    }
    #[derive(serde::Deserialize)]
    struct Layers {
        #[serde(default)]
        layers: std::collections::BTreeMap<String, mira_blobs::layers::LayerEntry>,
    }
    let manifest_key = mira_aggregates::manifest_key(&who.tenant, id, attempt);
    let bytes = state
        .blobs
        .read_result(&manifest_key)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::internal(format!("the manifest {manifest_key} is missing")))?;
    let parsed: Layers = serde_json::from_slice(&bytes).map_err(ApiError::internal)?;
    let job = Arc::new(JobLayers::new(prefix, parsed.layers));
    state.layers.keep(key, job.clone());
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_are_read_strictly() {
        assert_eq!(parse_path("slide.dzi"), Some(Asked::Dzi("slide")));
        assert_eq!(
            parse_path("normalized_files/12/3_4.jpeg"),
            Some(Asked::Tile {
                layer: "normalized",
                level: 12,
                col: 3,
                row: 4
            })
        );
        // Whatever the documented pattern allows is read (the API fuzzer sends such paths).
        for fine in [
            "a.dzi",
            "abc_files.dzi",
            "_files_files/1/2_3.jpeg",
            "a_files/000000000/0_999999999.jpeg",
            "abcdefghijklmnopqrstuvwxyz_abcde.dzi",
        ] {
            assert!(parse_path(fine).is_some(), "{fine}");
        }
        for bad in [
            ".dzi",
            "abcdefghijklmnopqrstuvwxyz_abcdef.dzi",
            "../slide.dzi",
            "slide_files/12/3_4.png",
            "slide_files/12/3_4_5.jpeg",
            "slide_files/-1/0_0.jpeg",
            "slide_files/1/0_0.jpeg/x",
            "slide_files/99999999999/0_0.jpeg",
            "Slide.dzi",
            "slide_files/1/+1_0.jpeg",
        ] {
            assert_eq!(parse_path(bad), None, "{bad}");
        }
    }
}
