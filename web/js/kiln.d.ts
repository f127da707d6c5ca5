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
      /** Files the model has (known before any weight is downloaded). */
      files: number;
      /** All files together: bytes so far, and the total (null when a server gave no size). */
      overall: { loaded: number; total: number | null };
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
  /** Hugging Face sources: a branch, tag or commit (default "main"). */
  revision?: string;
  /** Hugging Face sources: an access token (private or gated repositories); sent to huggingface.co only. */
  token?: string;
}

export interface CachedModel {
  source: string;
  label: string;
  kind: "text" | "image";
  base: string;
  file: string | null;
  files: { name: string; url: string; size: number | null }[];
  bytes: number;
  /** ISO date of the download. */
  date: string;
}

/** Which model a cache call means: `kind` matters for "default"; `modelsBase` and `revision` as when loading. */
export interface CacheQuery {
  kind?: "text" | "image";
  modelsBase?: string;
  revision?: string;
}

export interface ModelCache {
  /** Whether every file of the model is cached (loading it downloads nothing). */
  has(source: string, query?: CacheQuery): Promise<boolean>;
  /** Deletes the model's cached files; resolves to whether there were any. */
  delete(source: string, query?: CacheQuery): Promise<boolean>;
  list(): Promise<CachedModel[]>;
  /** `navigator.storage.persist()`: asks the browser not to evict the cache. */
  persist(): Promise<boolean>;
  /** `navigator.storage.estimate()`. */
  estimate(): Promise<{ usage: number | null; quota: number | null }>;
  /** Deletes every cached model file. */
  clear(): Promise<void>;
}

export declare const cache: ModelCache;

export interface TextLoadOptions extends LoadOptions {
  /** Context length (KV-cache positions), capped by the model's maximum. Default 2048. */
  ctx?: number;
  /** Quantize float matrices on load (Q4_K/Q6_K byte for byte as llama.cpp's quantizer). */
  quantize?: "q4" | "q8" | "q4_k" | "q6_k";
  /** KV-cache element type: "auto" (default: f16 on GPUs, f32 on software adapters). */
  kvCache?: "auto" | "f32" | "f16";
  /**
   * A chat template instead of the model's: a built-in name or Jinja text. A model without one
   * gets its architecture's (Gemma's turns for Gemma files).
   */
  chatTemplate?: "chatml" | "gemma" | "llama3" | "phi3" | (string & {});
}

export interface ImageLoadOptions extends LoadOptions {
  /** Which weights to fetch when a folder has both: "fp16" (default, half the bytes) or "fp32". */
  variant?: "fp16" | "fp32";
  /** The URL of a tiny autoencoder folder (diffusers' AutoencoderTiny, e.g. a copy of madebyollin/taesd): see `ImageModel.setTinyDecoder`. */
  taesd?: string;
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
  /** Default: a random seed (the result's `seed` says which). */
  seed?: number;
  /** Also report this many most likely alternatives per token (0..20), in `topLogprobs`. */
  topLogprobs?: number;
  /** Stop when the text contains one of these (it is cut before it). */
  stop?: string[];
  /** What the output must match; the sampler draws only tokens the grammar allows. */
  grammar?: Grammar;
  /** Token id to a bias added to its logit before sampling (-100 bans, 100 forces). */
  logitBias?: Record<number, number>;
  signal?: AbortSignal;
}

/** An output constraint: any JSON object, JSON valid under a JSON schema, or a grammar in
 * llguidance's Lark dialect (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md). */
export type Grammar =
  | { type: "json_object" }
  | { type: "json_schema"; schema: object }
  | { type: "lark"; grammar: string };

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
  /** Leading prompt tokens whose keys and values came from the previous generation. */
  reused: number;
  /** Per generated id, `[id, logprob]` of the `topLogprobs` most likely ids (when asked for). */
  topLogprobs?: [number, number][][];
  /** The sampler seed used. */
  seed: number;
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

