// kiln-gpu: text and image generation on WebGPU, in the page or in a Web Worker.
//
//   const kiln = await Kiln.create();                       // or Kiln.create({ worker: true })
//   const llm = await kiln.loadText("default", { onProgress });
//   for await (const piece of llm.generate("In the beginning", { maxTokens: 32 })) ...
//   const r = await kiln.chat.completions.create({ messages: [{ role: "user", content: "Hi" }] });
//   const sd = await kiln.loadImage("default");
//   const image = await sd.generate("a red circle on a blue background", { seed: 1 }); // ImageData
//   await kiln.loadEmbedding("sentence-transformers/all-MiniLM-L6-v2");
//   const e = await kiln.embeddings.create({ input: ["a", "b"] });   // OpenAI's response shape
//
// Static imports only: bundlers emit one graph for the page and one for worker.js (which
// imports page.js, not this file).

import { WorkerKiln } from "./client.js";
import { Kiln as PageKiln } from "./page.js";

export { cache, clearCache, debugPanic, EmbeddingModel, ImageModel, resolveSource, TextModel } from "./page.js";

/** The entry point: a WebGPU device and the models loaded on it, in this thread or a worker. */
export class Kiln extends PageKiln {
  /** See `PageKiln.create`; `{ worker: true }` runs everything in a module Web Worker. */
  static create(opts = {}) {
    return opts.worker ? WorkerKiln.create(opts) : super.create(opts);
  }
}
