import { useState } from "preact/hooks";
import { api, type NewJob, newJob, type Priority, priorityRefusal } from "../api";
import {
  allowed,
  defaultsOf,
  fits,
  KINDS,
  type KindRules,
  type ParamRule,
  type ParamValue,
  type ParamValues,
} from "../jobkinds";
import { STAT_NOTE } from "../priority";

/** How the form shows a parameter: words a person reads, which the API's document does not
 * have. The rules themselves (type, values, range, default) come from the document
 * (`../jobkinds`); a parameter not named here is shown by its name, after these. */
type Presentation = {
  label: string;
  /** Said after the allowed range when a value is out of it. */
  unit?: string;
  /** What is allowed, when the document's range is not the whole rule. */
  hint?: string;
  /** The words for an enum's values. */
  options?: Record<string, string>;
};

const PRESENTATION: Record<string, Presentation> = {
  normalize: {
    label: "Stain normalisation",
    options: { none: "none", macenko: "Macenko", reinhard: "Reinhard" },
  },
  format: { label: "Tile format", options: { jpeg: "JPEG", png: "PNG" } },
  tile_size: { label: "Tile size (pixels)", unit: "pixels" },
  overlap: { label: "Overlap (pixels)", hint: "0 to a quarter of the tile size" },
  quality: { label: "JPEG quality" },
  tissue: { label: "Tissue mask and statistics" },
};

const ORDER = Object.keys(PRESENTATION);

/** Rules between parameters, which a JSON schema does not state: the document has them in words
 * only (`PreprocessParams.overlap`: "At most a quarter of `tile_size`"). The API checks them too
 * (events/src/params.rs); these only say so before sending. */
const RELATIONS: Partial<Record<string, (p: ParamValues) => Record<string, string>>> = {
  "wsi.preprocess": (p): Record<string, string> => {
    const { overlap, tile_size } = p;
    if (typeof overlap === "number" && typeof tile_size === "number" && overlap > Math.floor(tile_size / 4))
      return { overlap: "0 to a quarter of the tile size" };
    return {};
  },
};

/** A kind's parameters in the order the form shows them. */
export function shown(kind: KindRules): ParamRule[] {
  const at = (name: string) => {
    const i = ORDER.indexOf(name);
    return i < 0 ? ORDER.length : i;
  };
  return [...kind.params].sort((a, b) => at(a.name) - at(b.name) || a.name.localeCompare(b.name));
}

/** The API's rules for a kind's parameters, checked before sending: one message per parameter
 * that breaks them. */
export function validate(kind: KindRules, p: ParamValues): Record<string, string> {
  const e: Record<string, string> = {};
  for (const rule of kind.params) {
    if (fits(rule, p[rule.name])) continue;
    const how = PRESENTATION[rule.name];
    e[rule.name] = how?.hint ?? [allowed(rule), how?.unit].filter(Boolean).join(" ");
  }
  return { ...RELATIONS[kind.kind]?.(p), ...e };
}

function Param(props: {
  rule: ParamRule;
  value: ParamValue;
  error: string | undefined;
  onChange: (v: ParamValue) => void;
}) {
  const { rule, error } = props;
  const how = PRESENTATION[rule.name];
  const label = how?.label ?? rule.name;
  const invalid = error ? { "aria-invalid": true, "aria-describedby": `err-${rule.name}` } : {};
  const message = error && (
    <span id={`err-${rule.name}`} class="error">
      {error}
    </span>
  );
  switch (rule.type) {
    case "boolean":
      return (
        <label class="check">
          <input
            type="checkbox"
            checked={props.value === true}
            onChange={(e) => props.onChange(e.currentTarget.checked)}
          />
          {label}
          {message}
        </label>
      );
    case "string":
      return (
        <label>
          {label}
          <select
            value={String(props.value)}
            onChange={(e) => props.onChange(e.currentTarget.value)}
            {...invalid}
          >
            {rule.values.map((v) => (
              <option key={v} value={v}>
                {how?.options?.[v] ?? v}
              </option>
            ))}
          </select>
          {message}
        </label>
      );
    case "integer":
      return (
        <label>
          {label}
          <input
            type="number"
            value={Number(props.value)}
            onInput={(e) => props.onChange(Number(e.currentTarget.value))}
            {...invalid}
          />
          {message}
        </label>
      );
  }
}

export function JobForm(props: {
  slideId: string;
  slideName: string;
  onDone: () => void;
  onCancel: () => void;
}) {
  const [kind, setKind] = useState<KindRules>(KINDS[0]);
  const [p, setP] = useState<ParamValues>(() => defaultsOf(KINDS[0]));
  const [errors, setErrors] = useState<Record<string, string>>({});
  const [priority, setPriority] = useState<Priority>("routine");
  // Who may submit STAT is the server's setting (Jobs__StatGroups), which the token does not
  // carry: everyone offered this form (WRITERS) may ask, and a refusal is shown at the choice,
  // in the server's words.
  const [priorityError, setPriorityError] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  return (
    <form
      class="panel"
      aria-label={`Process ${props.slideName}`}
      onSubmit={async (e) => {
        e.preventDefault();
        const errs = validate(kind, p);
        setErrors(errs);
        if (Object.keys(errs).length) return;
        setBusy(true);
        setError("");
        setPriorityError("");
        try {
          await api("/api/jobs", {
            method: "POST",
            // Checked against the kind's schema above (and by the API again).
            body: newJob(props.slideId, kind.kind, p as NewJob["params"], priority),
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
      {KINDS.length > 1 && (
        <label>
          Job kind
          <select
            value={kind.kind}
            onChange={(e) => {
              const k = KINDS.find((x) => x.kind === e.currentTarget.value) ?? KINDS[0];
              setKind(k);
              setP(defaultsOf(k));
              setErrors({});
            }}
          >
            {KINDS.map((k) => (
              <option key={k.kind} value={k.kind}>
                {k.kind}
              </option>
            ))}
          </select>
        </label>
      )}
      {shown(kind).map((rule) => (
        <Param
          key={`${kind.kind}.${rule.name}`}
          rule={rule}
          value={p[rule.name]}
          error={errors[rule.name]}
          onChange={(v) => setP({ ...p, [rule.name]: v })}
        />
      ))}
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
