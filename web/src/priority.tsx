// How a job's priority is shown: a STAT job carries a "STAT" badge wherever it is listed, in
// words (not colour alone); a routine job carries nothing in lists, and "routine" on its page.

import type { Priority } from "./api";

/** What the job form says under its priority choice. */
export const STAT_NOTE =
  "STAT jobs are taken before routine ones waiting; a running job is not stopped for them.";

/** A job's priority. A job from before priorities has none: it is routine. */
export function PriorityBadge(props: { priority: Priority | undefined; showRoutine?: boolean }) {
  if (props.priority === "stat")
    return (
      <span class="badge badge-stat" data-priority="stat" title="STAT: taken before routine jobs waiting">
        STAT
      </span>
    );
  return props.showRoutine ? <span data-priority="routine">routine</span> : null;
}
