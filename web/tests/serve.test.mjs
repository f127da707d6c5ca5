// `kiln serve` driven by the official OpenAI client library and by plain HTTP: streaming and
// non-streaming chat, completions, an image, bad requests, a wrong API key, a client that
// disconnects mid-stream, two concurrent requests; greedy ids equal to `kiln text --json` and the
// image equal to `kiln image`. Run by native-demo/tests/serve.rs (which builds the binary):
//   KILN_BIN=target/debug/kiln node web/tests/serve.test.mjs
import OpenAI, { toFile } from "openai";
import { execFile } from "node:child_process";
import { KilnServers } from "./kiln-serve.mjs";
import http from "node:http";
import { promisify } from "node:util";
import { mkdtempSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { readPng } from "./png.mjs";
import parsePrometheus from "parse-prometheus-text-format";

const root = join(dirname(fileURLToPath(import.meta.url)), "../..");
const bin = process.env.KILN_BIN ?? join(root, "target/debug/kiln");
const textModel = join(root, "tests/fixtures/llm/llama-gqa-f32");
const imageModel = join(root, "models/image-shapes");
const KEY = "sk-kiln-test";
const run = promisify(execFile);
const env = { ...process.env, XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR ?? tmpdir() };

const kiln = new KilnServers(bin, env);
// Never hang: the whole script has five minutes.
setTimeout(() => {
  console.log(`FAIL the serve tests did not finish in 5 minutes\n--- kiln serve log ---\n${kiln.log}`);
  kiln.killAll();
  process.exit(1);
}, 300_000).unref();
const startServe = (args) => kiln.start(args);

const base = await startServe(["-m", textModel, "--image-model", imageModel, "--api-key", KEY, "--ctx", "256", "--max-body", "65536"]);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: KEY, maxRetries: 0, timeout: 600_000 });
const tests = [];
const test = (name, fn) => tests.push([name, fn]);
const post = (path, body, headers = {}) =>
  fetch(`${base}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${KEY}`, ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });

/** `kiln text --json` for the same greedy request. */
async function kilnText(promptIds, maxTokens) {
  const { stdout } = await run(bin, ["text", "-m", textModel, "--prompt-ids", promptIds.join(","), "--temperature", "0", "-n", String(maxTokens), "--json"], { env, maxBuffer: 1 << 24 });
  return JSON.parse(stdout);
}

const messages = [
  { role: "system", content: "You are a helpful assistant." },
  { role: "user", content: "Name three colours." },
];
const greedy = { model: "default", messages, temperature: 0, max_tokens: 12 };

test("models and health", async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.deepEqual(ids, ["llama-gqa-f32", "image-shapes"]);
  const h = await fetch(`${base}/health`);
  assert.equal(h.status, 200);
  assert.equal((await h.json()).status, "ok");
});

let reference;
test("chat, not streaming: OpenAI shape, ids equal to kiln text --json, top_logprobs", async () => {
  const r = await client.chat.completions.create({ ...greedy, logprobs: true, top_logprobs: 3 });
  assert.equal(r.object, "chat.completion");
  assert.equal(r.model, "llama-gqa-f32");
  const c = r.choices[0];
  assert.equal(c.message.role, "assistant");
  assert.ok(["stop", "length"].includes(c.finish_reason), c.finish_reason);
  assert.equal(r.usage.prompt_tokens, r.kiln.prompt_ids.length);
  assert.equal(r.usage.completion_tokens, r.kiln.ids.length);
  assert.equal(c.logprobs.content.length, r.kiln.ids.length);
  for (const t of c.logprobs.content) {
    assert.equal(t.top_logprobs.length, 3);
    assert.equal(t.top_logprobs[0].logprob, t.logprob, "greedy: the chosen token is the most likely");
    assert.ok(t.top_logprobs[1].logprob <= t.top_logprobs[0].logprob);
  }
  const cli = await kilnText(r.kiln.prompt_ids, 12);
  assert.deepEqual(r.kiln.ids, cli.ids);
  assert.equal(c.message.content, cli.text);
  reference = r;
});