// ---- OpenAI-shaped API (`chat.completions.create`, `completions.create`) ----
// The shapes of OpenAI's REST API; Kiln's defaults for what a request leaves out are those of
// `GenerateOptions`. Every response (and the last chunk of a stream) also carries `kiln`.

export interface ChatMessage {
  role: "system" | "developer" | "user" | "assistant" | "tool" | (string & {});
  /** Text, or text parts; null in an assistant message that only calls tools. */
  content: string | { type: "text"; text: string }[] | null;
  name?: string;
  /** An assistant message's calls (as a response returned them). */
  tool_calls?: ToolCall[];
  /** A `tool` message: the call it answers. */
  tool_call_id?: string;
}

export interface ToolCall {
  /** 9 letters and digits. */
  id: string;
  type: "function";
  /** `arguments`: a JSON object as a string. */
  function: { name: string; arguments: string };
}

export interface Tool {
  type: "function";
  function: { name: string; description?: string; parameters?: object };
}

/** Fields chat and completion requests share. `null` counts as absent. */
export interface SamplingRequest {
  /** A loaded model's source (the one passed to `loadText`), or "default" (the latest loaded). Ignored on a TextModel. */
  model?: string;
  /** Default 128. `max_completion_tokens` wins when both are given. */
  max_tokens?: number | null;
  max_completion_tokens?: number | null;
  /** 0 is greedy. Default 0.8. */
  temperature?: number | null;
  /** Default 0.95. */
  top_p?: number | null;
  /** Kiln extension. Default 40. */
  top_k?: number | null;
  /** Kiln extension. Default 0.05. */
  min_p?: number | null;
  /** Kiln extension (multiplicative, as llama.cpp and transformers). Default 1 (off). */
  repeat_penalty?: number | null;
  repeat_window?: number | null;
  /** Only 0 is accepted (use `repeat_penalty`). */
  frequency_penalty?: number | null;
  presence_penalty?: number | null;
  /** Default: a random seed (the response's `kiln.seed` says which). */
  seed?: number | null;
  /** Up to 4 stop strings. */
  stop?: string | string[] | null;
  /** Only 1. */
  n?: number | null;
  stream?: boolean | null;
  stream_options?: { include_usage?: boolean } | null;
  user?: string;
  /** Constrained output, as OpenAI defines it: `{type: "json_object"}`, or `{type:
   * "json_schema", json_schema: {name, schema, strict?, description?}}`. */
  response_format?:
    | { type: "text" }
    | { type: "json_object" }
    | { type: "json_schema"; json_schema: { name: string; schema: object; strict?: boolean | null; description?: string } }
    | null;
  /** Kiln extension: the output matches this grammar (llguidance's Lark dialect; llama-server's
   * field of the same name takes GBNF). One of `response_format`, `grammar`, `json_schema`. */
  grammar?: string | null;
  /** llama-server's spelling of a JSON-schema constraint. */
  json_schema?: object | null;
  /** Token id (a decimal string, as OpenAI's) to a bias in [-100, 100] added to its logit. */
  logit_bias?: Record<string, number> | null;
  /** Alternative to the second argument's `signal`. */
  signal?: AbortSignal;
}

export interface ChatCompletionRequest extends SamplingRequest {
  messages: ChatMessage[];
  /** Functions the model may call: rendered through the model's chat template (or a system
   * message where the template has none), the reply parsed into `tool_calls`. */
  tools?: Tool[] | null;
  /** "auto" (default), "none", "required" or a named function: the last two constrain the reply
   * to a valid call whose arguments match the function's `parameters`. */
  tool_choice?: "none" | "auto" | "required" | { type: "function"; function: { name: string } } | null;
  /** Whether a required call may be several (default true). */
  parallel_tool_calls?: boolean | null;
  /** Per-token log-probabilities of the reply. */
  logprobs?: boolean | null;
  /** 0..20 most likely alternatives per token (needs `logprobs: true`); computed on the GPU. */
  top_logprobs?: number | null;
  /** "error" (default): a conversation longer than the context is refused; "drop_oldest": the
   * oldest messages after the leading system messages are dropped until it fits. */
  context_overflow?: "error" | "drop_oldest";
}

