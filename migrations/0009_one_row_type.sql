-- A job's progress is one column, `progress` ({"done": n, "total": n} or null), as the API
-- shows it: the read-model row and the API's JSON are the same type (projections::views,
-- ADR 0015), so a column is named once.

ALTER TABLE rm.jobs ADD COLUMN progress jsonb;
UPDATE rm.jobs SET progress = jsonb_build_object('done', coalesce(progress_done, 0), 'total', progress_total)
    WHERE progress_total IS NOT NULL;
ALTER TABLE rm.jobs DROP COLUMN progress_done, DROP COLUMN progress_total;

-- Rebuilds create their tables through mira_create_read_models: it now makes the tables as
-- migration 0003 did and then changes them as this migration changes `rm`, so the statement of
-- each change is written once per migration and the tables of 0003 are not copied here.
ALTER FUNCTION mira_create_read_models(text) RENAME TO mira_create_read_models_0003;

CREATE FUNCTION mira_create_read_models(s text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mira_create_read_models_0003(s);
    EXECUTE format('ALTER TABLE %I.jobs ADD COLUMN progress jsonb, DROP COLUMN progress_done, DROP COLUMN progress_total', s);
END
$$;