test("chat, streaming: the deltas add up to the same text and ids", async () => {
  const stream = await client.chat.completions.create({ ...greedy, stream: true, stream_options: { include_usage: true } });
  let text = "", finish = null, last = null, usage = null, n = 0;
  for await (const chunk of stream) {
    n++;
    assert.equal(chunk.object, "chat.completion.chunk");
    if (chunk.usage) usage = chunk.usage;
    const ch = chunk.choices[0];
    if (!ch) continue;
    text += ch.delta.content ?? "";
    if (ch.finish_reason) (finish = ch.finish_reason), (last = chunk);
  }
  assert.ok(n > 3, `${n} chunks`);
  assert.equal(text, reference.choices[0].message.content);
  assert.equal(finish, reference.choices[0].finish_reason);
  assert.deepEqual(last.kiln.ids, reference.kiln.ids);
  assert.equal(usage.completion_tokens, reference.kiln.ids.length);
  // The conversation was the same: its keys and values were reused.
  assert.equal(usage.prompt_tokens_details.cached_tokens, reference.kiln.prompt_ids.length - 1);
});

test("completions: ids equal to kiln text --json with the same prompt", async () => {
  const r = await client.completions.create({ model: "llama-gqa-f32", prompt: "Once upon a time", temperature: 0, max_tokens: 10, logprobs: 2 });
  assert.equal(r.object, "text_completion");
  const cli = await kilnText(r.kiln.prompt_ids, 10);
  assert.deepEqual(r.kiln.ids, cli.ids);
  assert.equal(r.choices[0].text, cli.text);
  assert.equal(r.choices[0].logprobs.token_logprobs.length, cli.ids.length);
  const s = await client.completions.create({ prompt: "Once upon a time", temperature: 0, max_tokens: 10, stream: true });
  let text = "";
  for await (const chunk of s) text += chunk.choices[0]?.text ?? "";
  assert.equal(text, cli.text);
});

test("image: a PNG equal to kiln image with the same seed", async () => {
  const r = await client.images.generate({ model: "default", prompt: "a red circle", size: "64x64", steps: 2, seed: 7, response_format: "b64_json" });
  const png = readPng(Buffer.from(r.data[0].b64_json, "base64"));
  assert.equal(png.width, 64);
  const out = join(mkdtempSync(join(tmpdir(), "kiln-serve-")), "cli.png");
  await run(bin, ["image", "--model", imageModel, "--prompt", "a red circle", "--width", "64", "--height", "64", "--steps", "2", "--seed", "7", "--out", out, "--json"], { env });
  const cli = readPng(readFileSync(out));
  assert.deepEqual(Buffer.from(png.data), Buffer.from(cli.data));
});

