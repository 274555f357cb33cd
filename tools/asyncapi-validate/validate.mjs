// Validate an AsyncAPI document with the official parser: `node validate.mjs FILE`.
// Prints every diagnostic; exits 1 when any is an error, 2 when the file cannot be read.
import { readFile } from "node:fs/promises";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const path = process.argv[2];
let text;
try {
  text = await readFile(path, "utf8");
} catch (error) {
  console.error(`asyncapi-validate: cannot read ${path}: ${error.message}`);
  process.exit(2);
}
const { document, diagnostics } = await new Parser().parse(text);
const severities = ["error", "warning", "info", "hint"];
for (const d of diagnostics) {
  console.log(`${severities[d.severity]}: ${d.code}: ${d.message} at /${d.path.join("/")}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
if (errors.length > 0 || document === undefined) {
  console.log(`asyncapi-validate: ${path} is INVALID (${errors.length} errors)`);
  process.exit(1);
}
console.log(`asyncapi-validate: ${path} is valid AsyncAPI ${document.version()}`);
