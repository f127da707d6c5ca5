// npm run serve [-- --port N]: a static server for the demo and the tests.
//   /            -> web/ (the demo is /demo/, the package /pkg/)
//   /models/     -> models/ at the repository root (the "default" models)
//   /fixtures/   -> tests/fixtures/ (small models the browser tests load)
//   /cache/      -> the real checkpoints tools/fetch-real-model.sh fetched ($KILN_MODEL_CACHE or
//                   ~/.cache/kiln/models)
//   /__stall/    -> answers 200 and then sends nothing (tests the stalled-download error)
//   /__garbage/  -> 4 KiB of noise for any name (tests the errors of the parsers)
//   /__spa/...   -> the same files, but a missing one is answered with the demo's index.html and
//                   status 200, as SPA fallbacks (Vite, common static hosts) do
import { createReadStream, statSync } from "node:fs";
import { createServer } from "node:http";
import { homedir } from "node:os";
import { dirname, extname, join, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";

const web = join(dirname(fileURLToPath(import.meta.url)), "..");
const root = join(web, "..");
export const modelCache = process.env.KILN_MODEL_CACHE ?? join(homedir(), ".cache", "kiln", "models");
const mounts = [
  ["/models/", join(root, "models")],
  ["/fixtures/", join(root, "tests", "fixtures")],
  ["/cache/", modelCache],
  ["/", web],
];
const types = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".txt": "text/plain; charset=utf-8",
  ".wasm": "application/wasm",
  ".png": "image/png",
};

function file(path) {
  for (const [prefix, dir] of mounts) {
    if (!path.startsWith(prefix)) continue;
    const p = normalize(join(dir, path.slice(prefix.length)));
    if (p !== dir && !p.startsWith(dir + sep)) return null;
    return p;
  }
  return null;
}

/** Starts the server; resolves to `{ server, url }` (port 0 picks a free port). */
export function startServer({ port = 8080, host = "127.0.0.1", log = false } = {}) {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    if (log) console.log(req.method, path);
    if (path === "/") {
      res.writeHead(302, { location: "/demo/" });
      return res.end();
    }
    if (path.startsWith("/__garbage/")) {
      // Same bytes every time: a model file that is not one (parsers must fail with an error).
      const bytes = Buffer.alloc(4096);
      for (let i = 0, s = 1; i < bytes.length; i++) bytes[i] = (s = (s * 1103515245 + 12345) >>> 0) >>> 24;
      res.writeHead(200, { "content-type": "application/octet-stream", "content-length": bytes.length });
      return res.end(bytes);
    }
    if (path.startsWith("/__stall/")) {
      res.writeHead(200, { "content-type": "application/octet-stream", "content-length": "1000" });
      res.flushHeaders();
      return; // never sends the body
    }
    const spa = path.startsWith("/__spa/");
    let p = file(spa ? path.slice("/__spa".length) : path);
    let st;
    try {
      st = p && statSync(p);
      if (st?.isDirectory()) {
        p = join(p, "index.html");
        st = statSync(p);
      }
    } catch {
      st = null;
    }
    if ((!st || !st.isFile()) && spa) {
      p = join(web, "demo", "index.html");
      st = statSync(p);
    }
    if (!st || !st.isFile()) {
      res.writeHead(404, { "content-type": "text/plain" });
      return res.end(`not found: ${path}\n`);
    }
    res.writeHead(200, {
      "content-type": types[extname(p)] ?? "application/octet-stream",
      "content-length": st.size,
      "cache-control": "no-store",
    });
    if (req.method === "HEAD") return res.end();
    createReadStream(p).pipe(res);
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve({ server, url: `http://${host}:${server.address().port}` }));
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const i = process.argv.indexOf("--port");
  const port = Number(i > 0 ? process.argv[i + 1] : process.env.PORT ?? 8080);
  const { url } = await startServer({ port, log: process.argv.includes("--log") });
  console.log(`serving ${web} at ${url}/demo/  (models: ${url}/models/)`);
}
