-- The gateway's idempotency keys (DESIGN §7): `Idempotency-Key` on POST /api/jobs and
-- POST /api/slides. A key belongs to one user of one tenant and one endpoint. It maps the
-- request's SHA-256 to the id of the resource it creates; the resource itself lives in the
-- log. The row is written before the command, so a crash between the two is healed by the
-- retry: it finds the row and runs the command for the same id again.
CREATE TABLE api_idempotency (
    tenant_id      text NOT NULL,
    subject        text NOT NULL,
    scope          text NOT NULL,
    key            text NOT NULL,
    request_sha256 text NOT NULL,
    resource_id    uuid NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, subject, scope, key)
);
CREATE INDEX ON api_idempotency (created_at);

GRANT SELECT, INSERT, DELETE ON api_idempotency TO mira_app;
