// Rebuilds the vendored three.js bundle of the results page: npm ci && npm run vendor-three (in tests/web).
// Writes animate124/core/report/static/three-viewer.min.js (minified, tree-shaken, three's licence header kept),
// THREE_LICENSE and VENDOR.json (package, version, licence, what was bundled, the esbuild version).
import { build, version as esbuildVersion } from "esbuild";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "..", "animate124", "core", "report", "static");
const three = JSON.parse(readFileSync(join(here, "node_modules", "three", "package.json"), "utf8"));
await build({
  entryPoints: [join(here, "three_entry.mjs")],
  bundle: true,
  minify: true,
  format: "iife",
  globalName: "A124Three",
  target: "es2020",
  legalComments: "inline",
  outfile: join(out, "three-viewer.min.js"),
});
copyFileSync(join(here, "node_modules", "three", "LICENSE"), join(out, "THREE_LICENSE"));
const entry = readFileSync(join(here, "three_entry.mjs"), "utf8");
writeFileSync(join(out, "VENDOR.json"), JSON.stringify({
  package: "three",
  version: three.version,
  license: three.license,
  license_file: "THREE_LICENSE",
  file: "three-viewer.min.js",
  contents: [...entry.matchAll(/from "([^"]+)"/g)].map((m) => m[1]),
  built_with: `esbuild ${esbuildVersion} (tests/web/build_three_bundle.mjs: iife, minified, global A124Three)`,
}, null, 2) + "\n");
console.log(`three ${three.version} -> ${out}`);
