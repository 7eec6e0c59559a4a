import { describe, expect, expectTypeOf, it } from "vitest";
import document from "../../gateway/openapi.json";
import type { Job, JobPage, NewJob, Slide, SlidePage } from "../src/api";
import { allowed, defaultsOf, fits, KINDS, type KindRules, kindsOf } from "../src/jobkinds";
import type { Paged } from "../src/pages";
import { bounds, shown, validate } from "../src/pages/jobform";

/** A document as the gateway writes it, cut to what the form reads. */
function fixture() {
  return {
    openapi: "3.1.0",
    components: {
      schemas: {
        NewJob: {
          type: "object",
          required: ["slide_id", "kind"],
          properties: {
            slide_id: { type: "string", format: "uuid" },
            kind: { type: "string", enum: ["wsi.preprocess", "wsi.count"] },
            params: {
              oneOf: [
                { $ref: "#/components/schemas/PreprocessParams" },
                { $ref: "#/components/schemas/CountParams" },
                { type: "null" },
              ],
            },
            priority: { type: "string", enum: ["routine", "stat"], default: "routine" },
          },
        },
        PreprocessParams: {
          type: "object",
          additionalProperties: false,
          properties: {
            // An inline enum with a default, as utoipa writes it.
            format: { oneOf: [{ type: "string", enum: ["jpeg", "png", "webp"] }], default: "png" },
            normalize: { type: "string", enum: ["none", "macenko"], default: "none" },
            overlap: { type: "integer", format: "int32", minimum: 0, default: 2 },
            quality: { type: "integer", format: "int32", minimum: 1, maximum: 90, default: 75 },
            tile_size: { type: "integer", format: "int32", minimum: 32, maximum: 2048, default: 512 },
            tissue: { type: "boolean", default: false },
          },
        },
        CountParams: {
          type: "object",
          properties: {
            model: { allOf: [{ $ref: "#/components/schemas/Model" }], default: "small" },
            threshold: { type: "integer", maximum: 10, default: 3 },
          },
        },
        Model: { type: "string", enum: ["small", "large"] },
      },
    },
  };
}

type Doc = ReturnType<typeof fixture>;

function kindOf(doc: unknown, name: string): KindRules {
  const k = kindsOf(doc).find((x) => x.kind === name);
  if (!k) throw new Error(`no kind ${name}`);
  return k;
}

