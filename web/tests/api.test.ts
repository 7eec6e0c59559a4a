import { describe, expect, it } from "vitest";
import { ApiError, identityOf, problemOf } from "../src/api";

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
