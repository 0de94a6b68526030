// The Khronos glTF validator on one file: prints its report as JSON (issues.numErrors / numWarnings / numInfos /
// numHints, issues.messages, info). Exit status 0 when the file could be read, whatever the report says.
// Usage: node validate_gltf.mjs FILE.glb
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const validator = require("gltf-validator");

const path = process.argv[2];
if (!path) {
  console.error("usage: node validate_gltf.mjs FILE.glb");
  process.exit(2);
}
const report = await validator.validateBytes(new Uint8Array(readFileSync(path)), {
  maxIssues: 100,
  uri: path,
  format: "glb",
});
report.validatorVersion = validator.version();
console.log(JSON.stringify(report, null, 2));
