-- Read models (DESIGN §6): jobs, slides, the per-job timeline and per-tenant usage, in the
-- schema `rm`. Every row carries tenant_id; row-level security is enabled and forced, and the
-- gateway reads as `mira_api` with `mira.tenant_id` set per transaction. Reading without a
-- tenant fails instead of returning everything.
--
-- The projector writes as `mira_projector`. A rebuild builds a second schema with the same
-- tables (mira_create_read_models) and swaps the schemas atomically.

DO $$
BEGIN
    CREATE ROLE mira_api NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;
DO $$
BEGIN
    CREATE ROLE mira_projector NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;
-- The migrating user runs the processes in development; it must be able to SET ROLE.
DO $$
BEGIN
    EXECUTE format('GRANT mira_api, mira_projector, mira_app TO %I', current_user);
END
$$;

-- The tenant of the current transaction, or an error: tenant-scoped reads fail closed.
CREATE FUNCTION mira_tenant() RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    t text := current_setting('mira.tenant_id', true);
BEGIN
    IF t IS NULL OR t = '' THEN
        RAISE EXCEPTION 'mira.tenant_id is not set: tenant-scoped reads fail closed'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN t;
END
$$;

-- Creates the read-model tables, their row-level security and grants in schema `s`.
CREATE FUNCTION mira_create_read_models(s text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t text;
BEGIN
    EXECUTE format('CREATE SCHEMA %I', s);
    EXECUTE format($f$
        CREATE TABLE %I.jobs (
            job_id          uuid PRIMARY KEY,
            tenant_id       text NOT NULL,
            slide_id        uuid NOT NULL,
            kind            text NOT NULL,
            params          jsonb NOT NULL,
            status          text NOT NULL,
            attempt         integer NOT NULL,
            max_attempts    integer NOT NULL,
            worker_id       text,
            lease_until     timestamptz,
            progress_done   bigint,
            progress_total  bigint,
            failure         text,
            manifest_key    text,
            manifest_sha256 text,
            state           jsonb NOT NULL,
            submitted_by    text NOT NULL,
            submitted_at    timestamptz NOT NULL,
            updated_at      timestamptz NOT NULL,
            last_sequence   bigint NOT NULL,
            position        bigint NOT NULL
        )$f$, s);
    EXECUTE format('CREATE INDEX ON %I.jobs (tenant_id, submitted_at DESC, job_id DESC)', s);
    EXECUTE format('CREATE INDEX ON %I.jobs (tenant_id, status, submitted_at DESC)', s);
    EXECUTE format('CREATE INDEX ON %I.jobs (tenant_id, slide_id)', s);
    EXECUTE format($f$
        CREATE TABLE %I.slides (
            slide_id      uuid PRIMARY KEY,
            tenant_id     text NOT NULL,
            status        text NOT NULL,
            name          jsonb NOT NULL,
            size_bytes    bigint NOT NULL,
            content_type  text NOT NULL,
            object_key    text NOT NULL,
            metadata      jsonb,
            rejection     text,
            state         jsonb NOT NULL,
            registered_by text NOT NULL,
            registered_at timestamptz NOT NULL,
            updated_at    timestamptz NOT NULL,
            last_sequence bigint NOT NULL,
            position      bigint NOT NULL
        )$f$, s);
    EXECUTE format('CREATE INDEX ON %I.slides (tenant_id, registered_at DESC)', s);
    EXECUTE format($f$
        CREATE TABLE %I.job_timeline (
            job_id      uuid NOT NULL,
            sequence    bigint NOT NULL,
            tenant_id   text NOT NULL,
            event_id    uuid NOT NULL,
            event_type  text NOT NULL,
            actor_kind  text NOT NULL,
            actor_id    text NOT NULL,
            recorded_at timestamptz NOT NULL,
            hash        text NOT NULL,
            position    bigint NOT NULL,
            PRIMARY KEY (job_id, sequence)
        )$f$, s);
    EXECUTE format($f$
        CREATE TABLE %I.usage (
            tenant_id      text PRIMARY KEY,
            -- Whole microseconds: integer sums do not depend on the order events are applied in.
            gpu_us         bigint NOT NULL DEFAULT 0,
            cpu_us         bigint NOT NULL DEFAULT 0,
            bytes_uploaded bigint NOT NULL DEFAULT 0,
            bytes_written  bigint NOT NULL DEFAULT 0
        )$f$, s);
    EXECUTE format($f$
        CREATE VIEW %I.jobs_by_status WITH (security_invoker = true) AS
            SELECT tenant_id, status, count(*) AS jobs FROM %I.jobs GROUP BY tenant_id, status
        $f$, s, s);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO mira_api, mira_projector', s);
    FOREACH t IN ARRAY ARRAY['jobs', 'slides', 'job_timeline', 'usage'] LOOP
        EXECUTE format('ALTER TABLE %I.%I ENABLE ROW LEVEL SECURITY', s, t);
        EXECUTE format('ALTER TABLE %I.%I FORCE ROW LEVEL SECURITY', s, t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I.%I TO mira_api USING (tenant_id = mira_tenant())', s, t);
        EXECUTE format('CREATE POLICY projector_writes ON %I.%I TO mira_projector USING (true) WITH CHECK (true)', s, t);
        EXECUTE format('GRANT SELECT ON %I.%I TO mira_api', s, t);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I.%I TO mira_projector', s, t);
    END LOOP;
    EXECUTE format('GRANT SELECT ON %I.jobs_by_status TO mira_api, mira_projector', s);
END
$$;

SELECT mira_create_read_models('rm');

-- Where each projection stands in the log, for `mira projections status` and lag metrics.
CREATE TABLE projection_positions (
    projection       text PRIMARY KEY,
    last_position    bigint NOT NULL DEFAULT 0,
    last_recorded_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT ON events TO mira_projector;
GRANT SELECT, INSERT, UPDATE, DELETE ON projection_positions, consumer_streams, consumer_set_aside TO mira_projector;
GRANT SELECT ON projection_positions TO mira_api;
