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
-- running id of S that is neither proven unregistered nor proven finished. An id is proven
-- unregistered only when one read of the lock table (taken after S) shows its transactionid
-- lock held by a backend that does not hold K in this database; it is proven finished when,
-- after S, pg_xact_status no longer says 'in progress' (it has left the running set, so a later
-- snapshot sees its outcome). Anything else (an id whose lock is not yet visible, a prepared
-- transaction) still holds the bound. Without the second proof the bound would step back
-- whenever a transaction ends between S and the lock read, which happens all the time on a
-- busy cluster. Ids at or above xmax(S)
-- may be running too (xmax is one past the last completed id), so the bound never exceeds it.
-- PL/pgSQL, not SQL: its plans are cached, and S with no running id below xmax needs no lock
-- table read at all.
--
-- Two cases fall back to the plain xmin(S), which no running transaction can pass:
-- * a caller outside READ COMMITTED: it reads its events with its transaction's first snapshot,
--   not with a later one, and an appender that dropped K but still shows its id's lock (locks
--   are released one partition at a time) would be passed while that snapshot sees it running;
-- * K held by a prepared transaction (pid null): its locks move to the dummy process one
--   partition at a time, so its id's lock may still show the old pid after K moved.
CREATE FUNCTION mira_follow_bound() RETURNS xid8
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    s pg_snapshot := pg_current_snapshot();
    lowest xid8;
    prepared_appender boolean;
BEGIN
    IF pg_snapshot_xmin(s) = pg_snapshot_xmax(s) THEN
        RETURN pg_snapshot_xmax(s); -- xip(S) is empty
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RETURN pg_snapshot_xmin(s);
    END IF;
    WITH locks AS MATERIALIZED (
        SELECT locktype, database, classid, objid, objsubid, transactionid, pid, mode, granted FROM pg_locks
    ), appenders AS (
        SELECT pid FROM locks
        WHERE locktype = 'advisory' AND granted AND classid = 1835627105 AND objid = 1819240225 AND objsubid = 2
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    ), unregistered AS (
        SELECT transactionid::text::bigint AS xid32 FROM locks l
        WHERE locktype = 'transactionid' AND mode = 'ExclusiveLock' AND granted AND pid IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM appenders a WHERE a.pid = l.pid)
    )
    SELECT EXISTS (SELECT 1 FROM appenders WHERE pid IS NULL),
           (SELECT x FROM pg_snapshot_xip(s) AS x
             WHERE (x::text::numeric % 4294967296)::bigint NOT IN (SELECT xid32 FROM unregistered)
               AND coalesce(pg_xact_status(x), 'in progress') = 'in progress'
             ORDER BY x LIMIT 1)
      INTO prepared_appender, lowest;
    IF prepared_appender THEN
        RETURN pg_snapshot_xmin(s);
    END IF;
    RETURN least(pg_snapshot_xmax(s), lowest);
END
$$;

-- The watermark lag (DESIGN §4.1): the age of the oldest registered appender still open, and
-- the committed events the followers cannot read yet.
-- A prepared appender has no backend: its age is the time since it was prepared. The bound is
-- computed once (a scalar subquery), so the count walks the follow index.
CREATE FUNCTION mira_appender_lag(OUT seconds float8, OUT events bigint)
LANGUAGE sql VOLATILE AS $$
    WITH k AS (
        SELECT l.pid, l.virtualtransaction FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 1835627105
          AND l.objid = 1819240225 AND l.objsubid = 2
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.pid IS DISTINCT FROM pg_backend_pid()
    ), started AS (
        SELECT a.xact_start AS t FROM k JOIN pg_stat_activity a ON a.pid = k.pid
        UNION ALL
        SELECT p.prepared FROM k JOIN pg_prepared_xacts p ON k.pid IS NULL
          AND k.virtualtransaction = '-1/' || p.transaction::text
    )
    SELECT
        coalesce((SELECT extract(epoch FROM clock_timestamp() - min(t))::float8 FROM started), 0),
        (SELECT count(*) FROM events WHERE tx_id >= (SELECT mira_follow_bound()))
$$;

GRANT EXECUTE ON FUNCTION mira_register_appender(), mira_follow_bound(), mira_appender_lag() TO mira_app;
