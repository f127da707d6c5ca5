// Model sources -> file bytes: URL resolution (folders, .gguf files, Hugging Face repo ids,
// "default"), downloads with progress, and the Cache Storage API so a reload downloads nothing.

const CACHE_NAME = "kiln-models-v1";
const HF = "https://huggingface.co";
const DEFAULT_FOLDERS = { text: "text-kjv", image: "image-shapes" };

/**
 * Resolves a model source to `{ base, file?, label, hf }`; `base` is an absolute folder URL
 * ending in "/". `revision` (a branch, tag or commit) applies to Hugging Face repo ids.
 */
export function resolveSource(source, kind, modelsBase, revision = "main") {
  if (typeof source !== "string" || source.trim() === "") {
    throw new Error(`model source must be a non-empty string, got ${typeof source === "string" ? "an empty string" : typeof source}`);
  }
  const s = source.trim();
  if (s === "default") {
    if (!DEFAULT_FOLDERS[kind]) throw new Error(`there is no default ${kind} model: give a URL or a Hugging Face repo id`);
    return { base: new URL(`${DEFAULT_FOLDERS[kind]}/`, modelsBase).href, label: `default (${DEFAULT_FOLDERS[kind]})` };
  }
  const isUrl = /^[a-z][a-z0-9+.-]*:\/\//i.test(s) || /^(\/|\.\/|\.\.\/)/.test(s);
  if (isUrl) {
    const url = new URL(s, globalThis.location?.href);
    if (url.pathname.toLowerCase().endsWith(".gguf")) {
      const cut = url.href.lastIndexOf("/") + 1;
      return { base: url.href.slice(0, cut), file: decodeURIComponent(url.href.slice(cut)), label: url.href };
    }
    return { base: url.href.endsWith("/") ? url.href : `${url.href}/`, label: url.href };
  }
  // Hugging Face: "owner/name" (a folder at the repo root) or "owner/name/path/to/file.gguf".
  const m = /^([A-Za-z0-9][\w.-]*\/[\w.-]+)(?:\/(.+\.gguf))?$/i.exec(s);
  if (m) {
    const base = `${HF}/${m[1]}/resolve/${encodeURIComponent(revision ?? "main")}/`;
    const label = revision && revision !== "main" ? `${s}@${revision}` : s;
    if (m[2]) {
      const cut = m[2].lastIndexOf("/") + 1;
      return { base: base + m[2].slice(0, cut), file: m[2].slice(cut), label, hf: true };
    }
    return { base, label, hf: true };
  }
  throw new Error(`model source "${s}" is not a URL of a model folder or .gguf file, a Hugging Face repo id ("owner/name") or "default"`);
}

async function openCache(enabled) {
  if (!enabled || typeof caches === "undefined") return null;
  try {
    return await caches.open(CACHE_NAME);
  } catch {
    return null; // e.g. an opaque origin: no cache, downloads still work
  }
}

/** Deletes every cached model file. */
export async function clearCache() {
  if (typeof caches !== "undefined") await caches.delete(CACHE_NAME);
}

/**
 * Fetches one file. Returns its bytes, or null when it is optional and absent (HTTP 404).
 * A download that receives nothing for `stallMs` is aborted with an error (never a hang).
 */
