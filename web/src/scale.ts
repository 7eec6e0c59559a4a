// What a length on screen is on the glass (issue 37): the viewer's scale bar and its
// magnification readout. Everything here is in CSS pixels, because that is what the bar is
// drawn in and what OpenSeadragon's image zoom counts; the device pixel ratio does not enter.
//
// `zoom` is the image zoom: CSS pixels per level-0 pixel of the slide (the pyramid is built from
// level 0, so its pixels are the slide's). `mpp` is the slide's micrometres per level-0 pixel.
// A measuring tool would convert with the same two numbers: µm = image pixels × mpp.

/** The longest 1, 2 or 5 × 10^k µm that is at most `um` (which must be positive and finite). */
export function niceLength(um: number): number {
  if (!(um > 0 && Number.isFinite(um))) throw new RangeError(`no nice length below ${um} µm`);
  let k = Math.floor(Math.log10(um));
  // log10 of an exact power of ten may come out a hair under the integer, or over it.
  if (Number(`1e${k + 1}`) <= um) k += 1;
  if (Number(`1e${k}`) > um) k -= 1;
  // Read back from decimal so that 2 × 10^-1 is 0.2, not 0.2000000000000001.
  for (const step of [5, 2, 1]) {
    const length = Number(`${step}e${k}`);
    if (length <= um) return length;
  }
  return Number(`1e${k}`);
}

/** A physical length as a person reads it: µm below a millimetre, mm from there. */
export function lengthLabel(um: number): string {
  const [value, unit] = um >= 1000 ? [um / 1000, "mm"] : [um, "µm"];
  return `${Number(value.toPrecision(6))} ${unit}`;
}

export type ScaleBar = {
  /** The bar's physical length, a nice one. */
  um: number;
  /** Its length on screen, in CSS pixels. */
  px: number;
  label: string;
};

/** The bar for a slide of `mpp` µm per pixel shown at image zoom `zoom`: the longest nice length
 * that fits in `maxPx` CSS pixels, so the bar is between `maxPx` / 2.5 and `maxPx` long. Null when
 * either number is unusable. */
export function scaleBar(mpp: number, zoom: number, maxPx = 150): ScaleBar | null {
  const umPerPx = mpp / zoom;
  if (!(umPerPx > 0 && Number.isFinite(umPerPx) && maxPx > 0)) return null;
  const um = niceLength(maxPx * umPerPx);
  return { um, px: um / umPerPx, label: lengthLabel(um) };
}

export type Magnification = {
  /** The magnification on screen, as if looking through an objective of this power. */
  times: number;
  /** `objective`: the scanner's objective power times the zoom. `pixel size`: no objective
   * power was recorded, so it is estimated from the pixel size, taking 10× as 1 µm per pixel. */
  from: "objective" | "pixel size";
};

/** The effective magnification at image zoom `zoom`; null when the slide records neither an
 * objective power nor a pixel size. At zoom 1 (one screen pixel per slide pixel) a slide scanned
 * with a 20× objective is seen at 20×. */
export function magnification(
  zoom: number,
  objectivePower: number | undefined,
  mpp: number | undefined,
): Magnification | null {
  if (!(zoom > 0 && Number.isFinite(zoom))) return null;
  if (objectivePower && objectivePower > 0) return { times: objectivePower * zoom, from: "objective" };
  if (mpp && mpp > 0) return { times: (10 * zoom) / mpp, from: "pixel size" };
  return null;
}

/** "20×", "3.8×", "0.19×". */
export function magnificationLabel(times: number): string {
  const shown = times >= 10 ? times.toFixed(0) : times >= 1 ? times.toFixed(1) : times.toPrecision(2);
  return `${Number(shown)}×`;
}
