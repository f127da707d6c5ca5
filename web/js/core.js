// The wasm module: loading it once, and turning every failure into an Error. A Rust panic
// traps the module; its message reaches every pending call as an Error, and later calls fail
// with the same message instead of an opaque "unreachable".

import initWasm, * as wasm from "./wasm/kiln_web.js";

let ready = null;
let crashed = null;
const pending = new Set();

export { wasm };

function panicError(msg) {
  const e = new Error(`kiln crashed (Rust panic): ${msg}. Reload the page to use Kiln again.`);
  e.name = "KilnPanic";
  return e;
}

/**
 * Where this package's own files are when a dev server moved this module away from them: Vite's
 * dependency pre-bundler serves it from `node_modules/.vite/deps/` without `worker.js` and the
 * wasm, which stay in the package folder (served as `/node_modules/kiln-gpu/pkg/...`). `null`
 * when the module is where the package put it (production builds, no bundler).
 */
export function packageFile(name) {
  const here = import.meta.url;
  if (!/\/node_modules\/\.vite\/deps\//.test(here)) return null;
  return new URL(`/node_modules/kiln-gpu/pkg/${name}`, here);
}

/** Loads and instantiates the wasm module (once). */
export function init(wasmUrl) {
  const url = wasmUrl ?? packageFile("wasm/kiln_web_bg.wasm") ?? new URL("./wasm/kiln_web_bg.wasm", import.meta.url);
  ready ??= initWasm({ module_or_path: url }).then(() => {
    wasm.setPanicHandler((msg) => {
      crashed = msg;
      const err = panicError(msg);
      for (const reject of pending) reject(err);
      pending.clear();
    });
  });
  return ready;
}

/** The error a failed call should surface as. */
export function toError(e) {
  if (crashed || e instanceof WebAssembly.RuntimeError) return panicError(crashed ?? e.message);
  if (e instanceof Error) return e;
  return new Error(typeof e === "string" ? e : JSON.stringify(e));
}

/** Runs a synchronous call into the module. */
export function sync(f) {
  if (crashed) throw panicError(crashed);
  try {
    return f();
  } catch (e) {
    throw toError(e);
  }
}

/** Runs a call into the module that returns a promise; settles even if the module panics. */
export function call(f) {
  if (crashed) return Promise.reject(panicError(crashed));
  return new Promise((resolve, reject) => {
    pending.add(reject);
    let p;
    try {
      p = f();
    } catch (e) {
      pending.delete(reject);
      reject(toError(e));
      return;
    }
    Promise.resolve(p)
      .then(resolve, (e) => reject(toError(e)))
      .finally(() => pending.delete(reject));
  });
}

/** The engine's snake_case result keys in JavaScript's camelCase (`prompt_ids` -> `promptIds`). */
export function camelKeys(v) {
  if (Array.isArray(v)) return v.map(camelKeys);
  if (v === null || typeof v !== "object") return v;
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k.replace(/_([a-z])/g, (_, c) => c.toUpperCase()), camelKeys(x)]));
}

/** Drops undefined and null fields, so the Rust side applies its defaults. */
export function options(o) {
  return JSON.stringify(Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined && v !== null)));
}

/**
 * Turns `run(onPiece) -> Promise<result>` into an async generator of pieces that returns the
 * result. Leaving the loop early (break, throw) stops the generation; so does `signal`.
 */
export async function* stream(run, signal) {
  signal?.throwIfAborted();
  const queue = [];
  let wake = null;
  let finished = false;
  let stopped = false;
  let error = null;
  let result;
  const onPiece = (piece) => {
    // null: a token that produced nothing to send yet (held-back text of a possible tool call).
    if (piece !== null) queue.push(piece);
    wake?.();
    return !stopped && !signal?.aborted;
  };
  const onAbort = () => wake?.();
  signal?.addEventListener("abort", onAbort);
  const done = run(onPiece).then(
    (r) => (result = r),
    (e) => (error = e),
  ).finally(() => {
    finished = true;
    wake?.();
  });
  try {
    for (;;) {
      signal?.throwIfAborted();
      if (queue.length) {
        yield queue.shift();
        continue;
      }
      if (finished) break;
      await new Promise((r) => (wake = r));
      wake = null;
    }
  } finally {
    stopped = true;
    signal?.removeEventListener("abort", onAbort);
    await done; // the model is free again when the generator is done
  }
  if (error) throw error;
  signal?.throwIfAborted();
  return result;
}

/**
 * The OpenAI-shaped `create(body, { signal })` over `run(json, onChunk, signal) -> Promise<json>`
 * (the engine's chat-completion core, in this thread or in the worker). With `stream: true` it
 * resolves to an async iterable of chunk objects (leaving the loop early or aborting stops the
 * generation); otherwise to the response object. `signal` may also be given in the body.
 */
export function openaiCreate(run, body = {}, opts = {}) {
  const { signal: bodySignal, ...req } = body;
  const signal = opts.signal ?? bodySignal;
  const json = JSON.stringify(req);
  if (req.stream) {
    const chunks = stream((onChunk) => run(json, onChunk, signal), signal);
    return Promise.resolve(parsed(chunks));
  }
  if (signal?.aborted) return Promise.reject(signal.reason);
  return run(json, () => !signal?.aborted, signal).then((r) => {
    signal?.throwIfAborted();
    return JSON.parse(r);
  });
}

async function* parsed(chunks) {
  for await (const c of chunks) yield JSON.parse(c);
}

/** `chat.completions.create` and `completions.create` over `runner(kind)`. */
export function openaiApi(runner) {
  const create = (kind) => (body, opts) => {
    try {
      return openaiCreate(runner(kind, body), body, opts);
    } catch (e) {
      return Promise.reject(e); // e.g. no such model: a rejected promise, as for every other error
    }
  };
  return { chat: { completions: { create: create("chat") } }, completions: { create: create("completion") } };
}

/**
 * The loaded text (or embedding) models of a Kiln by name, for its own `chat.completions.create`
 * (`embeddings.create`): a request's
 * `model` names one by the source it was loaded from; absent or "default", the latest loaded.
 */
export class TextModels {
  #models = new Map();
  #kind;
  #load;

  constructor(kind = "text", load = "loadText") {
    this.#kind = kind;
    this.#load = load;
  }

  add(source, model) {
    this.#models.delete(source);
    this.#models.set(source, model);
    const dispose = model.dispose.bind(model);
    model.dispose = () => {
      if (this.#models.get(source) === model) this.#models.delete(source);
      return dispose();
    };
  }

  pick(name) {
    if (name === undefined || name === null || name === "default") {
      const all = [...this.#models.values()];
      if (!all.length) throw new Error(`no ${this.#kind} model is loaded: call ${this.#load} first`);
      return all[all.length - 1];
    }
    const m = this.#models.get(name);
    if (!m) throw new Error(`the model '${name}' is not loaded (loaded: ${[...this.#models.keys()].join(", ") || "none"})`);
    return m;
  }

  /** `pick` as a promise (a missing model is a rejection). */
  pickAsync(name) {
    try {
      return Promise.resolve(this.pick(name));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** The API of the Kiln object: each request goes to the model it names. */
  api() {
    return openaiApi((kind, body) => {
      const m = this.pick(body?.model);
      return (json, onChunk, signal) => m.openaiRun(kind, json, onChunk, signal);
    });
  }
}
