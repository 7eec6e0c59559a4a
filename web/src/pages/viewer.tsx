// The result pyramid in OpenSeadragon (ADR 0016 says how tiles are authorised): the `.dzi`
// and the manifest come through the API with the Bearer token; tiles are fetched with XHR
// (`loadTilesWithAjax`) carrying the same header. A job's pyramids are layers (ADR 0036), whose
// tiles the gateway reads from the layer's object (`GET /api/jobs/{id}/layers/…`); results
// stored before layers are DeepZoom trees under `GET /api/jobs/{id}/results/…`, whose redirect
// goes to a short-lived URL (the browser drops `Authorization` on a cross-origin redirect, so
// S3 sees only its own signature). Every tile request goes through the API, so no tile URL can
// be stale. The stain-normalised pyramid, when the job made one, is a second
// layer; the tissue mask is a green tint of adjustable opacity over both (mask.ts).
//
// Around the picture (issue 37): the slide's name and what the worker read from it, a scale bar
// and the magnification (scale.ts), and the view in the address (viewstate.ts). What is drawn
// over the picture sits in `.viewer-frame` beside OpenSeadragon's element, never inside it, and
// lets the pointer through; a measuring or annotation layer would go there too, and would convert
// with the slide's level-0 pixels and `mpp_x`, as the scale bar does.

import type OpenSeadragonNs from "openseadragon";
import { useEffect, useRef, useState } from "preact/hooks";
import { api, bearer, type Job, type Slide, type SlideMetadata, slideMetadata } from "../api";
import { tintMask } from "../mask";
import { jobName } from "../names";
import { Link, useHeading } from "../nav";
import { type Manifest, percentOf, pyramidOf } from "../results";
import { magnification, magnificationLabel, scaleBar } from "../scale";
import { formatView, type Layer, parseView, type View } from "../viewstate";

type Item = { setOpacity(o: number): void };

/** The mask's opacity until someone moves the slider: a tint that leaves the tissue readable. */
const MASK_OPACITY = 0.35;

/** How long the view must rest before the address follows it, in ms: the history entry is
 * rewritten once per gesture, not once per animation frame. */
const ADDRESS_DELAY = 300;

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

/** The mask PNG, tinted (mask.ts), as an object URL the caller revokes. */
async function tinted(png: Blob): Promise<string> {
  const bmp = await createImageBitmap(png);
  const canvas = document.createElement("canvas");
  canvas.width = bmp.width;
  canvas.height = bmp.height;
  const g = canvas.getContext("2d");
  if (!g) throw new Error("the tissue mask: this browser gives no 2D canvas");
  g.drawImage(bmp, 0, 0);
  bmp.close();
  const px = g.getImageData(0, 0, canvas.width, canvas.height);
  tintMask(px.data);
  g.putImageData(px, 0, 0);
  const out = await new Promise<Blob | null>((ok) => canvas.toBlob(ok, "image/png"));
  if (!out) throw new Error("the tissue mask could not be tinted");
  return URL.createObjectURL(out);
}

/** Where the view is heading, in the slide's pixels (the first item is the slide's pyramid, built
 * from level 0), or nothing before the pyramid is open. */
function viewOf(viewer: OpenSeadragonNs.Viewer): View["at"] {
  const slide = viewer.world.getItemAt(0);
  if (!slide) return undefined;
  const c = slide.viewportToImageCoordinates(viewer.viewport.getCenter());
  return { x: c.x, y: c.y, zoom: slide.viewportToImageZoom(viewer.viewport.getZoom()) };
}

