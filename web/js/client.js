// The page side of Kiln.create({ worker: true }): the same API as kiln.js, with the engine in a
// module Web Worker (worker.js) so generation never blocks the page.

import { openaiApi, packageFile, stream, TextModels } from "./core.js";

class Rpc {
  #worker;
  #next = 1;
  #calls = new Map();

  constructor(worker) {
    this.#worker = worker;
    worker.onmessage = ({ data }) => {
      const c = this.#calls.get(data.id);
      if (!c) return;
      if ("progress" in data) c.onProgress?.(data.progress);
      else if ("piece" in data) c.onPiece?.(data.piece);
      else if ("step" in data) c.onStep?.(data.step);
      else {
        this.#calls.delete(data.id);
        c.signal?.removeEventListener("abort", c.abort);
        if (data.error && c.signal?.aborted) c.reject(c.signal.reason);
        else if (data.error) {
          const e = new Error(data.error.message);
          e.name = data.error.name;
          c.reject(e);
        } else c.resolve(data.result);
      }
    };
    const fail = (ev) => {
      const e = new Error(`the Kiln worker failed: ${ev.message ?? "could not load or run worker.js"}`);
      for (const c of this.#calls.values()) c.reject(e);
      this.#calls.clear();
    };
    worker.onerror = fail;
    worker.onmessageerror = fail;
  }

  /** Sends a request; `hooks`: onProgress, onPiece, onStep, signal. */
  request(op, args = {}, hooks = {}) {
    if (hooks.signal?.aborted) return Promise.reject(hooks.signal.reason);
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      const c = { ...hooks, resolve, reject };
      c.abort = () => this.#worker.postMessage({ op: "abort", args: { target: id } });
      hooks.signal?.addEventListener("abort", c.abort);
      this.#calls.set(id, c);
      this.#worker.postMessage({ id, op, args });
    });
  }

  terminate() {
    this.#worker.terminate();
  }
}

function toImageData({ width, height, data }) {
  return new ImageData(new Uint8ClampedArray(data.buffer, data.byteOffset, data.byteLength), width, height);
}

/** Splits the functions and the signal off options (they cannot be posted). */
function split(opts) {
  const { onProgress, onPiece, onStep, signal, ...rest } = opts;
  return { hooks: { onProgress, onPiece, onStep, signal }, rest };
}

class WorkerTextModel {
  #rpc;
  #handle;
  info;

  constructor(rpc, handle, info) {
    this.#rpc = rpc;
    this.#handle = handle;
    this.info = info;
    Object.assign(this, openaiApi((kind) => (json, onChunk, signal) => this.openaiRun(kind, json, onChunk, signal)));
  }

  /** One request through the engine's chat-completion core in the worker. */
  openaiRun(kind, json, onChunk, signal) {
    // A consumer that stops (onChunk returns false) stops the generation in the worker too.
    const stop = new AbortController();
    const sig = signal ? AbortSignal.any([signal, stop.signal]) : stop.signal;
    const piece = (c) => {
      if (onChunk(c) === false) stop.abort();
    };
    return this.#rpc.request("openai", { handle: this.#handle, kind, json }, { signal: sig, onPiece: piece });
  }

  generate(prompt, opts = {}) {
    return stream((onPiece) => this.#complete(prompt, opts, onPiece), opts.signal);
  }

  complete(prompt, opts = {}) {
    return this.#complete(prompt, opts, opts.onPiece);
  }

  #complete(prompt, opts, onPiece) {
    const { hooks, rest } = split(opts);
    // A consumer that leaves the stream early stops the generation in the worker too.
    const stop = new AbortController();
    const signal = hooks.signal ? AbortSignal.any([hooks.signal, stop.signal]) : stop.signal;
    const piece = (p) => {
      if (onPiece?.(p) === false) stop.abort();
    };
    const args = { handle: this.#handle, prompt: typeof prompt === "string" ? prompt : Array.from(prompt), options: rest };
    return this.#rpc.request("complete", args, { ...hooks, signal, onPiece: piece });
  }

  encode(text) {
    return this.#rpc.request("encode", { handle: this.#handle, text });
  }

  decode(ids) {
    return this.#rpc.request("decode", { handle: this.#handle, ids: Array.from(ids) });
  }

  renderChat(messages) {
    return this.#rpc.request("renderChat", { handle: this.#handle, messages });
  }

  dispose() {
    return this.#rpc.request("dispose", { handle: this.#handle }).catch(() => {});
  }
}

class WorkerImageModel {
  #rpc;
  #handle;
  info;

  constructor(rpc, handle, info) {
    this.#rpc = rpc;
    this.#handle = handle;
    this.info = info;
  }

  setTinyDecoder(folder) {
    return this.#rpc.request("setTinyDecoder", { handle: this.#handle, folder: new URL(folder, globalThis.location?.href).href });
  }

