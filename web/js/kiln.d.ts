// Types of kiln-gpu: text and image generation on WebGPU.

/** Download and upload progress of a model. */
export type Progress =
  | {
      phase: "download";
      /** File name relative to the model folder, e.g. "unet/config.json". */
      file: string;
      url: string;
      /** Bytes received so far. */
      loaded: number;
      /** Bytes in the file, when the server says (null otherwise); 0 for an absent optional file. */
      total: number | null;
      /** True when the file came from the Cache Storage API (no download). */
      cached: boolean;
      fileIndex: number;
    }
  | {
      /** Weights going to the GPU: `loaded` of `total` tensors. */
      phase: "upload";
      loaded: number;
      total: number;
    };

export interface AdapterInfo {
  name: string;
  vendor: number;
  device: number;
  driver: string;
  driverInfo: string;
  backend: string;
  deviceType: string;
  features: { shaderF16: boolean; subgroups: boolean; timestamps: boolean };
  limits: {
    maxStorageBufferBindingSize: number;
    maxBufferSize: number;
    maxComputeWorkgroupStorageSize: number;
    maxComputeInvocationsPerWorkgroup: number;
    maxStorageBuffersPerShaderStage: number;
  };
  /** Largest buffer the engine binds at once; bigger weights are split. */
  bindingLimit: number;
  description: string;
  /** What the browser reports (GPUAdapter.info and .features); the engine uses a subset. */
  browser?: {
    vendor: string;
    architecture: string;
    device: string;
    description: string;
    isFallbackAdapter: boolean;
    features: string[];
  };
}

export interface CreateOptions {
  /** Run the engine in a module Web Worker; the API is the same. */
  worker?: boolean;
  /** Where the "default" models live: `<modelsBase>text-kjv/`, `<modelsBase>image-shapes/`. Default: `/models/` on this origin. */
  modelsBase?: string;
  /** URL of kiln_web_bg.wasm (default: next to this module). */
  wasmUrl?: string;
  /** Use the engine's kernels for software adapters (no barriers; one row per invocation).
   * Default: when the adapter is SwiftShader or a fallback adapter. */
  softwareKernels?: boolean;
  /** URL of worker.js (default: next to this module). */
  workerUrl?: string;
}

export interface LoadOptions {
  onProgress?: (p: Progress) => void;
  signal?: AbortSignal;
  /** Keep downloads in the Cache Storage API (default true). */
  cache?: boolean;
  /** Abort a download that receives nothing for this long (default 60000 ms). */
  stallMs?: number;
}

export interface TextLoadOptions extends LoadOptions {
  /** Context length (KV-cache positions), capped by the model's maximum. Default 2048. */
  ctx?: number;
  /** Quantize float matrices on load. */
  quantize?: "q4" | "q8";
}

export interface ImageLoadOptions extends LoadOptions {
  /** Which weights to fetch when a folder has both: "fp16" (default, half the bytes) or "fp32". */
  variant?: "fp16" | "fp32";
}

/** Sampler settings; the defaults are the `kiln text` CLI's. */
export interface GenerateOptions {
  /** Default 128. */
  maxTokens?: number;
  /** 0 is greedy. Default 0.8. */
  temperature?: number;
  /** Default 40; 0 disables. */
  topK?: number;
  /** Default 0.95; 1 disables. */
  topP?: number;
  /** Default 0.05; 0 disables. */
  minP?: number;
  /** Default 1 (off). */
  repeatPenalty?: number;
  /** Default 64. */
  repeatWindow?: number;
  /** Default 0. */
  seed?: number;
  /** Stop when the text contains one of these (it is cut before it). */
  stop?: string[];
  signal?: AbortSignal;
}

export interface CompleteOptions extends GenerateOptions {
  /** Receives each new piece of text. */
  onPiece?: (piece: string) => void;
}

export interface Completion {
  text: string;
  /** Generated token ids. */
  ids: number[];
  /** Natural-log probability of each generated id under the unmodified logits. */
  logprobs: number[];
  promptIds: number[];
  stop: "eos" | "stopstring" | "maxtokens" | "contextfull" | "cancelled";
  timings: { ttftMs: number; prefillMs: number; decodeMs: number; prefillTokS: number; decodeTokS: number };
}

export interface TextModelInfo {
  arch: string;
  layers: number;
  hidden: number;
  heads: number;
  kvHeads: number;
  vocab: number;
  ctx: number;
  chatTemplate: boolean;
}

/** A prompt: text, or token ids. */
export type Prompt = string | number[] | Uint32Array;

export interface TextModel {
  readonly info: TextModelInfo;
  /** Streams the text piece by piece; leaving the loop early stops the generation. */
  generate(prompt: Prompt, options?: GenerateOptions): AsyncGenerator<string, Completion, undefined>;
  complete(prompt: Prompt, options?: CompleteOptions): Promise<Completion>;
  /** Prompt ids as the generator sees them (a promise in worker mode). */
  encode(text: string): number[] | Promise<number[]>;
  decode(ids: number[]): string | Promise<string>;
  renderChat(messages: { role: string; content: string }[]): string | Promise<string>;
  dispose(): void;
}

export interface ImageOptions {
  negativePrompt?: string;
  /** Default 20. */
  steps?: number;
  /** Classifier-free guidance; 1 or less disables it. Default 7.5. */
  guidance?: number;
  /** Default: the pipeline's own (Euler when it is not supported). */
  scheduler?: "ddim" | "euler" | "euler-a" | "dpm++2m" | "lcm";
  /** Default 0. */
  seed?: number;
  /** Default: the U-Net's sample size times the VAE factor (see `info`). */
  width?: number;
  height?: number;
  /** After each step; `preview` is the latents as a small RGB image (null after the first step). */
  onStep?: (s: { step: number; steps: number; preview: ImageData | null }) => void;
  signal?: AbortSignal;
}

export interface ImageModel {
  readonly info: { width: number; height: number; sizeMultiple: number; latentChannels: number };
  /** The image; `notes` carries messages such as a scheduler substitution. */
  generate(prompt: string, options?: ImageOptions): Promise<ImageData & { notes: string[] }>;
  dispose(): void;
}

export interface KernelCheck {
  name: string;
  relErr: number;
  tol: number;
  ok: boolean;
  n: number;
}

export declare class Kiln {
  /** Requests a WebGPU adapter and device (in this thread, or in a worker with `{ worker: true }`). */
  static create(options?: CreateOptions): Promise<Kiln>;
  readonly adapter: AdapterInfo;
  /** A model folder URL, a .gguf URL, a Hugging Face repo id ("owner/name" or "owner/name/file.gguf"), or "default". */
  loadText(source: string, options?: TextLoadOptions): Promise<TextModel>;
  /** A diffusers folder URL, a Hugging Face repo id, or "default". */
  loadImage(source: string, options?: ImageLoadOptions): Promise<ImageModel>;
  /** A few kernels against the engine's CPU reference, on this device. */
  kernelParity(): Promise<KernelCheck[]>;
  counters(): Record<string, number> | Promise<Record<string, number>>;
  dispose(): void;
}

/** Where a source's files come from: `{ base, file?, label }`. */
export declare function resolveSource(source: string, kind: "text" | "image", modelsBase: string): { base: string; file?: string; label: string };

/** Deletes every cached model file. */
export declare function clearCache(): Promise<void>;

/** Test hook: makes the module panic (`inFuture`: inside an async call); the module is unusable afterwards. */
export declare function debugPanic(inFuture: boolean): Promise<never>;
