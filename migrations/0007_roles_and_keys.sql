-- The processes connect as a login role that owns nothing (DESIGN §2, §4.3; ADR 0012).
--
-- `mira migrate` runs as the owner (Database__MigrationUrl) and grants the runtime roles
-- (mira_app, mira_api, mira_projector) to the role in DATABASE_URL. That role cannot alter,
-- disable or drop the log's triggers, and holds only SELECT and INSERT on the log.
--
-- What used to need the owner at run time goes through the functions below, which run as the
-- owner (SECURITY DEFINER) and do one fixed thing each:
-- * the read-model rebuild's schema work: create `rm_rebuild`, swap it for `rm`, drop what a
--   rebuild leaves behind;
-- * nothing else: the log's tables have no such function.
--
-- Also: `data_keys`, the KMS-wrapped per-subject data keys (AWS__KMS__KeyId). Erasure deletes
-- a subject's row; the plaintext key never reaches the database.

-- Drops what an interrupted rebuild left and creates an empty `rm_rebuild`.
CREATE FUNCTION mira_rebuild_prepare() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    EXECUTE 'DROP SCHEMA IF EXISTS rm_rebuild CASCADE';
    PERFORM mira_create_read_models('rm_rebuild');
END
$$;

-- Renames `rm` away and `rm_rebuild` to `rm`, in the caller's transaction; returns the retired
-- schema's name for mira_rebuild_drop after the commit.
CREATE FUNCTION mira_rebuild_swap() RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    retired text := 'rm_retired_' || replace(gen_random_uuid()::text, '-', '');
BEGIN
    EXECUTE format('ALTER SCHEMA rm RENAME TO %I', retired);
    EXECUTE 'ALTER SCHEMA rm_rebuild RENAME TO rm';
    RETURN retired;
END
$$;

-- Drops a retired read-model schema, or `rm_rebuild`; nothing else.
CREATE FUNCTION mira_rebuild_drop(s text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF s <> 'rm_rebuild' AND s !~ '^rm_retired_[0-9a-f]{32}$' THEN
        RAISE EXCEPTION 'mira_rebuild_drop drops rm_rebuild or a retired read model, not %', s
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', s);
END
$$;

REVOKE ALL ON FUNCTION mira_rebuild_prepare(), mira_rebuild_swap(), mira_rebuild_drop(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION mira_rebuild_prepare(), mira_rebuild_swap(), mira_rebuild_drop(text) TO mira_projector;

CREATE TABLE data_keys (
    subject    text PRIMARY KEY,
    kms_key_id text NOT NULL,
    wrapped    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, DELETE ON data_keys TO mira_app;
GRANT SELECT ON mira_schema_migrations TO mira_app;
