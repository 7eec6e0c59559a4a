import { defineConfig } from "vitest/config";

// The app is served by the gateway from `Web__Dir` (web/dist). Hashed files go to `assets/`,
// which the gateway caches for a year; `index.html` is revalidated on every load.
export default defineConfig({
  oxc: { jsx: { runtime: "automatic", importSource: "preact" } },
  build: {
    outDir: "dist",
    assetsDir: "assets",
    sourcemap: false,
    target: "es2022",
    chunkSizeWarningLimit: 600,
    rollupOptions: {
      output: {
        // OpenSeadragon is loaded only by the viewer: its own chunk, outside the app's budget.
        manualChunks: (id: string) =>
          id.includes("node_modules/openseadragon") ? "openseadragon" : undefined,
      },
    },
  },
  test: {
    include: ["tests/*.test.ts"],
    environment: "node",
  },
});
