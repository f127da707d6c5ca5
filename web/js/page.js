// The engine in this thread: Kiln, TextModel, ImageModel. `kiln.js` (the package entry) adds
// the worker mode on top; `worker.js` imports this module, so a bundled worker needs no code
// splitting and never contains itself.
import { call, camelKeys, init, openaiApi, options, stream, sync, TextModels, wasm } from "./core.js";
import { cache, clearCache, fetchModel, resolveSource, textMemory } from "./fetch.js";

export { cache, clearCache, resolveSource };

const defaultModelsBase = () => new URL("/models/", globalThis.location?.href ?? "http://localhost/").href;

function textOptions(o) {
  return {
    maxTokens: o.maxTokens,
    temperature: o.temperature,
    topK: o.topK,
    topP: o.topP,
    minP: o.minP,
    repeatPenalty: o.repeatPenalty,
    repeatWindow: o.repeatWindow,
    topLogprobs: o.topLogprobs,
    seed: o.seed,
    stop: o.stop,
    grammar: o.grammar,
    logitBias: o.logitBias,
  };
}

function promptField(prompt) {
  if (typeof prompt === "string") return { prompt };
  if (Array.isArray(prompt) || ArrayBuffer.isView(prompt)) return { promptIds: Array.from(prompt) };
  throw new Error("prompt must be a string or an array of token ids");
}

/** A loaded text model (in this thread). */
export class TextModel {
  #m;
  #id;
  /** Architecture, sizes, context length. */
  info;

  constructor(m, id = "default") {
    this.#m = m;
    this.#id = id;
    this.info = JSON.parse(m.info());
    // OpenAI-shaped: `chat.completions.create(...)`, `completions.create(...)`.
    Object.assign(this, openaiApi((kind) => (json, onChunk, signal) => this.openaiRun(kind, json, onChunk, signal)));
  }

  /** One request through the engine's chat-completion core; resolves to the response JSON. */
  openaiRun(kind, json, onChunk, _signal) {
    return call(() => this.#m.openai(kind, json, this.#id, onChunk));
  }

  /** Streams the generated text piece by piece; the generator's return value is the result. */
  generate(prompt, opts = {}) {
    return stream((onPiece) => this.#run(prompt, opts, onPiece), opts.signal);
  }

  /** Generates to the end: `{ text, ids, logprobs, promptIds, stop, timings }`. */
  async complete(prompt, opts = {}) {
    opts.signal?.throwIfAborted();
    return this.#run(prompt, opts, (piece) => {
      opts.onPiece?.(piece);
      return !opts.signal?.aborted;
    });
  }