test("image edits: inpainting through the OpenAI client equal to kiln image --init-image --mask", async () => {
  const fx = join(root, "tests/fixtures/sd-edit");
  const init = join(imageModel, "reference/image.png");
  const file = (p, name) => toFile(readFileSync(p), name, { type: "image/png" });
  // OpenAI's mask (transparent = repaint) and Kiln's (white = repaint) say the same here.
  const r = await client.images.edit({ model: "default", image: await file(init, "init.png"), mask: await file(join(fx, "mask64-alpha.png"), "mask.png"), prompt: "a blue square", size: "64x64", steps: 2, seed: 7, response_format: "b64_json" });
  const png = readPng(Buffer.from(r.data[0].b64_json, "base64"));
  assert.equal(png.width, 64);
  const out = join(mkdtempSync(join(tmpdir(), "kiln-serve-")), "cli-edit.png");
  await run(bin, ["image", "--model", imageModel, "--prompt", "a blue square", "--init-image", init, "--mask", join(fx, "mask64.png"), "--width", "64", "--height", "64", "--steps", "2", "--seed", "7", "--out", out, "--json"], { env });
  assert.deepEqual(Buffer.from(png.data), Buffer.from(readPng(readFileSync(out)).data));
  // img2img: no mask, strength 0.5 of 4 steps.
  const i2i = await client.images.edit({ image: await file(init, "init.png"), prompt: "a red circle", steps: 4, strength: 0.5, seed: 3 });
  assert.equal(i2i.kiln.steps, 2);
  // Bad edits: errors that name the field.
  const form = (fields) => {
    const f = new FormData();
    for (const [k, v] of Object.entries(fields)) {
      if (v instanceof Uint8Array) f.append(k, new Blob([v], { type: "image/png" }), `${k}.png`);
      else f.append(k, v);
    }
    return fetch(`${base}/v1/images/edits`, { method: "POST", headers: { authorization: `Bearer ${KEY}` }, body: f });
  };
  const initPng = readFileSync(init);
  const cases = [
    [{ image: initPng, mask: readFileSync(join(fx, "mask.png")), prompt: "x" }, /mask/],
    [{ image: new TextEncoder().encode("not a png"), prompt: "x" }, /image: .*not a PNG/],
    [{ image: initPng, prompt: "x", strength: "2" }, /strength/],
    [{ image: initPng, prompt: "x", strength: "lots" }, /strength/],
    [{ prompt: "x" }, /image/],
    [{ image: initPng, "image[]": initPng, prompt: "x" }, /one 'image'/],
  ];
  for (const [fields, says] of cases) {
    const res = await form(fields);
    const body = await res.json();
    assert.equal(res.status, 400, JSON.stringify(body));
    assert.match(body.error.message, says);
  }
  const json = await post("/v1/images/edits", { prompt: "x" });
  assert.equal(json.status, 415);
});

test("image LoRAs by name (--lora-dir): equal to kiln image --lora; the set changes per request; unknown names are 400s", async () => {
  const sd = join(root, "tests/fixtures/sd/sd1-tiny");
  const loras = join(root, "tests/fixtures/sd-lora");
  const s = await startServe(["--image-model", sd, "--lora-dir", loras]);
  const lc = new OpenAI({ baseURL: `${s}/v1`, apiKey: "none", maxRetries: 0, timeout: 600_000 });
  const gen = async (extra) => readPng(Buffer.from((await lc.images.generate({ prompt: "a red door", size: "16x16", steps: 3, guidance: 3, seed: 4, ...extra })).data[0].b64_json, "base64"));
  const cli = async (flags) => {
    const out = join(mkdtempSync(join(tmpdir(), "kiln-serve-")), "cli.png");
    await run(bin, ["image", "--model", sd, "--prompt", "a red door", "--width", "16", "--height", "16", "--steps", "3", "--guidance", "3", "--seed", "4", ...flags, "--out", out, "--json"], { env });
    return readPng(readFileSync(out));
  };
  const plain = await gen({});
  const two = await gen({ loras: [{ name: "peft", scale: 0.7 }, { name: "unet-only", scale: 1.5 }] });
  assert.deepEqual(Buffer.from(two.data), Buffer.from((await cli(["--lora", `${loras}/peft.safetensors:0.7`, "--lora", `${loras}/unet-only.safetensors:1.5`])).data));
  assert.notDeepEqual(Buffer.from(two.data), Buffer.from(plain.data));
  // Back to none: un-merged, the plain image again, bit for bit.
  assert.deepEqual(Buffer.from((await gen({ loras: [] })).data), Buffer.from(plain.data));
  const bad = await fetch(`${s}/v1/images/generations`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ prompt: "x", loras: [{ name: "nope" }] }) });
  assert.equal(bad.status, 400);
  const msg = (await bad.json()).error.message;
  assert.match(msg, /loras\[0\]\.name 'nope'.*peft/, msg);
});

