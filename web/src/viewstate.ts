// The viewer's view in the address's fragment (issue 37), so that a copied link opens the same
// place: `#x=1110&y=1484&z=0.42&layer=normalized&mask=0.35`. The fragment, not the query: it is
// the page's own state, the route (nav.tsx) is the path alone, and the server never sees it.
//
// `x`, `y` are the centre of the view in the slide's level-0 pixels and `z` the image zoom (CSS
// pixels per slide pixel), not OpenSeadragon's viewport units: a link then shows the same
// magnification on a screen of another size, and stays meaningful if the pyramid's layout changes.

export type Layer = "original" | "normalized";

export type View = {
  /** Where and how close; absent when the link has no (usable) position. */
  at?: { x: number; y: number; zoom: number };
  layer: Layer;
  /** The tissue mask's opacity, 0 to 1; null when the mask is off. */
  mask: number | null;
};

/** Reads a fragment (`location.hash`); anything missing or malformed is the default. */
export function parseView(hash: string): View {
  const q = new URLSearchParams(hash.replace(/^#/, ""));
  const num = (k: string) => {
    const s = q.get(k);
    const v = s === null || s.trim() === "" ? Number.NaN : Number(s);
    return Number.isFinite(v) ? v : null;
  };
  const [x, y, zoom, mask] = [num("x"), num("y"), num("z"), num("mask")];
  const view: View = {
    layer: q.get("layer") === "normalized" ? "normalized" : "original",
    mask: mask !== null && mask >= 0 && mask <= 1 ? mask : null,
  };
  if (x !== null && y !== null && zoom !== null && zoom > 0) view.at = { x, y, zoom };
  return view;
}

/** The fragment for a view, `#` included. Positions are rounded to a pixel and the zoom to four
 * significant digits: finer would only make the link longer. */
export function formatView(view: View): string {
  const q = new URLSearchParams();
  if (view.at) {
    q.set("x", String(Math.round(view.at.x)));
    q.set("y", String(Math.round(view.at.y)));
    q.set("z", String(Number(view.at.zoom.toPrecision(4))));
  }
  if (view.layer !== "original") q.set("layer", view.layer);
  if (view.mask !== null) q.set("mask", String(Number(view.mask.toFixed(2))));
  const s = q.toString();
  return s ? `#${s}` : "";
}
