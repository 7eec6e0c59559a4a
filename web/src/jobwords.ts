// The words the app uses for job kinds and their parameters: the job form's labels and help
// lines, and what a job is called in lists ("CMU-1 · Macenko · 14:02", names.ts). The API's
// document has the rules (jobkinds.ts), not these words.

/** How the form shows a parameter: words a person reads, which the API's document does not
 * have. The rules themselves (type, values, range, default) come from the document
 * (`../jobkinds`); a parameter not named here is shown by its name, after these. */
export type Presentation = {
  label: string;
  /** Said after the allowed range when a value is out of it. */
  unit?: string;
  /** One plain line under the field: what it does, for someone who has not read the API. */
  help: string;
  /** The words for an enum's values. */
  options?: Record<string, string>;
};

export const PRESENTATION: Record<string, Presentation> = {
  normalize: {
    label: "Stain normalisation",
    help: "Evens out stain colour between slides. The original tiles are kept; a normalised set is added.",
    options: { none: "none", macenko: "Macenko", reinhard: "Reinhard" },
  },
  format: {
    label: "Tile format",
    help: "JPEG tiles are smaller; PNG tiles keep every pixel exactly.",
    options: { jpeg: "JPEG", png: "PNG" },
  },
  tile_size: {
    label: "Tile size (pixels)",
    unit: "pixels",
    help: "The width and height of each square the viewer loads. 254 suits most screens.",
  },
  overlap: {
    label: "Overlap (pixels)",
    unit: "pixels",
    help: "How many pixels each tile repeats from its neighbours, so edges join without seams. At most a quarter of the tile size.",
  },
  quality: { label: "JPEG quality", help: "Higher is sharper and larger. Used for JPEG tiles only." },
  tissue: {
    label: "Tissue mask and statistics",
    help: "Finds where the tissue is, as a mask the viewer can show, and how much of each tile it covers.",
  },
};

/** A job kind in words, where the form offers a choice of kinds and where a job is named. A
 * kind not listed here is shown by its API name. */
export const KIND_LABELS: Record<string, string> = {
  "wsi.preprocess": "Tile pyramid",
};