export interface CompletionRequest extends SamplingRequest {
  /** Text (BOS added as the model wants), a list of one text, or token ids. */
  prompt: string | [string] | number[];
  /** Number of alternatives per token (0..20). */
  logprobs?: number | null;
}

export type FinishReason = "stop" | "length" | "tool_calls" | "contextfull" | "cancelled";

export interface TokenLogprob {
  token: string;
  logprob: number;
  bytes: number[];
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** Prompt tokens whose keys and values were reused from the previous request. */
  prompt_tokens_details: { cached_tokens: number };
}

/** Kiln's extension on every response and on a stream's last chunk. */
export interface KilnDetails {
  prompt_ids: number[];
  ids: number[];
  seed: number;
  stop: Completion["stop"];
  reused_tokens: number;
  dropped_messages: number;
  timings: { ttft_ms: number; prefill_ms: number; decode_ms: number; prefill_tok_s: number; decode_tok_s: number; encode_ms_per_token: number; submit_ms_per_token: number; wait_ms_per_token: number; mask_ms_per_token: number };
}

export interface ChatCompletion {
  id: string;
  object: "chat.completion";
  created: number;
  model: string;
  system_fingerprint: string;
  choices: {
    index: 0;
    message: { role: "assistant"; content: string | null; tool_calls?: ToolCall[] };
    logprobs: { content: (TokenLogprob & { top_logprobs: TokenLogprob[] })[] } | null;
    finish_reason: FinishReason;
  }[];
  usage: Usage;
  kiln: KilnDetails;
}

export interface ChatCompletionChunk {
  id: string;
  object: "chat.completion.chunk";
  created: number;
  model: string;
  system_fingerprint: string;
  /** Empty in the usage chunk (`stream_options.include_usage`). */
  choices: {
    index: 0;
    delta: { role?: "assistant"; content?: string; tool_calls?: (ToolCall & { index: number })[] };
    logprobs: { content: (TokenLogprob & { top_logprobs: TokenLogprob[] })[] } | null;
    finish_reason: FinishReason | null;
  }[];
  usage?: Usage;
  kiln?: KilnDetails;
}

export interface TextCompletion {
  id: string;
  object: "text_completion";
  created: number;
  model: string;
  system_fingerprint: string;
  choices: {
    index: 0;
    text: string;
    logprobs: { tokens: string[]; token_logprobs: number[]; top_logprobs: Record<string, number>[] } | null;
    finish_reason: FinishReason | null;
  }[];
  usage?: Usage;
  kiln?: KilnDetails;
}

export interface RequestOptions {
  /** Aborting stops the generation at the next token; the promise (or the stream) rejects. */
  signal?: AbortSignal;
}

/** `for await (const chunk of stream)`; leaving the loop early stops the generation. */
export type ChunkStream<T> = AsyncGenerator<T, unknown, undefined>;

export interface OpenAIApi {
  chat: {
    completions: {
      create(body: ChatCompletionRequest & { stream: true }, options?: RequestOptions): Promise<ChunkStream<ChatCompletionChunk>>;
      create(body: ChatCompletionRequest & { stream?: false | null }, options?: RequestOptions): Promise<ChatCompletion>;
      create(body: ChatCompletionRequest, options?: RequestOptions): Promise<ChatCompletion | ChunkStream<ChatCompletionChunk>>;
    };
  };
  completions: {
    create(body: CompletionRequest & { stream: true }, options?: RequestOptions): Promise<ChunkStream<TextCompletion>>;
    create(body: CompletionRequest & { stream?: false | null }, options?: RequestOptions): Promise<TextCompletion>;
    create(body: CompletionRequest, options?: RequestOptions): Promise<TextCompletion | ChunkStream<TextCompletion>>;
  };
}

