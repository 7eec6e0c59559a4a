-- Fan-out (DESIGN §5): the relay's durable cursor, each consumer's per-aggregate record of
-- what it applied (its inbox), parked aggregates with the events set aside behind them, and
-- the durable due-time table for delayed work.

CREATE TABLE relay_cursor (
    name       text PRIMARY KEY,
    tx_id      xid8 NOT NULL,
    position   bigint NOT NULL,
    published  bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per (consumer, aggregate): the last sequence whose effect committed, and, while
-- the aggregate is parked, why and since when.
CREATE TABLE consumer_streams (
    consumer          text NOT NULL,
    aggregate_type    text NOT NULL,
    aggregate_id      text NOT NULL,
    last_sequence     bigint NOT NULL DEFAULT 0,
    parked_at         timestamptz,
    parked_sequence   bigint,
    parked_reason     text,
    redrive_requested timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, aggregate_type, aggregate_id)
);
CREATE INDEX consumer_streams_parked_idx ON consumer_streams (consumer) WHERE parked_at IS NOT NULL;

-- Events that arrived for a parked aggregate. The log stays the source of their content.
CREATE TABLE consumer_set_aside (
    consumer       text NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    sequence       bigint NOT NULL,
    event_id       uuid NOT NULL,
    set_aside_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, aggregate_type, aggregate_id, sequence)
);

-- Delayed work, polled with FOR UPDATE SKIP LOCKED. One row per (kind, key): scheduling
-- again moves the due time.
CREATE TABLE due_work (
    kind       text NOT NULL,
    key        text NOT NULL,
    due_at     timestamptz NOT NULL,
    payload    text NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
);
CREATE INDEX due_work_due_idx ON due_work (kind, due_at);

GRANT SELECT, INSERT, UPDATE, DELETE ON relay_cursor, consumer_streams, consumer_set_aside, due_work TO mira_app;