test("embeddings through the OpenAI client (base64 by default, floats, dimensions, token ids) equal kiln embed", async () => {
  const model = join(root, "tests/fixtures/embed/minilm-tiny");
  const s = await startServe(["-m", textModel, "--embedding-model", model]);
  const ec = new OpenAI({ baseURL: `${s}/v1`, apiKey: "none", maxRetries: 0 });
  const ids = (await (await fetch(`${s}/v1/models`)).json()).data.map((m) => `${m.id}:${m.kiln.kind}`);
  assert.deepEqual(ids, ["llama-gqa-f32:text", "minilm-tiny:embedding"]);
  const texts = ["The cat sat on the mat.", "sky", "A quick brown fox jumps over the lazy dog"];
  const { stdout } = await run(bin, ["embed", "-m", model, "--json", ...texts], { env });
  const want = JSON.parse(stdout);
  const close = (a, b) => a.length === b.length && a.every((x, i) => Math.abs(x - b[i]) < 1e-6);
  const r = await ec.embeddings.create({ model: "minilm-tiny", input: texts });
  assert.equal(r.data.length, 3);
  r.data.forEach((d, i) => assert.ok(close(d.embedding, want.embeddings[i]), `input ${i}`));
  assert.equal(r.usage.prompt_tokens, want.tokens.reduce((a, b) => a + b, 0));
  const f = await ec.embeddings.create({ input: "sky", encoding_format: "float", dimensions: 8 });
  const short = want.embeddings[1].slice(0, 8);
  const n = Math.hypot(...short);
  assert.ok(close(f.data[0].embedding, short.map((x) => x / n)), JSON.stringify(f.data[0].embedding));
  const byIds = await ec.embeddings.create({ input: [[2, 50, 3], [2, 51, 3]], encoding_format: "float" });
  assert.equal(byIds.data.length, 2);
  const bad = await fetch(`${s}/v1/embeddings`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ input: [[2, 99999, 3]] }) });
  assert.equal(bad.status, 400);
  assert.match((await bad.json()).error.message, /input 0: token id 99999/);
});