  async #run(prompt, opts, onPiece) {
    const json = options({ ...promptField(prompt), ...textOptions(opts) });
    const r = camelKeys(JSON.parse(await call(() => this.#m.generate(json, onPiece))));
    if (r.stop === "cancelled") opts.signal?.throwIfAborted();
    return r;
  }

  /** Prompt token ids as the generator sees them. */
  encode(text) {
    return Array.from(sync(() => this.#m.encodePrompt(text)));
  }

  decode(ids) {
    return sync(() => this.#m.decode(Uint32Array.from(ids)));
  }

  /** Renders `[{ role, content }]` with the model's chat template. */
  renderChat(messages) {
    return sync(() => this.#m.renderChat(JSON.stringify(messages.map((m) => [m.role, m.content]))));
  }

  /** Frees the model's GPU buffers (after the current generation, if any). */
  dispose() {
    this.#m?.free();
    this.#m = null;
  }
}

/** A loaded image pipeline (in this thread). */
export class ImageModel {
  #m;
  /** Default `width`/`height` and the size multiple. */
  info;

  constructor(m) {
    this.#m = m;
    this.info = JSON.parse(m.info());
  }

  /**
   * Loads a tiny autoencoder (the URL of a diffusers `AutoencoderTiny` folder, e.g. a copy of
   * madebyollin/taesd): previews become its full-size decode of the current estimate, and
   * `generate(..., { tinyDecoder: true })` decodes the final image with it.
   */
  async setTinyDecoder(folder) {
    const base = folder.endsWith("/") ? folder : `${folder}/`;
    const get = async (name) => {
      const r = await fetch(new URL(name, new URL(base, globalThis.location?.href)));
      if (!r.ok) throw new Error(`tiny decoder ${base}${name}: HTTP ${r.status}`);
      return r;
    };
    const config = await (await get("config.json")).text();
    const weights = new Uint8Array(await (await get("diffusion_pytorch_model.safetensors")).arrayBuffer());
    sync(() => this.#m.setTinyDecoder(config, weights));
  }

  /**
   * Merges LoRA files into the pipeline, replacing the previous set (`[]` removes them):
   * `[{ source, scale }]`, `source` a URL, a Blob or bytes. Resolves to the modules merged.
   */
  async setLoras(loras = []) {
    const list = [];
    for (const { source, scale = 1, name } of loras) list.push({ name: name ?? (typeof source === "string" ? source : "LoRA"), data: await loraBytes(source), scale });
    return call(() => this.#m.setLoras(list));
  }

  /** Generates an image: an `ImageData`. `onStep({ step, steps, preview })` gets live previews. */
  async generate(prompt, opts = {}) {
    const { signal, onStep } = opts;
    signal?.throwIfAborted();
    const json = options({
      prompt,
      negativePrompt: opts.negativePrompt,
      steps: opts.steps,
      guidance: opts.guidance,
      scheduler: opts.scheduler,
      seed: opts.seed,
      width: opts.width,
      height: opts.height,
      strength: opts.strength,
      sampleEncoding: opts.sampleEncoding,
      tinyDecoder: opts.tinyDecoder,
    });
    // img2img and inpainting: the pixels of the init image and the mask, as RGBA.
    const images =
      opts.initImage || opts.mask
        ? { init: opts.initImage ? await toPixels(opts.initImage, "initImage") : null, mask: opts.mask ? await toPixels(opts.mask, "mask") : null }
        : null;
    const step = (done, total, p) => {
      if (signal?.aborted) return false;
      onStep?.({ step: done, steps: total, preview: p && toImageData(p) });
      return true;
    };
    let r;
    try {
      r = await call(() => this.#m.generate(json, step, images));
    } catch (e) {
      signal?.throwIfAborted();
      throw e;
    }
    const image = toImageData(r);
    image.notes = r.notes;
    return image;
  }

  dispose() {
    this.#m?.free();
    this.#m = null;
  }
}

/** A loaded embedding model (in this thread). */
export class EmbeddingModel {
  #m;
  #id;
  /** `{ dim, maxTokens, pooling, normalized, layers, hidden }`. */
  info;

  constructor(m, id = "default") {
    this.#m = m;
    this.#id = id;
    this.info = JSON.parse(m.info());
    // OpenAI-shaped: `embeddings.create({ input, encoding_format, dimensions })`.
    this.embeddings = { create: (body = {}) => this.openaiRun(JSON.stringify(body)).then((r) => JSON.parse(r)) };
  }

  /** One request through the engine's embeddings core; resolves to the response JSON text. */
  openaiRun(json) {
    return call(() => this.#m.openai(json, this.#id));
  }

  /** The embeddings of texts, one `Float32Array` each, in one batched pass. */
  async embed(texts, opts = {}) {
    const r = JSON.parse(await this.openaiRun(JSON.stringify({ input: Array.isArray(texts) ? texts : [texts], dimensions: opts.dimensions })));
    return r.data.map((d) => Float32Array.from(d.embedding));
  }

  /** An input's token ids (start and end tokens, truncated as embedding does). */
  tokenize(text) {
    return Array.from(sync(() => this.#m.tokenize(text)));
  }

  dispose() {
    this.#m?.free();
    this.#m = null;
  }
}

/** The bytes of a LoRA file given as a URL, a Blob or bytes. */
async function loraBytes(source) {
  if (typeof source === "string") {
    const r = await fetch(source);
    if (!r.ok) throw new Error(`LoRA ${source}: HTTP ${r.status}`);
    return new Uint8Array(await r.arrayBuffer());
  }
  if (typeof Blob !== "undefined" && source instanceof Blob) return new Uint8Array(await source.arrayBuffer());
  if (source instanceof ArrayBuffer) return new Uint8Array(source);
  if (ArrayBuffer.isView(source)) return new Uint8Array(source.buffer, source.byteOffset, source.byteLength);
  throw new Error("a LoRA's source must be a URL, a Blob or bytes");
}

/**
 * `{ width, height, data }` (RGBA bytes) of an image given as ImageData (or any object of that
 * shape), a Blob (PNG, JPEG, ...), or anything `drawImage` takes (ImageBitmap, canvas, <img>),
 * decoded without colour-space conversion or premultiplication.
 */
async function toPixels(src, what) {
  if (src && typeof src.width === "number" && typeof src.height === "number" && src.data) {
    return { width: src.width, height: src.height, data: new Uint8Array(src.data.buffer, src.data.byteOffset, src.data.byteLength) };
  }
  let bitmap = src;
  if (typeof Blob !== "undefined" && src instanceof Blob) {
    try {
      bitmap = await createImageBitmap(src, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    } catch (e) {
      throw new Error(`${what}: not an image the browser can decode (${e.message ?? e})`);
    }
  }
  const w = bitmap?.width, h = bitmap?.height;
  if (!w || !h || typeof OffscreenCanvas === "undefined") throw new Error(`${what}: expected ImageData, a Blob or an ImageBitmap`);
  const ctx = new OffscreenCanvas(w, h).getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const d = ctx.getImageData(0, 0, w, h, { colorSpace: "srgb" });
  return { width: w, height: h, data: new Uint8Array(d.data.buffer) };
}

function toImageData({ width, height, data }) {
  const px = new Uint8ClampedArray(data.buffer, data.byteOffset, data.byteLength);
  return typeof ImageData === "undefined" ? { width, height, data: px } : new ImageData(px, width, height);
}

/** Hands fetched files to the module (copying them into its memory). */
function toFiles(map) {
  const f = new wasm.Files();
  for (const [name, bytes] of map) f.add(name, bytes);
  return f;
}

/** The entry point: a WebGPU device and the models loaded on it. */
export class Kiln {
  #device;
  #modelsBase;
  /** The adapter: name, backend, features (shaderF16, subgroups), limits. */
  adapter;

  #texts = new TextModels();
  #embedders = new TextModels("embedding", "loadEmbedding");
  /** Downloaded models in the Cache Storage API: `has`, `delete`, `list`, `persist`, `estimate`. */
  static cache = cache;

  constructor(device, opts) {
    this.#device = device;
    this.#modelsBase = opts.modelsBase ?? defaultModelsBase();
    this.adapter = JSON.parse(device.info());
    // `kiln.chat.completions.create({ model, messages, ... })`: `model` names a loaded text
    // model by its source; absent or "default", the latest one loaded.
    Object.assign(this, this.#texts.api());
    // `kiln.embeddings.create({ model, input, ... })`: `model` names a loaded embedding model by
    // its source; absent or "default", the latest one loaded.
    this.embeddings = { create: (body = {}) => this.#embedders.pickAsync(body.model).then((m) => m.embeddings.create(body)) };
  }

  /**
   * Creates the device. Options: `worker` (run everything in a Web Worker), `modelsBase` (where
   * "default" models live; default `/models/` on this origin), `wasmUrl`, `softwareKernels`
   * (use the kernels written for software adapters; default: when the adapter is SwiftShader or
   * a fallback adapter).
   */
  static async create(opts = {}) {
    if (opts.worker) throw new Error("page.js runs the engine in this thread: import Kiln from kiln.js for { worker: true }");
    if (!globalThis.navigator?.gpu) {
      throw new Error("WebGPU is not available here (navigator.gpu is missing): use a browser with WebGPU, on https or localhost");
    }
    // Asked here too so that "no adapter" gets a browser's explanation, not a native one.
    const a = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" }).catch(() => null);
    if (!a) {
      throw new Error(
        "WebGPU found no adapter (navigator.gpu.requestAdapter() returned null): the GPU may be blocklisted or hardware acceleration off" +
          " (headless Chromium without a GPU needs --enable-unsafe-webgpu --use-webgpu-adapter=swiftshader)",
      );
    }
    await init(opts.wasmUrl);
    // A software adapter (SwiftShader, or any the browser calls a fallback) runs the engine's
    // barrier-free kernel variants; `softwareKernels` overrides the guess.
    const i = a.info ?? {};
    const software = opts.softwareKernels ?? (!!i.isFallbackAdapter || /swiftshader/i.test(`${i.architecture} ${i.description} ${i.vendor}`));
    const device = await call(() => wasm.createDevice(software));
    const kiln = new this(device, opts); // the subclass kiln.js exports, when called through it
    kiln.#describeBrowserAdapter(a);
    return kiln;
  }

  /** Adds what the browser says about its adapter (wgpu leaves the name empty and does not
   * map every feature, e.g. `subgroups`, which the engine then does not use). */
  #describeBrowserAdapter(a) {
    const i = a.info ?? {};
    this.adapter.browser = {
      vendor: i.vendor ?? "",
      architecture: i.architecture ?? "",
      device: i.device ?? "",
      description: i.description ?? "",
      isFallbackAdapter: !!i.isFallbackAdapter,
      features: [...a.features].sort(),
    };
    if (!this.adapter.name) {
      this.adapter.name = [i.vendor, i.architecture, i.description].filter(Boolean).join(" ");
      this.adapter.description = this.adapter.name + this.adapter.description;
    }
  }

  /**
   * Loads a text model: a model folder URL, a .gguf URL, a Hugging Face repo id or "default".
   * Options: `onProgress`, `signal`, `cache`, `ctx`, `quantize` ("q4" | "q8" | "q4_k" | "q6_k"),
   * `kvCache` ("auto": f16 on GPUs, f32 on software adapters; "f32" | "f16"),
   * `chatTemplate` (a built-in name: "chatml", "gemma", "llama3", "phi3", or Jinja text).
   */
  async loadText(source, opts = {}) {
    const files = await fetchModel(wasm, source, "text", { ...opts, modelsBase: this.#modelsBase });
    opts.signal?.throwIfAborted();
    const progress = (loaded, total) => opts.onProgress?.({ phase: "upload", loaded, total });
    const m = await call(() => this.#device.loadText(toFiles(files), options({ ctx: opts.ctx, quantize: opts.quantize, chat_template: opts.chatTemplate, kv_cache: opts.kvCache }), progress));
    const model = new TextModel(m, source);
    this.#texts.add(source, model);
    return model;
  }

  /**
   * What loading a text model will take on the GPU (weights as stored + the KV cache for `ctx`),
   * found without downloading the weights: `{ ctx, weightsBytes, kvCacheBytes, totalBytes }`.
   */
  textMemory(source, opts = {}) {
    return textMemory(wasm, source, { ...opts, modelsBase: this.#modelsBase });
  }

  /** Loads a diffusers pipeline folder (URL, Hugging Face repo id or "default"). */
  async loadImage(source, opts = {}) {
    const files = await fetchModel(wasm, source, "image", { ...opts, modelsBase: this.#modelsBase });
    opts.signal?.throwIfAborted();
    opts.onProgress?.({ phase: "upload", loaded: 0, total: 1 });
    const m = await call(() => this.#device.loadImage(toFiles(files)));
    opts.onProgress?.({ phase: "upload", loaded: 1, total: 1 });
    const model = new ImageModel(m);
    if (opts.taesd) await model.setTinyDecoder(opts.taesd);
    return model;
  }

  /** Loads a sentence-transformers folder (URL or Hugging Face repo id) for embeddings. */
  async loadEmbedding(source, opts = {}) {
    const files = await fetchModel(wasm, source, "embedding", { ...opts, modelsBase: this.#modelsBase });
    opts.signal?.throwIfAborted();
    const m = await call(() => this.#device.loadEmbedding(toFiles(files)));
    const model = new EmbeddingModel(m, source);
    this.#embedders.add(source, model);
    return model;
  }

  /** Runs a few kernels against the engine's CPU reference: `[{ name, relErr, tol, ok }]`. */
  async kernelParity() {
    return JSON.parse(await call(() => this.#device.kernelParity()));
  }

  /** The engine's counters (dispatches, submits, bytes read back, objects created). */
  counters() {
    return JSON.parse(sync(() => this.#device.counters()));
  }

  /** Destroys the GPU device (what a driver reset or a GPU-process crash does; for tests):
   * work in progress ends with an error naming the loss; create a new Kiln to go on. */
  loseDevice() {
    sync(() => this.#device.loseDevice());
  }

  dispose() {
    this.#device?.free();
    this.#device = null;
  }
}

/** Test hook: panics inside the module (`inFuture`: inside an async call). */
export async function debugPanic(inFuture) {
  await init();
  return call(() => wasm.debugPanic(inFuture));
}