describe("the job form's rules, read from the OpenAPI document", () => {
  it("lists the kinds of NewJob.kind's enum, each with its parameters schema in order", () => {
    const kinds = kindsOf(fixture());
    expect(kinds.map((k) => [k.kind, k.schema])).toEqual([
      ["wsi.preprocess", "PreprocessParams"],
      ["wsi.count", "CountParams"],
    ]);
  });

  it("takes each parameter's type, values, range and default from its schema", () => {
    const k = kindOf(fixture(), "wsi.preprocess");
    expect(k.params).toEqual([
      { name: "format", type: "string", values: ["jpeg", "png", "webp"], default: "png" },
      { name: "normalize", type: "string", values: ["none", "macenko"], default: "none" },
      { name: "overlap", type: "integer", minimum: 0, default: 2 },
      { name: "quality", type: "integer", minimum: 1, maximum: 90, default: 75 },
      { name: "tile_size", type: "integer", minimum: 32, maximum: 2048, default: 512 },
      { name: "tissue", type: "boolean", default: false },
    ]);
    expect(defaultsOf(k)).toEqual({
      format: "png",
      normalize: "none",
      overlap: 2,
      quality: 75,
      tile_size: 512,
      tissue: false,
    });
    // A referenced enum, wrapped with its default.
    expect(kindOf(fixture(), "wsi.count").params).toEqual([
      { name: "model", type: "string", values: ["small", "large"], default: "small" },
      { name: "threshold", type: "integer", maximum: 10, default: 3 },
    ]);
  });

  it("checks values against those rules, in the form's words", () => {
    const k = kindOf(fixture(), "wsi.preprocess");
    const ok = defaultsOf(k);
    expect(validate(k, ok)).toEqual({});
    expect(validate(k, { ...ok, tile_size: 4096 })).toEqual({ tile_size: "32 to 2048 pixels" });
    expect(validate(k, { ...ok, tile_size: 31.5 })).toEqual({ tile_size: "32 to 2048 pixels" });
    expect(validate(k, { ...ok, quality: 91 })).toEqual({ quality: "1 to 90" });
    expect(validate(k, { ...ok, format: "gif" })).toEqual({ format: "jpeg, png or webp" });
    expect(validate(k, { ...ok, overlap: -1 })).toEqual({
      overlap: "0 to 128 pixels (a quarter of the tile size)",
    });
    // The relation the document says in words only, with the number it comes to.
    expect(validate(k, { ...ok, tile_size: 64, overlap: 17 })).toEqual({
      overlap: "0 to 16 pixels (a quarter of the tile size)",
    });
    expect(validate(k, { ...ok, tile_size: 64, overlap: 16 })).toEqual({});
    // In whole pixels, as the API divides: 66 / 4 is 16.
    expect(validate(k, { ...ok, tile_size: 66, overlap: 17 })).toEqual({
      overlap: "0 to 16 pixels (a quarter of the tile size)",
    });
    // A tile size that is no number gives overlap no number either: one message each.
    expect(validate(k, { ...ok, tile_size: Number.NaN, overlap: 1 })).toEqual({
      tile_size: "32 to 2048 pixels",
    });
    expect(validate(k, { ...ok, tile_size: Number.NaN, overlap: -1 })).toEqual({
      tile_size: "32 to 2048 pixels",
      overlap: "0 to a quarter of the tile size",
    });
    // An emptied field (the input's valueAsNumber is NaN) is refused, not sent as 0.
    expect(validate(k, { ...ok, quality: Number.NaN })).toEqual({ quality: "1 to 90" });
    const count = kindOf(fixture(), "wsi.count");
    expect(fits(count.params[1], 10)).toBe(true);
    expect(fits(count.params[1], 11)).toBe(false);
    expect(allowed(count.params[1])).toBe("at most 10");
  });

  it("gives each whole-number field the range it takes now, for its min and max", () => {
    const k = kindOf(fixture(), "wsi.preprocess");
    const ok = defaultsOf(k);
    const rule = (name: string) => {
      const r = k.params.find((p) => p.name === name);
      if (r?.type !== "integer") throw new Error(`no integer ${name}`);
      return r;
    };
    expect(bounds(k, rule("tile_size"), ok)).toEqual({ min: 32, max: 2048 });
    expect(bounds(k, rule("quality"), ok)).toEqual({ min: 1, max: 90 });
    expect(bounds(k, rule("overlap"), { ...ok, tile_size: 254 })).toEqual({
      min: 0,
      max: 63,
      why: "a quarter of the tile size",
    });
    expect(bounds(k, rule("overlap"), { ...ok, tile_size: Number.NaN })).toEqual({
      min: 0,
      why: "a quarter of the tile size",
    });
  });

  it("shows the parameters it has words for in its order, then the others by name", () => {
    const k = kindOf(fixture(), "wsi.preprocess");
    expect(shown(k).map((r) => r.name)).toEqual([
      "normalize",
      "format",
      "tile_size",
      "overlap",
      "quality",
      "tissue",
    ]);
  });

  it("fails loudly on a document it cannot follow", () => {
    const broken = (f: (d: Doc) => void) => {
      const d = fixture();
      f(d);
      return () => kindsOf(d);
    };
    // A kind without a parameters schema.
    expect(
      broken((d) => {
        d.components.schemas.NewJob.properties.params.oneOf.splice(1, 1);
      }),
    ).toThrow(/kind wsi.count has no parameters schema/);
    expect(
      broken((d) => {
        d.components.schemas.NewJob.properties.kind.enum = [];
      }),
    ).toThrow(/no enum of kinds/);
    expect(
      broken((d) => {
        (d.components.schemas.NewJob.properties.params.oneOf[1] as { $ref: string }).$ref =
          "#/components/schemas/Nothing";
      }),
    ).toThrow(/names no schema/);
    // Parameter shapes the form cannot draw.
    expect(
      broken((d) => {
        Object.assign(d.components.schemas.PreprocessParams.properties, {
          ratio: { type: "number", default: 0.5 },
        });
      }),
    ).toThrow(/PreprocessParams.ratio: type "number"/);
    expect(
      broken((d) => {
        Object.assign(d.components.schemas.PreprocessParams.properties, {
          name: { type: "string", default: "x" },
        });
      }),
    ).toThrow(/PreprocessParams.name: a string parameter without an enum/);
    expect(
      broken((d) => {
        Object.assign(d.components.schemas.PreprocessParams.properties, {
          either: { oneOf: [{ type: "integer" }, { type: "string", enum: ["a"] }], default: 1 },
        });
      }),
    ).toThrow(/PreprocessParams.either: a oneOf of 2 alternatives/);
    expect(
      broken((d) => {
        Object.assign(d.components.schemas.PreprocessParams.properties, {
          level: { type: "integer", minimum: 0 },
        });
      }),
    ).toThrow(/PreprocessParams.level: has no default/);
    expect(
      broken((d) => {
        d.components.schemas.PreprocessParams.properties.format.default = "gif";
      }),
    ).toThrow(/PreprocessParams.format: the default is not one of its values/);
    expect(() => kindsOf({})).toThrow(/components.schemas/);
  });
});

