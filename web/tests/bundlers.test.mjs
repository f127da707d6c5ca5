// The npm package inside apps as users build them: `npm pack`, the tarball installed into copies
// of web/examples/vite and web/examples/webpack, production builds, `dist/` served by a server
// that answers unknown paths with index.html (an SPA fallback, as Vite's preview and common
// static hosts do), and web/examples/no-bundler (an import map pointing at the unpacked package).
// In headless Chromium (SwiftShader) each runs the default text and image models in worker and
// page mode: greedy ids equal native `kiln text`, the image within 40 dB PSNR of `kiln image`.
//
//   node tests/bundlers.test.mjs        (after `npm run build`; needs the npm registry for
//                                        vite and webpack, and target/debug/kiln)
import { execFile } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, extname, join, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { chromium } from "playwright-core";
import { psnr, readPng } from "./png.mjs";

const web = join(dirname(fileURLToPath(import.meta.url)), "..");
const root = join(web, "..");
const KILN = process.env.KILN_BIN ?? join(root, "target", "debug", "kiln");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const run = promisify(execFile);
const env = { ...process.env, XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR ?? tmpdir() };
const sh = (cmd, args, cwd) => run(cmd, args, { cwd, env, maxBuffer: 1 << 26, timeout: 600_000 });
const assert = (cond, msg) => {
  if (!cond) throw new Error(msg);
};
const OPTS = { prompt: "And God said", maxTokens: 16, seed: 7, steps: 4 };

// ---- native reference
const work = mkdtempSync(join(tmpdir(), "kiln-bundlers-"));
const { stdout } = await sh(KILN, ["text", "--json", "--temperature", "0", "--prompt", OPTS.prompt, "-n", String(OPTS.maxTokens)]);
const nativeText = JSON.parse(stdout);
const png = join(work, "native.png");
await sh(KILN, ["image", "--json", "--prompt", "a red circle on a blue background", "--seed", String(OPTS.seed), "--steps", String(OPTS.steps), "--out", png]);
const nativeImage = readPng(readFileSync(png));

// ---- the package as npm would ship it
await sh("npm", ["pack", "--pack-destination", work], web);
const tarball = join(work, readdirSync(work).find((f) => f.endsWith(".tgz")));
const unpacked = join(work, "unpacked");
mkdirSync(unpacked);
await sh("tar", ["-xzf", tarball, "-C", unpacked]); // -> unpacked/package/pkg/...

/** Copies an example, installs the tarball (and its build tools) and builds it: its dist/. */
async function build(name) {
  const dir = await install(name);
  await sh("npm", ["run", "build"], dir);
  return join(dir, "dist");
}

/** Copies an example and installs the tarball and its build tools: the app's folder. */
async function install(name) {
  const dir = join(work, name);
  cpSync(join(web, "examples", name), dir, { recursive: true, filter: (p) => !p.includes("node_modules") && !p.includes(`${sep}dist`) });
  const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
  pkg.dependencies["kiln-gpu"] = `file:${tarball}`;
  writeFileSync(join(dir, "package.json"), JSON.stringify(pkg, null, 2));
  await sh("npm", ["install", "--no-audit", "--no-fund", "--loglevel=error"], dir);
  return dir;
}

