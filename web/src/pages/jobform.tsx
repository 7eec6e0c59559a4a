import { useEffect, useRef, useState } from "preact/hooks";
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
import { KIND_LABELS, PRESENTATION } from "../jobwords";
import { STAT_NOTE } from "../priority";

const ORDER = Object.keys(PRESENTATION);

/** Bounds a parameter takes from the others', which a JSON schema cannot state: the document
 * has them in words only (`PreprocessParams.overlap`: "At most a quarter of `tile_size`"). The
 * API checks them too (`events/src/params.rs`: `overlap > tile_size / 4` is refused, in whole
 * pixels); these say so before sending, and set the field's own `max`. */
type Relation = (p: ParamValues) => { maximum?: number; why: string };
const RELATIONS: Partial<Record<string, Record<string, Relation>>> = {
  "wsi.preprocess": {
    overlap: (p) => {
      const t = p.tile_size;
      const why = "a quarter of the tile size";
      return typeof t === "number" && Number.isInteger(t) && t >= 0
        ? { maximum: Math.floor(t / 4), why }
        : { why };
    },
  },
};

/** The range a whole-number parameter takes now: its schema's, narrowed by the other values
 * (overlap by tile size). The form's inputs carry it as `min`/`max`, and `validate` checks it. */
export function bounds(
  kind: KindRules,
  rule: ParamRule & { type: "integer" },
  p: ParamValues,
): { min?: number; max?: number; why?: string } {
  const rel = RELATIONS[kind.kind]?.[rule.name]?.(p);
  const max =
    rel?.maximum === undefined
      ? rule.maximum
      : rule.maximum === undefined
        ? rel.maximum
        : Math.min(rule.maximum, rel.maximum);
  return {
    ...(rule.minimum !== undefined ? { min: rule.minimum } : {}),
    ...(max !== undefined ? { max } : {}),
    ...(rel ? { why: rel.why } : {}),
  };
}

/** A kind's parameters in the order the form shows them. */
export function shown(kind: KindRules): ParamRule[] {
  const at = (name: string) => {
    const i = ORDER.indexOf(name);
    return i < 0 ? ORDER.length : i;
  };
  return [...kind.params].sort((a, b) => at(a.name) - at(b.name) || a.name.localeCompare(b.name));
}

/** The API's rules for a kind's parameters, checked before sending: one message per parameter
 * that breaks them, in the form's words ("16 to 4096 pixels"). */
export function validate(kind: KindRules, p: ParamValues): Record<string, string> {
  const e: Record<string, string> = {};
  for (const rule of kind.params) {
    const v = p[rule.name];
    const how = PRESENTATION[rule.name];
    if (rule.type !== "integer") {
      if (!fits(rule, v)) e[rule.name] = allowed(rule);
      continue;
    }
    const { min, max, why } = bounds(kind, rule, p);
    const ok =
      fits(rule, v) &&
      (min === undefined || (v as number) >= min) &&
      (max === undefined || (v as number) <= max);
    if (ok) continue;
    const range = allowed({ ...rule, minimum: min, maximum: max });
    // Bounded by another value that is itself wrong, the range has no number to give.
    if (why && max === undefined) e[rule.name] = min === undefined ? `at most ${why}` : `${min} to ${why}`;
    else e[rule.name] = [range, how?.unit].filter(Boolean).join(" ") + (why ? ` (${why})` : "");
  }
  return e;
}

function Param(props: {
  rule: ParamRule;
  value: ParamValue;
  /** For a whole number: its range now (`bounds`). */
  range?: { min?: number; max?: number };
  error: string | undefined;
  onChange: (v: ParamValue) => void;
}) {
  const { rule, error } = props;
  const how = PRESENTATION[rule.name];
  const label = how?.label ?? rule.name;
  const help = how?.help ?? rule.description;
  const described = [help && `help-${rule.name}`, error && `err-${rule.name}`].filter(Boolean).join(" ");
  const aria = {
    ...(error ? { "aria-invalid": true } : {}),
    ...(described ? { "aria-describedby": described } : {}),
  };
  const notes = (
    <>
      {help && (
        <span id={`help-${rule.name}`} class="help">
          {help}
        </span>
      )}
      {error && (
        <span id={`err-${rule.name}`} class="error">
          {error}
        </span>
      )}
    </>
  );
  switch (rule.type) {
    case "boolean":
      return (
        <div class="field">
          <label class="check">
            <input
              type="checkbox"
              name={rule.name}
              checked={props.value === true}
              onChange={(e) => props.onChange(e.currentTarget.checked)}
              {...aria}
            />
            {label}
          </label>
          {notes}
        </div>
      );
    case "string":
      return (
        <label>
          {label}
          <select
            name={rule.name}
            value={String(props.value)}
            onChange={(e) => props.onChange(e.currentTarget.value)}
            {...aria}
          >
            {rule.values.map((v) => (
              <option key={v} value={v}>
                {how?.options?.[v] ?? v}
              </option>
            ))}
          </select>
          {notes}
        </label>
      );
    case "integer": {
      const v = Number(props.value);
      return (
        <label>
          {label}
          <input
            type="number"
            name={rule.name}
            inputMode="numeric"
            min={props.range?.min}
            max={props.range?.max}
            step={1}
            // What is not a number yet ("", "1e") is left as typed, and checked as not a number.
            value={Number.isFinite(v) ? v : undefined}
            onInput={(e) => props.onChange(e.currentTarget.valueAsNumber)}
            {...aria}
          />
          {notes}
        </label>
      );
    }
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
  const form = useRef<HTMLFormElement>(null);
  // The form opens under a list that may be longer than the screen (always so on a phone):
  // bring it into view and put the keyboard on its first field.
  useEffect(() => {
    const f = form.current;
    if (!f) return;
    f.scrollIntoView({ block: "start" });
    f.querySelector<HTMLElement>("input:checked, input, select")?.focus({ preventScroll: true });
  }, []);
  return (
    <form
      ref={form}
      class="panel"
      aria-label={`Process ${props.slideName}`}
      // The form checks its fields itself (`validate`), in its own words, one message per field;
      // the browser's own bubbles would say the same thing differently.
      noValidate
      onSubmit={async (e) => {
        e.preventDefault();
        const errs = validate(kind, p);
        setErrors(errs);
        if (Object.keys(errs).length) {
          const first = shown(kind).find((r) => errs[r.name]);
          if (first)
            setTimeout(() => form.current?.querySelector<HTMLElement>(`[name="${first.name}"]`)?.focus());
          return;
        }
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
                {KIND_LABELS[k.kind] ?? k.kind}
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
          range={rule.type === "integer" ? bounds(kind, rule, p) : undefined}
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
