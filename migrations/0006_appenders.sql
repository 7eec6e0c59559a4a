-- Only appending transactions hold the follow watermark back (DESIGN §4.1, ADR 0010).
--
-- * Every transaction that appends to `events` first calls mira_register_appender(), before
--   it has a transaction id. Registration takes the advisory lock K (shared; the two-key form
--   (1835627105, 1819240225), "mira" "log!") for the rest of the transaction and sets a
--   transaction-local flag; a statement trigger on `events` refuses inserts without the flag.
-- * mira_follow_bound() is the follower's bound: every event with tx_id below it has
--   committed, and no event can still appear below it. Read events with a snapshot taken
--   after the bound was computed (a later statement).
-- * A transaction that holds an id but is provably not a registered appender (a report, a
--   migration, an idle psql session, a consumer's record) no longer holds the bound back.

CREATE FUNCTION mira_register_appender() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('mira.appender', true) = 'on' THEN
        RETURN; -- already registered in this transaction
    END IF;
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'mira_register_appender() must come before the transaction''s first write: this transaction already has id %',
            pg_current_xact_id_if_assigned()
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1835627105, 1819240225);
    PERFORM set_config('mira.appender', 'on', true);
END
$$;

CREATE FUNCTION mira_require_appender() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('mira.appender', true), '') <> 'on' THEN
        RAISE EXCEPTION 'an append to the event log must first call mira_register_appender() in its transaction'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_registered_appenders_only BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION mira_require_appender();

-- With snapshot S (the function's first statement): the lower of xmax(S) and the lowest
-- running id of S that is not proven unregistered. An id is proven unregistered only when one
-- read of the lock table (taken after S) shows its transactionid lock held by a backend that
-- does not hold K in this database. Anything else (the backend is gone, a prepared
-- transaction, an id whose lock is not visible) still holds the bound. Ids at or above xmax(S)
-- may be running too (xmax is one past the last completed id), so the bound never exceeds it.
-- PL/pgSQL, not SQL: its plans are cached, and S with no running id below xmax needs no lock
-- table read at all.
CREATE FUNCTION mira_follow_bound() RETURNS xid8
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    s pg_snapshot := pg_current_snapshot();
    lowest xid8;
BEGIN
    IF pg_snapshot_xmin(s) = pg_snapshot_xmax(s) THEN
        RETURN pg_snapshot_xmax(s); -- xip(S) is empty
    END IF;
    WITH locks AS MATERIALIZED (
        SELECT locktype, database, classid, objid, objsubid, transactionid, pid, mode, granted FROM pg_locks
    ), appenders AS (
        SELECT pid FROM locks
        WHERE locktype = 'advisory' AND granted AND classid = 1835627105 AND objid = 1819240225 AND objsubid = 2
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    ), unregistered AS (
        SELECT transactionid::text::bigint AS xid32 FROM locks
        WHERE locktype = 'transactionid' AND mode = 'ExclusiveLock' AND granted AND pid IS NOT NULL
          AND pid NOT IN (SELECT pid FROM appenders)
    )
    SELECT x INTO lowest FROM pg_snapshot_xip(s) AS x
     WHERE (x::text::numeric % 4294967296)::bigint NOT IN (SELECT xid32 FROM unregistered)
     ORDER BY x LIMIT 1;
    RETURN least(pg_snapshot_xmax(s), lowest);
END
$$;

-- The watermark lag (DESIGN §4.1): the age of the oldest registered appender still open, and
-- the committed events the followers cannot read yet.
CREATE FUNCTION mira_appender_lag(OUT seconds float8, OUT events bigint)
LANGUAGE sql VOLATILE AS $$
    SELECT
        coalesce((SELECT extract(epoch FROM clock_timestamp() - min(a.xact_start))::float8
                  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                  WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 1835627105
                    AND l.objid = 1819240225 AND l.objsubid = 2
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND l.pid <> pg_backend_pid()), 0),
        (SELECT count(*) FROM events WHERE tx_id >= mira_follow_bound())
$$;

GRANT EXECUTE ON FUNCTION mira_register_appender(), mira_follow_bound(), mira_appender_lag() TO mira_app;