async function fetchFile(url, name, required, ctx) {
  const { cache, signal, stallMs } = ctx;
  const report = (loaded, total, cached) => ctx.report(name, url, loaded, total, cached);
  if (cache) {
    const hit = await cache.match(url);
    if (hit) {
      const bytes = new Uint8Array(await hit.arrayBuffer());
      if (!isHtml(bytes)) {
        report(bytes.length, bytes.length, true);
        return bytes;
      }
      await cache.delete(url); // an HTML page cached by an older version: fetch again
    }
  }
  signal?.throwIfAborted();
  const ctrl = new AbortController();
  const onAbort = () => ctrl.abort(signal.reason);
  signal?.addEventListener("abort", onAbort);
  let timer;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => ctrl.abort(new Error(`no data for ${stallMs / 1000} s`)), stallMs);
  };
  const fail = (e) => {
    if (signal?.aborted) return signal.reason;
    const why = ctrl.signal.aborted ? ctrl.signal.reason?.message : e?.message ?? String(e);
    return new Error(`could not fetch ${name} from ${url}: ${why}`);
  };
  try {
    arm();
    let res;
    try {
      res = await fetch(url, { signal: ctrl.signal, headers: ctx.headers });
    } catch (e) {
      throw fail(e);
    }
    if (res.status === 404 && !required) {
      report(0, 0, false);
      return null;
    }
    // An HTML answer for a model file is a missing file behind a fallback page: absent when the
    // file is optional, a clear error when it is required.
    if (res.ok && /text\/html/i.test(res.headers.get("content-type") ?? "")) {
      await res.body?.cancel().catch(() => {});
      if (!required) {
        report(0, 0, false);
        return null;
      }
      throw htmlError(name, url, ctx.base);
    }
    if (!res.ok) {
      const hint = res.status === 401 || res.status === 403 ? " (a private or gated repository, or none by that name)" : "";
      throw new Error(`could not fetch ${name} from ${url}: HTTP ${res.status} ${res.statusText}${hint}`);
    }
    // Content-Length is the transfer size; with a content encoding it is not the byte count.
    const encoded = res.headers.get("content-encoding");
    const total = encoded ? null : Number(res.headers.get("content-length")) || null;
    const chunks = [];
    let loaded = 0;
    report(0, total, false);
    try {
      const reader = res.body.getReader();
      for (;;) {
        arm();
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value);
        loaded += value.length;
        report(loaded, total, false);
      }
    } catch (e) {
      throw fail(e);
    }
    const bytes = new Uint8Array(loaded);
    let off = 0;
    for (const c of chunks) {
      bytes.set(c, off);
      off += c.length;
    }
    if (isHtml(bytes)) {
      if (!required) {
        report(0, 0, false);
        return null;
      }
      throw htmlError(name, url, ctx.base);
    }
    report(loaded, loaded, false);
    if (cache) {
      // A full quota only costs the next reload a download.
      await cache
        .put(url, new Response(bytes, { headers: { "content-type": res.headers.get("content-type") ?? "application/octet-stream" } }))
        .catch(() => {});
    }
    return bytes;
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", onAbort);
  }
}

const text = (b) => new TextDecoder().decode(b);

/** Whether bytes are an HTML page (what SPA fallbacks and many hosts send for a missing file). */
function isHtml(bytes) {
  const head = new TextDecoder().decode(bytes.subarray(0, 64)).trimStart().toLowerCase();
  return head.startsWith("<!doctype html") || head.startsWith("<html");
}

function htmlError(name, url, base) {
  return new Error(
    `got an HTML page for ${name} (${url}), not the file: is the model folder served at ${base}? ` +
      "(a server that answers missing files with index.html and status 200, as SPA fallbacks do, hides the real 404)",
  );
}

/**
 * Whether a file is there, and its size, without downloading it: the cache, or a HEAD request.
 * Returns `{ size, bytes? }` (bytes when cached), `null` when absent (404, or an HTML page from a
 * fallback: see `isHtml`), or `{ html: true }` for an HTML answer.
 */
async function probe(ctx, name) {
  const url = new URL(name, ctx.base).href;
  if (ctx.cache) {
    const hit = await ctx.cache.match(url);
    if (hit) {
      const bytes = new Uint8Array(await hit.arrayBuffer());
      if (!isHtml(bytes)) return { url, size: bytes.length, bytes, cached: true };
      await ctx.cache.delete(url);
    }
  }
  ctx.signal?.throwIfAborted();
  let res;
  try {
    res = await fetch(url, { method: "HEAD", headers: ctx.headers, signal: ctx.signal });
  } catch (e) {
    if (ctx.signal?.aborted) throw ctx.signal.reason;
    throw new Error(`could not fetch ${name} from ${url}: ${e?.message ?? e}`);
  }
  if (res.status === 404) return null;
  if (res.status === 405 || res.status === 501) return { url, size: null }; // no HEAD: find out by GET
  if (!res.ok) {
    const hint = res.status === 401 || res.status === 403 ? " (a private or gated repository: pass a token, or none by that name)" : "";
    throw new Error(`could not fetch ${name} from ${url}: HTTP ${res.status} ${res.statusText}${hint}`);
  }
  if (/text\/html/i.test(res.headers.get("content-type") ?? "")) return { url, html: true };
  const size = res.headers.get("content-encoding") ? null : Number(res.headers.get("content-length")) || null;
  return { url, size };
}

