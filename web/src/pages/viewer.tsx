// The result pyramid in OpenSeadragon (ADR 0016 says how tiles are authorised): the `.dzi`
// and the manifest come through the API with the Bearer token; tiles are fetched with XHR
// (`loadTilesWithAjax`) carrying the same header to `GET /api/jobs/{id}/results/…`, whose
// redirect goes to a short-lived URL (the browser drops `Authorization` on a cross-origin
// redirect, so S3 sees only its own signature). Every tile request goes through the API, so
// no tile URL can be stale. The tissue mask is an overlay of adjustable opacity; the
// stain-normalised pyramid, when the job made one, is a second layer.

import type OpenSeadragonNs from "openseadragon";
import { useEffect, useRef, useState } from "preact/hooks";
import { api, bearer } from "../api";
import { Link } from "../nav";

type Manifest = {
  slide: { width: number; height: number };
  deepzoom: { dzi: string };
  tissue: { mask: string } | null;
  normalized: { dzi: string } | null;
};

type Item = { setOpacity(o: number): void };

/** A `.dzi` document as OpenSeadragon's inline DZI tile source, its tiles under `base`. */
export function dziSource(xml: string, base: string): object {
  const doc = new DOMParser().parseFromString(xml, "application/xml");
  const image = doc.getElementsByTagName("Image")[0];
  const size = doc.getElementsByTagName("Size")[0];
  if (!image || !size) throw new Error("the pyramid's descriptor is not a DeepZoom document");
  return {
    Image: {
      xmlns: "http://schemas.microsoft.com/deepzoom/2008",
      Url: base,
      Format: image.getAttribute("Format"),
      Overlap: image.getAttribute("Overlap"),
      TileSize: image.getAttribute("TileSize"),
      Size: { Width: size.getAttribute("Width"), Height: size.getAttribute("Height") },
    },
  };
}

async function text(url: string): Promise<string> {
  const res = await fetch(url, { headers: bearer() });
  if (!res.ok) throw new Error(`${url}: ${res.status}`);
  return res.text();
}

export function ViewerPage(props: { id: string }) {
  const host = useRef<HTMLDivElement>(null);
  const [error, setError] = useState("");
  const [manifest, setManifest] = useState<Manifest | null>(null);
  const [maskOn, setMaskOn] = useState(false);
  const [maskOpacity, setMaskOpacity] = useState(0.5);
  const [layer, setLayer] = useState<"original" | "normalized">("original");
  const [drawn, setDrawn] = useState(false);
  const items = useRef<{ mask?: Item; normalized?: Item; viewer?: OpenSeadragonNs.Viewer; maskUrl?: string }>(
    {},
  );
  const results = `/api/jobs/${props.id}/results`;

  useEffect(() => {
    let cancelled = false;
    (async () => {
      const m = await api<Manifest>(`${results}/manifest.json`);
      if (cancelled || !host.current) return;
      setManifest(m);
      const OSD = (await import("openseadragon")).default;
      const slide = dziSource(
        await text(`${results}/${m.deepzoom.dzi}`),
        `${results}/${m.deepzoom.dzi.replace(/\.dzi$/, "")}_files/`,
      );
      if (cancelled || !host.current) return;
      const viewer = OSD({
        element: host.current,
        tileSources: slide,
        loadTilesWithAjax: true,
        ajaxHeaders: bearer(),
        showNavigator: true,
        showNavigationControl: false,
        crossOriginPolicy: false,
        drawer: "canvas",
      } as OpenSeadragonNs.Options);
      items.current.viewer = viewer;
      viewer.addHandler("tile-drawn", () => setDrawn(true));
      if (m.normalized) {
        viewer.addTiledImage({
          tileSource: dziSource(
            await text(`${results}/${m.normalized.dzi}`),
            `${results}/${m.normalized.dzi.replace(/\.dzi$/, "")}_files/`,
          ),
          opacity: 0,
          x: 0,
          y: 0,
          width: 1,
          success: (e: unknown) => {
            items.current.normalized = (e as { item: Item }).item;
          },
        });
      }
      if (m.tissue) {
        const res = await fetch(`${results}/${m.tissue.mask}`, { headers: bearer() });
        if (!res.ok) throw new Error(`the tissue mask: ${res.status}`);
        const url = URL.createObjectURL(await res.blob());
        items.current.maskUrl = url;
        viewer.addTiledImage({
          tileSource: { type: "image", url, buildPyramid: false },
          opacity: 0,
          x: 0,
          y: 0,
          width: 1,
          loadTilesWithAjax: false,
          success: (e: unknown) => {
            items.current.mask = (e as { item: Item }).item;
          },
        });
      }
    })().catch((e) => setError((e as Error).message));
    return () => {
      cancelled = true;
      items.current.viewer?.destroy();
      if (items.current.maskUrl) URL.revokeObjectURL(items.current.maskUrl);
      items.current = {};
    };
  }, [props.id]);

  useEffect(() => {
    items.current.mask?.setOpacity(maskOn ? maskOpacity : 0);
  }, [maskOn, maskOpacity, manifest]);

  useEffect(() => {
    items.current.normalized?.setOpacity(layer === "normalized" ? 1 : 0);
  }, [layer, manifest]);

  return (
    <section aria-labelledby="viewer-title" class="viewer-page">
      <h1 id="viewer-title">
        Result of job <Link href={`/jobs/${props.id}`}>{props.id.slice(0, 8)}</Link>
      </h1>
      {error && (
        <p role="alert" class="error">
          {error}
        </p>
      )}
      <div class="viewer-controls">
        <button type="button" onClick={() => items.current.viewer?.viewport.zoomBy(1.5)}>
          Zoom in
        </button>
        <button type="button" onClick={() => items.current.viewer?.viewport.zoomBy(1 / 1.5)}>
          Zoom out
        </button>
        <button type="button" onClick={() => items.current.viewer?.viewport.goHome()}>
          Whole slide
        </button>
        {manifest?.tissue && (
          <>
            <label class="check">
              <input type="checkbox" checked={maskOn} onChange={(e) => setMaskOn(e.currentTarget.checked)} />
              Tissue mask
            </label>
            <label>
              Mask opacity
              <input
                type="range"
                min={0}
                max={1}
                step={0.05}
                value={maskOpacity}
                onInput={(e) => setMaskOpacity(Number(e.currentTarget.value))}
              />
            </label>
          </>
        )}
        {manifest?.normalized && (
          <fieldset class="inline">
            <legend>Layer</legend>
            <label class="check">
              <input
                type="radio"
                name="layer"
                checked={layer === "original"}
                onChange={() => setLayer("original")}
              />
              Original
            </label>
            <label class="check">
              <input
                type="radio"
                name="layer"
                checked={layer === "normalized"}
                onChange={() => setLayer("normalized")}
              />
              Stain-normalised
            </label>
          </fieldset>
        )}
      </div>
      <div
        ref={host}
        class="viewer"
        data-drawn={drawn ? "yes" : "no"}
        role="img"
        aria-label="The slide's pyramid"
      />
    </section>
  );
}
