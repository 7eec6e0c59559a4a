-- Fair admission (issue 33, ADR 0027): a job ready to run (its slide verified, or its retry
-- due) waits in the due-time table (kind `job.queue`) until the handlers admit it. STAT jobs
-- are admitted at once; routine jobs while fewer than `Jobs__AdmissionWindow` of them are
-- queued and not started, tenants in turn, each under `Jobs__MaxRunningPerTenant`.
--
-- * handler_waiting.priority: a job waiting for its slide keeps its priority for the queue row
--   its slide's verdict schedules (rows of the release before are routine).
-- * job_slots: the jobs admitted and not finished, started or not: what the window and the
--   per-tenant cap count. The handlers add a row when they queue a job, mark it started on
--   JobStarted and remove it when the attempt ends.
-- * admission_turns: when each tenant was last admitted a routine job; the tenant admitted
--   least recently goes first.
-- The release before writes neither table and queues as it did; both read as empty to it.

ALTER TABLE handler_waiting ADD COLUMN priority text NOT NULL DEFAULT 'routine';

CREATE TABLE job_slots (
    job_id      uuid PRIMARY KEY,
    tenant_id   text NOT NULL,
    priority    text NOT NULL,
    started     boolean NOT NULL DEFAULT false,
    admitted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_slots_tenant_idx ON job_slots (tenant_id);

CREATE TABLE admission_turns (
    tenant_id     text PRIMARY KEY,
    last_admitted timestamptz NOT NULL
);

GRANT SELECT, INSERT, UPDATE, DELETE ON job_slots, admission_turns TO mira_handlers, mira_app;

-- /metrics shows the jobs waiting for admission (what KEDA adds to the GPU queues' depth),
-- for the roles that serve it and cannot read the due-time table's job rows.
CREATE FUNCTION mira_jobs_waiting_admission(OUT routine bigint, OUT stat bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT count(*) FILTER (WHERE coalesce(d.payload::jsonb ->> 'priority', 'routine') <> 'stat'),
           count(*) FILTER (WHERE d.payload::jsonb ->> 'priority' = 'stat')
    FROM public.due_work d
    WHERE d.kind = 'job.queue' AND d.due_at <= now()
$$;
REVOKE ALL ON FUNCTION mira_jobs_waiting_admission() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION mira_jobs_waiting_admission() TO mira_api, mira_relay, mira_projector, mira_handlers, mira_app;

-- The API shows which of a tenant's jobs are ready and wait for their admission
-- (`waiting_for_admission`); it passes its tenant and the ids of the jobs it shows (from the
-- read model under row-level security) and learns which of that tenant's jobs wait, nothing
-- else.
CREATE FUNCTION mira_jobs_waiting_for_admission(tenant text, ids uuid[]) RETURNS SETOF uuid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT d.key::uuid FROM public.due_work d
    -- Due now, or claimed by an admission sending its Queue (ADMISSION_CLAIM, 30 s); not a
    -- retry still in its backoff.
    WHERE d.kind = 'job.queue' AND d.due_at <= now() + interval '30 seconds'
      AND d.payload::jsonb ->> 'tenant' = tenant
      AND d.key = ANY (SELECT i::text FROM unnest(ids) i)
$$;
REVOKE ALL ON FUNCTION mira_jobs_waiting_for_admission(text, uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION mira_jobs_waiting_for_admission(text, uuid[]) TO mira_api, mira_app;

-- Like handler_waiting (0008, 0014): under forced row-level security, reached by the handlers
-- and the operator's role across tenants, by no other.
ALTER TABLE job_slots ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_slots FORCE ROW LEVEL SECURITY;
CREATE POLICY handlers_across_tenants ON job_slots TO mira_handlers USING (true) WITH CHECK (true);
CREATE POLICY across_tenants ON job_slots TO mira_app USING (true) WITH CHECK (true);
ALTER TABLE admission_turns ENABLE ROW LEVEL SECURITY;
ALTER TABLE admission_turns FORCE ROW LEVEL SECURITY;
CREATE POLICY handlers_across_tenants ON admission_turns TO mira_handlers USING (true) WITH CHECK (true);
CREATE POLICY across_tenants ON admission_turns TO mira_app USING (true) WITH CHECK (true);
