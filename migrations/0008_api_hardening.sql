-- Hardening the API (issue: uploads, stored requests, an outside fuzzer).
--
-- 1. `api_idempotency` kept an unsalted SHA-256 of request bodies that carry patient data (a
--    slide's name), forever. It now keeps an HMAC under a key from the keyring, and rows
--    expire after Api__IdempotencyRetentionHours. The old rows are deleted here: an unsalted
--    hash of a short name is as good as the name.
-- 2. Every table with a tenant_id is under forced row-level security, the log itself excepted
--    (the relay, verify and the projector read it across tenants; the audit API's one read of
--    it filters by tenant). The API works as `mira_api` with `mira.tenant_id` set and sees its
--    tenant's rows only; the roles that work across tenants have explicit policies.
-- 3. The audit API reads a tenant's events by position: an index for it.

DELETE FROM api_idempotency;
ALTER TABLE api_idempotency RENAME COLUMN request_sha256 TO request_hmac;

ALTER TABLE api_idempotency ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_idempotency FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_idempotency TO mira_api
    USING (tenant_id = mira_tenant()) WITH CHECK (tenant_id = mira_tenant());
-- The sweeper that removes expired rows.
CREATE POLICY across_tenants ON api_idempotency TO mira_app USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE ON api_idempotency TO mira_api;

ALTER TABLE handler_waiting ENABLE ROW LEVEL SECURITY;
ALTER TABLE handler_waiting FORCE ROW LEVEL SECURITY;
-- The lifecycle handlers act on every tenant's events.
CREATE POLICY across_tenants ON handler_waiting TO mira_app USING (true) WITH CHECK (true);

CREATE INDEX events_tenant_position_idx ON events (tenant_id, global_position);
