-- The lifecycle handlers' own state (DESIGN §3, §5.3): jobs submitted on a slide that is not
-- verified yet, waiting for its verdict. Rows are written and consumed under an advisory lock
-- on the slide, so a verdict and a submission that race cannot miss each other.
CREATE TABLE handler_waiting (
    slide_id    uuid NOT NULL,
    job_id      uuid NOT NULL,
    tenant_id   text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slide_id, job_id)
);

GRANT SELECT, INSERT, DELETE ON handler_waiting TO mira_app;