test("/metrics in Prometheus' text format (parsed by a Prometheus parser) after two bursts of 50 requests against 4 slots (resident memory flat between them); request log lines", async () => {
  const s = await startServe(["-m", textModel, "--api-key", KEY, "--ctx", "256", "--log-format", "json", "--parallel", "4"]);
  const call = (i) =>
    fetch(`${s}/v1/completions`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${KEY}` }, body: JSON.stringify({ prompt: `number ${i}`, max_tokens: 3, temperature: 0 }) });
  const burst = async () => (await Promise.all(Array.from({ length: 50 }, (_, i) => call(i)))).map((r) => r.status);
  // Resident memory (Linux) after a first burst, and after a second: requests leave nothing
  // behind (the first one also warms the allocator and the pipeline cache).
  const pid = kiln.procs.at(-1).pid;
  const rss = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? NaN);
  assert.deepEqual([...new Set(await burst())], [200]);
  const after1 = rss();
  const statuses = await burst();
  assert.deepEqual([...new Set(statuses)], [200]);
  const after2 = rss();
  console.log(`      resident memory after 50 requests ${(after1 / 1024).toFixed(1)} MiB, after 50 more ${(after2 / 1024).toFixed(1)} MiB`);
  assert.ok(after2 <= after1 * 1.05 + 2048, `memory grew from ${after1} to ${after2} KiB over 50 requests`);
  await fetch(`${s}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" }); // 401
  assert.equal((await fetch(`${s}/metrics`)).status, 401);
  const res = await fetch(`${s}/metrics`, { headers: { authorization: `Bearer ${KEY}` } });
  assert.match(res.headers.get("content-type"), /^text\/plain; version=0.0.4/);
  const families = parsePrometheus(await res.text());
  const family = (name) => families.find((f) => f.name === name) ?? assert.fail(`no ${name}`);
  const value = (name, labels = {}) => {
    const f = family(name);
    const m = f.metrics.find((m) => Object.entries(labels).every(([k, v]) => m.labels?.[k] === v));
    return Number(m?.value ?? m?.count ?? NaN);
  };
  assert.equal(family("kiln_http_requests_total").type, "COUNTER");
  assert.equal(value("kiln_http_requests_total", { route: "/v1/completions", status: "200" }), 100);
  assert.equal(value("kiln_http_requests_total", { route: "/v1/completions", status: "401" }), 1);
  assert.equal(value("kiln_generated_tokens_total"), 300);
  assert.ok(value("kiln_prompt_tokens_total") >= 200);
  const ttft = family("kiln_time_to_first_token_seconds");
  assert.equal(ttft.type, "HISTOGRAM");
  assert.equal(Number(ttft.metrics[0].count), 100);
  assert.equal(Number(family("kiln_time_per_output_token_seconds").metrics[0].count), 100);
  assert.equal(value("kiln_queue_depth", { model: "llama-gqa-f32" }), 0);
  assert.equal(value("kiln_model_loaded", { model: "llama-gqa-f32", kind: "text" }), 1);
  assert.equal(value("kiln_kv_cache_capacity_tokens"), 256);
  // One JSON line per request with id, model, tokens, timings and finish reason.
  const lines = kiln.log.split("\n").filter((l) => l.startsWith("{") && l.includes('"endpoint":"completion"'));
  assert.ok(lines.length >= 100, kiln.log);
  const r = JSON.parse(lines.at(-1));
  assert.ok(r.id.startsWith("cmpl-") && r.model === "llama-gqa-f32" && r.completion_tokens === 3 && r.finish_reason === "length" && r.ttft_ms > 0 && r.duration_ms >= r.ttft_ms, JSON.stringify(r));
  // Still answering after the burst.
  assert.equal((await call(99)).status, 200);
});

test("several models: --models-dir offers them, requests load them on demand, --max-memory unloads the least recently used idle one", async () => {
  const dir = mkdtempSync(join(tmpdir(), "kiln-models-"));
  symlinkSync(textModel, join(dir, "llama-gqa-f32"));
  symlinkSync(join(root, "tests/fixtures/embed/minilm-tiny"), join(dir, "minilm-tiny"));
  symlinkSync(join(root, "tests/fixtures/sd/sd1-tiny"), join(dir, "sd1-tiny"));
  writeFileSync(join(dir, "notes.txt"), "not a model");
  const listed = async (base) => (await (await fetch(`${base}/v1/models`)).json()).data;
  const first = await startServe(["--models-dir", dir, "--ctx", "256"]);
  const all = await listed(first);
  assert.deepEqual(all.map((m) => `${m.id}:${m.kiln.kind}:${m.kiln.loaded}`), ["llama-gqa-f32:text:false", "minilm-tiny:embedding:false", "sd1-tiny:image:false"]);
  const est = Object.fromEntries(all.map((m) => [m.id, m.kiln.estimated_bytes]));
  assert.ok(Object.values(est).every((b) => b > 0), JSON.stringify(est));
  // Room for any two of the three, not all three.
  const budget = est["llama-gqa-f32"] + est["minilm-tiny"] + est["sd1-tiny"] - 1;
  const s = await startServe(["--models-dir", dir, "--ctx", "256", "--max-memory", String(budget)]);
  const loaded = async () => (await (await fetch(`${s}/health`)).json()).models.filter((m) => m.loaded).map((m) => m.id);
  assert.deepEqual(await loaded(), []);
  const mc = new OpenAI({ baseURL: `${s}/v1`, apiKey: "none", maxRetries: 0 });
  const chat = await mc.chat.completions.create({ ...greedy, model: "llama-gqa-f32" });
  assert.equal(chat.model, "llama-gqa-f32");
  const e = await mc.embeddings.create({ model: "minilm-tiny", input: "sky", encoding_format: "float" });
  assert.equal(e.data[0].embedding.length, 32);
  assert.deepEqual(await loaded(), ["llama-gqa-f32", "minilm-tiny"]); // a chat model and an embedder at once
  await mc.images.generate({ model: "sd1-tiny", prompt: "a red door", size: "16x16", steps: 1 });
  assert.deepEqual(await loaded(), ["minilm-tiny", "sd1-tiny"]); // the chat model was the least recently used
  assert.ok((await listed(s)).find((m) => m.id === "llama-gqa-f32").kiln.loaded === false);
  // Named again, it loads again (and the same greedy answer comes back).
  const again = await mc.chat.completions.create({ ...greedy, model: "llama-gqa-f32" });
  assert.equal(again.choices[0].message.content, chat.choices[0].message.content);
  assert.match(kiln.log, /unloading text model llama-gqa-f32 \(least recently used\) to make room for sd1-tiny/);
  // Unknown ids are 404s naming what there is; a model of another kind is a 400.
  const r = await fetch(`${s}/v1/embeddings`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "nope", input: "x" }) });
  assert.equal(r.status, 404);
  assert.match((await r.json()).error.message, /embedding models are minilm-tiny/);
  const k = await fetch(`${s}/v1/embeddings`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "sd1-tiny", input: "x" }) });
  assert.equal(k.status, 400);
  assert.match((await k.json()).error.message, /is an image model, not an embedding model/);
});

