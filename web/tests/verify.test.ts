import { describe, expect, it } from "vitest";
import { checkpointWords } from "../src/verify";

describe("the log badge", () => {
  it("counts the events under a signed checkpoint", () => {
    expect(checkpointWords({ events: 14, checkpointed: 12 })).toEqual({
      text: "12 of 14 events under a signed checkpoint",
      all: false,
    });
    expect(checkpointWords({ events: 14, checkpointed: 14 }).all).toBe(true);
  });

  it("says plainly when no event is under one, and never that the log is verified", () => {
    const w = checkpointWords({ events: 14, checkpointed: 0 });
    expect(w).toEqual({ text: "no signed checkpoint yet (14 events chained)", all: false });
    expect(w.text).not.toMatch(/verified/);
    expect(checkpointWords({ events: 1, checkpointed: 0 }).text).toBe(
      "no signed checkpoint yet (1 event chained)",
    );
  });
});