export function ViewerPage(props: { id: string }) {
  const host = useRef<HTMLDivElement>(null);
  // The layers the address asks for, read once; from then on the address follows the page.
  const [asked] = useState(() => parseView(location.hash));
  const [error, setError] = useState("");
  const [manifest, setManifest] = useState<Manifest | null>(null);
  const [slide, setSlide] = useState<Slide | null>(null);
  const [job, setJob] = useState<Job | null>(null);
  const [slideError, setSlideError] = useState("");
  const [maskOn, setMaskOn] = useState(asked.mask !== null);
  const [maskOpacity, setMaskOpacity] = useState(asked.mask ?? MASK_OPACITY);
  const [layer, setLayer] = useState<Layer>(asked.layer);
  /** CSS pixels per slide pixel as drawn now; null until the pyramid is open. */
  const [zoom, setZoom] = useState<number | null>(null);
  const [drawn, setDrawn] = useState(false);
  const items = useRef<{
    mask?: Item;
    normalized?: Item;
    viewer?: OpenSeadragonNs.Viewer;
    maskUrl?: string;
    /** Where the address asked to be, until the pyramid is open and the view is there. */
    pending?: View["at"];
    opened?: boolean;
    /** The page's path: the address is not rewritten once the app has moved elsewhere. */
    path?: string;
    addressTimer?: ReturnType<typeof setTimeout>;
  }>({});
  // The layers' settings, for the viewer's callbacks, which outlive the render that made them.
  const shown = useRef({ layer, maskOn, maskOpacity });
  shown.current = { layer, maskOn, maskOpacity };
  const results = `/api/jobs/${props.id}/results`;

  const applyLayers = () => {
    const { mask, normalized } = items.current;
    mask?.setOpacity(shown.current.maskOn ? shown.current.maskOpacity : 0);
    normalized?.setOpacity(shown.current.layer === "normalized" ? 1 : 0);
  };

  /** Rewrites the address's fragment once the view has rested (viewstate.ts). */
  const remember = () => {
    clearTimeout(items.current.addressTimer);
    items.current.addressTimer = setTimeout(() => {
      const { viewer, opened, pending, path } = items.current;
      if (location.pathname !== path) return;
      const s = shown.current;
      const hash = formatView({
        at: viewer && opened ? viewOf(viewer) : pending,
        layer: s.layer,
        mask: s.maskOn ? s.maskOpacity : null,
      });
      if (hash !== location.hash)
        history.replaceState(history.state, "", location.pathname + location.search + hash);
    }, ADDRESS_DELAY);
  };

  useEffect(() => {
    let cancelled = false;
    setSlide(null);
    setSlideError("");
    api<Job>(`/api/jobs/${props.id}`)
      .then((j) => {
        if (!cancelled) setJob(j);
        return api<Slide>(`/api/slides/${j.slide_id}`);
      })
      .then(
        (s) => {
          if (!cancelled) setSlide(s);
        },
        (e) => {
          if (!cancelled) setSlideError((e as Error).message);
        },
      );
    return () => {
      cancelled = true;
    };
  }, [props.id]);

  useEffect(() => {
    let cancelled = false;
    items.current.pending = parseView(location.hash).at;
    items.current.path = location.pathname;
    (async () => {
      const m = await api<Manifest>(`${results}/manifest.json`);
      if (cancelled || !host.current) return;
      setManifest(m);
      const OSD = (await import("openseadragon")).default;
      const pyramid = pyramidOf(m, props.id, "slide");
      if (!pyramid) throw new Error("the results have no pyramid");
      const slide = dziSource(await text(pyramid.dzi), pyramid.tiles);
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
        // On a touch screen one finger pans and two pinch, and neither scrolls the page (the
        // element's `touch-action: none` in styles.css says the same to the browser).
        // Cooperative gestures would leave one-finger drags to the page.
        cooperativeGestures: false,
        gestureSettingsTouch: {
          dragToPan: true,
          pinchToZoom: true,
          flickEnabled: true,
          scrollToZoom: false,
          clickToZoom: false,
          dblClickToZoom: true,
        },
      } as OpenSeadragonNs.Options);
      items.current.viewer = viewer;
      const measure = () => {
        const item = viewer.world.getItemAt(0);
        if (item) setZoom(item.viewportToImageZoom(viewer.viewport.getZoom(true)));
      };
      viewer.addHandler("open", () => {
        const item = viewer.world.getItemAt(0);
        const at = items.current.pending;
        if (item && at) {
          viewer.viewport.zoomTo(item.imageToViewportZoom(at.zoom), undefined, true);
          viewer.viewport.panTo(item.imageToViewportCoordinates(at.x, at.y), true);
          viewer.viewport.applyConstraints(true);
        }
        items.current.opened = true;
        measure();
      });
      // After every frame drawn, so the bar follows an animation as it runs.
      viewer.addHandler("update-viewport", measure);
      viewer.addHandler("viewport-change", remember);
      viewer.addHandler("tile-drawn", () => setDrawn(true));
      const normalized = m.normalized ? pyramidOf(m, props.id, "normalized") : null;
      if (normalized) {
        viewer.addTiledImage({
          tileSource: dziSource(await text(normalized.dzi), normalized.tiles),
          opacity: 0,
          x: 0,
          y: 0,
          width: 1,
          success: (e: unknown) => {
            items.current.normalized = (e as { item: Item }).item;
            applyLayers();
          },
        });
      }
      if (m.tissue) {
        const res = await fetch(`${results}/${m.tissue.mask}`, { headers: bearer() });
        if (!res.ok) throw new Error(`the tissue mask: ${res.status}`);
        const url = await tinted(await res.blob());
        if (cancelled) {
          URL.revokeObjectURL(url);
          return;
        }
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
            applyLayers();
          },
        });
      }
    })().catch((e) => setError((e as Error).message));
    return () => {
      cancelled = true;
      clearTimeout(items.current.addressTimer);
      items.current.viewer?.destroy();
      if (items.current.maskUrl) URL.revokeObjectURL(items.current.maskUrl);
      items.current = {};
    };
  }, [props.id]);

  useEffect(() => {
    applyLayers();
    remember();
  }, [maskOn, maskOpacity, layer, manifest]);

  const meta = slideMetadata(slide?.metadata);
  const mpp = meta.mpp_x;
  const bar = zoom !== null && mpp !== undefined ? scaleBar(mpp, zoom) : null;
  const mag = zoom !== null ? magnification(zoom, meta.objective_power, mpp) : null;
  const heading = useHeading(
    slide?.name ? `${slide.name} (viewer)` : slideError || error ? "Slide viewer" : null,
  );

  return (
    <section aria-labelledby="viewer-title" class="viewer-page">
      <h1 id="viewer-title" ref={heading} tabIndex={-1}>
        {slide?.name || "Slide viewer"}
      </h1>
      <p class="muted subtitle">
        Result of the job <Link href={`/jobs/${props.id}`}>{job ? jobName(job) : "…"}</Link>
      </p>
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
              Mask opacity ({Math.round(maskOpacity * 100)} %)
              <input
                type="range"
                min={0}
                max={1}
                step={0.05}
                value={maskOpacity}
                aria-valuetext={`${Math.round(maskOpacity * 100)} %`}
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
      <div class="viewer-layout">
        <div class="viewer-frame">
          <div
            ref={host}
            class="viewer"
            data-drawn={drawn ? "yes" : "no"}
            role="img"
            aria-label="The slide's pyramid"
          />
          {zoom !== null && slide && (
            <div class="viewer-scale">
              {bar ? (
                <div class="scale">
                  <div class="scale-bar" style={{ width: `${bar.px}px` }} />
                  <span class="scale-label">{bar.label}</span>
                </div>
              ) : (
                <p class="scale-none">no scale: the slide records no pixel size</p>
              )}
              {mag && (
                <p class="magnification">
                  {magnificationLabel(mag.times)}{" "}
                  <span class="muted">
                    {mag.from === "objective"
                      ? `(${meta.objective_power}× objective × zoom)`
                      : "(estimated from the pixel size: 10× ≈ 1 µm/px)"}
                  </span>
                </p>
              )}
            </div>
          )}
        </div>
        <SlideFacts slide={slide} meta={meta} error={slideError} tissue={manifest?.tissue?.fraction} />
      </div>
    </section>
  );
}

