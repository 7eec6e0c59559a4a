// What a succeeded job made, in numbers a pathologist reads (issue 37): the manifest
// (`GET /api/jobs/{id}/results/manifest.json`, written by the worker: gpu-worker/src/process.rs)
// and a summary of its `stats.json`, whose rows are the full-resolution tiles.

/** The manifest's fields the app reads. A field the worker did not write is absent. */
export type Manifest = {
  slide: { width: number; height: number };
  /** 2 when the pyramids are layers (one object each, served under `/api/jobs/{id}/layers/`);
   * 1 (or absent) when they are DeepZoom trees among the results. */
  format_version?: number;
  /** The pyramids as layers, by name (`slide`, `normalized`). */
  layers?: Record<string, { key: string; width: number; height: number }>;
  deepzoom: {
    /** A tree's `.dzi`; absent for layers. */
    dzi?: string;
    tile_size?: number;
    overlap?: number;
    format?: string;
    levels?: number;
    tiles?: number;
  };
  /** Null when the job made no tissue mask. */
  tissue: { mask: string; fraction?: number } | null;
  normalized: { dzi?: string } | null;
  /** The statistics' file among the results. */
  stats?: string;
};

/**
 * Where OpenSeadragon finds a pyramid: its `.dzi` and the base of its tiles. A layer is served
 * from its one object under `/api/jobs/{id}/layers/`; a tree's files under `…/results/`.
 * Null when the manifest has no such pyramid.
 */
export function pyramidOf(
  m: Manifest,
  job: string,
  name: "slide" | "normalized",
): { dzi: string; tiles: string } | null {
  if (m.layers) {
    if (!m.layers[name]) return null;
    const base = `/api/jobs/${job}/layers/${name}`;
    return { dzi: `${base}.dzi`, tiles: `${base}_files/` };
  }
  const dzi = name === "slide" ? m.deepzoom.dzi : m.normalized?.dzi;
  if (!dzi) return null;
  const results = `/api/jobs/${job}/results`;
  return { dzi: `${results}/${dzi}`, tiles: `${results}/${dzi.replace(/\.dzi$/, "")}_files/` };
}

/** `stats.json` in short. */
export type StatsSummary = {
  /** Full-resolution tiles. */
  tiles: number;
  /** Tiles with any tissue, and with at least half; null without a tissue mask. */
  withTissue: number | null;
  mostlyTissue: number | null;
  /** The tiles' mean tissue fraction, 0 to 1; null without a tissue mask. */
  meanTissue: number | null;
  /** The mean brightness (0 to 255, the mean of the channels' means) of the tiles with tissue,
   * or of every tile without a mask; null when there is no tile. */
  meanBrightness: number | null;
};

/**
 * Sums up a `stats.json`: `{"columns": ["col", "row", "tissue", "mean", "std"], "tiles": [...]}`,
 * one row per tile, `tissue` a fraction (null without a mask) and `mean` the channels' means.
 * Columns are found by name; a document without `tiles` and `columns` throws.
 */
export function summarizeStats(doc: unknown): StatsSummary {
  const d = doc as { columns?: unknown; tiles?: unknown };
  if (!d || !Array.isArray(d.columns) || !Array.isArray(d.tiles))
    throw new Error("stats.json: no columns and tiles");
  const col = (name: string) => (d.columns as unknown[]).indexOf(name);
  const [ti, mi] = [col("tissue"), col("mean")];
  const rows = d.tiles.filter(Array.isArray) as unknown[][];
  const fractions = ti < 0 ? [] : rows.map((r) => r[ti]).filter((v): v is number => typeof v === "number");
  const masked = fractions.length > 0;
  const brightness = (r: unknown[]): number | null => {
    const m = mi < 0 ? undefined : r[mi];
    const v = Array.isArray(m) ? m.filter((x): x is number => typeof x === "number") : [];
    return v.length ? v.reduce((a, b) => a + b, 0) / v.length : typeof m === "number" ? m : null;
  };
  const lit = rows
    .filter((r) => !masked || (typeof r[ti] === "number" && (r[ti] as number) > 0))
    .map(brightness)
    .filter((v): v is number => v !== null);
  const mean = (v: number[]) => (v.length ? v.reduce((a, b) => a + b, 0) / v.length : null);
  return {
    tiles: rows.length,
    withTissue: masked ? fractions.filter((f) => f > 0).length : null,
    mostlyTissue: masked ? fractions.filter((f) => f >= 0.5).length : null,
    meanTissue: masked ? mean(fractions) : null,
    meanBrightness: mean(lit),
  };
}

/** A fraction as a percentage with one decimal: "43.2 %". */
export function percentOf(fraction: number): string {
  return `${(fraction * 100).toFixed(1)} %`;
}
