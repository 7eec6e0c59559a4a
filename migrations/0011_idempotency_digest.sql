-- Idempotency rows are keyed by a digest of (tenant, subject, endpoint, key), not by the four
-- values: a token's `sub` may be thousands of characters long, and a primary key holding it
-- passed the index's row size limit (a 500 for that caller). Each part is length-prefixed,
-- so no two different tuples share a digest input. The gateway computes the same digest
-- (gateway/src/api/idempotency.rs, `key_digest`).
ALTER TABLE api_idempotency ADD COLUMN key_digest bytea;
UPDATE api_idempotency SET key_digest = sha256(convert_to(
    'mira.idempotency-key.v1' || E'\n'
    || octet_length(tenant_id) || ':' || tenant_id || E'\n'
    || octet_length(subject) || ':' || subject || E'\n'
    || octet_length(scope) || ':' || scope || E'\n'
    || octet_length(key) || ':' || key || E'\n', 'UTF8'));
ALTER TABLE api_idempotency ALTER COLUMN key_digest SET NOT NULL;
ALTER TABLE api_idempotency DROP CONSTRAINT api_idempotency_pkey;
ALTER TABLE api_idempotency ADD PRIMARY KEY (tenant_id, key_digest);
