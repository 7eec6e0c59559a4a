//! `mira audit export`: the log as JSON Lines that an outside party can re-verify with only
//! the export and the public audit key (`tools/verify_export.py` does exactly that).
//!
//! Line 1 is a header; then every event in follow order (payload and metadata as the exact
//! stored text, hashes in hex); then every checkpoint with its leaves and signature.

use std::io::Write;

use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use serde_json::json;
use sqlx::PgPool;

use crate::checkpoint;
use crate::store::{read_below, watermark, Cursor};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("database error while exporting: {0}")]
    Db(#[from] sqlx::Error),
    #[error("writing the export failed: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    pub events: u64,
    pub checkpoints: u64,
}

/// Writes events recorded in `[from, to]` (each bound optional) and every checkpoint.
pub async fn export(
    pool: &PgPool,
    key: &VerifyingKey,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    out: &mut dyn Write,
) -> Result<ExportSummary, ExportError> {
    // The current epoch; each checkpoint line carries the epoch it was signed in.
    let epoch = checkpoint::db_epochs(pool).await?.pop().expect("a first epoch").epoch;
    let header = json!({
        "kind": "header",
        "format": "mira.audit.export.v1",
        "epoch": epoch,
        "public_key": hex::encode(key.as_bytes()),
        "from": from,
        "to": to,
        "complete": from.is_none() && to.is_none(),
    });
    writeln!(out, "{header}")?;
    let wm = watermark(pool).await?;
    let mut cursor = Cursor::START;
    let mut events = 0;
    loop {
        let batch = read_below(pool, cursor, wm, 5_000).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor();
        for e in batch {
            if from.is_some_and(|f| e.recorded_at < f) || to.is_some_and(|t| e.recorded_at > t) {
                continue;
            }
            let line = json!({
                "kind": "event",
                "global_position": e.global_position,
                "tx_id": e.tx_id,
                "event_id": e.event_id,
                "tenant_id": e.tenant_id,
                "aggregate_type": e.aggregate_type,
                "aggregate_id": e.aggregate_id,
                "sequence": e.sequence,
                "event_type": e.event_type,
                "event_version": e.event_version,
                "recorded_at": e.recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "recorded_at_micros": e.recorded_at.timestamp_micros(),
                "payload": e.payload,
                "metadata": e.metadata,
                "prev_hash": hex::encode(e.prev_hash),
                "hash": hex::encode(e.hash),
            });
            writeln!(out, "{line}")?;
            events += 1;
        }
    }
    let mut headers = checkpoint::Headers::all(pool);
    let mut checkpoints = 0u64;
    while let Some(c) = headers.next().await? {
        checkpoints += 1;
        let leaves = checkpoint::load_leaves(pool, c.seq).await?;
        let line = json!({
            "kind": "checkpoint",
            "seq": c.seq,
            "epoch": c.epoch,
            "created_at_micros": c.created_at.timestamp_micros(),
            "upto_tx": c.upto.tx_id,
            "upto_position": c.upto.position,
            "event_count": c.event_count,
            "prev_digest": hex::encode(c.prev_digest),
            "digest": hex::encode(c.digest),
            "leaves": hex::encode(&leaves),
            "key_id": c.key_id,
            "signature": hex::encode(c.signature),
        });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(ExportSummary { events, checkpoints })
}