// ---- a static server with an SPA fallback; /models/ holds the default models
const types = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json", ".wasm": "application/wasm" };
function serve(dist) {
  const mounts = [["/models/", join(root, "models")], ["/kiln-gpu/", join(unpacked, "package")], ["/", dist]];
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    let file = null;
    for (const [prefix, dir] of mounts) {
      if (!path.startsWith(prefix)) continue;
      const p = normalize(join(dir, path.slice(prefix.length)));
      if (p.startsWith(dir)) file = p;
      break;
    }
    try {
      if (!file || !statSync(file).isFile()) throw new Error();
    } catch {
      file = join(dist, "index.html"); // SPA fallback: status 200, an HTML page
    }
    res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
    res.end(readFileSync(file));
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

const FLAGS = ["--no-sandbox", "--enable-unsafe-webgpu", "--enable-unsafe-swiftshader", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan", "--use-vulkan=swiftshader"];
const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--headless=new", ...FLAGS] });
let failed = 0;

async function check(name, dist, devUrl) {
  const server = devUrl ? { close() {} } : await serve(dist);
  const url = devUrl ?? `http://127.0.0.1:${server.address().port}/`;
  try {
    for (const worker of [true, false]) {
      const t0 = Date.now();
      const page = await browser.newPage();
      page.on("pageerror", (e) => console.log(`      [pageerror] ${e.message}`));
      await page.goto(url);
      await page.waitForFunction(() => window.example, null, { timeout: 60_000 });
      const got = await page.evaluate((o) => window.example.run(o), { ...OPTS, worker });
      await page.close();
      const mode = worker ? "worker" : "page";
      assert(JSON.stringify(got.ids) === JSON.stringify(nativeText.ids), `${name} (${mode}): ids ${got.ids}, native ${nativeText.ids}`);
      assert(got.text === nativeText.text, `${name} (${mode}): text differs`);
      const db = psnr({ width: nativeImage.width, height: nativeImage.height, channels: 4, data: got.image }, nativeImage);
      assert(db >= 40, `${name} (${mode}): image ${db.toFixed(1)} dB against native`);
      console.log(`ok   ${name}, ${mode}: ${got.ids.length} ids equal native, image ${db === Infinity ? "identical" : db.toFixed(1) + " dB"} (${Date.now() - t0} ms)`);
    }
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}\n${e.stack ?? e}`);
  } finally {
    server.close();
  }
}

for (const name of ["vite", "webpack"]) {
  let dist;
  try {
    dist = await build(name);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: the build failed\n${e.stderr ?? ""}${e.stdout ?? ""}${e.message}`);
    continue;
  }
  await check(name, dist);
}
// The dev servers (the models come from the examples' public/ folders there).
const { spawn } = await import("node:child_process");
for (const [name, args, pattern] of [
  ["vite", ["vite", "--port", "0", "--strictPort=false", "--host", "127.0.0.1"], /Local:\s+(http:\/\/\S+)/],
  ["webpack", ["webpack", "serve", "--mode", "development", "--port", "auto", "--host", "127.0.0.1"], /Loopback:\s+(http:\/\/\S+)/],
]) {
  const dir = join(work, name);
  cpSync(join(root, "models"), join(dir, "public", "models"), { recursive: true });
  // Its own process group, so that stopping it stops the server under npx too.
  const dev = spawn("npx", args, { cwd: dir, env, detached: true });
  let out = "";
  const devUrl = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${name} dev server did not start: ${out}`)), 120_000);
    const scan = (d) => {
      out += d;
      const m = pattern.exec(out.replace(/\x1b\[[0-9;]*m/g, ""));
      if (m) clearTimeout(timer), resolve(m[1]);
    };
    dev.stdout.on("data", scan);
    dev.stderr.on("data", scan);
  }).catch((e) => (console.log(`FAIL ${name} dev server: ${e.message}`), failed++, null));
  // webpack serve answers before its first compilation is done: wait for it.
  if (devUrl && name === "webpack") {
    for (let i = 0; i < 240 && !/compiled (successfully|with)/i.test(out); i++) await new Promise((r) => setTimeout(r, 500));
  }
  if (devUrl) await check(`${name} dev server`, null, devUrl);
  process.kill(-dev.pid, "SIGTERM");
  await new Promise((r) => setTimeout(r, 500));
}
// The no-bundler page, its import map pointed at the unpacked package on this server.
const plain = join(work, "no-bundler");
mkdirSync(plain);
const html = readFileSync(join(web, "examples/no-bundler/index.html"), "utf8");
writeFileSync(join(plain, "index.html"), html.replace(/https:\/\/unpkg\.com\/kiln-gpu@[^/]+\//, "/kiln-gpu/"));
await check("no-bundler", plain);

await browser.close();
rmSync(work, { recursive: true, force: true, maxRetries: 5 });
if (failed) {
  console.log(`${failed} bundler check(s) FAILED`);
  process.exit(1);
}
console.log("all bundler checks passed");
