-- STAT jobs (issue 33, ADR 0027): a job's priority, `stat` or `routine`, is a read-model
-- column as the API shows it. Rows written before it are routine, as their events read
-- (the upcasters of JobSubmitted 2 and JobQueued 1). The release before ignores the column.

ALTER TABLE rm.jobs ADD COLUMN priority text NOT NULL DEFAULT 'routine';

-- Rebuilds make their tables through mira_create_read_models (as 0009 arranged): the tables
-- as 0009 left them, then this change.
ALTER FUNCTION mira_create_read_models(text) RENAME TO mira_create_read_models_0009;

CREATE FUNCTION mira_create_read_models(s text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mira_create_read_models_0009(s);
    EXECUTE format('ALTER TABLE %I.jobs ADD COLUMN priority text NOT NULL DEFAULT ''routine''', s);
END
$$;