/** A loaded text model; `chat.completions.create` and `completions.create` run on it. Each
 * request reuses the keys and values of the longest prefix it shares with the previous one. */
export interface TextModel extends OpenAIApi {
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
  /** Default 20, or the model's (`info.steps`). */
  steps?: number;
  /** Classifier-free guidance; 1 or less disables it. Default 7.5, or the model's (`info.guidance`). */
  guidance?: number;
  /** Default: the pipeline's own (Euler when it is not supported). */
  scheduler?: "ddim" | "euler" | "euler-a" | "dpm++2m" | "lcm";
  /** Default 0. */
  seed?: number;
  /** Default: the U-Net's sample size times the VAE factor (see `info`). */
  width?: number;
  height?: number;
  /**
   * img2img: the image to start from (its size is the default size). ImageData, a Blob (PNG,
   * JPEG, ...), an ImageBitmap or anything a canvas draws.
   */
  initImage?: ImageSource;
  /**
   * Inpainting: white = repaint, the init image's size; transparent pixels count as black (so
   * white strokes on a transparent canvas mark what to repaint).
   */
  mask?: ImageSource;
  /** With `initImage`: the share of the steps run, 0 to 1 (default 0.8, 1 with a mask). */
  strength?: number;
  /** Encode `initImage` to a seeded draw from the VAE's latent distribution (diffusers' default) instead of its mean. */
  sampleEncoding?: boolean;
  /** Decode the final image with the tiny decoder (`setTinyDecoder`) instead of the VAE. */
  tinyDecoder?: boolean;
  /** After each step; `preview` is the latents as a small RGB image (null after the first step). */
  onStep?: (s: { step: number; steps: number; preview: ImageData | null }) => void;
  signal?: AbortSignal;
}

export type ImageSource =
  | ImageData
  | Blob
  | ImageBitmap
  | HTMLCanvasElement
  | OffscreenCanvas
  | HTMLImageElement
  | { width: number; height: number; data: Uint8Array | Uint8ClampedArray };

export interface ImageModel {
  /**
   * `inpainting`: a U-Net made for inpainting (9 input channels), which needs `initImage` and
   * `mask`. `steps`, `guidance`: what a generation that leaves them out gets (few-step models:
   * 4 for LCM, 1 step at guidance 0 for SD-Turbo's scheduler; else 20 and 7.5). `sdxl`: a
   * Stable Diffusion XL pipeline (two text encoders).
   */
  readonly info: { width: number; height: number; sizeMultiple: number; latentChannels: number; inpainting: boolean; sdxl: boolean; steps: number; guidance: number };
  /** The image; `notes` carries messages such as a scheduler substitution. */
  generate(prompt: string, options?: ImageOptions): Promise<ImageData & { notes: string[] }>;
  /**
   * Merges LoRA files (diffusers/PEFT or kohya safetensors) into the U-Net and text encoder,
   * replacing the previous set (`[]` removes them); scale defaults to 1. Resolves to the number
   * of modules merged; a file whose keys fit no tensor of the model is an Error naming the key.
   */
  /** Loads a tiny autoencoder folder (URL): full-size previews, and `tinyDecoder`. */
  setTinyDecoder(folder: string): Promise<void>;
  setLoras(loras: { source: string | Blob | ArrayBuffer | Uint8Array; scale?: number; name?: string }[]): Promise<number>;
  dispose(): void;
}

/** OpenAI's embeddings request: `input` a string, strings, token ids or lists of token ids. */
export interface EmbeddingRequest {
  model?: string;
  input: string | string[] | number[] | number[][];
  /** "float" (default) or "base64" (little-endian f32 bytes). */
  encoding_format?: "float" | "base64";
  /** Keep the first N values, renormalised (Matryoshka-trained models). */
  dimensions?: number;
  user?: string;
}

