import { describe, expect, it } from "vitest";
import { fileName, isIdOrShort, jobName, shortId, slideNameOf, whatAsked, whenAsked } from "../src/names";

// UUIDv7s made within the same minute share their first characters, not their last.
const A = "01a24c65-7e3b-7c11-9f00-3b1d2a9e4f10";
const B = "01a24c65-7e3c-7a22-8e00-77c0ffee1234";

const at = (h: number, m: number, day = 7) => new Date(2026, 11, day, h, m, 30);

describe("names", () => {
  it("shortens an id to its last 8 hex characters, which tell ids made together apart", () => {
    expect(shortId(A)).toBe("2a9e4f10");
    expect(shortId(B)).toBe("c0ffee1234".slice(-8));
    expect(shortId(A)).not.toBe(shortId(B));
    expect(A.slice(0, 8)).toBe(B.slice(0, 8));
    expect(isIdOrShort("2a9e4f10")).toBe(true);
    expect(isIdOrShort("2A9E4F10")).toBe(true);
    expect(isIdOrShort(A)).toBe(true);
    expect(isIdOrShort("2a9e4f1")).toBe(false);
    expect(isIdOrShort("not-an-id")).toBe(false);
  });

  it("names a job by its slide, what was asked and when", () => {
    const job = {
      slide_id: A,
      slide_name: "CMU-1.svs",
      kind: "wsi.preprocess",
      params: { normalize: "macenko", tile_size: 254 },
      submitted_at: at(14, 2).toISOString(),
    };
    expect(jobName(job, at(18, 0))).toBe("CMU-1.svs · Macenko · 14:02");
    // No normalisation: the kind in words.
    expect(whatAsked({ kind: "wsi.preprocess", params: { normalize: "none" } })).toBe("Tile pyramid");
    expect(whatAsked({ kind: "wsi.preprocess", params: {} })).toBe("Tile pyramid");
    expect(whatAsked({ kind: "wsi.preprocess", params: { normalize: "reinhard" } })).toBe("Reinhard");
    // A kind the app has no words for is shown by its API name.
    expect(whatAsked({ kind: "wsi.other", params: {} })).toBe("wsi.other");
  });

  it("gives the date as well for a job of another day, and 24-hour times", () => {
    expect(whenAsked(at(9, 5).toISOString(), at(23, 59))).toBe("09:05");
    expect(whenAsked(at(21, 40, 6).toISOString(), at(8, 0))).toBe("2026-12-06 21:40");
    expect(whenAsked("not a time")).toBe("not a time");
  });

  it("names a slide whose name is erased or unknown by its short id", () => {
    expect(slideNameOf({ slide_id: A, slide_name: null })).toBe("slide 2a9e4f10");
    expect(slideNameOf({ slide_id: A })).toBe("slide 2a9e4f10");
    expect(slideNameOf({ slide_id: A, slide_name: "  " })).toBe("slide 2a9e4f10");
  });

  it("names a saved file after the slide and the job, with nothing a file system refuses", () => {
    expect(fileName({ job_id: B, slide_id: A, slide_name: "CMU-1-Small-Region.svs" }, "stats.json")).toBe(
      "CMU-1-Small-Region-ffee1234-stats.json",
    );
    expect(fileName({ job_id: B, slide_id: A, slide_name: "a/b: c?.tiff" }, "mask.png")).toBe(
      "a-b-c-ffee1234-mask.png",
    );
    expect(fileName({ job_id: B, slide_id: A, slide_name: null }, "manifest.json")).toBe(
      "slide-2a9e4f10-ffee1234-manifest.json",
    );
  });
});