/**
 * The files of a plan from the engine (`modelFiles`), found before any download: each group
 * offers alternatives (sets of files), looked for only when its `when` file (if any) was found;
 * the first alternative whose first file exists is taken,
 * the rest of it is then required; a sharded checkpoint's index (downloaded here) brings its
 * shards. Returns `[{ name, url, size, bytes? }]` and the index files' bytes.
 */
async function resolvePlan(ctx, plan) {
  const list = [];
  const want = async (name) => {
    const p = await probe(ctx, name);
    if (!p) throw new Error(`${ctx.label}: ${name} not found under ${ctx.base} (HTTP 404)`);
    if (p.html) throw htmlError(name, p.url, ctx.base);
    list.push({ name, ...p });
    return list[list.length - 1];
  };
  for (const group of plan) {
    // A part that only some models have (SDXL's second text encoder): looked for when its
    // marker file was found.
    if (group.when && !list.some((f) => f.name === group.when)) continue;
    let found = false;
    for (const [i, alt] of group.any.entries()) {
      const last = group.required && i === group.any.length - 1;
      const p = await probe(ctx, alt[0]);
      if (!p || p.html) {
        if (last && p?.html) throw htmlError(alt[0], p.url, ctx.base);
        if (last) {
          const names = group.any.map((a) => a.join(" + ")).join(", or ");
          throw new Error(`${ctx.label}: ${group.any.length > 1 ? `none of ${names} found` : `${names} not found`} under ${ctx.base} (HTTP 404)`);
        }
        continue;
      }
      list.push({ name: alt[0], ...p });
      for (const name of alt.slice(1)) await want(name);
      for (const name of alt) {
        if (!name.endsWith(".index.json")) continue;
        const entry = list.find((f) => f.name === name);
        entry.bytes ??= await fetchFile(entry.url, name, true, ctx);
        let shards;
        try {
          shards = ctx.engine.shardsOf(name, text(entry.bytes));
        } catch (e) {
          throw new Error(`${ctx.label}: ${name}: ${e.message ?? e}`);
        }
        for (const s of shards) await want(s);
      }
      found = true;
      break;
    }
    if (!found && group.required) {
      throw new Error(`${ctx.label}: none of ${group.any.map((a) => a.join(" + ")).join(", or ")} found under ${ctx.base}`);
    }
  }
  return list;
}

/** Downloads what the list does not hold yet, with per-file and overall progress. */
async function download(ctx, list) {
  const sizes = new Map(list.map((f) => [f.name, f.size]));
  const loaded = new Map();
  const total = list.every((f) => f.size !== null) ? list.reduce((a, f) => a + f.size, 0) : null;
  ctx.report = (file, url, done, size, cached) => {
    loaded.set(file, done);
    if (size !== null && size !== undefined) sizes.set(file, size);
    const sum = [...loaded.values()].reduce((a, b) => a + b, 0);
    ctx.onProgress?.({
      phase: "download",
      file,
      url,
      loaded: done,
      total: size,
      cached,
      fileIndex: list.findIndex((f) => f.name === file),
      files: list.length,
      overall: { loaded: sum, total },
    });
  };
  const files = new Map();
  for (const f of list) {
    if (f.bytes) ctx.report(f.name, f.url, f.bytes.length, f.bytes.length, !!f.cached);
    files.set(f.name, f.bytes ?? (await fetchFile(f.url, f.name, true, ctx)));
  }
  return files;
}

