// The job kinds and their parameters' rules, read from the gateway's OpenAPI document at build
// time (gateway/openapi.json is the golden copy of what `GET /api/openapi.json` serves, and the
// gateway derives those schemas from `events/src/params.rs`). The job form is drawn and checked
// from these rules, so a new parameter, range, value or default needs no change here.
//
// Where the rules are: the kinds are `NewJob.properties.kind.enum`; the kinds' parameter schemas
// are the `$ref`s of `NewJob.properties.params.oneOf`, in the same order as the kinds (its
// `{"type": "null"}` alternative, "every default", is not one). A document that breaks that rule,
// or a parameter of a shape the form cannot draw, throws here: at module load in the app, and in
// the unit tests (tests/jobkinds.test.ts) before that.

// Only `components` is imported: the build keeps the schemas and drops `paths`.
import { components } from "../../gateway/openapi.json";
import type { JobKind } from "./api";

type Common = { name: string; description?: string };

/** One parameter of a kind, as the form draws and checks it. */
export type ParamRule =
  | (Common & { type: "integer"; minimum?: number; maximum?: number; default: number })
  | (Common & { type: "string"; values: string[]; default: string })
  | (Common & { type: "boolean"; default: boolean });

export type ParamValue = ParamRule["default"];
export type ParamValues = Record<string, ParamValue>;

/** A kind, the schema of its parameters, and their rules in the document's order. */
export type KindRules = { kind: JobKind; schema: string; params: ParamRule[] };

type Json = Record<string, unknown>;

const isObject = (v: unknown): v is Json => typeof v === "object" && v !== null && !Array.isArray(v);

function fail(where: string, why: string): never {
  throw new Error(`the OpenAPI document's ${where}: ${why}`);
}

const REF = "#/components/schemas/";

function resolve(schemas: Json, s: unknown, where: string): Json {
  if (!isObject(s)) fail(where, "is not a schema object");
  if (typeof s.$ref !== "string") return s;
  if (!s.$ref.startsWith(REF)) fail(where, `${s.$ref} is not a reference to #/components/schemas`);
  const target = schemas[s.$ref.slice(REF.length)];
  if (!isObject(target)) fail(where, `${s.$ref} names no schema`);
  return target;
}

/** A property's schema with a one-element `oneOf`/`allOf` wrapper and `$ref`s taken off: an
 * inline enum with a default comes as `{"oneOf": [{"type": "string", "enum": [...]}],
 * "default": ...}`. What the wrapper says (default, description) wins over what it wraps. */
function flatten(schemas: Json, s: unknown, where: string): Json {
  const outer = resolve(schemas, s, where);
  for (const key of ["oneOf", "allOf", "anyOf"] as const) {
    const alts = outer[key];
    if (alts === undefined) continue;
    if (!Array.isArray(alts) || alts.length !== 1)
      fail(
        where,
        `a ${key} of ${Array.isArray(alts) ? alts.length : "no"} alternatives is not a shape the form can draw`,
      );
    const { [key]: _, ...rest } = outer;
    return { ...flatten(schemas, alts[0], where), ...rest };
  }
  return outer;
}

const finite = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);

function rule(schemas: Json, name: string, s: unknown, where: string): ParamRule {
  const p = flatten(schemas, s, where);
  const description = typeof p.description === "string" ? { description: p.description } : {};
  const type: unknown = p.type ?? (Array.isArray(p.enum) ? "string" : undefined);
  if (!("default" in p)) fail(where, "has no default, which the form starts from");
  if (type === "integer") {
    for (const k of ["minimum", "maximum"] as const)
      if (p[k] !== undefined && !finite(p[k])) fail(where, `${k} is not a number`);
    if (!Number.isInteger(p.default)) fail(where, "the default is not an integer");
    return {
      name,
      type,
      ...(finite(p.minimum) ? { minimum: p.minimum } : {}),
      ...(finite(p.maximum) ? { maximum: p.maximum } : {}),
      default: p.default as number,
      ...description,
    };
  }
  if (type === "string") {
    const values = p.enum;
    if (!Array.isArray(values) || values.length === 0 || !values.every((v) => typeof v === "string"))
      fail(where, "a string parameter without an enum of strings is not a shape the form can draw");
    if (!values.includes(p.default as string)) fail(where, "the default is not one of its values");
    return { name, type, values, default: p.default as string, ...description };
  }
  if (type === "boolean") {
    if (typeof p.default !== "boolean") fail(where, "the default is not a boolean");
    return { name, type, default: p.default, ...description };
  }
  return fail(where, `type ${JSON.stringify(type)} is not a shape the form can draw`);
}

