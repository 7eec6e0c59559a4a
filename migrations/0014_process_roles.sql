-- One role per process (DESIGN §2, ADR 0012): the API, the relay, the projector, the lifecycle
-- handlers and the worker each connect as their own login role (`mira migrate` creates them:
-- mira_svc_api, mira_svc_relay, mira_svc_projector, mira_svc_handlers, mira_svc_worker), a
-- member of one group role below that holds only what that process does. Before, one login
-- role held mira_app, mira_api and mira_projector at once: the API could write read models
-- and the projector could append.
--
-- | role           | the log                    | its own tables                                      |
-- |----------------|----------------------------|-----------------------------------------------------|
-- | mira_api       | read, append; checkpoints, | read models (its tenant's, read-only),              |
-- |                | epochs read                | api_idempotency, data_keys (read, add)              |
-- | mira_relay     | read; checkpoints, epochs  | relay_cursor                                        |
-- |                | append                     |                                                     |
-- | mira_projector | read                       | read models (write), projection_positions,          |
-- |                |                            | consumer_streams, consumer_set_aside                |
-- | mira_handlers  | read, append               | consumer_streams, consumer_set_aside, due_work,     |
-- |                |                            | handler_waiting                                     |
-- | mira_worker    | read, append               | consumer_streams, consumer_set_aside, data_keys     |
-- |                |                            | (read, add); relay_cursor (mira dev's private relay)|
-- |                |                            | its own slow work in due_work                       |
--
-- mira_app keeps its grants: it is the operator's role for the command line's maintenance
-- commands (`mira dlq`, `mira audit new-epoch`), and no process's login holds it.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['mira_relay', 'mira_handlers', 'mira_worker'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- roles are cluster-wide: another database (or a concurrent migration) made it
        END;
    END LOOP;
    -- The migrating owner works as each of them in the tests and in rebuilds (as 0003 does).
    EXECUTE format('GRANT mira_relay, mira_handlers, mira_worker TO %I', current_user);
END
$$;

-- The API.
GRANT SELECT, INSERT ON events TO mira_api;
GRANT SELECT ON checkpoints, log_epoch, log_epochs TO mira_api;
GRANT SELECT, INSERT ON data_keys TO mira_api;
-- The sweeper deletes expired idempotency rows of every tenant through one function that does
-- that alone (Api__IdempotencyRetentionHours is at least 1, and so is the function's floor);
-- the tenant policy keeps every other access to one tenant. The function runs as the owner,
-- which forced row-level security binds too unless it is a superuser: a policy lets it.
CREATE FUNCTION mira_sweep_idempotency(retention interval) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM public.api_idempotency WHERE created_at < now() - greatest(retention, interval '1 hour');
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION mira_sweep_idempotency(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION mira_sweep_idempotency(interval) TO mira_api;
DO $$
BEGIN
    EXECUTE format('CREATE POLICY owner_sweeps ON api_idempotency TO %I USING (true) WITH CHECK (true)', current_user);
END
$$;
-- /metrics (served by the API and by each role's service) reads the watermark lag, whose age
-- comes from pg_stat_activity: without this, the sessions of other roles (the worker's, the
-- handlers') show no transaction start and the lag reads 0 (ADR 0012).
DO $$
BEGIN
    GRANT pg_read_all_stats TO mira_api, mira_relay, mira_projector, mira_handlers;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'the migrating role % cannot grant pg_read_all_stats to the roles that serve /metrics; without it the watermark-lag metric reads 0 for other roles'' sessions. Migrate as a role that can (the RDS master user, or a superuser).', current_user
        USING ERRCODE = 'insufficient_privilege';
END
$$;
-- /metrics also reads the projection's position (`mira projections status` does the same).
GRANT SELECT ON projection_positions TO mira_relay, mira_handlers;

-- The relay (and the checkpointer inside it). `mira audit checkpoint`, `verify` and
-- `new-epoch` run on its login too (docs/runbooks/deploy.md).
GRANT SELECT ON events, log_epoch TO mira_relay;
GRANT SELECT, INSERT ON checkpoints, log_epochs TO mira_relay;
GRANT SELECT, INSERT, UPDATE, DELETE ON relay_cursor TO mira_relay;

-- The projector: already holds what it needs (0003, 0007).

-- The lifecycle handlers.
GRANT SELECT, INSERT ON events TO mira_handlers;
GRANT SELECT, INSERT, UPDATE, DELETE ON consumer_streams, consumer_set_aside, due_work TO mira_handlers;
GRANT SELECT, INSERT, DELETE ON handler_waiting TO mira_handlers;
CREATE POLICY handlers_across_tenants ON handler_waiting TO mira_handlers USING (true) WITH CHECK (true);

-- The due-time table holds the handlers' timers and each consumer's slow work to try again
-- (kind `slow-work:<consumer>`, ADR 0025): each role reaches its own kinds only. The operator's
-- role (and the release before, whose login holds it) reaches all.
ALTER TABLE due_work ENABLE ROW LEVEL SECURITY;
CREATE POLICY handlers_timers ON due_work TO mira_handlers
    USING (kind NOT LIKE 'slow-work:%' OR kind = 'slow-work:handlers')
    WITH CHECK (kind NOT LIKE 'slow-work:%' OR kind = 'slow-work:handlers');
CREATE POLICY projector_slow_work ON due_work TO mira_projector
    USING (kind = 'slow-work:projections') WITH CHECK (kind = 'slow-work:projections');
CREATE POLICY worker_slow_work ON due_work TO mira_worker
    USING (kind = 'slow-work:gpu-jobs') WITH CHECK (kind = 'slow-work:gpu-jobs');
CREATE POLICY operator_all ON due_work TO mira_app USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON due_work TO mira_projector, mira_worker;

-- /metrics shows each consumer's parked aggregates and slow work waiting for a retry; the
-- roles that serve it cannot read the consumers' tables, so one function counts them.
CREATE FUNCTION mira_consumer_health(OUT consumer text, OUT parked bigint, OUT retrying bigint)
RETURNS SETOF record
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
    WITH p AS (SELECT s.consumer, count(*) AS n FROM public.consumer_streams s
               WHERE s.parked_at IS NOT NULL GROUP BY 1),
         r AS (SELECT substr(d.kind, 11) AS consumer, count(*) AS n FROM public.due_work d
               WHERE d.kind LIKE 'slow-work:%' GROUP BY 1)
    SELECT coalesce(p.consumer, r.consumer), coalesce(p.n, 0), coalesce(r.n, 0)
    FROM p FULL JOIN r ON r.consumer = p.consumer
$$;
REVOKE ALL ON FUNCTION mira_consumer_health() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION mira_consumer_health() TO mira_api, mira_relay, mira_projector, mira_handlers, mira_app;

-- The worker.
GRANT SELECT, INSERT ON events TO mira_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON consumer_streams, consumer_set_aside TO mira_worker;
GRANT SELECT, INSERT ON data_keys TO mira_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON relay_cursor TO mira_worker;
