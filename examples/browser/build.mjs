// Bundles src/app.js and its packages into dist/app.js (one file, no module loader needed) and
// copies index.html beside it. The shop.v1 descriptor set is embedded as bytes:
//   node build.mjs [path/to/shop_v1.binpb]   (default: ../../generated/descriptors/shop_v1.binpb)
import { copyFile, mkdir } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = path.dirname(fileURLToPath(import.meta.url));
const descriptors = path.resolve(
  process.argv[2] ?? path.join(here, "..", "..", "generated", "descriptors", "shop_v1.binpb"),
);
const dist = path.join(here, "dist");

await mkdir(dist, { recursive: true });
await esbuild.build({
  entryPoints: [path.join(here, "src", "app.js")],
  outfile: path.join(dist, "app.js"),
  bundle: true,
  format: "iife",
  target: "es2020",
  alias: { "shop-descriptors": descriptors },
  loader: { ".binpb": "binary" },
  logLevel: "warning",
});
await copyFile(path.join(here, "index.html"), path.join(dist, "index.html"));
console.log(`built ${path.relative(process.cwd(), dist)}/ (descriptors: ${descriptors})`);
