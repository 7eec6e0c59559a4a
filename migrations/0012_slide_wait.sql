-- A job waits for its slide at most Jobs__SlideWaitHours (DESIGN §5.3): the handlers schedule
-- a `job.slide_wait` row in the due-time table when a job starts waiting, and fail the job
-- when it comes due. Jobs already waiting when this release arrives get the default wait
-- (24 hours) from when they began, caused by the job's last event as a new row would be.
INSERT INTO due_work (kind, key, due_at, payload)
SELECT 'job.slide_wait',
       w.job_id::text,
       w.since + interval '24 hours',
       json_build_object(
           'tenant', w.tenant_id,
           'reason', 'the slide was never uploaded (waited 24 h)',
           'correlation_id', (e.metadata::json ->> 'correlation_id'),
           'causation_id', e.event_id,
           'traceparent', coalesce(e.metadata::json ->> 'traceparent', '')
       )::text
FROM handler_waiting w
JOIN LATERAL (
    SELECT event_id, metadata FROM events
    WHERE aggregate_type = 'Job' AND aggregate_id = w.job_id::text
    ORDER BY sequence DESC LIMIT 1
) e ON true
ON CONFLICT (kind, key) DO NOTHING;
