import { describe, expect, it } from "vitest";
import { formatView, parseView } from "../src/viewstate";

describe("the view in the address", () => {
  it("round-trips a position, a zoom, the layer and the mask", () => {
    const hash = formatView({
      at: { x: 1110.4, y: 1483.6, zoom: 0.424_812 },
      layer: "normalized",
      mask: 0.35,
    });
    expect(hash).toBe("#x=1110&y=1484&z=0.4248&layer=normalized&mask=0.35");
    expect(parseView(hash)).toEqual({
      at: { x: 1110, y: 1484, zoom: 0.4248 },
      layer: "normalized",
      mask: 0.35,
    });
  });

  it("leaves out what is the default", () => {
    expect(formatView({ layer: "original", mask: null })).toBe("");
    expect(formatView({ at: { x: 0, y: 0, zoom: 1 }, layer: "original", mask: null })).toBe("#x=0&y=0&z=1");
    expect(parseView("")).toEqual({ layer: "original", mask: null });
  });

  it("ignores what it cannot use rather than guess", () => {
    expect(parseView("#x=10&y=20")).toEqual({ layer: "original", mask: null });
    expect(parseView("#x=10&y=20&z=0")).toEqual({ layer: "original", mask: null });
    expect(parseView("#x=10&y=&z=1")).toEqual({ layer: "original", mask: null });
    expect(parseView("#x=a&y=2&z=1&layer=purple&mask=2")).toEqual({ layer: "original", mask: null });
    expect(parseView("#mask=0").mask).toBe(0);
  });
});
