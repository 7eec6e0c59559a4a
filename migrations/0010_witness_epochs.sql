-- Epochs of the log after its first (DESIGN §4.3, ADR 0019). A point-in-time restore repeats
-- checkpoint numbers with other contents; the witness refuses them (its records are written
-- once) until an operator starts a new epoch with `mira audit new-epoch --reason TEXT`, which
-- writes the signed epoch record to the witness first and then this row. The log's current
-- epoch is the newest row here, or `log_epoch`'s when there is none.
CREATE TABLE log_epochs (
    n             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    epoch         uuid NOT NULL UNIQUE,
    previous      uuid NOT NULL,
    after_seq     bigint NOT NULL CHECK (after_seq >= 0),
    after_digest  bytea NOT NULL CHECK (length(after_digest) = 32),
    witness_from  bigint NOT NULL CHECK (witness_from >= 1),
    created_at    timestamptz NOT NULL,
    reason        text NOT NULL CHECK (reason <> ''),
    key_id        text NOT NULL,
    signature     bytea NOT NULL CHECK (length(signature) = 64)
);

CREATE TRIGGER log_epochs_append_only BEFORE UPDATE OR DELETE ON log_epochs
    FOR EACH ROW EXECUTE FUNCTION mira_refuse_log_change();
CREATE TRIGGER log_epochs_no_truncate BEFORE TRUNCATE ON log_epochs
    FOR EACH STATEMENT EXECUTE FUNCTION mira_refuse_log_change();

REVOKE ALL ON log_epochs FROM PUBLIC;
GRANT SELECT, INSERT ON log_epochs TO mira_app;

-- The per-job check finds the checkpoint covering an event by its cursor.
CREATE INDEX checkpoints_upto_idx ON checkpoints (upto_tx, upto_position);
