import { describe, expect, it } from "vitest";
import { TINT, tintMask } from "../src/mask";

describe("the tissue mask's tint", () => {
  it("colours tissue, opaque, and makes the background transparent", () => {
    const px = new Uint8ClampedArray([255, 255, 255, 255, 0, 0, 0, 255, 128, 128, 128, 255]);
    tintMask(px);
    expect([...px]).toEqual([...TINT, 255, ...TINT, 0, ...TINT, 128]);
  });
});