/** Records in the cache which files make a model, for `cache.has/list/delete`. */
async function writeManifest(ctx, kind, list, files) {
  if (!ctx.cache) return;
  const manifest = { source: ctx.source, label: ctx.label, kind, base: ctx.base, file: ctx.file ?? null, files: list.map((f) => ({ name: f.name, url: f.url, size: files.get(f.name)?.length ?? f.size })), date: new Date().toISOString() };
  manifest.bytes = manifest.files.reduce((a, f) => a + (f.size ?? 0), 0);
  await ctx.cache.put(manifestKey(ctx, kind), new Response(JSON.stringify(manifest), { headers: { "content-type": "application/json" } })).catch(() => {});
}

function manifestKey(r, kind) {
  return `${r.base}?kiln-manifest=${kind}${r.file ? `&file=${encodeURIComponent(r.file)}` : ""}`;
}

/** The files of a text model: one .gguf, or a folder as the engine lists it. */
async function textFiles(ctx) {
  if (ctx.file) {
    const p = await probe(ctx, ctx.file);
    if (p?.html) throw htmlError(ctx.file, p.url, ctx.base);
    return [{ name: ctx.file, url: new URL(ctx.file, ctx.base).href, size: p?.size ?? null, bytes: p?.bytes }];
  }
  return resolvePlan(ctx, JSON.parse(ctx.engine.modelFiles("text", true)));
}

/** The files of a diffusers pipeline folder (fp16 weights first unless `variant` is "fp32"). */
async function imageFiles(ctx) {
  if (ctx.file) throw new Error(`${ctx.label}: an image model is a diffusers folder, not a .gguf file`);
  return resolvePlan(ctx, JSON.parse(ctx.engine.modelFiles("image", ctx.variant !== "fp32")));
}

/** The files of a sentence-transformers folder (embeddings), or one BERT .gguf file. */
async function embeddingFiles(ctx) {
  if (ctx.file) return textFiles(ctx); // a BERT .gguf: one file
  return resolvePlan(ctx, JSON.parse(ctx.engine.modelFiles("embedding", true)));
}

/** What every fetch of one model source shares: its URLs, the cache, the options. */
async function fetchContext(engine, source, kind, options) {
  const r = resolveSource(source, kind, options.modelsBase, options.revision);
  return {
    ...r,
    source,
    cache: await openCache(options.cache !== false),
    signal: options.signal,
    onProgress: options.onProgress,
    // A Hugging Face token goes to huggingface.co only.
    headers: options.token && r.hf ? { authorization: `Bearer ${options.token}` } : undefined,
    stallMs: options.stallMs ?? 60000,
    variant: options.variant,
    engine,
    report: () => {},
  };
}

/**
 * Fetches a model's files: `Map(name -> Uint8Array)`. `engine` is the wasm module, which says
 * which files make a model (`modelFiles`, `shardsOf`: the list the native loaders read too).
 * `kind`: "text", "image" or "embedding". Options: `modelsBase`, `onProgress`, `signal`, `cache` (default
 * true), `stallMs` (default 60 s), `variant` ("fp16" default, or "fp32").
 */
export async function fetchModel(engine, source, kind, options = {}) {
  const ctx = await fetchContext(engine, source, kind, options);
  const list = kind === "text" ? await textFiles(ctx) : kind === "embedding" ? await embeddingFiles(ctx) : await imageFiles(ctx);
  const files = await download(ctx, list);
  await writeManifest(ctx, kind, list, files);
  return files;
}

/**
 * The cache of downloaded models (the Cache Storage API), per model source. `opts`: `kind`
 * ("text" default, or "image"; it matters for "default"), `modelsBase`, `revision`.
 */
