//! The canonical bytes that Mira's audit hashes and signatures cover.
//!
//! Every field is written as a 4-byte big-endian length followed by its bytes; integers are
//! 8-byte big-endian; UUIDs are their 16 raw bytes; text is UTF-8 exactly as stored. The first
//! field is a domain tag, so an event's bytes can never be read as a checkpoint's.
//!
//! * event: `hash = SHA-256(prev_hash ‖ event_bytes)`, with `prev_hash` = 32 zero bytes for
//!   the first event of an aggregate.
//! * checkpoint digest: `d = SHA-256(d_prev ‖ position ‖ event_id ‖ hash)` folded over every
//!   event in follow order, from 32 zero bytes at the start of the log; the signature is
//!   Ed25519 over the checkpoint bytes.
//!
//! `docs/audit/canonical-bytes.md` documents this for outside verifiers, and
//! `docs/audit/test-vectors.json` pins it (the tests below regenerate and compare).

use sha2::{Digest, Sha256};
use uuid::Uuid;

pub type Hash32 = [u8; 32];
pub const ZERO_HASH: Hash32 = [0u8; 32];

pub const EVENT_TAG: &[u8] = b"mira.event.v1";
pub const CHECKPOINT_TAG: &[u8] = b"mira.checkpoint.v1";
pub const EPOCH_TAG: &[u8] = b"mira.epoch.v1";

/// Size of one checkpoint leaf: position (8) ‖ event id (16) ‖ hash (32).
pub const LEAF_LEN: usize = 56;

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("a field over 4 GiB cannot be stored");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The envelope fields an event's hash covers (all of them but `hash` itself, the follow
/// cursor and `global_position`, which the database assigns; checkpoints cover those).
#[derive(Debug, Clone, Copy)]
pub struct CanonicalEvent<'a> {
    pub event_id: Uuid,
    pub tenant_id: &'a str,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: u64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    pub recorded_at_micros: i64,
    pub payload: &'a [u8],
    pub metadata: &'a [u8],
}

impl CanonicalEvent<'_> {
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.payload.len() + self.metadata.len() + self.aggregate_id.len());
        field(&mut out, EVENT_TAG);
        field(&mut out, self.event_id.as_bytes());
        field(&mut out, self.tenant_id.as_bytes());
        field(&mut out, self.aggregate_type.as_bytes());
        field(&mut out, self.aggregate_id.as_bytes());
        field(&mut out, &self.sequence.to_be_bytes());
        field(&mut out, self.event_type.as_bytes());
        field(&mut out, self.event_version.as_bytes());
        field(&mut out, &self.recorded_at_micros.to_be_bytes());
        field(&mut out, self.payload);
        field(&mut out, self.metadata);
        out
    }

    pub fn hash(&self, prev_hash: &Hash32) -> Hash32 {
        chain_hash(prev_hash, &self.bytes())
    }
}

/// `SHA-256(prev ‖ bytes)`.
pub fn chain_hash(prev: &Hash32, bytes: &[u8]) -> Hash32 {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(bytes);
    h.finalize().into()
}

/// One checkpoint leaf.
pub fn leaf(position: i64, event_id: Uuid, hash: &Hash32) -> [u8; LEAF_LEN] {
    let mut out = [0u8; LEAF_LEN];
    out[..8].copy_from_slice(&position.to_be_bytes());
    out[8..24].copy_from_slice(event_id.as_bytes());
    out[24..].copy_from_slice(hash);
    out
}

/// Folds leaves into the running checkpoint digest.
pub fn fold_leaves(mut digest: Hash32, leaves: &[u8]) -> Hash32 {
    for l in leaves.chunks(LEAF_LEN) {
        digest = chain_hash(&digest, l);
    }
    digest
}

/// The fields of a checkpoint that its signature covers.
#[derive(Debug, Clone, Copy)]
pub struct CanonicalCheckpoint {
    pub epoch: Uuid,
    pub seq: i64,
    pub created_at_micros: i64,
    pub upto_tx: i64,
    pub upto_position: i64,
    pub event_count: i64,
    pub prev_digest: Hash32,
    pub digest: Hash32,
}

