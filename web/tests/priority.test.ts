import type { VNode } from "preact";
import { describe, expect, it } from "vitest";
import { ApiError, newJob, priorityRefusal } from "../src/api";
import { PriorityBadge } from "../src/priority";

const params = { tile_size: 254, normalize: "macenko" } as const;

describe("a job's priority", () => {
  it("is sent only when STAT: routine is the API's default", () => {
    expect(newJob("s1", "wsi.preprocess", params, "stat")).toEqual({
      slide_id: "s1",
      kind: "wsi.preprocess",
      params,
      priority: "stat",
    });
    const routine = newJob("s1", "wsi.preprocess", params, "routine");
    expect(routine).toEqual({ slide_id: "s1", kind: "wsi.preprocess", params });
    expect(JSON.stringify(routine)).not.toContain("priority");
  });

  it("takes the server's reason when it refuses the priority, and only then", () => {
    const refused = new ApiError(
      403,
      "about:blank",
      "Forbidden",
      "priority: STAT jobs may be submitted by pathologist (Jobs__StatGroups)",
    );
    expect(priorityRefusal(refused)).toBe("STAT jobs may be submitted by pathologist (Jobs__StatGroups)");
    const unknown = new ApiError(422, "about:blank", "Unprocessable", 'priority: unknown priority "urgent".');
    expect(priorityRefusal(unknown)).toBe('unknown priority "urgent"');
    // A missing role, or another field, is the form's error, not the priority's.
    expect(
      priorityRefusal(new ApiError(403, "t", "Forbidden", "this needs one of the roles pathologist, admin")),
    ).toBeNull();
    expect(
      priorityRefusal(new ApiError(422, "t", "Unprocessable", "params.tile_size: 16 to 4096")),
    ).toBeNull();
    expect(priorityRefusal(new ApiError(500, "t", "Internal", "priority: oops"))).toBeNull();
    expect(priorityRefusal(new Error("priority: network"))).toBeNull();
  });

  it("shows STAT as a badge in words, and routine only where asked", () => {
    const stat = PriorityBadge({ priority: "stat" }) as VNode<{ class: string; children: string }>;
    expect(stat.props.children).toBe("STAT");
    expect(stat.props.class).toContain("badge-stat");
    expect(PriorityBadge({ priority: "routine" })).toBeNull();
    // A job from before priorities has none: routine.
    expect(PriorityBadge({ priority: undefined })).toBeNull();
    const routine = PriorityBadge({ priority: "routine", showRoutine: true }) as VNode<{ children: string }>;
    expect(routine.props.children).toBe("routine");
  });
});
