import { describe, expect, it } from "vitest";
import { ApiError, identityOf, problemOf, slideMetadata } from "../src/api";

const b64 = (o: object) => btoa(JSON.stringify(o)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");

describe("api", () => {
  it("turns problem+json into a readable message", async () => {
    const res = new Response(
      JSON.stringify({
        type: "t",
        title: "Forbidden",
        status: 403,
        detail: "this needs one of the roles auditor",
      }),
      {
        status: 403,
      },
    );
    const e = await problemOf(res);
    expect(e).toBeInstanceOf(ApiError);
    expect(e.message).toBe("this needs one of the roles auditor");
    const plain = await problemOf(new Response("<html>", { status: 502, statusText: "Bad Gateway" }));
    expect(plain.message).toBe("Bad Gateway");
  });

  it("reads who is signed in from the token", () => {
    const token = `${b64({ alg: "RS256" })}.${b64({ sub: "s1", "cognito:username": "ada", "custom:tenant": "lab-a", "cognito:groups": ["pathologist"], exp: 99 })}.sig`;
    expect(identityOf(token)).toEqual({ user: "ada", tenant: "lab-a", roles: ["pathologist"], exp: 99 });
  });
});

describe("a slide's metadata", () => {
  it("is read as the worker recorded it (events::SlideMetadata)", () => {
    const recorded = {
      vendor: "aperio",
      width: 2220,
      height: 2967,
      levels: [{ width: 2220, height: 2967, downsample: 1 }],
      mpp_x: 0.499,
      mpp_y: 0.499,
      objective_power: 20,
      sealed_properties: null,
    };
    expect(slideMetadata(recorded)).toEqual({
      vendor: "aperio",
      width: 2220,
      height: 2967,
      mpp_x: 0.499,
      mpp_y: 0.499,
      objective_power: 20,
    });
  });

  it("leaves out what the slide does not record, or records unusably: nothing is made up", () => {
    expect(slideMetadata(null)).toEqual({});
    expect(slideMetadata(undefined)).toEqual({});
    expect(
      slideMetadata({ vendor: " ", width: 100, height: "200", mpp_x: null, mpp_y: 0, objective_power: -1 }),
    ).toEqual({ width: 100 });
    expect(
      slideMetadata({ vendor: "generic-tiff", mpp_x: Number.NaN, mpp_y: Number.POSITIVE_INFINITY }),
    ).toEqual({ vendor: "generic-tiff" });
  });
});
