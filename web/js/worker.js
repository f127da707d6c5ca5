// The worker side of Kiln.create({ worker: true }): the same API, driven by messages from
// client.js. Each request carries an id; replies carry it back with progress, pieces, steps,
// and finally a result or an error.

import { Kiln } from "./page.js";

let kiln = null;
const models = new Map();
const aborts = new Map();
let nextHandle = 1;

function send(id, msg, transfer = []) {
  self.postMessage({ id, ...msg }, transfer);
}

const ops = {
  async create(id, args) {
    kiln = await Kiln.create({ ...args, worker: false });
    return { adapter: kiln.adapter };
  },
  async loadText(id, { source, options }, signal) {
    const m = await kiln.loadText(source, { ...options, signal, onProgress: (p) => send(id, { progress: p }) });
    models.set(nextHandle, m);
    return { handle: nextHandle++, info: m.info };
  },
  async loadImage(id, { source, options }, signal) {
    const m = await kiln.loadImage(source, { ...options, signal, onProgress: (p) => send(id, { progress: p }) });
    models.set(nextHandle, m);
    return { handle: nextHandle++, info: m.info };
  },
  async loadEmbedding(id, { source, options }, signal) {
    const m = await kiln.loadEmbedding(source, { ...options, signal, onProgress: (p) => send(id, { progress: p }) });
    models.set(nextHandle, m);
    return { handle: nextHandle++, info: m.info };
  },
  embed: (id, { handle, json }) => model(handle).openaiRun(json),
  tokenize: (id, { handle, text }) => model(handle).tokenize(text),
  async complete(id, { handle, prompt, options }, signal) {
    return model(handle).complete(prompt, { ...options, signal, onPiece: (piece) => send(id, { piece }) });
  },
  // Non-streaming requests get null probes: answer them here (is the request still wanted?).
  async openai(id, { handle, kind, json }, signal) {
    const onChunk = (c) => (c === null ? !signal.aborted : (send(id, { piece: c }), !signal.aborted));
    return model(handle).openaiRun(kind, json, onChunk, signal);
  },
  async image(id, { handle, prompt, options, previews }, signal) {
    const onStep = ({ step, steps, preview }) => {
      const p = previews && preview ? { width: preview.width, height: preview.height, data: preview.data } : null;
      send(id, { step: { step, steps, preview: p } }, p ? [p.data.buffer] : []);
    };
    const img = await model(handle).generate(prompt, { ...options, signal, onStep });
    return { result: { width: img.width, height: img.height, data: img.data, notes: img.notes }, transfer: [img.data.buffer] };
  },
  encode: (id, { handle, text }) => model(handle).encode(text),
  decode: (id, { handle, ids }) => model(handle).decode(ids),
  renderChat: (id, { handle, messages }) => model(handle).renderChat(messages),
  textMemory: (id, { source, options }, signal) => kiln.textMemory(source, { ...options, signal }),
  kernelParity: () => kiln.kernelParity(),
  counters: () => kiln.counters(),
  loseDevice: () => kiln.loseDevice(),
  setLoras: (id, { handle, loras }) => model(handle).setLoras(loras),
  setTinyDecoder: (id, { handle, folder }) => model(handle).setTinyDecoder(folder),
  dispose(id, { handle }) {
    model(handle).dispose();
    models.delete(handle);
  },
};

function model(handle) {
  const m = models.get(handle);
  if (!m) throw new Error("this model was disposed");
  return m;
}

self.onmessage = async ({ data }) => {
  const { id, op, args } = data;
  if (op === "abort") {
    aborts.get(args.target)?.abort();
    return;
  }
  const ctrl = new AbortController();
  aborts.set(id, ctrl);
  try {
    const fn = ops[op];
    if (!fn) throw new Error(`unknown operation ${op}`);
    if (op !== "create" && !kiln) throw new Error("Kiln is not created in this worker");
    const r = await fn(id, args ?? {}, ctrl.signal);
    if (r && r.transfer) send(id, { result: r.result }, r.transfer);
    else send(id, { result: r });
  } catch (e) {
    send(id, { error: { name: e?.name ?? "Error", message: e?.message ?? String(e) } });
  } finally {
    aborts.delete(id);
  }
};