/** Every job kind with its parameters' rules. Throws on a document the form cannot follow. */
export function kindsOf(doc: unknown): KindRules[] {
  const schemas = isObject(doc) && isObject(doc.components) ? doc.components.schemas : undefined;
  if (!isObject(schemas)) fail("components.schemas", "is missing");
  const newJob = schemas.NewJob;
  if (!isObject(newJob) || !isObject(newJob.properties)) fail("NewJob", "has no properties");
  const kind = newJob.properties.kind;
  const kinds = isObject(kind) ? kind.enum : undefined;
  if (!Array.isArray(kinds) || kinds.length === 0 || !kinds.every((k) => typeof k === "string"))
    fail("NewJob.properties.kind", "has no enum of kinds");
  const params = newJob.properties.params;
  if (!isObject(params)) fail("NewJob.properties.params", "is missing");
  const alts = Array.isArray(params.oneOf) ? params.oneOf : [params];
  const refs = alts
    .filter((a) => !(isObject(a) && a.type === "null"))
    .map((a, i) => {
      if (!isObject(a) || typeof a.$ref !== "string" || !a.$ref.startsWith(REF))
        fail(`NewJob.properties.params.oneOf[${i}]`, "is neither a schema reference nor null");
      return a.$ref.slice(REF.length);
    });
  if (refs.length !== kinds.length)
    fail(
      "NewJob.properties.params",
      `${kinds.length} kinds (${kinds.join(", ")}) but ${refs.length} parameters schemas (${refs.join(", ")}): ` +
        `kind ${kinds[Math.min(refs.length, kinds.length - 1)]} has no parameters schema of its own`,
    );
  return kinds.map((k, i) => {
    const schema = refs[i];
    const s = schemas[schema];
    if (!isObject(s)) fail(`NewJob.properties.params`, `kind ${k}'s ${schema} names no schema`);
    const props = s.properties ?? {};
    if (!isObject(props)) fail(schema, "has no properties");
    return {
      // The same document generated `JobKind` (src/api.gen.ts), and `npm run check` keeps the two
      // together.
      kind: k as JobKind,
      schema,
      params: Object.entries(props).map(([name, p]) => rule(schemas, name, p, `${schema}.${name}`)),
    };
  });
}

/** The parameters' defaults: what the API fills in for each one left out. */
export function defaultsOf(kind: KindRules): ParamValues {
  return Object.fromEntries(kind.params.map((p) => [p.name, p.default]));
}

/** Whether a value keeps to its parameter's rule. */
export function fits(rule: ParamRule, v: unknown): boolean {
  switch (rule.type) {
    case "integer":
      return (
        typeof v === "number" &&
        Number.isInteger(v) &&
        (rule.minimum === undefined || v >= rule.minimum) &&
        (rule.maximum === undefined || v <= rule.maximum)
      );
    case "string":
      return typeof v === "string" && rule.values.includes(v);
    case "boolean":
      return typeof v === "boolean";
  }
}

/** What a parameter's rule allows, in words: "16 to 4096", "at least 0", "jpeg or png". */
export function allowed(rule: ParamRule): string {
  switch (rule.type) {
    case "integer": {
      const { minimum: lo, maximum: hi } = rule;
      if (lo !== undefined && hi !== undefined) return `${lo} to ${hi}`;
      if (lo !== undefined) return `at least ${lo}`;
      if (hi !== undefined) return `at most ${hi}`;
      return "a whole number";
    }
    case "string":
      return rule.values.length > 1
        ? `${rule.values.slice(0, -1).join(", ")} or ${rule.values[rule.values.length - 1]}`
        : rule.values[0];
    case "boolean":
      return "yes or no";
  }
}

/** The kinds the API takes, from the document this app was built with. */
export const KINDS: KindRules[] = kindsOf({ components });