export const cache = {
  /** Whether every file of the model is cached (so loading it downloads nothing). */
  async has(source, opts = {}) {
    const c = await openCache(true);
    const m = c && (await readManifest(c, source, opts));
    if (!m) return false;
    for (const f of m.files) if (!(await c.match(f.url))) return false;
    return true;
  },
  /** Deletes the model's files; resolves to whether anything was cached. */
  async delete(source, opts = {}) {
    const c = await openCache(true);
    const m = c && (await readManifest(c, source, opts));
    if (!m) return false;
    for (const f of m.files) await c.delete(f.url);
    await c.delete(manifestKey(m, m.kind));
    return true;
  },
  /** The cached models: `[{ source, label, kind, base, file, files, bytes, date }]`. */
  async list() {
    const c = await openCache(true);
    if (!c) return [];
    const out = [];
    for (const req of await c.keys()) {
      if (!req.url.includes("?kiln-manifest=")) continue;
      const res = await c.match(req);
      if (res) out.push(await res.json());
    }
    return out;
  },
  /** Asks the browser to keep the cache under storage pressure (`navigator.storage.persist`). */
  async persist() {
    return (await globalThis.navigator?.storage?.persist?.()) ?? false;
  },
  /** `{ usage, quota }` in bytes for this origin, as the browser estimates them. */
  async estimate() {
    return (await globalThis.navigator?.storage?.estimate?.()) ?? { usage: null, quota: null };
  },
  /** Deletes every cached model file. */
  clear: () => clearCache(),
};

async function readManifest(c, source, opts) {
  const r = resolveSource(source, opts.kind ?? "text", opts.modelsBase ?? new URL("/models/", globalThis.location?.href ?? "http://localhost/").href, opts.revision);
  const res = await c.match(manifestKey(r, opts.kind ?? "text"));
  return res ? res.json() : null;
}

/**
 * What a text model will take on the GPU before loading it: the files are found (cache or HEAD)
 * and only `config.json` (or a `.gguf` file's metadata, from its first bytes) is downloaded:
 * `{ ctx, weightsBytes, kvCacheBytes, totalBytes }`.
 */
export async function textMemory(engine, source, options = {}) {
  const ctx = await fetchContext(engine, source, "text", options);
  const list = await textFiles(ctx);
  const weights = list.filter((f) => /\.(safetensors|gguf)$/.test(f.name)).reduce((a, f) => a + (f.size ?? 0), 0);
  if (ctx.file) {
    // The metadata sits at the start of the file: read growing prefixes until it is whole.
    const f = list[0];
    for (let n = 1 << 20; ; n *= 4) {
      const prefix = f.bytes ?? (await fetchPrefix(f.url, n, ctx));
      const r = engine.ggufTextMemory(f.name, prefix, f.size ?? prefix.length, options.ctx ?? 2048);
      if (r !== undefined) return JSON.parse(r);
      if (f.bytes || prefix.length < n) throw new Error(`${ctx.label}: the GGUF metadata of ${f.name} ends past the end of the file`);
    }
  }
  const cfg = list.find((f) => f.name === "config.json");
  const bytes = cfg.bytes ?? (await fetchFile(cfg.url, "config.json", true, ctx));
  return JSON.parse(engine.textMemory(text(bytes), weights, options.ctx ?? 2048));
}

/** The first `n` bytes of a file (a Range request; a server that ignores it is read only that far). */
async function fetchPrefix(url, n, ctx) {
  const ctrl = new AbortController();
  const onAbort = () => ctrl.abort(ctx.signal.reason);
  ctx.signal?.addEventListener("abort", onAbort);
  try {
    const res = await fetch(url, { headers: { ...ctx.headers, range: `bytes=0-${n - 1}` }, signal: ctrl.signal });
    if (!res.ok) throw new Error(`could not fetch ${url}: HTTP ${res.status} ${res.statusText}`);
    const reader = res.body.getReader();
    const out = new Uint8Array(n);
    let got = 0;
    while (got < n) {
      const { done, value } = await reader.read();
      if (done) break;
      const take = Math.min(value.length, n - got);
      out.set(value.subarray(0, take), got);
      got += take;
    }
    await reader.cancel().catch(() => {});
    return out.subarray(0, got);
  } finally {
    ctx.signal?.removeEventListener("abort", onAbort);
  }
}