  setLoras(loras = []) {
    // URLs are fetched by the worker (relative ones against this page).
    const abs = loras.map((l) => (typeof l.source === "string" ? { ...l, source: new URL(l.source, globalThis.location?.href).href } : l));
    return this.#rpc.request("setLoras", { handle: this.#handle, loras: abs });
  }

  async generate(prompt, opts = {}) {
    const { hooks, rest } = split(opts);
    const onStep = hooks.onStep && ((s) => hooks.onStep({ ...s, preview: s.preview && toImageData(s.preview) }));
    const r = await this.#rpc.request(
      "image",
      { handle: this.#handle, prompt, options: rest, previews: !!hooks.onStep },
      { ...hooks, onStep },
    );
    const image = toImageData(r);
    image.notes = r.notes;
    return image;
  }

  dispose() {
    return this.#rpc.request("dispose", { handle: this.#handle }).catch(() => {});
  }
}

class WorkerEmbeddingModel {
  #rpc;
  #handle;
  info;

  constructor(rpc, handle, info) {
    this.#rpc = rpc;
    this.#handle = handle;
    this.info = info;
    this.embeddings = { create: (body = {}) => this.openaiRun(JSON.stringify(body)).then((r) => JSON.parse(r)) };
  }

  openaiRun(json) {
    return this.#rpc.request("embed", { handle: this.#handle, json });
  }

  async embed(texts, opts = {}) {
    const r = JSON.parse(await this.openaiRun(JSON.stringify({ input: Array.isArray(texts) ? texts : [texts], dimensions: opts.dimensions })));
    return r.data.map((d) => Float32Array.from(d.embedding));
  }

  tokenize(text) {
    return this.#rpc.request("tokenize", { handle: this.#handle, text });
  }

  dispose() {
    return this.#rpc.request("dispose", { handle: this.#handle }).catch(() => {});
  }
}

/** Kiln with the engine in a worker. Same methods as Kiln; sync helpers return promises. */
export class WorkerKiln {
  #rpc;
  #texts = new TextModels();
  #embedders = new TextModels("embedding", "loadEmbedding");
  adapter;

  constructor(rpc, adapter) {
    this.#rpc = rpc;
    this.adapter = adapter;
    Object.assign(this, this.#texts.api());
    this.embeddings = { create: (body = {}) => this.#embedders.pickAsync(body.model).then((m) => m.embeddings.create(body)) };
  }

  static async create(opts = {}) {
    // Written literally, `new Worker(new URL("./worker.js", import.meta.url), ...)` is the
    // pattern bundlers (Vite, webpack 5, Parcel, esbuild) recognize and emit the worker for.
    // (Under Vite's dev server the package's worker.js is used from the package folder.)
    const own = opts.workerUrl ?? packageFile("worker.js");
    const worker = own ? new Worker(own, { type: "module" }) : new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    const rpc = new Rpc(worker);
    const modelsBase = new URL(opts.modelsBase ?? "/models/", globalThis.location?.href).href;
    const wasmUrl = opts.wasmUrl && new URL(opts.wasmUrl, globalThis.location?.href).href;
    try {
      const { adapter } = await rpc.request("create", { modelsBase, wasmUrl, softwareKernels: opts.softwareKernels });
      return new WorkerKiln(rpc, adapter);
    } catch (e) {
      rpc.terminate();
      throw e;
    }
  }

  async loadText(source, opts = {}) {
    const { hooks, rest } = split(opts);
    const { handle, info } = await this.#rpc.request("loadText", { source, options: rest }, hooks);
    const model = new WorkerTextModel(this.#rpc, handle, info);
    this.#texts.add(source, model);
    return model;
  }

  async loadImage(source, opts = {}) {
    const { hooks, rest } = split(opts);
    const { handle, info } = await this.#rpc.request("loadImage", { source, options: rest }, hooks);
    return new WorkerImageModel(this.#rpc, handle, info);
  }

  async loadEmbedding(source, opts = {}) {
    const { hooks, rest } = split(opts);
    const { handle, info } = await this.#rpc.request("loadEmbedding", { source, options: rest }, hooks);
    const model = new WorkerEmbeddingModel(this.#rpc, handle, info);
    this.#embedders.add(source, model);
    return model;
  }

  textMemory(source, opts = {}) {
    const { hooks, rest } = split(opts);
    return this.#rpc.request("textMemory", { source, options: rest }, hooks);
  }

  kernelParity() {
    return this.#rpc.request("kernelParity");
  }

  loseDevice() {
    return this.#rpc.request("loseDevice");
  }

  counters() {
    return this.#rpc.request("counters");
  }

  /** Ends the worker (and with it every model). */
  dispose() {
    this.#rpc.terminate();
  }
}
