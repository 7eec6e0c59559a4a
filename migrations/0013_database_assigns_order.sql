-- The database assigns the log's order, and registration cannot be faked (DESIGN §4.1,
-- ADR 0010).
--
-- Before: a transaction registered as an appender by calling mira_register_appender(), which
-- took the advisory lock K and set a transaction-local setting the insert guard checked. Any
-- login could set that setting itself (set_config('mira.appender', 'on', true)) without K, or
-- take K after its transaction already had an id; mira_follow_bound() then passed that id and
-- the event committed behind every follower's cursor. The client also supplied tx_id (a column
-- default) and could supply global_position (OVERRIDING SYSTEM VALUE).
--
-- Now:
-- * A statement trigger registers the inserting transaction itself. With no transaction id yet
--   it takes K (shared, for the rest of the transaction) before the first row gets one. With an
--   id already, it requires an `events` row this transaction wrote earlier (tx_id is its own
--   id), which only the first path can have produced; otherwise the insert is refused. Nothing
--   a client sets or calls changes this, and appending needs no registration round trip.
-- * A row trigger sets tx_id := pg_current_xact_id() and global_position from the log's
--   sequence, and refuses a row that supplies either.
-- * The same trigger refuses a row whose recorded_at is not transaction_timestamp(): the
--   appender reads now() in its transaction before hashing, so the hashed time is the
--   database's, not the client's. On a log that already has events, the release before this
--   one may still be running (a deploy, a rollback: docs/runbooks/deploy.md) and hashes its
--   own clock's time; there `log_rules.recorded_at_leeway` (5 minutes) admits a time between
--   the transaction's start less the leeway and the insert plus the leeway, and the next
--   release's migration sets it to zero. A new log starts at zero.
-- * mira_register_appender(), which that release calls, stays for it: it takes K when the
--   transaction has no id yet, as the statement trigger would, and sets nothing anyone checks.
-- COPY fires both triggers the same way. The functions name `public.events` and search
-- pg_temp last: a temporary table called `events` must not stand in for the log.

DROP TRIGGER events_registered_appenders_only ON events;
DROP FUNCTION mira_require_appender();

CREATE OR REPLACE FUNCTION mira_register_appender() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'mira_register_appender() must come before the transaction''s first write: this transaction already has id %',
            pg_current_xact_id_if_assigned()
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1835627105, 1819240225);
END
$$;

CREATE TABLE log_rules (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    recorded_at_leeway interval NOT NULL CHECK (recorded_at_leeway >= interval '0')
);
INSERT INTO log_rules (recorded_at_leeway)
    SELECT CASE WHEN EXISTS (SELECT 1 FROM events) THEN interval '5 minutes' ELSE interval '0' END;
REVOKE ALL ON log_rules FROM PUBLIC;

-- global_position: from an identity column (which OVERRIDING SYSTEM VALUE bypasses) to a plain
-- column the row trigger fills from a sequence that continues where the identity stopped.
DO $$
DECLARE
    identity_seq text := pg_get_serial_sequence('public.events', 'global_position');
    last bigint;
    called boolean;
BEGIN
    EXECUTE format('SELECT last_value, is_called FROM %s', identity_seq) INTO last, called;
    ALTER TABLE events ALTER COLUMN global_position DROP IDENTITY;
    CREATE SEQUENCE events_global_position_seq AS bigint OWNED BY events.global_position;
    PERFORM setval('events_global_position_seq', last, called);
END
$$;
ALTER TABLE events ALTER COLUMN tx_id DROP DEFAULT;

REVOKE ALL ON SEQUENCE events_global_position_seq FROM PUBLIC;

-- SECURITY DEFINER: appending roles need INSERT on events, not SELECT, for the check below.
CREATE FUNCTION mira_register_append() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    own xid8 := pg_current_xact_id_if_assigned();
BEGIN
    IF own IS NULL THEN
        -- First write of the transaction: K before the id, so the followers' bound waits for it.
        PERFORM pg_advisory_xact_lock_shared(1835627105, 1819240225);
    ELSIF NOT EXISTS (SELECT 1 FROM public.events WHERE tx_id = own) THEN
        RAISE EXCEPTION 'an append to the event log must be its transaction''s first write: this transaction already has id % and has appended nothing',
            own
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN NULL;
END
$$;

-- SECURITY DEFINER so that no runtime role needs the sequence: nextval here is the only way a
-- position is taken.
CREATE FUNCTION mira_assign_order() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    leeway interval := (SELECT recorded_at_leeway FROM public.log_rules);
BEGIN
    IF NEW.tx_id IS NOT NULL THEN
        RAISE EXCEPTION 'the event log assigns tx_id; a row that supplies one (%) is refused', NEW.tx_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.global_position IS NOT NULL THEN
        RAISE EXCEPTION 'the event log assigns global_position; a row that supplies one (%) is refused', NEW.global_position
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.recorded_at IS NULL OR (leeway = interval '0' AND NEW.recorded_at <> transaction_timestamp())
       OR NEW.recorded_at < transaction_timestamp() - leeway OR NEW.recorded_at > clock_timestamp() + leeway THEN
        RAISE EXCEPTION 'recorded_at (%) must be the appending transaction''s timestamp (%): read now() in the transaction before hashing',
            NEW.recorded_at, transaction_timestamp()
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.tx_id := pg_current_xact_id();
    NEW.global_position := nextval('public.events_global_position_seq');
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION mira_register_append(), mira_assign_order() FROM PUBLIC;

CREATE TRIGGER events_registered_appenders_only BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION mira_register_append();
-- Row triggers fire in name order; this one is the only BEFORE INSERT row trigger on events.
CREATE TRIGGER events_assign_order BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION mira_assign_order();