export interface EmbeddingResponse {
  object: "list";
  data: { object: "embedding"; index: number; embedding: number[] | string }[];
  model: string;
  usage: { prompt_tokens: number; total_tokens: number };
}

export interface EmbeddingsApi {
  embeddings: { create(body: EmbeddingRequest): Promise<EmbeddingResponse> };
}

/** A sentence-transformers model (BERT-family encoder, pooling, optional Dense, Normalize). */
export interface EmbeddingModel extends EmbeddingsApi {
  readonly info: { dim: number; maxTokens: number; pooling: "mean" | "cls" | "lasttoken"; normalized: boolean; layers: number; hidden: number };
  /** One vector per text, in one batched pass. */
  embed(texts: string | string[], options?: { dimensions?: number }): Promise<Float32Array[]>;
  /** Token ids with the start and end tokens, truncated to `info.maxTokens`. */
  tokenize(text: string): number[] | Promise<number[]>;
  dispose(): void;
}

export interface KernelCheck {
  name: string;
  relErr: number;
  tol: number;
  ok: boolean;
  n: number;
}

/** `kiln.chat.completions.create({ model, ... })` runs on the loaded text model `model` names
 * (its `loadText` source), or on the latest one loaded. */
export declare class Kiln implements OpenAIApi, EmbeddingsApi {
  /** Downloaded models in the Cache Storage API. */
  static readonly cache: ModelCache;
  chat: OpenAIApi["chat"];
  completions: OpenAIApi["completions"];
  /** `kiln.embeddings.create({ model, input })` runs on the loaded embedding model `model`
   * names (its `loadEmbedding` source), or on the latest one loaded. */
  embeddings: EmbeddingsApi["embeddings"];
  /** Requests a WebGPU adapter and device (in this thread, or in a worker with `{ worker: true }`). */
  static create(options?: CreateOptions): Promise<Kiln>;
  readonly adapter: AdapterInfo;
  /** A model folder URL, a .gguf URL, a Hugging Face repo id ("owner/name" or "owner/name/file.gguf"), or "default". */
  loadText(source: string, options?: TextLoadOptions): Promise<TextModel>;
  /** What loading a text model will take on the GPU, found without downloading its weights
   * (weights as stored + the f32 KV cache for `ctx`, default 2048 capped by the model); for a
   * .gguf file its metadata is read from the first bytes of the file. */
  textMemory(source: string, options?: TextLoadOptions): Promise<{ ctx: number; weightsBytes: number; kvCacheBytes: number; totalBytes: number }>;
  /** A diffusers folder URL, a Hugging Face repo id, or "default". */
  loadImage(source: string, options?: ImageLoadOptions): Promise<ImageModel>;
  /** A sentence-transformers folder URL or a Hugging Face repo id. */
  loadEmbedding(source: string, options?: LoadOptions): Promise<EmbeddingModel>;
  /** A few kernels against the engine's CPU reference, on this device. */
  kernelParity(): Promise<KernelCheck[]>;
  counters(): Record<string, number> | Promise<Record<string, number>>;
  /** Destroys the GPU device, as a driver reset or a GPU-process crash would (for tests): work
   * in progress ends with an error naming the loss; create a new Kiln to go on. */
  loseDevice(): void | Promise<void>;
  dispose(): void;
}

/** Where a source's files come from: `{ base, file?, label }`. */
export declare function resolveSource(source: string, kind: "text" | "image" | "embedding", modelsBase: string, revision?: string): { base: string; file?: string; label: string; hf?: boolean };

/** Deletes every cached model file. */
export declare function clearCache(): Promise<void>;

/** Test hook: makes the module panic (`inFuture`: inside an async call); the module is unusable afterwards. */
export declare function debugPanic(inFuture: boolean): Promise<never>;