test("/tokenize and /detokenize as llama-server has them: ids and pieces equal kiln tokenize", async () => {
  const text = "Once upon a time, in 1999!";
  const { stdout } = await run(bin, ["tokenize", "--model", textModel, "--json", text], { env });
  const cli = JSON.parse(stdout);
  const res = await post("/tokenize", { content: text, add_special: true, with_pieces: true });
  assert.equal(res.status, 200);
  const got = (await res.json()).tokens;
  assert.deepEqual(got.map((t) => t.id), cli.ids);
  assert.deepEqual(got.map((t) => t.piece), cli.pieces);
  const plain = await (await post("/tokenize", { content: text })).json();
  assert.ok(plain.tokens.every((t) => typeof t === "number") && plain.tokens.length <= cli.ids.length);
  const back = await (await post("/detokenize", { tokens: plain.tokens })).json();
  assert.equal(back.content, text);
  const bad = await post("/detokenize", { tokens: [1, 999999999] });
  assert.equal(bad.status, 400);
  assert.match((await bad.json()).error.message, /999999999/);
  assert.equal((await post("/tokenize", { text })).status, 400); // llama-server's field is `content`
  assert.equal((await post("/tokenize", { content: "x" }, { authorization: "" })).status, 401);
});

test("bad requests get OpenAI error objects with the right status", async () => {
  const cases = [
    [await post("/v1/chat/completions", "{not json"), 400],
    [await post("/v1/chat/completions", { messages, temprature: 0 }), 400],
    [await post("/v1/chat/completions", { messages, n: 2 }), 400],
    [await post("/v1/chat/completions", { messages, top_p: 7 }), 400],
    [await post("/v1/chat/completions", { messages: [] }), 400],
    [await post("/v1/chat/completions", { messages, model: "gpt-4o" }), 404],
    [await post("/v1/images/generations", { prompt: "x", size: "big" }), 400],
    [await post("/v1/chat/completions", JSON.stringify({ messages, pad: "x".repeat(100_000) })), 413],
    [await post("/v1/nothing", {}), 404],
  ];
  for (const [res, status] of cases) {
    const body = await res.json();
    assert.equal(res.status, status, JSON.stringify(body));
    assert.equal(typeof body.error.message, "string");
    assert.ok(body.error.type);
  }
  await assert.rejects(client.chat.completions.create({ ...greedy, temperature: -1 }), (e) => e.status === 400 && /temperature/.test(e.message));
  await assert.rejects(client.chat.completions.create({ ...greedy, model: "nope" }), (e) => e.status === 404 && e.code === "model_not_found");
});

