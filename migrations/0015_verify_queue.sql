-- Slides are verified off the GPU fleet (issue 32, ADR 0026): `mira-worker verify` consumes the
-- `verify` queue (SlideUploaded), `gpu-jobs` carries only JobQueued. The verifier is the worker
-- binary and connects as the worker's login (mira_worker), so the worker's role reaches the
-- verify consumer's slow work in the due-time table (kind `slow-work:verify`, ADR 0025) beside
-- its own. The release before keeps working: its worker's kind is still allowed.
ALTER POLICY worker_slow_work ON due_work
    USING (kind IN ('slow-work:gpu-jobs', 'slow-work:verify'))
    WITH CHECK (kind IN ('slow-work:gpu-jobs', 'slow-work:verify'));
