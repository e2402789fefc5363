// Builds a JavaScript plugin into a component with @bytecodealliance/componentize-js.
// Usage (from a plugin.toml build command): node "$DUS_SDK_TOOLS/componentize-js.mjs" SOURCE.js WORLD
// Reads DUS_WIT (WIT folder), DUS_OUT (output file) and DUS_TOOLCHAINS (where the npm package is
// installed by scripts/install-plugin-toolchains.sh). ESM ignores NODE_PATH, hence the explicit path.
import { writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const [source, world] = process.argv.slice(2);
if (!source || !world) {
  console.error('usage: componentize-js.mjs SOURCE.js WORLD');
  process.exit(2);
}
const pkg = join(process.env.DUS_TOOLCHAINS, 'node/node_modules/@bytecodealliance/componentize-js/src/componentize.js');
const { componentize } = await import(pathToFileURL(pkg).href);
const { component } = await componentize({
  sourcePath: resolve(source),
  witPath: process.env.DUS_WIT,
  worldName: world,
  // Plugins get no HTTP; stdio stays for error output, clocks and random for the JS engine.
  disableFeatures: ['http', 'fetch-event'],
});
await writeFile(process.env.DUS_OUT, component);
