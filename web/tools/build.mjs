// npm run build [-- --dev]: the wasm module (cargo, wasm32) -> wasm-bindgen --target web ->
// web/pkg/ together with the JavaScript API and its types. Prints the wasm size, raw and gzip.
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const web = join(dirname(fileURLToPath(import.meta.url)), "..");
const root = join(web, "..");
const dev = process.argv.includes("--dev");
const profile = dev ? "debug" : "release";
const run = (cmd, args) => {
  console.log(`> ${cmd} ${args.join(" ")}`);
  execFileSync(cmd, args, { cwd: root, stdio: "inherit" });
};

run("cargo", ["build", "-p", "kiln-web", "--target", "wasm32-unknown-unknown", ...(dev ? [] : ["--release"])]);
const pkg = join(web, "pkg");
rmSync(pkg, { recursive: true, force: true });
mkdirSync(join(pkg, "wasm"), { recursive: true });
const target = process.env.CARGO_TARGET_DIR ?? join(root, "target");
run("wasm-bindgen", [
  "--target", "web",
  "--no-typescript",
  "--out-dir", join(pkg, "wasm"),
  "--out-name", "kiln_web",
  join(target, "wasm32-unknown-unknown", profile, "kiln_web.wasm"),
]);
for (const f of readdirSync(join(web, "js"))) copyFileSync(join(web, "js", f), join(pkg, f));

const wasm = join(pkg, "wasm", "kiln_web_bg.wasm");
const raw = statSync(wasm).size;
const gz = gzipSync(readFileSync(wasm), { level: 9 }).length;
const mib = (n) => `${(n / 1048576).toFixed(2)} MiB`;
console.log(`wasm (${profile}): ${mib(raw)} raw, ${mib(gz)} gzip -> ${pkg}`);
