// The tissue mask as a tint (issue 37). The worker writes it as 8-bit greyscale, 255 for tissue
// (gpu-worker's tissue.rs). Laid over the slide as it is, it is a grey sheet that hides the
// tissue it marks; recoloured, tissue becomes one colour and the background transparent, so the
// layer's opacity is how strongly tissue is tinted, and the background is left as scanned.

/** A green that reads as "marked" against H&E's pinks and purples. */
export const TINT: readonly [number, number, number] = [0, 200, 83];

/** Recolours a mask's RGBA pixels in place: each takes `rgb`, with its grey level as its alpha,
 * so tissue is opaque, background transparent, and a smoothed edge in between. */
export function tintMask(px: Uint8ClampedArray, rgb: readonly [number, number, number] = TINT): void {
  for (let i = 0; i + 3 < px.length; i += 4) {
    const grey = px[i];
    px[i] = rgb[0];
    px[i + 1] = rgb[1];
    px[i + 2] = rgb[2];
    px[i + 3] = grey;
  }
}
