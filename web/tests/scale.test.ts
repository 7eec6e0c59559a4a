import { describe, expect, it } from "vitest";
import { lengthLabel, magnification, magnificationLabel, niceLength, scaleBar } from "../src/scale";

describe("the scale bar", () => {
  it("is the longest 1, 2 or 5 × 10^k µm that fits", () => {
    const cases: [number, number][] = [
      [1, 1],
      [1.99, 1],
      [2, 2],
      [4.999, 2],
      [5, 5],
      [9.99, 5],
      [10, 10],
      [74.85, 50],
      [149.7, 100],
      [199.99, 100],
      [250, 200],
      [999, 500],
      [1000, 1000],
      [3500, 2000],
      [12_000, 10_000],
      [0.75, 0.5],
      [0.3, 0.2],
      [0.1, 0.1],
      [0.0123, 0.01],
    ];
    for (const [max, nice] of cases) expect(niceLength(max), `under ${max} µm`).toBe(nice);
    // Exact powers of ten, where log10 may land a hair either side of the integer.
    for (let k = -6; k <= 9; k++) expect(niceLength(Number(`1e${k}`))).toBe(Number(`1e${k}`));
  });

  it("refuses a length that is not positive and finite", () => {
    for (const bad of [0, -1, Number.NaN, Number.POSITIVE_INFINITY]) expect(() => niceLength(bad)).toThrow();
  });

  it("is labelled in µm below a millimetre and in mm from there", () => {
    expect(lengthLabel(0.5)).toBe("0.5 µm");
    expect(lengthLabel(1)).toBe("1 µm");
    expect(lengthLabel(20)).toBe("20 µm");
    expect(lengthLabel(500)).toBe("500 µm");
    expect(lengthLabel(1000)).toBe("1 mm");
    expect(lengthLabel(2000)).toBe("2 mm");
    expect(lengthLabel(50_000)).toBe("50 mm");
  });

  it("is as long on screen as its length at the zoom, and between 2/5 of the room and all of it", () => {
    // CMU-1-Small-Region: 0.499 µm per pixel; fitted to a 560-pixel-high viewer, zoom 560/2967.
    const zoom = 560 / 2967;
    const bar = scaleBar(0.499, zoom, 150);
    expect(bar).not.toBeNull();
    if (!bar) return;
    // 150 CSS px is 150 / zoom = 794.7 slide pixels = 396.6 µm: the bar is 200 µm.
    expect(bar.um).toBe(200);
    expect(bar.label).toBe("200 µm");
    expect(bar.px).toBeCloseTo((200 / 0.499) * zoom, 9);
    for (const z of [0.01, 0.05, 0.19, 0.5, 1, 1.1, 4]) {
      const b = scaleBar(0.25, z, 150);
      expect(b?.px).toBeLessThanOrEqual(150);
      expect(b?.px).toBeGreaterThan(150 / 2.5 - 1e-9);
      expect(((b?.px ?? 0) / z) * 0.25).toBeCloseTo(b?.um ?? -1, 9);
    }
    // Zoomed right out on a big slide, the bar is in millimetres.
    expect(scaleBar(0.25, 0.01, 150)?.label).toBe("2 mm");
  });

  it("is not drawn without a usable pixel size or zoom", () => {
    expect(scaleBar(0, 1)).toBeNull();
    expect(scaleBar(Number.NaN, 1)).toBeNull();
    expect(scaleBar(0.5, 0)).toBeNull();
    expect(scaleBar(0.5, Number.POSITIVE_INFINITY)).toBeNull();
  });
});

describe("the magnification", () => {
  it("is the objective power times the zoom when the slide records one", () => {
    expect(magnification(1, 20, 0.499)).toEqual({ times: 20, from: "objective" });
    expect(magnification(0.25, 40, 0.25)).toEqual({ times: 10, from: "objective" });
  });

  it("is estimated from the pixel size otherwise, 10× being 1 µm per pixel", () => {
    expect(magnification(1, undefined, 0.5)).toEqual({ times: 20, from: "pixel size" });
    expect(magnification(0.5, undefined, 0.25)).toEqual({ times: 20, from: "pixel size" });
    expect(magnification(1, 0, 1)).toEqual({ times: 10, from: "pixel size" });
  });

  it("is unknown when the slide records neither", () => {
    expect(magnification(1, undefined, undefined)).toBeNull();
    expect(magnification(Number.NaN, 20, 0.5)).toBeNull();
  });

  it("is shown with the precision a person can use", () => {
    expect(magnificationLabel(20)).toBe("20×");
    expect(magnificationLabel(12.6)).toBe("13×");
    expect(magnificationLabel(3.776)).toBe("3.8×");
    expect(magnificationLabel(4)).toBe("4×");
    expect(magnificationLabel(0.1887)).toBe("0.19×");
  });
});
