import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { returnPath } from "../src/auth";

describe("the way back from the Hosted UI", () => {
  beforeEach(() => {
    const store = new Map<string, string>();
    vi.stubGlobal("sessionStorage", {
      getItem: (k: string) => store.get(k) ?? null,
      setItem: (k: string, v: string) => store.set(k, v),
      removeItem: (k: string) => store.delete(k),
    });
  });
  afterEach(() => vi.unstubAllGlobals());

  it("is the page the sign-in started from, its view included, once", () => {
    sessionStorage.setItem("mira.return", "/jobs/0b6c/view#x=10&y=20&z=0.5");
    expect(returnPath()).toBe("/jobs/0b6c/view#x=10&y=20&z=0.5");
    expect(returnPath()).toBe("/");
  });

  it("is the slide list when there is none, or when it would leave the app", () => {
    expect(returnPath()).toBe("/");
    for (const away of [
      "//evil.example/x",
      "/\\evil.example/x",
      "https://evil.example/",
      "javascript:alert(1)",
      "",
    ]) {
      sessionStorage.setItem("mira.return", away);
      expect(returnPath()).toBe("/");
    }
  });
});
