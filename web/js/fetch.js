// Model sources -> file bytes: URL resolution (folders, .gguf files, Hugging Face repo ids,
// "default"), downloads with progress, and the Cache Storage API so a reload downloads nothing.

const CACHE_NAME = "kiln-models-v1";
const HF = "https://huggingface.co";
const DEFAULT_FOLDERS = { text: "text-kjv", image: "image-shapes" };

/** Resolves a model source to `{ base, file?, label }`; `base` is an absolute folder URL ending in "/". */
export function resolveSource(source, kind, modelsBase) {
  if (typeof source !== "string" || source.trim() === "") {
    throw new Error(`model source must be a non-empty string, got ${typeof source === "string" ? "an empty string" : typeof source}`);
  }
  const s = source.trim();
  if (s === "default") {
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
    const base = `${HF}/${m[1]}/resolve/main/`;
    if (m[2]) {
      const cut = m[2].lastIndexOf("/") + 1;
      return { base: base + m[2].slice(0, cut), file: m[2].slice(cut), label: s };
    }
    return { base, label: s };
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
  const { cache, signal, onProgress, stallMs } = ctx;
  const report = (loaded, total, cached) =>
    onProgress?.({ phase: "download", file: name, url, loaded, total, cached, fileIndex: ctx.index });
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
      res = await fetch(url, { signal: ctrl.signal });
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
 * Fetches the files of a plan from the engine (`modelFiles`): each group offers alternatives
 * (sets of files); the first alternative whose first file exists is taken, the rest of it is
 * then required; a sharded checkpoint's index brings its shards.
 */
async function fetchPlan(ctx, plan) {
  const files = new Map();
  const get = async (name, required) => {
    const bytes = await fetchFile(new URL(name, ctx.base).href, name, required, ctx);
    ctx.index++;
    if (bytes) files.set(name, bytes);
    return bytes;
  };
  for (const group of plan) {
    let found = false;
    for (const [i, alt] of group.any.entries()) {
      // The last alternative of a required group is fetched as required: its error (a 404, a
      // timeout) is the one to report.
      const first = await get(alt[0], group.required && i === group.any.length - 1);
      if (!first) continue;
      for (const name of alt.slice(1)) await get(name, true);
      for (const name of alt) {
        if (!name.endsWith(".index.json")) continue;
        let shards;
        try {
          shards = ctx.engine.shardsOf(name, text(files.get(name)));
        } catch (e) {
          throw new Error(`${ctx.label}: ${name}: ${e.message ?? e}`);
        }
        for (const s of shards) await get(s, true);
      }
      found = true;
      break;
    }
    if (!found && group.required) {
      const names = group.any.map((a) => a.join(" + ")).join(", or ");
      throw new Error(`${ctx.label}: none of ${names} found under ${ctx.base}`);
    }
  }
  return files;
}

/** The files of a text model: one .gguf, or a folder as the engine lists it. */
async function textFiles(ctx) {
  if (ctx.file) {
    const files = new Map();
    const bytes = await fetchFile(new URL(ctx.file, ctx.base).href, ctx.file, true, ctx);
    files.set(ctx.file, bytes);
    return files;
  }
  return fetchPlan(ctx, JSON.parse(ctx.engine.modelFiles("text", true)));
}

/** The files of a diffusers pipeline folder (fp16 weights first unless `variant` is "fp32"). */
async function imageFiles(ctx) {
  if (ctx.file) throw new Error(`${ctx.label}: an image model is a diffusers folder, not a .gguf file`);
  return fetchPlan(ctx, JSON.parse(ctx.engine.modelFiles("image", ctx.variant !== "fp32")));
}

/**
 * Fetches a model's files: `Map(name -> Uint8Array)`. `engine` is the wasm module, which says
 * which files make a model (`modelFiles`, `shardsOf`: the list the native loaders read too).
 * `kind`: "text" or "image". Options: `modelsBase`, `onProgress`, `signal`, `cache` (default
 * true), `stallMs` (default 60 s), `variant` ("fp16" default, or "fp32").
 */
export async function fetchModel(engine, source, kind, options = {}) {
  const r = resolveSource(source, kind, options.modelsBase);
  const ctx = {
    ...r,
    index: 0,
    cache: await openCache(options.cache !== false),
    signal: options.signal,
    onProgress: options.onProgress,
    stallMs: options.stallMs ?? 60000,
    variant: options.variant,
    engine,
  };
  return kind === "text" ? textFiles(ctx) : imageFiles(ctx);
}
