import { useState } from "preact/hooks";
import { api, newJob, type Priority, priorityRefusal } from "../api";
import { STAT_NOTE } from "../priority";

export type Params = {
  tile_size: number;
  overlap: number;
  format: "jpeg" | "png";
  quality: number;
  tissue: boolean;
  normalize: "none" | "macenko" | "reinhard";
};

export const DEFAULTS: Params = {
  tile_size: 254,
  overlap: 1,
  format: "jpeg",
  quality: 80,
  tissue: true,
  normalize: "none",
};

/** The API's rules for `wsi.preprocess` (events/src/params.rs), checked before sending. */
export function validate(p: Params): Record<string, string> {
  const e: Record<string, string> = {};
  if (!Number.isInteger(p.tile_size) || p.tile_size < 16 || p.tile_size > 4096)
    e.tile_size = "16 to 4096 pixels";
  if (!Number.isInteger(p.overlap) || p.overlap < 0 || p.overlap > Math.floor(p.tile_size / 4))
    e.overlap = "0 to a quarter of the tile size";
  if (!Number.isInteger(p.quality) || p.quality < 1 || p.quality > 100) e.quality = "1 to 100";
  return e;
}

export function JobForm(props: {
  slideId: string;
  slideName: string;
  onDone: () => void;
  onCancel: () => void;
}) {
  const [p, setP] = useState<Params>(DEFAULTS);
  const [errors, setErrors] = useState<Record<string, string>>({});
  const [priority, setPriority] = useState<Priority>("routine");
  // Who may submit STAT is the server's setting (Jobs__StatGroups), which the token does not
  // carry: everyone offered this form (WRITERS) may ask, and a refusal is shown at the choice,
  // in the server's words.
  const [priorityError, setPriorityError] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const num = (k: keyof Params) => (e: Event) =>
    setP({ ...p, [k]: Number((e.currentTarget as HTMLInputElement).value) });
  const field = (k: string) => (errors[k] ? { "aria-invalid": true, "aria-describedby": `err-${k}` } : {});
  return (
    <form
      class="panel"
      aria-label={`Process ${props.slideName}`}
      onSubmit={async (e) => {
        e.preventDefault();
        const errs = validate(p);
        setErrors(errs);
        if (Object.keys(errs).length) return;
        setBusy(true);
        setError("");
        setPriorityError("");
        try {
          await api("/api/jobs", {
            method: "POST",
            body: newJob(props.slideId, "wsi.preprocess", p, priority),
            headers: { "Idempotency-Key": crypto.randomUUID() },
          });
          props.onDone();
        } catch (err) {
          const refused = priorityRefusal(err);
          if (refused) setPriorityError(refused);
          else setError((err as Error).message);
        } finally {
          setBusy(false);
        }
      }}
    >
      <h2>Process {props.slideName}</h2>
      <fieldset
        class="choice"
        aria-describedby={priorityError ? "priority-note err-priority" : "priority-note"}
      >
        <legend>Priority</legend>
        {(
          [
            ["routine", "Routine"],
            ["stat", "STAT (frozen section, intraoperative)"],
          ] as const
        ).map(([value, label]) => (
          <label key={value} class="check">
            <input
              type="radio"
              name="priority"
              value={value}
              checked={priority === value}
              onChange={() => {
                setPriority(value);
                setPriorityError("");
              }}
            />
            {label}
          </label>
        ))}
        <p id="priority-note" class="muted">
          {STAT_NOTE}
        </p>
        {priorityError && (
          <p id="err-priority" role="alert" class="error">
            {priorityError}. Choose Routine to submit it now.
          </p>
        )}
      </fieldset>
      <label>
        Stain normalisation
        <select
          value={p.normalize}
          onChange={(e) => setP({ ...p, normalize: e.currentTarget.value as Params["normalize"] })}
        >
          <option value="none">none</option>
          <option value="macenko">Macenko</option>
          <option value="reinhard">Reinhard</option>
        </select>
      </label>
      <label>
        Tile format
        <select
          value={p.format}
          onChange={(e) => setP({ ...p, format: e.currentTarget.value as Params["format"] })}
        >
          <option value="jpeg">JPEG</option>
          <option value="png">PNG</option>
        </select>
      </label>
      <label>
        Tile size (pixels)
        <input type="number" value={p.tile_size} onInput={num("tile_size")} {...field("tile_size")} />
        {errors.tile_size && (
          <span id="err-tile_size" class="error">
            {errors.tile_size}
          </span>
        )}
      </label>
      <label>
        Overlap (pixels)
        <input type="number" value={p.overlap} onInput={num("overlap")} {...field("overlap")} />
        {errors.overlap && (
          <span id="err-overlap" class="error">
            {errors.overlap}
          </span>
        )}
      </label>
      <label>
        JPEG quality
        <input type="number" value={p.quality} onInput={num("quality")} {...field("quality")} />
        {errors.quality && (
          <span id="err-quality" class="error">
            {errors.quality}
          </span>
        )}
      </label>
      <label class="check">
        <input
          type="checkbox"
          checked={p.tissue}
          onChange={(e) => setP({ ...p, tissue: e.currentTarget.checked })}
        />
        Tissue mask and statistics
      </label>
      <div class="actions">
        <button type="submit" disabled={busy}>
          Submit job
        </button>
        <button type="button" onClick={props.onCancel}>
          Close
        </button>
      </div>
      {error && (
        <p role="alert" class="error">
          {error}
        </p>
      )}
    </form>
  );
}