/** What the worker read from the slide, as recorded: a fact the slide lacks is left out, except
 * the pixel size, whose absence is why there is no scale bar. */
function SlideFacts(props: {
  slide: Slide | null;
  meta: SlideMetadata;
  error: string;
  /** The job's tissue fraction, from its manifest. */
  tissue: number | undefined;
}) {
  const { slide, meta } = props;
  const mpp =
    meta.mpp_x === undefined
      ? "not recorded"
      : meta.mpp_y === undefined || meta.mpp_y === meta.mpp_x
        ? `${meta.mpp_x} µm/px`
        : `${meta.mpp_x} × ${meta.mpp_y} µm/px (across × down)`;
  return (
    <details class="slide-facts" open>
      <summary>Slide details</summary>
      {props.error && <p class="error">The slide's details could not be read: {props.error}</p>}
      {!slide && !props.error && <p class="muted">Loading…</p>}
      {slide && (
        <dl class="facts">
          {slide.name && (
            <>
              <dt>Name</dt>
              <dd>{slide.name}</dd>
            </>
          )}
          {meta.vendor && (
            <>
              <dt>Vendor</dt>
              <dd>{meta.vendor}</dd>
            </>
          )}
          {meta.width !== undefined && meta.height !== undefined && (
            <>
              <dt>Dimensions</dt>
              <dd>
                {meta.width.toLocaleString()} × {meta.height.toLocaleString()} px
              </dd>
            </>
          )}
          <dt>Pixel size</dt>
          <dd data-fact="mpp">{mpp}</dd>
          {meta.objective_power !== undefined && (
            <>
              <dt>Objective</dt>
              <dd>{meta.objective_power}×</dd>
            </>
          )}
          {props.tissue !== undefined && (
            <>
              <dt>Tissue</dt>
              <dd data-fact="tissue">{percentOf(props.tissue)} of the slide</dd>
            </>
          )}
        </dl>
      )}
    </details>
  );
}
