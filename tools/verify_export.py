#!/usr/bin/env python3
"""Re-verifies a `mira audit export` with nothing but the export and the public audit key.

    python3 tools/verify_export.py EXPORT.jsonl PUBLIC_KEY_HEX_OR_FILE

It is written from docs/audit/canonical-bytes.md alone (hashlib and `cryptography`), so an
outside party can check Mira's log without trusting Mira's code. Exit 0: intact; exit 1: the
first problem found is printed.
"""
import hashlib
import json
import os
import struct
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ZERO = bytes(32)
LEAF = 56


def field(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def i64(n: int) -> bytes:
    return struct.pack(">q", n)


def uuid_bytes(u: str) -> bytes:
    return bytes.fromhex(u.replace("-", ""))


def event_bytes(e: dict) -> bytes:
    return b"".join(
        [
            field(b"mira.event.v1"),
            field(uuid_bytes(e["event_id"])),
            field(e["tenant_id"].encode()),
            field(e["aggregate_type"].encode()),
            field(e["aggregate_id"].encode()),
            field(struct.pack(">Q", e["sequence"])),
            field(e["event_type"].encode()),
            field(e["event_version"].encode()),
            field(i64(e["recorded_at_micros"])),
            field(e["payload"].encode()),
            field(e["metadata"].encode()),
        ]
    )


def checkpoint_bytes(c: dict) -> bytes:
    parts = [field(b"mira.checkpoint.v1"), field(uuid_bytes(c["epoch"]))]
    for k in ("seq", "created_at_micros", "upto_tx", "upto_position", "event_count"):
        parts.append(field(i64(c[k])))
    parts.append(field(bytes.fromhex(c["prev_digest"])))
    parts.append(field(bytes.fromhex(c["digest"])))
    return b"".join(parts)


def sha(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def fail(msg: str) -> None:
    print(f"FAIL: {msg}")
    sys.exit(1)


def main() -> None:
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    key_arg = sys.argv[2]
    key_hex = open(key_arg).read().strip() if os.path.exists(key_arg) else key_arg
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))

    header, events, checkpoints = None, [], []
    with open(sys.argv[1]) as f:
        for n, line in enumerate(f, 1):
            rec = json.loads(line)
            kind = rec.get("kind")
            if kind == "header":
                header = rec
            elif kind == "event":
                events.append(rec)
            elif kind == "checkpoint":
                checkpoints.append(rec)
            else:
                fail(f"line {n}: unknown record kind {kind!r}")
    if header is None or header.get("format") != "mira.audit.export.v1":
        fail("missing or unknown header")
    tenant = header.get("tenant")
    if header["public_key"] != key_hex:
        print("note: the export names another public key than the one given; using the one given")

    # 1. Every event's hash, and every chain link the export contains.
    by_stream = {}
    for e in events:
        if tenant is not None and e["tenant_id"] != tenant:
            fail(f"event at position {e['global_position']} (id {e['event_id']}): of tenant {e['tenant_id']!r} in {tenant!r}'s export")
        prev = bytes.fromhex(e["prev_hash"])
        if sha(prev, event_bytes(e)).hex() != e["hash"]:
            fail(f"event at position {e['global_position']} (id {e['event_id']}): hash mismatch")
        k = (e["aggregate_type"], e["aggregate_id"])
        last = by_stream.get(k)
        if last is not None:
            if e["sequence"] != last["sequence"] + 1 or prev.hex() != last["hash"]:
                fail(f"event at position {e['global_position']} (id {e['event_id']}): chain broken")
        elif e["sequence"] == 1 and prev != ZERO:
            fail(f"event at position {e['global_position']} (id {e['event_id']}): first event with a prev_hash")
        elif header["complete"] and e["sequence"] != 1:
            fail(f"event at position {e['global_position']} (id {e['event_id']}): stream starts at {e['sequence']}")
        by_stream[k] = e

    # 2. Checkpoints: signatures, the digest chain, and the leaves against the events.
    by_pos = {e["global_position"]: e for e in events}
    covered_positions = set()
    digest = ZERO
    count = 0
    for i, c in enumerate(checkpoints, 1):
        if c["seq"] != i:
            fail(f"checkpoint {c['seq']}: expected checkpoint {i}")
        try:
            key.verify(bytes.fromhex(c["signature"]), checkpoint_bytes(c))
        except InvalidSignature:
            fail(f"checkpoint {c['seq']}: bad signature")
        if bytes.fromhex(c["prev_digest"]) != digest:
            fail(f"checkpoint {c['seq']}: does not continue the previous checkpoint")
        leaves = bytes.fromhex(c["leaves"])
        if len(leaves) % LEAF:
            fail(f"checkpoint {c['seq']}: malformed leaves")
        for j in range(0, len(leaves), LEAF):
            leaf = leaves[j : j + LEAF]
            digest = sha(digest, leaf)
            count += 1
            pos = struct.unpack(">q", leaf[:8])[0]
            covered_positions.add(pos)
            eid, h = leaf[8:24].hex(), leaf[24:].hex()
            e = by_pos.get(pos)
            if e is None:
                # A tenant's export holds its own events: the other leaves are other tenants'.
                if header["complete"] and tenant is None:
                    fail(f"event at position {pos} (id {eid}): covered by checkpoint {c['seq']} but missing")
                continue
            if e["event_id"].replace("-", "") != eid or e["hash"] != h:
                fail(f"event at position {pos} (id {e['event_id']}): differs from checkpoint {c['seq']}")
        if digest.hex() != c["digest"] or count != c["event_count"]:
            fail(f"checkpoint {c['seq']}: leaves do not match the signed digest")

    covered = sum(1 for e in events if e["global_position"] in covered_positions)
    print(
        f"OK: {len(events)} events, {len(checkpoints)} checkpoints verified "
        f"({covered} of the events under a signed checkpoint)"
        + (f"; tenant {tenant}'s export" if tenant is not None else "")
    )


if __name__ == "__main__":
    main()