describe("the gateway's golden document", () => {
  const newJob = document.components.schemas.NewJob;

  it("gives the app every kind, each with rules the form can draw", () => {
    expect(KINDS.map((k) => k.kind)).toEqual(newJob.properties.kind.enum);
    const preprocess = KINDS.find((k) => k.kind === "wsi.preprocess");
    expect(preprocess?.schema).toBe("PreprocessParams");
    if (!preprocess) return;
    // What events/src/params.rs says, as the form reads it.
    expect(defaultsOf(preprocess)).toEqual({
      tile_size: 254,
      overlap: 1,
      format: "jpeg",
      quality: 80,
      tissue: true,
      normalize: "none",
    });
    const rule = (name: string) => preprocess.params.find((p) => p.name === name);
    expect(rule("tile_size")).toMatchObject({ type: "integer", minimum: 16, maximum: 4096 });
    expect(rule("quality")).toMatchObject({ type: "integer", minimum: 1, maximum: 100 });
    expect(rule("format")).toMatchObject({ type: "string", values: ["jpeg", "png"] });
    expect(rule("normalize")).toMatchObject({ type: "string", values: ["none", "macenko", "reinhard"] });
    // The messages the end-to-end test waits for.
    expect(validate(preprocess, { ...defaultsOf(preprocess), tile_size: 5000 })).toEqual({
      tile_size: "16 to 4096 pixels",
    });
    // The API's own edge (events/src/params.rs: refused when overlap > tile_size / 4): 4096 with
    // 1024 is taken, 1025 is not.
    const big = { ...defaultsOf(preprocess), tile_size: 4096 };
    expect(validate(preprocess, { ...big, overlap: 1024 })).toEqual({});
    expect(validate(preprocess, { ...big, overlap: 1025 })).toEqual({
      overlap: "0 to 1024 pixels (a quarter of the tile size)",
    });
    expect(validate(preprocess, { ...defaultsOf(preprocess), quality: 101 })).toEqual({
      quality: "1 to 100",
    });
  });

  it("types what the app uses: the generated types fit the app's", () => {
    expectTypeOf<JobPage>().toExtend<Paged<Job, string>>();
    expectTypeOf<SlidePage>().toExtend<Paged<Slide, string>>();
    expectTypeOf<NewJob["kind"]>().toEqualTypeOf<KindRules["kind"]>();
  });
});
