//! `mira audit export`: the log as JSON Lines that an outside party can re-verify with only
//! the export and the public audit key (`tools/verify_export.py` does exactly that).
//!
//! Line 1 is a header; then every event in follow order (payload and metadata as the exact
//! stored text, hashes in hex); then every checkpoint with its leaves and signature.
//!
//! A tenant's export (`GET /api/audit/export`, ADR 0033) holds that tenant's events only, and
//! every checkpoint with all its leaves: a leaf is a position, an event id and a hash, so the
//! signed digests can be re-folded, and other tenants' leaves show how many events they had and
//! when, never what. The header names the tenant.

use std::io::Write;

use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use serde_json::json;
use sqlx::PgPool;

use mira_events::TenantId;

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

/// Where an export's lines go, a chunk at a time.
#[allow(async_fn_in_trait)]
pub trait Sink {
    async fn put(&mut self, chunk: Vec<u8>) -> std::io::Result<()>;
}

impl<W: Write + ?Sized> Sink for &mut W {
    async fn put(&mut self, chunk: Vec<u8>) -> std::io::Result<()> {
        self.write_all(&chunk)
    }
}

/// An HTTP body's chunks: a closed receiver (the client went away) stops the export.
impl Sink for tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>> {
    async fn put(&mut self, chunk: Vec<u8>) -> std::io::Result<()> {
        self.send(Ok(chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the reader of the export went away"))
    }
}

/// Which events an export holds.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// One tenant's events only (every checkpoint is still written whole).
    pub tenant: Option<TenantId>,
}

/// Writes events recorded in `[from, to]` (each bound optional) and every checkpoint.
pub async fn export(
    pool: &PgPool,
    key: &VerifyingKey,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    mut out: &mut dyn Write,
) -> Result<ExportSummary, ExportError> {
    let summary = export_to(pool, key, &Scope { from, to, tenant: None }, &mut out).await?;
    out.flush()?;
    Ok(summary)
}

/// Writes the export of `scope` to `out`, a batch of lines at a time.
pub async fn export_to<S: Sink>(
    pool: &PgPool,
    key: &VerifyingKey,
    scope: &Scope,
    out: &mut S,
) -> Result<ExportSummary, ExportError> {
    let (from, to) = (scope.from, scope.to);
    // The current epoch; each checkpoint line carries the epoch it was signed in.
    let epoch = checkpoint::db_epochs(pool).await?.pop().expect("a first epoch").epoch;
    let header = json!({
        "kind": "header",
        "format": "mira.audit.export.v1",
        "epoch": epoch,
        "public_key": hex::encode(key.as_bytes()),
        "from": from,
        "to": to,
        "tenant": scope.tenant.as_ref().map(|t| t.as_str()),
        "complete": from.is_none() && to.is_none(),
    });
    out.put(format!("{header}\n").into_bytes()).await?;
    let wm = watermark(pool).await?;
    let mut cursor = Cursor::START;
    let mut events = 0;
    loop {
        let batch = read_below(pool, cursor, wm, 5_000).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor();
        let mut chunk = Vec::new();
        for e in batch {
            if from.is_some_and(|f| e.recorded_at < f)
                || to.is_some_and(|t| e.recorded_at > t)
                || scope.tenant.as_ref().is_some_and(|t| t.as_str() != e.tenant_id)
            {
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
            writeln!(chunk, "{line}")?;
            events += 1;
        }
        out.put(chunk).await?;
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
        out.put(format!("{line}\n").into_bytes()).await?;
    }
    Ok(ExportSummary { events, checkpoints })
}
