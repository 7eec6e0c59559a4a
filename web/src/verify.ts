// What the job page's badge says about the log (`GET /api/jobs/{id}/verify`): the events chain
// and re-hash, and how many of them a signed checkpoint covers. "Verified" alone would claim
// more than is known while no checkpoint covers an event, so the badge counts them.

/** The badge's words for a stream that verifies: "12 of 14 events under a signed checkpoint",
 * or plainly that none is yet. `all`: every event is covered. */
export function checkpointWords(v: { events: number; checkpointed: number }): { text: string; all: boolean } {
  const noun = v.events === 1 ? "event" : "events";
  if (v.checkpointed <= 0)
    return { text: `no signed checkpoint yet (${v.events} ${noun} chained)`, all: v.events === 0 };
  return {
    text: `${v.checkpointed} of ${v.events} ${noun} under a signed checkpoint`,
    all: v.checkpointed >= v.events,
  };
}
