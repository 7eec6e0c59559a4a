-- Mira's event log: the single source of truth (DESIGN §4).
--
-- * `events` is append-only. Triggers refuse UPDATE, DELETE and TRUNCATE for everyone,
--   the owner included; the application role `mira_app` is granted SELECT and INSERT only.
-- * `payload` and `metadata` are `text`, stored byte-exact: the hash covers these bytes.
-- * `tx_id` is the writing transaction's id. Followers read by (tx_id, global_position)
--   and only below pg_snapshot_xmin(pg_current_snapshot()), so an event that commits late
--   can never be skipped.

DO $$
BEGIN
    CREATE ROLE mira_app NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL; -- roles are cluster-wide: another database (or a concurrent migration) made it
END
$$;

CREATE TABLE log_epoch (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch      uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO log_epoch (epoch) VALUES (gen_random_uuid());

CREATE TABLE events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx_id           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id        uuid NOT NULL,
    tenant_id       text NOT NULL CHECK (tenant_id ~ '^[a-z0-9-]{1,64}$'),
    aggregate_type  text NOT NULL,
    aggregate_id    text NOT NULL,
    sequence        bigint NOT NULL CHECK (sequence >= 1),
    event_type      text NOT NULL,
    event_version   text NOT NULL,
    recorded_at     timestamptz NOT NULL,
    payload         text NOT NULL,
    metadata        text NOT NULL,
    prev_hash       bytea NOT NULL CHECK (length(prev_hash) = 32),
    hash            bytea NOT NULL CHECK (length(hash) = 32),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_sequence_key UNIQUE (aggregate_type, aggregate_id, sequence)
);

CREATE INDEX events_follow_idx ON events (tx_id, global_position);
CREATE INDEX events_recorded_at_idx ON events (recorded_at);

-- Signed checkpoints (DESIGN §4.3). `leaves` holds, for every event since the previous
-- checkpoint in follow order, position (8 bytes) ‖ event id (16) ‖ hash (32).
CREATE TABLE checkpoints (
    seq           bigint PRIMARY KEY CHECK (seq >= 1),
    epoch         uuid NOT NULL,
    created_at    timestamptz NOT NULL,
    upto_tx       xid8 NOT NULL,
    upto_position bigint NOT NULL,
    event_count   bigint NOT NULL,
    prev_digest   bytea NOT NULL CHECK (length(prev_digest) = 32),
    digest        bytea NOT NULL CHECK (length(digest) = 32),
    leaves        bytea NOT NULL,
    key_id        text NOT NULL,
    signature     bytea NOT NULL CHECK (length(signature) = 64)
);

CREATE FUNCTION mira_refuse_log_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION mira_refuse_log_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION mira_refuse_log_change();
CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON checkpoints
    FOR EACH ROW EXECUTE FUNCTION mira_refuse_log_change();
CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION mira_refuse_log_change();
CREATE TRIGGER log_epoch_append_only BEFORE UPDATE OR DELETE ON log_epoch
    FOR EACH ROW EXECUTE FUNCTION mira_refuse_log_change();
CREATE TRIGGER log_epoch_no_truncate BEFORE TRUNCATE ON log_epoch
    FOR EACH STATEMENT EXECUTE FUNCTION mira_refuse_log_change();

REVOKE ALL ON events, checkpoints, log_epoch FROM PUBLIC;
GRANT SELECT, INSERT ON events, checkpoints TO mira_app;
GRANT SELECT ON log_epoch TO mira_app;