impl CanonicalCheckpoint {
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(200);
        field(&mut out, CHECKPOINT_TAG);
        field(&mut out, self.epoch.as_bytes());
        for n in [
            self.seq,
            self.created_at_micros,
            self.upto_tx,
            self.upto_position,
            self.event_count,
        ] {
            field(&mut out, &n.to_be_bytes());
        }
        field(&mut out, &self.prev_digest);
        field(&mut out, &self.digest);
        out
    }
}

/// The fields of an epoch record that its signature covers: where an epoch of the log begins
/// (the first, or one started by `mira audit new-epoch` after a restore) and from which
/// checkpoint on every checkpoint of it is witnessed. `previous` is `None` for the log's first
/// epoch, written as an empty field.
#[derive(Debug, Clone, Copy)]
pub struct CanonicalEpoch<'a> {
    pub epoch: Uuid,
    pub previous: Option<Uuid>,
    /// The last checkpoint of the previous epoch this one continues (0: none).
    pub after_seq: i64,
    /// That checkpoint's digest (32 zero bytes: none).
    pub after_digest: Hash32,
    /// Every checkpoint numbered from here on is witnessed.
    pub witness_from: i64,
    pub created_at_micros: i64,
    pub reason: &'a str,
}

impl CanonicalEpoch<'_> {
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.reason.len());
        field(&mut out, EPOCH_TAG);
        field(&mut out, self.epoch.as_bytes());
        field(&mut out, self.previous.as_ref().map_or(&[][..], |p| p.as_bytes()));
        field(&mut out, &self.after_seq.to_be_bytes());
        field(&mut out, &self.after_digest);
        field(&mut out, &self.witness_from.to_be_bytes());
        field(&mut out, &self.created_at_micros.to_be_bytes());
        field(&mut out, self.reason.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const VECTORS: &str = include_str!("../../docs/audit/test-vectors.json");

    /// The published vectors: built from fixed inputs here, compared with the committed file.
    /// `MIRA_WRITE_VECTORS=1 cargo test -p mira-events` rewrites the file after a deliberate
    /// change of encoding (which also needs a new tag).
    fn vectors() -> Value {
        let eid = |n: u8| Uuid::from_bytes([n; 16]);
        let e1 = CanonicalEvent {
            event_id: eid(1),
            tenant_id: "lab-1",
            aggregate_type: "Job",
            aggregate_id: "0190d5a4-0000-7000-8000-000000000001",
            sequence: 1,
            event_type: "JobSubmitted",
            event_version: "2",
            recorded_at_micros: 1_767_225_600_000_000,
            payload: br#"{"type":"JobSubmitted","slide_id":"0190d5a4-0000-7000-8000-000000000002","kind":"wsi.preprocess","params":{},"max_attempts":3}"#,
            metadata: br#"{"actor":{"kind":"user","id":"u-1"},"correlation_id":"0190d5a4-0000-7000-8000-00000000000a","causation_id":"0190d5a4-0000-7000-8000-00000000000a","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#,
        };
        let h1 = e1.hash(&ZERO_HASH);
        let e2 = CanonicalEvent {
            event_id: eid(2),
            sequence: 2,
            event_type: "JobQueued",
            event_version: "1",
            recorded_at_micros: 1_767_225_600_000_001,
            payload: br#"{"type":"JobQueued","attempt":1}"#,
            ..e1
        };
        let h2 = e2.hash(&h1);
        let mut leaves = Vec::new();
        leaves.extend_from_slice(&leaf(1, eid(1), &h1));
        leaves.extend_from_slice(&leaf(2, eid(2), &h2));
        let digest = fold_leaves(ZERO_HASH, &leaves);
        let ck = CanonicalCheckpoint {
            epoch: Uuid::from_bytes([9; 16]),
            seq: 1,
            created_at_micros: 1_767_225_601_000_000,
            upto_tx: 750,
            upto_position: 2,
            event_count: 2,
            prev_digest: ZERO_HASH,
            digest,
        };
        let ep = CanonicalEpoch {
            epoch: Uuid::from_bytes([10; 16]),
            previous: Some(ck.epoch),
            after_seq: ck.seq,
            after_digest: ck.digest,
            witness_from: ck.seq + 1,
            created_at_micros: 1_767_225_700_000_000,
            reason: "restored to 2026-01-01T00:01:00Z",
        };
        let ev = |e: &CanonicalEvent, prev: &Hash32, h: &Hash32| {
            json!({
                "event_id": e.event_id.to_string(),
                "tenant_id": e.tenant_id,
                "aggregate_type": e.aggregate_type,
                "aggregate_id": e.aggregate_id,
                "sequence": e.sequence,
                "event_type": e.event_type,
                "event_version": e.event_version,
                "recorded_at_micros": e.recorded_at_micros,
                "payload": std::str::from_utf8(e.payload).unwrap(),
                "metadata": std::str::from_utf8(e.metadata).unwrap(),
                "prev_hash": hex::encode(prev),
                "canonical_bytes": hex::encode(e.bytes()),
                "hash": hex::encode(h),
            })
        };
        json!({
            "format": "mira audit test vectors v1",
            "events": [ev(&e1, &ZERO_HASH, &h1), ev(&e2, &h1, &h2)],
            "checkpoint": {
                "epoch": ck.epoch.to_string(),
                "seq": ck.seq,
                "created_at_micros": ck.created_at_micros,
                "upto_tx": ck.upto_tx,
                "upto_position": ck.upto_position,
                "event_count": ck.event_count,
                "leaves": hex::encode(&leaves),
                "prev_digest": hex::encode(ck.prev_digest),
                "digest": hex::encode(ck.digest),
                "canonical_bytes": hex::encode(ck.bytes()),
            },
            "epoch": {
                "epoch": ep.epoch.to_string(),
                "previous": ep.previous.map(|p| p.to_string()),
                "after_seq": ep.after_seq,
                "after_digest": hex::encode(ep.after_digest),
                "witness_from": ep.witness_from,
                "created_at_micros": ep.created_at_micros,
                "reason": ep.reason,
                "canonical_bytes": hex::encode(ep.bytes()),
            }
        })
    }

    #[test]
    fn published_vectors_match_the_encoding() {
        let now = vectors();
        if std::env::var_os("MIRA_WRITE_VECTORS").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/audit/test-vectors.json");
            std::fs::write(path, serde_json::to_string_pretty(&now).unwrap() + "\n").unwrap();
            return;
        }
        let published: Value = serde_json::from_str(VECTORS).expect("vectors file is JSON");
        assert_eq!(
            published, now,
            "the canonical encoding drifted from the published vectors"
        );
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = CanonicalEvent {
            event_id: Uuid::nil(),
            tenant_id: "t",
            aggregate_type: "Job",
            aggregate_id: "a",
            sequence: 1,
            event_type: "X",
            event_version: "1",
            recorded_at_micros: 0,
            payload: b"{}",
            metadata: b"{}",
        };
        let h = base.hash(&ZERO_HASH);
        let variants = [
            CanonicalEvent {
                event_id: Uuid::max(),
                ..base
            },
            CanonicalEvent { tenant_id: "u", ..base },
            CanonicalEvent {
                aggregate_type: "Slide",
                ..base
            },
            CanonicalEvent {
                aggregate_id: "b",
                ..base
            },
            CanonicalEvent { sequence: 2, ..base },
            CanonicalEvent {
                event_type: "Y",
                ..base
            },
            CanonicalEvent {
                event_version: "2",
                ..base
            },
            CanonicalEvent {
                recorded_at_micros: 1,
                ..base
            },
            CanonicalEvent {
                payload: b"{ }",
                ..base
            },
            CanonicalEvent {
                metadata: b"{ }",
                ..base
            },
            // Moving a byte across a field boundary must change the bytes too.
            CanonicalEvent {
                event_type: "X1",
                event_version: "",
                ..base
            },
        ];
        for v in variants {
            assert_ne!(v.hash(&ZERO_HASH), h, "{v:?}");
        }
        assert_ne!(base.hash(&[1; 32]), h);
    }
}