test("a wrong or missing API key is refused", async () => {
  const wrong = new OpenAI({ baseURL: `${base}/v1`, apiKey: "sk-wrong", maxRetries: 0 });
  await assert.rejects(wrong.chat.completions.create(greedy), (e) => e.status === 401 && e.code === "invalid_api_key");
  const res = await post("/v1/models", "");
  assert.equal(res.status, 405); // GET only
  const keyless = await post("/v1/models", "", { authorization: "" });
  assert.equal(keyless.status, 401); // the key is checked first
  const none = await fetch(`${base}/v1/models`);
  assert.equal(none.status, 401);
});

// The embedded default models (no --model): long enough generations that a disconnect lands
// mid-way (the fixture model is so fast that a whole reply fits in the socket buffers).
test("with no --model the embedded defaults are served; a client that disconnects mid-stream (or mid-image) cancels", async () => {
  const defaults = await startServe([]);
  const ids = (await (await fetch(`${defaults}/v1/models`)).json()).data.map((m) => m.id);
  assert.deepEqual(ids, ["text-kjv", "image-shapes"]);
  const cancels = () => (kiln.log.match(/finish_reason=cancelled/g) ?? []).length;
  const waitCancel = async (before) => {
    for (let i = 0; i < 300 && cancels() === before; i++) await new Promise((r) => setTimeout(r, 100));
    assert.ok(cancels() > before, kiln.log);
  };
  let before = cancels();
  // node:http, so that leaving closes the socket (fetch may drain a cancelled body to reuse
  // the connection).
  await new Promise((resolve, reject) => {
    const body = JSON.stringify({ messages: [{ role: "user", content: "And God said" }], max_tokens: 400, temperature: 0.8, seed: 1, stream: true });
    const req = http.request(`${defaults}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json" } }, (res) => {
      let got = "";
      res.on("data", (d) => {
        got += d;
        if ((got.match(/data:/g) ?? []).length >= 3) req.destroy(), resolve();
      });
      res.on("end", () => reject(new Error(`the stream ended before the client left: ${got.slice(-200)}`)));
    });
    req.on("error", () => {});
    req.end(body);
  });
  await waitCancel(before);
  const m = /endpoint=chat .*completion_tokens=(\d+) .*finish_reason=cancelled/.exec(kiln.log.split("\n").reverse().join("\n"));
  assert.ok(m && Number(m[1]) < 400, `${m?.[1]} tokens generated before the cancel`);
  // An image request whose client leaves stops at the next denoising step.
  before = cancels();
  const img = http.request(`${defaults}/v1/images/generations`, { method: "POST", headers: { "content-type": "application/json" } });
  img.on("error", () => {});
  img.end(JSON.stringify({ prompt: "a red circle", steps: 500 }));
  await new Promise((r) => setTimeout(r, 1500));
  img.destroy();
  await waitCancel(before);
  // The server goes on serving.
  const r = await fetch(`${defaults}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ prompt: "And God said", max_tokens: 4 }) });
  assert.equal(r.status, 200);
});

test("two concurrent requests queue and both match their serial results", async () => {
  const other = { ...greedy, messages: [{ role: "user", content: "What is the sky like?" }] };
  const serial = await client.chat.completions.create(other);
  const [a, b] = await Promise.all([client.chat.completions.create(greedy), client.chat.completions.create(other)]);
  assert.deepEqual(a.kiln.ids, reference.kiln.ids);
  assert.deepEqual(b.kiln.ids, serial.kiln.ids);
});

