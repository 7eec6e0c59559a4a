import { describe, expect, it } from "vitest";
import { percentOf, summarizeStats } from "../src/results";

describe("a job's statistics", () => {
  it("counts the tiles with tissue and averages their fractions and brightness", () => {
    const s = summarizeStats({
      level: 12,
      columns: ["col", "row", "tissue", "mean", "std"],
      tiles: [
        [0, 0, 0, [240, 240, 240], [1, 1, 1]],
        [1, 0, 0.25, [200, 150, 190], [9, 9, 9]],
        [0, 1, 0.5, [180, 120, 180], [9, 9, 9]],
        [1, 1, 1, [150, 90, 150], [9, 9, 9]],
      ],
    });
    expect(s.tiles).toBe(4);
    expect(s.withTissue).toBe(3);
    expect(s.mostlyTissue).toBe(2);
    expect(s.meanTissue).toBeCloseTo(0.4375);
    // The blank tile's brightness is left out.
    expect(s.meanBrightness).toBeCloseTo((180 + 160 + 130) / 3);
  });

  it("finds the columns by name and says nothing of tissue without a mask", () => {
    const s = summarizeStats({
      columns: ["row", "col", "mean", "std", "tissue"],
      tiles: [
        [0, 0, [100, 100, 100], [0, 0, 0], null],
        [0, 1, [200, 200, 200], [0, 0, 0], null],
      ],
    });
    expect(s).toEqual({
      tiles: 2,
      withTissue: null,
      mostlyTissue: null,
      meanTissue: null,
      meanBrightness: 150,
    });
  });

  it("refuses a document that is not statistics", () => {
    expect(() => summarizeStats({ tiles: [] })).toThrow(/columns/);
    expect(() => summarizeStats(null)).toThrow();
  });

  it("shows a fraction as a percentage", () => {
    expect(percentOf(0.43219)).toBe("43.2 %");
    expect(percentOf(1)).toBe("100.0 %");
  });
});