test("--parallel 4: four concurrent greedy streams give the ids of four serial runs; they run at once; a client that leaves frees its slot; a conversation's next turn returns to its slot", async () => {
  const prompts = ["Name three colours.", "What is the sky like?", "Count to five.", "Say hello."];
  const reqs = prompts.map((p, i) => ({ ...greedy, max_tokens: 16 + i, messages: [{ role: "user", content: p }] }));
  const serial = [];
  for (const r of reqs) serial.push((await client.chat.completions.create(r)).kiln.ids);
  const p4 = await startServe(["-m", textModel, "--ctx", "256", "--parallel", "4"]);
  const pc = new OpenAI({ baseURL: `${p4}/v1`, apiKey: "none", maxRetries: 0 });
  const collect = async (r) => {
    const s = await pc.chat.completions.create({ ...r, stream: true });
    let n = 0, ids = null;
    for await (const c of s) {
      n++;
      if (c.kiln) ids = c.kiln.ids;
    }
    return { n, ids };
  };
  const t0 = Date.now();
  const got = await Promise.all(reqs.map(collect));
  const ms = Date.now() - t0;
  got.forEach((g, i) => assert.deepEqual(g.ids, serial[i], `stream ${i}`));
  // The four ran in their own slots: each log line's duration is shorter than the whole.
  const lines = kiln.log.split("\n").filter((l) => l.includes("endpoint=chat model=llama-gqa-f32")).slice(-4);
  const durations = lines.map((l) => Number(/duration_ms=([\d.]+)/.exec(l)[1]));
  assert.equal(durations.length, 4);
  const total = durations.reduce((a, b) => a + b, 0);
  assert.ok(total > 1.5 * ms, `the streams did not overlap: ${durations} ms each, ${ms} ms in all`);
  const health = await (await fetch(`${p4}/health`)).json();
  assert.equal(health.models[0].queued, 0);
  // A client that leaves mid-stream: its slot serves the next request.
  const ctrl = new AbortController();
  const long = await pc.chat.completions.create({ ...greedy, max_tokens: 200, stream: true }, { signal: ctrl.signal });
  for await (const _ of long) { ctrl.abort(); break; }
  const after = await Promise.all(reqs.map((r) => pc.chat.completions.create(r)));
  after.forEach((r, i) => assert.deepEqual(r.kiln.ids, serial[i], `after the cancel, request ${i}`));
  // Each conversation's next turn, one at a time (every slot idle), goes back to the slot that
  // holds its history: its whole first prompt is reused, not just the template's first tokens.
  for (const i of [3, 1, 2, 0]) {
    const messages = [...reqs[i].messages, after[i].choices[0].message, { role: "user", content: "And then?" }];
    const next = await pc.chat.completions.create({ ...greedy, max_tokens: 4, messages });
    const cached = next.usage.prompt_tokens_details.cached_tokens;
    assert.ok(cached >= after[i].usage.prompt_tokens, `conversation ${i}: ${cached} of its ${after[i].usage.prompt_tokens} first-turn tokens reused`);
  }
  console.log(`      4 streams at once in ${ms} ms; per-request durations ${durations.map((d) => d.toFixed(0)).join(", ")} ms`);
});

let failed = 0;
for (const [name, fn] of tests) {
  const t0 = Date.now();
  try {
    await fn();
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}\n${e.stack ?? e}`);
  }
}
// Ctrl-C stops a server; it must exit on its own.
for (const server of kiln.procs) {
  const exited = new Promise((resolve) => server.on("exit", resolve));
  server.kill("SIGINT");
  const code = await Promise.race([exited, new Promise((r) => setTimeout(() => r("timeout"), 10_000))]);
  if (code === "timeout") {
    server.kill("SIGKILL");
    console.log("FAIL kiln serve did not exit within 10 s of SIGINT");
    failed++;
  }
}
if (failed) {
  console.log(`--- kiln serve log ---\n${kiln.log}`);
  process.exit(1);
}
console.log(`${tests.length} serve tests passed`);
