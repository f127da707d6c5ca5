// Browser tests: headless Chromium (Debian's, never a downloaded one) with WebGPU on
// SwiftShader, driven by playwright-core. Run by tools/test-browser.sh after `npm run build`.
//
// Text and images made in the browser are compared with the native `kiln` binary (lavapipe):
// greedy ids equal, images >= 40 dB PSNR. A missing WebGPU adapter is a failure, never a skip.
//
//   node tests/browser.test.mjs [--grep TEXT]
// Env: CHROMIUM (default /usr/bin/chromium), CHROMIUM_EXTRA_FLAGS, KILN_BIN (default
// target/debug/kiln), VERBOSE=1.

import { execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import { chromium } from "playwright-core";
import { modelCache, startServer } from "../tools/serve.mjs";
import { psnr, readPng, writePng } from "./png.mjs";
import { SCHEMAS } from "./schemas.mjs";
import Ajv from "ajv";

const web = join(dirname(fileURLToPath(import.meta.url)), "..");
const root = join(web, "..");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const KILN = process.env.KILN_BIN ?? join(root, "target", "debug", "kiln");
const VERBOSE = !!process.env.VERBOSE;
const grep = process.argv.includes("--grep") ? process.argv[process.argv.indexOf("--grep") + 1] : null;

// The flags of the design notes (section "Testing and CI"): WebGPU on SwiftShader.
const FLAGS = [
  "--no-sandbox",
  "--enable-unsafe-webgpu",
  "--enable-unsafe-swiftshader",
  "--use-webgpu-adapter=swiftshader",
  "--enable-features=Vulkan",
  "--use-vulkan=swiftshader",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

// The models: the small fixtures always; the embedded default models (models/ at the root).
const FIXTURE_TEXT = { source: "/fixtures/llm/llama-gqa-f32/", native: ["--model", join(root, "tests/fixtures/llm/llama-gqa-f32")], prompt: "The quick brown fox", tokens: 24 };
const DEFAULT_TEXT = { source: "default", native: [], prompt: "And God said", tokens: 32, needs: "models/text-kjv/config.json" };
// sd2-v-tiny is exactly what diffusers 0.42 / transformers 5 save (CLIP without `text_model.`,
// tokenizer.json only, fp16 variant files).
const SAVED_IMAGE = { source: "/fixtures/sd/sd2-v-tiny/", native: ["--model", join(root, "tests/fixtures/sd/sd2-v-tiny")], prompt: "a photo of an astronaut", seed: 3, steps: 4 };
const FIXTURE_IMAGE = { source: "/fixtures/sd/sd1-tiny/", native: ["--model", join(root, "tests/fixtures/sd/sd1-tiny")], prompt: "a red circle on a blue background", seed: 7, steps: 8 };
const DEFAULT_IMAGE = { source: "default", native: [], prompt: "a red circle on a blue background", seed: 7, steps: 20, needs: "models/image-shapes/model_index.json" };

const assert = (cond, msg) => {
  if (!cond) throw new Error(msg);
};
const run = promisify(execFile);
const log = (...a) => console.log("     ", ...a);
const results = {};

async function native(args) {
  assert(existsSync(KILN), `native binary ${KILN} not found: build it with \`cargo build -p kiln-demo\``);
  const env = { ...process.env, XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR ?? tmpdir() };
  const { stdout } = await run(KILN, args, { env, maxBuffer: 1 << 26, timeout: 600000 });
  return JSON.parse(stdout.trim().split("\n").pop());
}

function needs(model) {
  if (model.needs) assert(existsSync(join(root, model.needs)), `${model.needs} is missing: the default models are not in the repository yet`);
}

// ---- browser plumbing

let server, url, context, userDir;
const hits = [];

async function openDemo(worker) {
  const page = await context.newPage();
  page.on("console", (m) => {
    // Chrome logs every 404 of a fetch, including the optional files a model may lack.
    if (VERBOSE || (m.type() === "error" && !/status of 404/.test(m.text()))) console.log(`      [${worker ? "worker page" : "page"} ${m.type()}] ${m.text()}`);
  });
  page.on("pageerror", (e) => console.log(`      [pageerror] ${e.message}`));
  await page.goto(`${url}/demo/?worker=${worker ? 1 : 0}`);
  await page.waitForSelector("#adapter-section[data-state=ready], #adapter-section[data-state=error]", { timeout: 60000 });
  const state = await page.getAttribute("#adapter-section", "data-state");
  if (state !== "ready") throw new Error(`no WebGPU device in the browser: ${await page.textContent("#adapter-error")}`);
  return page;
}

async function waitState(page, section, states, timeout) {
  const sel = states.map((s) => `#${section}[data-state=${s}]`).join(", ");
  await page.waitForSelector(sel, { timeout });
  return page.getAttribute(`#${section}`, "data-state");
}

/** Loads a text model and generates greedily through the demo's controls. */
async function uiText(page, model) {
  await page.fill("#text-source", model.source);
  await page.click("#text-load");
  if ((await waitState(page, "text-section", ["loaded", "error"], 300000)) === "error") throw new Error(await page.textContent("#text-error"));
  await page.fill("#prompt", model.prompt);
  await page.fill("#max-tokens", String(model.tokens));
  await page.fill("#temperature", "0");
  await page.click("#generate");
  if ((await waitState(page, "text-section", ["done", "error"], 300000)) === "error") throw new Error(await page.textContent("#text-error"));
  const shown = await page.textContent("#output");
  const r = await page.evaluate(() => window.demo.lastText);
  assert(shown === r.text, `the page shows ${JSON.stringify(shown)}, the result is ${JSON.stringify(r.text)}`);
  return r;
}

async function textParity(model, worker) {
  needs(model);
  const want = await native(["text", ...model.native, "--json", "--temperature", "0", "--prompt", model.prompt, "--max-tokens", String(model.tokens), "--logprobs"]);
  const page = await openDemo(worker);
  const got = await uiText(page, model);
  await page.close();
  assert(JSON.stringify(got.promptIds) === JSON.stringify(want.prompt_ids), `prompt ids: browser ${got.promptIds}, native ${want.prompt_ids}`);
  assert(JSON.stringify(got.ids) === JSON.stringify(want.ids), `greedy ids differ:\n  browser ${got.ids}\n  native  ${want.ids}`);
  const diffs = got.logprobs.map((l, i) => Math.abs(l - want.logprobs[i]));
  const dlp = Math.max(...diffs);
  if (VERBOSE) log(`logprobs browser ${got.logprobs.map((l) => l.toFixed(5))}\n       native ${want.logprobs.map((l) => l.toFixed(5))}`);
  log(`${got.ids.length} ids equal to native; max |logprob diff| ${dlp.toExponential(2)}; text ${JSON.stringify(got.text.slice(0, 60))}`);
  log(`time to first token: ${got.ttftMs.toFixed(0)} ms on the page (first streamed piece), ${got.timings.ttftMs.toFixed(0)} ms in the engine (prefill of ${got.promptIds.length} tokens); decode ${got.timings.decodeTokS.toFixed(1)} tok/s`);
  // The rotary cos/sin come from a CPU table, so SwiftShader's looser sin/cos (off by 1.5e-4,
  // as WGSL allows) no longer reach the log-probabilities: 2.4e-6 seen; before the table, 1e-3.
  assert(dlp <= 1e-4, `logprobs differ by ${dlp}`);
  return got;
}

/** Generates an image with the API in the page (worker or not) and compares it with native. */
async function imageParity(model, worker, viaUi) {
  needs(model);
  const out = join(userDir, `native-${worker}-${viaUi}.png`);
  const want = await native(["image", ...model.native, "--prompt", model.prompt, "--seed", String(model.seed), "--steps", String(model.steps), "--out", out, "--json"]);
  const page = await openDemo(worker);
  let got;
  if (viaUi) {
    await page.fill("#image-source", model.source);
    await page.click("#image-load");
    if ((await waitState(page, "image-section", ["loaded", "error"], 300000)) === "error") throw new Error(await page.textContent("#image-error"));
    await page.fill("#image-prompt", model.prompt);
    await page.fill("#image-seed", String(model.seed));
    await page.fill("#steps", String(model.steps));
    await page.click("#image-generate");
    if ((await waitState(page, "image-section", ["done", "error"], 600000)) === "error") throw new Error(await page.textContent("#image-error"));
    got = await page.evaluate(() => {
      const i = window.demo.lastImage;
      const c = document.getElementById("canvas").getContext("2d").getImageData(0, 0, i.width, i.height);
      return { width: i.width, height: i.height, data: Array.from(i.data), canvas: Array.from(c.data) };
    });
    assert(JSON.stringify(got.canvas) === JSON.stringify(got.data), "the canvas does not show the generated image");
  } else {
    got = await page.evaluate(async (m) => {
      const sd = await window.demo.kiln.loadImage(m.source);
      const steps = [];
      const t0 = performance.now();
      const img = await sd.generate(m.prompt, {
        seed: m.seed,
        steps: m.steps,
        onStep: ({ step, steps: total, preview }) => steps.push({ step, total, preview: preview && [preview.width, preview.height, preview.data.length] }),
      });
      const ms = performance.now() - t0;
      sd.dispose();
      return { width: img.width, height: img.height, data: Array.from(img.data), steps, ms, isImageData: img instanceof ImageData };
    }, model);
    assert(got.isImageData, "generate did not resolve to an ImageData");
    assert(got.steps.length === model.steps && got.steps.every((s, i) => s.step === i + 1 && s.total === model.steps), `onStep calls: ${JSON.stringify(got.steps.map((s) => s.step))}`);
    const previews = got.steps.filter((s) => s.preview);
    assert(previews.length === model.steps - 1 && previews.every((p) => p.preview[0] > 0 && p.preview[2] === p.preview[0] * p.preview[1] * 4), `previews: ${JSON.stringify(previews.map((p) => p.preview))}`);
    log(`${model.steps} steps with ${previews.length} live previews (${previews[0]?.preview.slice(0, 2).join("x")}) in ${(got.ms / 1000).toFixed(1)} s`);
  }
  await page.close();
  const ref = readPng(readFileSync(out));
  const db = psnr({ ...got, channels: 4 }, ref);
  log(`${got.width}x${got.height}: PSNR ${db.toFixed(1)} dB against native (${want.width}x${want.height}, ${want.steps} steps)`);
  assert(db >= 40, `PSNR ${db.toFixed(2)} dB < 40 dB`);
}

// ---- the tests

const tests = [];
const test = (name, timeoutMs, fn) => tests.push({ name, timeoutMs, fn });

test("model sources resolve to URLs (folders, .gguf, Hugging Face ids, default)", 1000, async () => {
  const { resolveSource } = await import("../js/fetch.js");
  const base = "http://localhost:8080/models/";
  const cases = [
    ["default", "text", { base: `${base}text-kjv/` }],
    ["default", "image", { base: `${base}image-shapes/` }],
    ["HuggingFaceTB/SmolLM2-135M-Instruct", "text", { base: "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/resolve/main/" }],
    ["Qwen/Qwen2-0.5B-Instruct-GGUF/qwen2-0_5b-instruct-q4_k_m.gguf", "text", { base: "https://huggingface.co/Qwen/Qwen2-0.5B-Instruct-GGUF/resolve/main/", file: "qwen2-0_5b-instruct-q4_k_m.gguf" }],
    ["https://example.com/m/tiny.Q8_0.gguf", "text", { base: "https://example.com/m/", file: "tiny.Q8_0.gguf" }],
    ["https://example.com/sd", "image", { base: "https://example.com/sd/" }],
  ];
  for (const [src, kind, want] of cases) {
    const got = resolveSource(src, kind, base);
    assert(got.base === want.base && got.file === want.file, `${src}: ${JSON.stringify(got)}`);
  }
  const rev = resolveSource("owner/name", "text", base, "v1.0");
  assert(rev.base === "https://huggingface.co/owner/name/resolve/v1.0/" && rev.hf && rev.label === "owner/name@v1.0", JSON.stringify(rev));
  for (const bad of ["", "just-a-name", "a/b/c"]) {
    let msg = null;
    try {
      resolveSource(bad, "text", base);
    } catch (e) {
      msg = e.message;
    }
    assert(msg, `"${bad}" resolved`);
  }
});

test("WebGPU adapter on SwiftShader (main thread and worker)", 120000, async () => {
  for (const worker of [false, true]) {
    const page = await openDemo(worker);
    const a = await page.evaluate(() => window.demo.kiln.adapter);
    log(`${worker ? "worker" : "page  "}: ${a.description}`);
    assert(a.features.shaderF16 === false || a.features.shaderF16 === true, "no feature report");
    // The engine gets subgroups wherever the browser's adapter offers them (wgpu 30 dropped
    // them until vendor/wgpu mapped the feature).
    const offered = a.browser.features.includes("subgroups");
    log(`subgroups: browser ${offered}, engine ${a.features.subgroups}`);
    assert(a.features.subgroups === offered, `subgroups: the browser offers ${offered}, the engine got ${a.features.subgroups}`);
    await page.close();
  }
});

test("kernel parity in the browser (GPU vs CPU reference)", 120000, async () => {
  const page = await openDemo(false);
  const r = await page.evaluate(() => window.demo.kiln.kernelParity());
  await page.close();
  for (const c of r) log(`${c.ok ? "ok  " : "FAIL"} ${c.name}: ${c.relErr.toExponential(2)} (tol ${c.tol})`);
  assert(r.length > 0 && r.every((c) => c.ok), "a kernel is outside its tolerance");
});

// The kernels written for GPUs (what Chrome runs on a real GPU: the one-subgroup matvec where
// the subgroup size is fixed, the tiled GEMM) through the browser's own WGSL compiler, whose
// checks (uniformity among them) are stricter than naga's.
test("kernel parity in the browser with the GPU kernels", 120000, async () => {
  const page = await openDemo(false);
  const r = await page.evaluate(async () => {
    const k = await window.demo.Kiln.create({ softwareKernels: false });
    return { adapter: k.adapter.description, cases: await k.kernelParity() };
  });
  await page.close();
  log(r.adapter);
  for (const c of r.cases) log(`${c.ok ? "ok  " : "FAIL"} ${c.name}: ${c.relErr.toExponential(2)} (tol ${c.tol})`);
  assert(/software-kernels=false/.test(r.adapter), "the GPU kernels were not chosen");
  assert(r.cases.length > 0 && r.cases.every((c) => c.ok), "a kernel is outside its tolerance");
});

test("text: fixture model, greedy ids equal native (page)", 600000, () => textParity(FIXTURE_TEXT, false));
test("text: default model, greedy ids equal native (page)", 600000, async () => {
  results.ttft = (await textParity(DEFAULT_TEXT, false)).ttftMs;
});
test("text: default model in a Web Worker, equal native", 600000, () => textParity(DEFAULT_TEXT, true));

test("text: a .gguf URL (Q4_K_M), a sharded f16 folder and a Qwen2 folder equal native (worker)", 600000, async () => {
  const cases = [
    { source: "/fixtures/llm/llama-q-256/model-q4_k_m.gguf", model: "tests/fixtures/llm/llama-q-256/model-q4_k_m.gguf" },
    { source: "/fixtures/llm/llama3-rope-f16/", model: "tests/fixtures/llm/llama3-rope-f16" },
    { source: "/fixtures/llm/qwen2-f32/", model: "tests/fixtures/llm/qwen2-f32" },
  ];
  const page = await openDemo(true);
  for (const c of cases) {
    const want = await native(["text", "--model", join(root, c.model), "--json", "--temperature", "0", "--prompt", "Hello there", "--max-tokens", "16"]);
    const got = await page.evaluate(async (src) => {
      const llm = await window.demo.kiln.loadText(src);
      const r = await llm.complete("Hello there", { maxTokens: 16, temperature: 0 });
      llm.dispose();
      return r;
    }, c.source);
    log(`${c.source}: ${got.ids.length} ids${JSON.stringify(got.ids) === JSON.stringify(want.ids) ? " equal to native" : ""}`);
    assert(JSON.stringify(got.promptIds) === JSON.stringify(want.prompt_ids), `${c.source} prompt ids: ${got.promptIds} vs ${want.prompt_ids}`);
    assert(JSON.stringify(got.ids) === JSON.stringify(want.ids), `${c.source}: browser ${got.ids}\n native ${want.ids}`);
  }
  await page.close();
});

// Every run of every LLM fixture's expected.json (transformers on the HF folder; transformers on
// gguf-py's dequantization for a .gguf), fed the same prompt ids, checked as tests/tests/llm.rs
// checks the native engine: greedy ids equal up to the first step whose reference top-2 margin is
// under 0.01, log-probabilities within 1e-4 (tighter than the native test's 2e-3; 6.7e-6 seen,
// and up to 3.1e-3 before the rotary table replaced the backend's sin/cos).
test("text: ids and logprobs match the transformers / gguf-py reference files (worker)", 900000, async () => {
  // The Llama/Qwen2 fixtures and the architecture fixtures (Qwen3, Gemma 2/3, Phi-3, Mistral).
  const cases = ["llm", "llm-arch"].flatMap((d) =>
    readdirSync(join(root, "tests/fixtures", d))
      .filter((c) => existsSync(join(root, "tests/fixtures", d, c, "expected.json")))
      .sort()
      .map((c) => `${d}/${c}`),
  );
  assert(cases.length >= 12, `only ${cases.length} LLM fixtures found`);
  const page = await openDemo(true);
  let worst = 0;
  let runs = 0;
  const check = async (source, prompt, run) => {
    const got = await page.evaluate(
      async ({ source, ids, n }) => {
        const llm = await window.demo.kiln.loadText(source, { ctx: 128 });
        const r = await llm.complete(ids, { maxTokens: n, temperature: 0 });
        llm.dispose();
        return r;
      },
      { source, ids: prompt, n: run.ids.length },
    );
    const firm = run.margins.findIndex((m) => m < 0.01);
    const n = Math.min(firm < 0 ? run.ids.length : firm, got.ids.length);
    assert(n > 0 || firm === 0, `${source}: nothing generated`);
    let err = 0;
    for (let i = 0; i < n; i++) {
      assert(got.ids[i] === run.ids[i], `${source}: step ${i}: expected id ${run.ids[i]}, got ${got.ids[i]} (ids so far ${got.ids.slice(0, i + 1)})`);
      const d = Math.abs(got.logprobs[i] - run.logprobs[i]);
      assert(d <= 1e-4, `${source}: step ${i}: logprob expected ${run.logprobs[i]}, got ${got.logprobs[i]} (|err| ${d})`);
      err = Math.max(err, d);
    }
    log(`${source}: ${n} ids equal to the reference, max |logprob err| ${err.toExponential(2)}`);
    worst = Math.max(worst, err);
    runs++;
  };
  for (const c of cases) {
    const e = JSON.parse(readFileSync(join(root, "tests/fixtures", c, "expected.json"), "utf8"));
    for (const run of e.runs) {
      await check(`/fixtures/${c}/${run.weights === "hf" ? "" : run.weights}`, e.prompt_ids, run);
    }
  }
  // Two of the types llama.cpp's quantizer wrote (a K-quant with its own GPU repacking, and
  // IQ4_XS with its non-linear table), through the browser's WGSL compiler.
  const q = JSON.parse(readFileSync(join(root, "tests/fixtures/llm-gguf-types/expected-llama-quantize.json"), "utf8"));
  const picked = q.runs.filter((r) => /model-(q3_k|iq4_xs)\.gguf/.test(r.weights));
  assert(picked.length === 2, `Q3_K and IQ4_XS runs: ${picked.map((r) => r.weights)}`);
  for (const run of picked) await check(`/fixtures/llm-gguf-types/${run.weights}`, q.prompt_ids, run);
  await page.close();
  log(`${runs} runs; worst |logprob err| against the reference files: ${worst.toExponential(2)} (bound 1e-4)`);
});

// Qwen 3.5 past one short prompt, in the worker: a 150-token prompt (three prefill runs through
// the chunked delta rule), then a second turn extending the first, which resumes the live
// recurrent states (only its new tokens run); each against transformers' fresh run (1e-4).
test("text: Qwen 3.5 long prompt and a second turn resuming its recurrent states match transformers (worker)", 600000, async () => {
  const e = JSON.parse(readFileSync(join(root, "tests/fixtures/llm-arch/qwen35-f32/expected.json"), "utf8"));
  const page = await openDemo(true);
  const got = await page.evaluate(
    async ({ long, first, second }) => {
      const llm = await window.demo.kiln.loadText("/fixtures/llm-arch/qwen35-f32/", { ctx: 256 });
      const a = await llm.complete(long, { maxTokens: 32, temperature: 0 });
      const b = await llm.complete(first, { maxTokens: 8, temperature: 0 });
      const c = await llm.complete(second, { maxTokens: 16, temperature: 0 });
      llm.dispose();
      return [a, b, c];
    },
    { long: e.long.prompt_ids, first: e.reuse.first_prompt_ids, second: e.reuse.second_prompt_ids },
  );
  await page.close();
  const runs = [["150-token prompt", e.long.runs[0]], ["first turn", e.reuse.first], ["second turn", e.reuse.second]];
  runs.forEach(([what, run], i) => {
    const g = got[i];
    let err = 0;
    run.ids.forEach((id, j) => {
      assert(g.ids[j] === id, `${what}: step ${j}: expected id ${id}, got ${g.ids[j]}`);
      err = Math.max(err, Math.abs(g.logprobs[j] - run.logprobs[j]));
    });
    assert(err <= 1e-4, `${what}: logprob error ${err}`);
    log(`${what}: ${run.ids.length} ids equal, max |logprob err| ${err.toExponential(2)}, ${g.reused} reused`);
  });
  assert(got[2].reused === e.reuse.first_prompt_ids.length + 7, `second turn reused ${got[2].reused}`);
});

test("text: a decode token costs one submit, 8 bytes of readback and no new objects", 300000, async () => {
  const page = await openDemo(false);
  const r = await page.evaluate(async (src) => {
    const k = window.demo.kiln;
    const llm = await k.loadText(src);
    const diff = (x, y) => Object.fromEntries(Object.keys(x).map((key) => [key, y[key] - x[key]]));
    // 24 prompt tokens (more than a software adapter sends through the decode graph): one
    // prefill run, then (the cache reused) a one-token tail run and four decode tokens; each run
    // is one submit.
    const prompt = Array.from({ length: 24 }, (_, i) => i + 1);
    const a = k.counters();
    await llm.complete(prompt, { maxTokens: 1, temperature: 0 });
    const b = k.counters();
    await llm.complete(prompt, { maxTokens: 5, temperature: 0 });
    const c = k.counters();
    llm.dispose();
    const one = diff(a, b);
    const five = diff(b, c);
    return Object.fromEntries(Object.keys(one).map((key) => [key, (five[key] - one[key]) / 4]));
  }, FIXTURE_TEXT.source);
  await page.close();
  log(`per decode token: ${JSON.stringify(r)}`);
  assert(r.submits === 1 && r.bytesReadBack === 8 && r.buffersCreated + r.bindGroupsCreated + r.pipelinesCreated === 0, JSON.stringify(r));
});

test("text: a reload loads from the Cache Storage API, not the network", 300000, async () => {
  const page = await openDemo(true);
  const loadAndWatch = () =>
    page.evaluate(async (src) => {
      const events = [];
      const m = await window.demo.kiln.loadText(src, { onProgress: (p) => events.push(p) });
      m.dispose();
      return events.filter((e) => e.phase === "download" && e.loaded === e.total && e.total > 0);
    }, FIXTURE_TEXT.source);
  await loadAndWatch(); // fills the cache if no earlier test did
  await page.reload();
  await page.waitForSelector("#adapter-section[data-state=ready]");
  const before = hits.length;
  const files = await loadAndWatch();
  const fetched = hits.slice(before).filter((h) => h.path.startsWith("/fixtures/") && h.status === 200);
  await page.close();
  log(`${files.length} files after the reload, all from the cache: ${files.every((f) => f.cached)}; model bytes served: ${fetched.length} requests`);
  assert(files.length >= 3 && files.every((f) => f.cached), `files not from the cache: ${files.filter((f) => !f.cached).map((f) => f.file)}`);
  assert(fetched.length === 0, `downloaded again: ${fetched.map((h) => h.path)}`);
});

test("overall download progress, the cache API (has, list, delete) and textMemory", 300000, async () => {
  const page = await openDemo(false);
  const r = await page.evaluate(async (src) => {
    const { Kiln } = await import("/pkg/kiln.js");
    await Kiln.cache.delete(src);
    const before = await Kiln.cache.has(src);
    const events = [];
    const m = await window.demo.kiln.loadText(src, { onProgress: (p) => p.phase === "download" && events.push(p) });
    m.dispose();
    const last = events[events.length - 1];
    const perFile = {};
    for (const e of events) perFile[e.file] = e.loaded;
    const after = await Kiln.cache.has(src);
    const listed = (await Kiln.cache.list()).find((x) => x.source === src);
    const deleted = await Kiln.cache.delete(src);
    const gone = await Kiln.cache.has(src);
    const monotonic = events.every((e, i) => i === 0 || e.overall.loaded >= events[i - 1].overall.loaded);
    return { before, after, deleted, gone, last, sum: Object.values(perFile).reduce((a, b) => a + b, 0), files: events[0].files, listed, monotonic, persist: typeof (await Kiln.cache.persist()) };
  }, FIXTURE_TEXT.source);
  await page.close();
  log(`${r.files} files, overall ${r.last.overall.loaded} / ${r.last.overall.total} bytes; cached ${r.after}, listed ${r.listed?.files.length} files (${r.listed?.bytes} bytes), deleted ${r.deleted}`);
  assert(!r.before && r.after && r.deleted && !r.gone, JSON.stringify({ before: r.before, after: r.after, deleted: r.deleted, gone: r.gone }));
  assert(r.last.overall.total !== null && r.last.overall.loaded === r.last.overall.total && r.last.overall.total === r.sum, JSON.stringify(r.last));
  assert(r.monotonic && r.listed && r.listed.files.length === r.files && r.listed.bytes === r.sum, JSON.stringify(r.listed));
  assert(r.persist === "boolean", r.persist);
  // The memory a model needs, before loading it (page and worker).
  const cfg = JSON.parse(readFileSync(join(root, "tests/fixtures/llm/llama-gqa-f32/config.json"), "utf8"));
  const weights = statSync(join(root, "tests/fixtures/llm/llama-gqa-f32/model.safetensors")).size;
  for (const worker of [false, true]) {
    const p = await openDemo(worker);
    const mem = await p.evaluate((src) => window.demo.kiln.textMemory(src, { ctx: 64 }), FIXTURE_TEXT.source);
    await p.close();
    const hd = cfg.head_dim ?? cfg.hidden_size / cfg.num_attention_heads;
    // f32 keys and values per layer, the token history, the rotary table.
    const kv = 2 * cfg.num_hidden_layers * 64 * cfg.num_key_value_heads * hd * 4 + 65 * 4 + 64 * Math.ceil(hd / 2) * 2 * 4;
    log(`textMemory (${worker ? "worker" : "page"}): ${JSON.stringify(mem)}`);
    assert(mem.ctx === 64 && mem.weightsBytes === weights && mem.kvCacheBytes === kv && mem.totalBytes === mem.weightsBytes + mem.kvCacheBytes, JSON.stringify(mem));
  }
  // A .gguf file: the metadata from its first bytes gives the same KV cache.
  const p = await openDemo(false);
  const gguf = await p.evaluate((src) => window.demo.kiln.textMemory(`${src}model-f32.gguf`, { ctx: 64 }), FIXTURE_TEXT.source);
  await p.close();
  log(`textMemory (gguf): ${JSON.stringify(gguf)}`);
  const size = statSync(join(root, "tests/fixtures/llm/llama-gqa-f32/model-f32.gguf")).size;
  assert(gguf.weightsBytes === size && gguf.ctx === 64 && gguf.totalBytes === size + gguf.kvCacheBytes && gguf.kvCacheBytes > 0, JSON.stringify(gguf));
});

test("text: AbortSignal and leaving the loop stop generation; the model stays usable", 300000, async () => {
  for (const worker of [false, true]) {
    const page = await openDemo(worker);
    const r = await page.evaluate(async (m) => {
      const llm = await window.demo.kiln.loadText(m.source);
      const ac = new AbortController();
      let pieces = 0;
      let error = null;
      try {
        for await (const _ of llm.generate(m.prompt, { maxTokens: 500, temperature: 0, signal: ac.signal })) {
          if (++pieces === 3) ac.abort();
        }
      } catch (e) {
        error = e.name;
      }
      let early = 0;
      for await (const _ of llm.generate(m.prompt, { maxTokens: 500, temperature: 0 })) if (++early === 2) break;
      const pre = new AbortController();
      pre.abort();
      const preErr = await llm.complete(m.prompt, { signal: pre.signal }).then(() => null, (e) => e.name);
      const after = await llm.complete(m.prompt, { maxTokens: 4, temperature: 0 });
      llm.dispose();
      return { pieces, error, early, preErr, after: after.ids.length };
    }, FIXTURE_TEXT);
    await page.close();
    log(`${worker ? "worker" : "page  "}: ${JSON.stringify(r)}`);
    assert(r.error === "AbortError" && r.pieces === 3, `abort: ${JSON.stringify(r)}`);
    assert(r.preErr === "AbortError" && r.after === 4, `after abort: ${JSON.stringify(r)}`);
  }
});

test("chat.completions.create and completions.create: streaming and not, page and worker, ids equal native", 600000, async () => {
  for (const worker of [false, true]) {
    const page = await openDemo(worker);
    const r = await page.evaluate(async (src) => {
      const k = window.demo.kiln;
      await k.loadText(src);
      const body = { messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "Name three colours." }], temperature: 0, max_tokens: 12 };
      const whole = await k.chat.completions.create({ ...body, model: src, logprobs: true, top_logprobs: 2 });
      let text = "", last = null, chunks = 0;
      for await (const c of await k.chat.completions.create({ ...body, stream: true })) {
        chunks++;
        text += c.choices[0]?.delta?.content ?? "";
        if (c.kiln) last = c;
      }
      const ac = new AbortController();
      let got = 0, abortError = null;
      try {
        for await (const _ of await k.chat.completions.create({ ...body, max_tokens: 200, stream: true }, { signal: ac.signal })) if (++got === 3) ac.abort();
      } catch (e) {
        abortError = e.name;
      }
      const unknown = await k.chat.completions.create({ ...body, model: "nope" }).then(() => null, (e) => e.message);
      const bad = await k.chat.completions.create({ ...body, temprature: 1 }).then(() => null, (e) => e.message);
      const completion = await k.completions.create({ prompt: "The quick brown fox", max_tokens: 8, temperature: 0 });
      return { whole, text, chunks, lastIds: last.kiln.ids, cached: last.kiln.reused_tokens, abortError, unknown, bad, completion };
    }, FIXTURE_TEXT.source);
    await page.close();
    const w = r.whole;
    const want = await native(["text", ...FIXTURE_TEXT.native, "--json", "--temperature", "0", "--prompt-ids", w.kiln.prompt_ids.join(","), "-n", "12"]);
    const mode = worker ? "worker" : "page";
    log(`${mode}: ${w.kiln.ids.length} ids, ${r.chunks} chunks, streaming reused ${r.cached} prompt tokens; ${JSON.stringify(w.choices[0].message.content)}`);
    assert(w.object === "chat.completion" && w.choices[0].logprobs.content[0].top_logprobs.length === 2, `${mode}: shape ${JSON.stringify(w).slice(0, 300)}`);
    assert(JSON.stringify(w.kiln.ids) === JSON.stringify(want.ids), `${mode}: chat ids ${w.kiln.ids}, native ${want.ids}`);
    assert(w.choices[0].message.content === want.text, `${mode}: text differs from native`);
    assert(r.text === w.choices[0].message.content && JSON.stringify(r.lastIds) === JSON.stringify(want.ids), `${mode}: streamed ${JSON.stringify(r.text)}`);
    assert(r.cached === w.kiln.prompt_ids.length - 1, `${mode}: the same conversation reused ${r.cached} tokens`);
    assert(r.abortError === "AbortError", `${mode}: abort gave ${r.abortError}`);
    assert(/not loaded/.test(r.unknown) && /unknown field 'temprature'/.test(r.bad), `${mode}: errors ${r.unknown} / ${r.bad}`);
    const c = await native(["text", ...FIXTURE_TEXT.native, "--json", "--temperature", "0", "--prompt", "The quick brown fox", "-n", "8"]);
    assert(JSON.stringify(r.completion.kiln.ids) === JSON.stringify(c.ids) && r.completion.choices[0].text === c.text, `${mode}: completion ${r.completion.kiln.ids} vs ${c.ids}`);
  }
});

test("structured output and a tool call in the browser: JSON schemas validate (Ajv), greedy ids equal native", 600000, async () => {
  const page = await openDemo(true);
  const r = await page.evaluate(async ([src, schemas]) => {
    const k = window.demo.kiln;
    await k.loadText(src);
    const out = [];
    for (let i = 0; i < schemas.length; i++) {
      const c = await k.chat.completions.create({
        messages: [{ role: "user", content: `JSON ${i}` }],
        response_format: { type: "json_schema", json_schema: { name: `s${i}`, schema: schemas[i] } },
        temperature: i === 0 ? 0 : 1,
        max_tokens: 200,
        seed: i,
      });
      out.push({ text: c.choices[0].message.content, finish: c.choices[0].finish_reason, ids: c.kiln.ids, promptIds: c.kiln.prompt_ids });
    }
    const llm = await k.loadText(src);
    const lark = await llm.complete("?", { grammar: { type: "lark", grammar: 'start: "id-" /[0-9]{3}/' }, maxTokens: 20, seed: 2 });
    const bad = await k.chat.completions.create({ messages: [{ role: "user", content: "x" }], response_format: { type: "json_schema", json_schema: { name: "x" } } }).then(() => null, (e) => e.message);
    const tool = { type: "function", function: { name: "pick", parameters: { type: "object", properties: { x: { enum: ["a", "b"] } }, required: ["x"], additionalProperties: false } } };
    const call = await k.chat.completions.create({ messages: [{ role: "user", content: "pick" }], tools: [tool], tool_choice: "required", parallel_tool_calls: false, max_tokens: 60, seed: 1 });
    return { out, lark: lark.text, bad, call: call.choices[0] };
  }, [FIXTURE_TEXT.source, SCHEMAS]);
  await page.close();
  const ajv = new Ajv({ strict: false });
  r.out.forEach((o, i) => {
    assert(o.finish === "stop", `schema ${i}: finish ${o.finish}: ${o.text}`);
    const v = JSON.parse(o.text);
    assert(ajv.validate(SCHEMAS[i], v), `schema ${i}: ${ajv.errorsText()}: ${o.text}`);
  });
  assert(/^id-[0-9]{3}$/.test(r.lark), `lark: ${JSON.stringify(r.lark)}`);
  assert(/json_schema\.schema/.test(r.bad), `bad: ${r.bad}`);
  const call = r.call.message.tool_calls?.[0];
  assert(r.call.finish_reason === "tool_calls" && call.function.name === "pick" && ["a", "b"].includes(JSON.parse(call.function.arguments).x), `tool call: ${JSON.stringify(r.call)}`);
  // The greedy constrained reply equals the native binary's for the same prompt ids.
  const dir = mkdtempSync(join(tmpdir(), "kiln-schema-"));
  writeFileSync(join(dir, "s.json"), JSON.stringify(SCHEMAS[0]));
  const o = r.out[0];
  const want = await native(["text", ...FIXTURE_TEXT.native, "--json", "--temperature", "0", "--prompt-ids", o.promptIds.join(","), "-n", "200", "--json-schema", join(dir, "s.json")]);
  rmSync(dir, { recursive: true });
  assert(JSON.stringify(o.ids) === JSON.stringify(want.ids), `greedy constrained ids ${o.ids} vs native ${want.ids}`);
  log(`10 schemas valid; greedy: ${o.ids.length} ids equal native: ${JSON.stringify(o.text)}`);
});

test("loadText's chatTemplate replaces the model's template (a built-in name or Jinja text)", 300000, async () => {
  const page = await openDemo(true);
  const r = await page.evaluate(async (src) => {
    const { Kiln } = await import("/pkg/kiln.js");
    const k = await Kiln.create({ worker: true });
    const ids = async (chatTemplate) => {
      await k.loadText(src, { chatTemplate });
      const c = await k.chat.completions.create({ messages: [{ role: "user", content: "hi there" }], max_tokens: 1, temperature: 0 });
      return c.kiln.prompt_ids;
    };
    const jinja = await ids("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}");
    const chatml = await ids("chatml");
    const own = await ids(undefined);
    const raw = (await k.completions.create({ prompt: "<<hi there>>", max_tokens: 1, temperature: 0 })).kiln.prompt_ids;
    const rawChatml = (await k.completions.create({ prompt: "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", max_tokens: 1, temperature: 0 })).kiln.prompt_ids;
    return { jinja, chatml, own, raw, rawChatml };
  }, FIXTURE_TEXT.source);
  await page.close();
  log(`jinja ${r.jinja.length} ids, chatml ${r.chatml.length}, the model's own ${r.own.length}`);
  assert(JSON.stringify(r.jinja) === JSON.stringify(r.raw), `Jinja template: ${r.jinja} vs the rendered text's ${r.raw}`);
  assert(JSON.stringify(r.chatml) === JSON.stringify(r.rawChatml), `chatml: ${r.chatml} vs ${r.rawChatml}`);
});

test("demo chat panel: two streamed turns, the second prefills only its own tokens", 600000, async () => {
  needs(DEFAULT_TEXT);
  const page = await openDemo(true);
  await page.fill("#text-source", "default");
  await page.click("#text-load");
  if ((await waitState(page, "text-section", ["loaded", "error"], 300000)) === "error") throw new Error(await page.textContent("#text-error"));
  await page.fill("#max-tokens", "16");
  await page.fill("#temperature", "0");
  const turns = [];
  for (const say of ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void."]) {
    await page.fill("#chat-input", say);
    await page.click("#chat-send");
    if ((await waitState(page, "chat-section", ["done", "error"], 300000)) === "error") throw new Error(await page.textContent("#chat-error"));
    turns.push(await page.evaluate(() => ({ k: window.demo.chat.last.kiln, stats: document.querySelector("#chat-stats").textContent, bubbles: document.querySelectorAll("#chat-history .msg").length })));
  }
  await page.close();
  const [a, b] = turns;
  log(`turn 1: ${a.stats}`);
  log(`turn 2: ${b.stats}`);
  assert(a.bubbles === 2 && b.bubbles === 4, `history bubbles ${a.bubbles}, ${b.bubbles}`);
  assert(b.k.reused_tokens >= a.k.prompt_ids.length, `turn 2 reused ${b.k.reused_tokens} of turn 1's ${a.k.prompt_ids.length} prompt tokens`);
  assert(/tok\/s/.test(b.stats), b.stats);
});

// A real checkpoint (tools/fetch-real-model.sh; reported NOT RUN when it is not in the cache,
// a failure when KILN_REQUIRE_REAL_MODELS=1): SmolLM2-135M-Instruct Q4_1 from its GGUF URL in
// the demo's chat panel answers a question as transformers does on the same file.
test("demo chat panel: a real checkpoint (SmolLM2-135M-Instruct Q4_1) answers like transformers", 900000, async () => {
  const ref = JSON.parse(readFileSync(join(root, "tests/fixtures/real/SmolLM2-135M-Instruct.Q4_1.json"), "utf8"));
  if (!existsSync(join(modelCache, ref.file))) {
    assert(process.env.KILN_REQUIRE_REAL_MODELS !== "1", `${ref.file} is not in ${modelCache} (KILN_REQUIRE_REAL_MODELS=1)`);
    log(`NOT RUN: ${ref.file} is not in ${modelCache}: run tools/fetch-real-model.sh`);
    return;
  }
  const chat = ref.runs.find((r) => typeof r.prompt === "object");
  const page = await openDemo(true);
  await page.fill("#text-source", `/cache/${ref.file}`);
  await page.click("#text-load");
  if ((await waitState(page, "text-section", ["loaded", "error"], 600000)) === "error") throw new Error(await page.textContent("#text-error"));
  await page.fill("#max-tokens", "24");
  await page.fill("#temperature", "0");
  await page.fill("#chat-input", chat.prompt.chat[0].content);
  await page.click("#chat-send");
  if ((await waitState(page, "chat-section", ["done", "error"], 600000)) === "error") throw new Error(await page.textContent("#chat-error"));
  const got = await page.evaluate(() => ({ k: window.demo.chat.last.kiln, bubbles: [...document.querySelectorAll("#chat-history .msg")].map((m) => m.textContent) }));
  await page.close();
  log(`answer: ${JSON.stringify(got.bubbles.at(-1))}`);
  assert(JSON.stringify(got.k.prompt_ids) === JSON.stringify(chat.prompt_ids), `prompt ids ${got.k.prompt_ids} vs transformers' ${chat.prompt_ids}`);
  const n = got.k.ids.length;
  assert(n >= 8 && JSON.stringify(got.k.ids) === JSON.stringify(chat.ids.slice(0, n)), `ids ${got.k.ids} vs transformers' ${chat.ids}`);
  assert(/Paris/.test(got.bubbles.at(-1)), `the answer does not name Paris: ${got.bubbles.at(-1)}`);
});

test("image: fixture pipeline equals native (worker, with previews)", 600000, () => imageParity(FIXTURE_IMAGE, true, false));
test("image: a pipeline as diffusers 0.42 saves it equals native (page)", 600000, () => imageParity(SAVED_IMAGE, false, false));
test("image: default pipeline equals native (demo page, canvas)", 900000, () => imageParity(DEFAULT_IMAGE, false, true));

test("embeddings: embeddings.create (page and worker) equals kiln embed; base64, dimensions, token ids, errors; a BERT .gguf; EmbeddingGemma's and nomic-bert's layouts", 300000, async () => {
  const model = join(root, "tests/fixtures/embed/minilm-tiny");
  const texts = ["The cat sat on the mat.", "sky", "Light from the moon, light from the sun, and the dark sea between them."];
  const want = await native(["embed", "-m", model, "--json", ...texts]);
  for (const worker of [false, true]) {
    const page = await openDemo(worker);
    const got = await page.evaluate(async (texts) => {
      const k = window.demo.kiln;
      const m = await k.loadEmbedding("/fixtures/embed/minilm-tiny/");
      const r = await k.embeddings.create({ input: texts });
      const b64 = await m.embeddings.create({ input: "sky", encoding_format: "base64" });
      const bytes = Uint8Array.from(atob(b64.data[0].embedding), (c) => c.charCodeAt(0));
      const short = await m.embed(["sky"], { dimensions: 8 });
      const ids = await m.embeddings.create({ input: [[2, 50, 3]] });
      const error = await k.embeddings.create({ input: [[2, 99999, 3]] }).then(() => null, (e) => e.message);
      const missing = await k.embeddings.create({ model: "nope", input: "x" }).then(() => null, (e) => e.message);
      const info = m.info;
      m.dispose();
      return { data: r.data.map((d) => d.embedding), usage: r.usage, b64: Array.from(new Float32Array(bytes.buffer)), short: Array.from(short[0]), ids: ids.data.length, error, missing, info };
    }, texts);
    await page.close();
    const close = (a, b, tol) => a.length === b.length && a.every((x, i) => Math.abs(x - b[i]) <= tol);
    let worst = 0;
    got.data.forEach((v, i) => {
      worst = Math.max(worst, ...v.map((x, j) => Math.abs(x - want.embeddings[i][j])));
      assert(close(v, want.embeddings[i], 1e-5), `input ${i}: ${v.slice(0, 4)} vs native ${want.embeddings[i].slice(0, 4)}`);
    });
    log(`${worker ? "worker" : "page  "}: ${got.data.length} embeddings of ${got.info.dim}, max abs difference from native ${worst.toExponential(1)}`);
    assert(close(got.b64, want.embeddings[1], 1e-5), "base64");
    const s = want.embeddings[1].slice(0, 8);
    const n = Math.hypot(...s);
    assert(close(got.short, s.map((x) => x / n), 1e-5), "dimensions");
    assert(got.usage.prompt_tokens === want.tokens.reduce((a, b) => a + b, 0), JSON.stringify(got.usage));
    assert(got.ids === 1 && /input 0: token id 99999/.test(got.error) && /'nope' is not loaded/.test(got.missing), `${got.error} / ${got.missing}`);
  }
  // The GGUF llama.cpp's converter makes of the same model, by URL.
  const wantGguf = await native(["embed", "-m", join(root, "tests/fixtures/embed/minilm-tiny.gguf"), "--json", ...texts]);
  const page = await openDemo(false);
  const gguf = await page.evaluate(async (texts) => {
    const m = await window.demo.kiln.loadEmbedding("/fixtures/embed/minilm-tiny.gguf");
    const r = await m.embeddings.create({ input: texts });
    m.dispose();
    return r.data.map((d) => d.embedding);
  }, texts);
  await page.close();
  gguf.forEach((v, i) => assert(v.every((x, j) => Math.abs(x - wantGguf.embeddings[i][j]) <= 1e-5), `gguf input ${i}`));
  log(`page  : minilm-tiny.gguf equals native`);
  // EmbeddingGemma's layout (bidirectional Gemma 3, two Dense modules) and nomic-embed-text's
  // (nomic-bert: rotary positions, SwiGLU) with their query prompts; nomic's GGUF.
  for (const [source, prompt] of [["gemma-emb-tiny/", "query"], ["nomic-tiny/", "query"], ["nomic-tiny.gguf", null]]) {
    const flags = prompt ? ["--prompt-name", prompt] : [];
    const want = await native(["embed", "-m", join(root, "tests/fixtures/embed", source), ...flags, "--json", ...texts]);
    const p = await openDemo(false);
    const got = await p.evaluate(async ({ source, texts, prompt }) => {
      const m = await window.demo.kiln.loadEmbedding(`/fixtures/embed/${source}`);
      const r = await m.embeddings.create(prompt ? { input: texts, prompt_name: prompt } : { input: texts });
      m.dispose();
      return r.data.map((d) => d.embedding);
    }, { source, texts, prompt });
    await p.close();
    got.forEach((v, i) => assert(v.every((x, j) => Math.abs(x - want.embeddings[i][j]) <= 1e-5), `${source} input ${i}`));
    log(`page  : ${source}${prompt ? ` (${prompt} prompt)` : ""} equals native`);
  }
});

test("image SDXL: two text encoders, added conditioning and SDXL-Turbo's defaults equal native (page and worker)", 600000, async () => {
  // [folder under /fixtures/sdxl, browser options (steps/guidance left out: the model's defaults), worker]
  const runs = [
    ["sdxl-tiny", { steps: 3, guidance: 5, negativePrompt: "blurry", width: 16, height: 24 }, false],
    ["sdxl-turbo-tiny", {}, true],
  ];
  for (const [model, o, worker] of runs) {
    const out = join(userDir, `sdxl-${model}.png`);
    const flags = [];
    if (o.steps) flags.push("--steps", String(o.steps), "--guidance", String(o.guidance), "--negative-prompt", o.negativePrompt, "--width", String(o.width), "--height", String(o.height));
    await native(["image", "--model", join(root, "tests/fixtures/sdxl", model), "--prompt", "a red door", "--seed", "5", ...flags, "--out", out, "--json"]);
    const page = await openDemo(worker);
    const got = await page.evaluate(async ({ model, o }) => {
      const sd = await window.demo.kiln.loadImage(`/fixtures/sdxl/${model}/`);
      const img = await sd.generate("a red door", { seed: 5, ...o });
      const info = sd.info;
      sd.dispose();
      return { width: img.width, height: img.height, data: Array.from(img.data), info };
    }, { model, o });
    await page.close();
    const db = psnr({ ...got, channels: 4 }, readPng(readFileSync(out)));
    log(`${worker ? "worker" : "page  "} ${model} ${got.width}x${got.height} (steps ${got.info.steps}, guidance ${got.info.guidance}): PSNR ${db.toFixed(1)} dB against native`);
    assert(got.info.sdxl === true, `info.sdxl ${got.info.sdxl}`);
    assert(db >= 40, `PSNR ${db.toFixed(2)} dB < 40 dB`);
  }
});

test("image edits: img2img and inpainting (both U-Net kinds) from a Blob, ImageData and a transparent-canvas mask equal native (page and worker)", 600000, async () => {
  const fx = join(root, "tests/fixtures/sd-edit");
  const runs = [
    // [model folder under /fixtures, native folder, native extra flags, browser options, worker]
    ["sd/sd1-tiny", "tests/fixtures/sd/sd1-tiny", ["--strength", "0.6", "--scheduler", "euler"], { strength: 0.6, scheduler: "euler", blobs: false, mask: false }, false],
    ["sd/sd1-tiny", "tests/fixtures/sd/sd1-tiny", ["--mask", join(fx, "mask.png"), "--scheduler", "ddim"], { scheduler: "ddim", blobs: true, mask: true }, true],
    ["sd-edit/sd1-inpaint-tiny", "tests/fixtures/sd-edit/sd1-inpaint-tiny", ["--mask", join(fx, "mask.png"), "--strength", "0.75", "--scheduler", "dpm++2m"], { strength: 0.75, scheduler: "dpm++2m", blobs: false, mask: true }, false],
  ];
  for (const [source, dir, flags, o, worker] of runs) {
    const out = join(userDir, `edit-${worker}-${o.scheduler}.png`);
    await native(["image", "--model", join(root, dir), "--prompt", "a red door", "--init-image", join(fx, "init.png"), "--steps", "4", "--guidance", "3", "--seed", "5", ...flags, "--out", out, "--json"]);
    const page = await openDemo(worker);
    const got = await page.evaluate(async ({ source, o }) => {
      const blob = async (name) => (await fetch(`/fixtures/sd-edit/${name}`)).blob();
      const decoded = async (name) => {
        const b = await createImageBitmap(await blob(name), { colorSpaceConversion: "none", premultiplyAlpha: "none" });
        const c = new OffscreenCanvas(b.width, b.height).getContext("2d");
        c.drawImage(b, 0, 0);
        return c.getImageData(0, 0, b.width, b.height);
      };
      // The mask as a brush would leave it: white where mask.png is white, transparent elsewhere.
      const maskOnTransparent = async () => {
        const m = await decoded("mask.png");
        for (let i = 0; i < m.data.length; i += 4) if (m.data[i] < 128) m.data.fill(0, i, i + 4);
        return m;
      };
      const sd = await window.demo.kiln.loadImage(`/fixtures/${source}/`);
      const img = await sd.generate("a red door", {
        steps: 4, guidance: 3, seed: 5, scheduler: o.scheduler, strength: o.strength,
        initImage: o.blobs ? await blob("init.png") : await decoded("init.png"),
        mask: o.mask ? (o.blobs ? await blob("mask.png") : await maskOnTransparent()) : undefined,
      });
      const info = sd.info;
      sd.dispose();
      return { width: img.width, height: img.height, data: Array.from(img.data), info };
    }, { source, o });
    await page.close();
    const db = psnr({ ...got, channels: 4 }, readPng(readFileSync(out)));
    log(`${worker ? "worker" : "page  "} ${source} ${o.mask ? "inpainting" : "img2img"} (${o.scheduler}${o.blobs ? ", Blobs" : ", ImageData"}): PSNR ${db.toFixed(1)} dB against native`);
    assert(got.info.inpainting === source.includes("inpaint"), `info.inpainting ${got.info.inpainting}`);
    assert(db >= 40, `PSNR ${db.toFixed(2)} dB < 40 dB`);
  }
});

test("image LoRAs: setLoras (a URL, page; bytes, worker) equals native kiln image --lora; a LoRA for another model is an Error naming the key", 600000, async () => {
  const lora = join(root, "tests/fixtures/sd-lora/peft.safetensors");
  const out = join(userDir, "lora.png");
  await native(["image", "--model", join(root, "tests/fixtures/sd/sd1-tiny"), "--prompt", "a red door", "--steps", "4", "--guidance", "3", "--scheduler", "ddim", "--seed", "5", "--lora", `${lora}:0.7`, "--out", out, "--json"]);
  const ref = readPng(readFileSync(out));
  for (const worker of [false, true]) {
    const page = await openDemo(worker);
    const got = await page.evaluate(async (worker) => {
      const sd = await window.demo.kiln.loadImage("/fixtures/sd/sd1-tiny/");
      const url = "/fixtures/sd-lora/peft.safetensors";
      const source = worker ? new Uint8Array(await (await fetch(url)).arrayBuffer()) : url;
      const merged = await sd.setLoras([{ source, scale: 0.7 }]);
      const img = await sd.generate("a red door", { steps: 4, guidance: 3, scheduler: "ddim", seed: 5 });
      const def = await window.demo.kiln.loadImage("default");
      const error = await def.setLoras([{ source: "/fixtures/sd-lora/kohya.safetensors" }]).then(() => null, (e) => e.message);
      sd.dispose();
      def.dispose();
      return { merged, error, width: img.width, height: img.height, data: Array.from(img.data) };
    }, worker);
    await page.close();
    const db = psnr({ ...got, channels: 4 }, ref);
    log(`${worker ? "worker" : "page  "}: ${got.merged} modules merged; PSNR ${db.toFixed(1)} dB against native; another model's LoRA: ${got.error?.slice(0, 90)}`);
    assert(got.merged > 0 && db >= 40, `merged ${got.merged}, PSNR ${db.toFixed(2)} dB`);
    assert(/lora_unet_/.test(got.error ?? ""), `error: ${got.error}`);
  }
});

test("image TAESD: full-size previews and the final decode with the tiny decoder equal native (worker)", 600000, async () => {
  const out = join(userDir, "taesd.png");
  await native(["image", "--model", join(root, "tests/fixtures/sd/sd1-tiny"), "--prompt", "a red door", "--steps", "4", "--guidance", "3", "--seed", "5", "--taesd", join(root, "tests/fixtures/sd-fewstep/taesd-tiny"), "--tiny-decoder", "--out", out, "--json"]);
  const page = await openDemo(true);
  const got = await page.evaluate(async () => {
    const sd = await window.demo.kiln.loadImage("/fixtures/sd/sd1-tiny/", { taesd: "/fixtures/sd-fewstep/taesd-tiny/" });
    const previews = [];
    const img = await sd.generate("a red door", { steps: 4, guidance: 3, seed: 5, tinyDecoder: true, onStep: ({ preview }) => preview && previews.push([preview.width, preview.height]) });
    sd.dispose();
    return { previews, width: img.width, height: img.height, data: Array.from(img.data) };
  });
  await page.close();
  const db = psnr({ ...got, channels: 4 }, readPng(readFileSync(out)));
  log(`previews ${JSON.stringify(got.previews)}; PSNR ${db.toFixed(1)} dB against native`);
  assert(got.previews.length === 3 && got.previews.every(([w, h]) => w === 16 && h === 16), JSON.stringify(got.previews));
  assert(db >= 40, `PSNR ${db.toFixed(2)} dB < 40 dB`);
});

test("demo page: an uploaded image inpainted where the brush painted equals native (default model); screenshot", 900000, async () => {
  needs(DEFAULT_IMAGE);
  const init = join(root, "models/image-shapes/reference/image.png");
  const page = await openDemo(false);
  await page.click("#image-load");
  if ((await waitState(page, "image-section", ["loaded", "error"], 300000)) === "error") throw new Error(await page.textContent("#image-error"));
  await page.setInputFiles("#init-file", init);
  await page.waitForSelector("#edit:not([hidden])");
  const box = await page.locator("#mask-canvas").boundingBox();
  await page.mouse.move(box.x + box.width * 0.3, box.y + box.height * 0.35);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.7, box.y + box.height * 0.65, { steps: 12 });
  await page.mouse.up();
  await page.fill("#image-prompt", "a green square");
  await page.fill("#image-seed", "7");
  await page.fill("#steps", "20");
  await page.click("#image-generate");
  if ((await waitState(page, "image-section", ["done", "error"], 600000)) === "error") throw new Error(await page.textContent("#image-error"));
  const got = await page.evaluate(() => {
    const m = document.getElementById("mask-canvas");
    const mask = m.getContext("2d").getImageData(0, 0, m.width, m.height);
    const i = window.demo.lastImage;
    return { edit: window.demo.lastEdit, width: i.width, height: i.height, data: Array.from(i.data), mask: { width: mask.width, height: mask.height, data: Array.from(mask.data) } };
  });
  if (process.env.KILN_SCREENSHOT) await page.locator("#image-section").screenshot({ path: process.env.KILN_SCREENSHOT });
  await page.close();
  assert(got.edit?.masked && got.edit.init.join("x") === "64x64", `lastEdit ${JSON.stringify(got.edit)}`);
  // The painted mask over black, as the engine takes it, for the native run.
  const m = Uint8Array.from(got.mask.data);
  for (let i = 0; i < m.length; i += 4) {
    for (let k = 0; k < 3; k++) m[i + k] = Math.floor((m[i + k] * m[i + 3] + 127) / 255);
    m[i + 3] = 255;
  }
  const painted = m.filter((v, i) => i % 4 === 0 && v >= 128).length;
  assert(painted > 50 && painted < 64 * 64 / 2, `${painted} mask pixels painted`);
  const maskPng = join(userDir, "demo-mask.png");
  writeFileSync(maskPng, writePng({ width: got.mask.width, height: got.mask.height, data: m }));
  const out = join(userDir, "demo-inpaint.png");
  await native(["image", "--prompt", "a green square", "--init-image", init, "--mask", maskPng, "--seed", "7", "--steps", "20", "--out", out, "--json"]);
  const db = psnr({ ...got, channels: 4 }, readPng(readFileSync(out)));
  log(`${painted} pixels painted; the inpainted image: PSNR ${db.toFixed(1)} dB against native`);
  assert(db >= 40, `PSNR ${db.toFixed(2)} dB < 40 dB`);
});

test("image: AbortSignal stops the denoising loop; the pipeline stays usable", 300000, async () => {
  for (const worker of [false, true]) {
    const page = await openDemo(worker);
    const r = await page.evaluate(async (m) => {
      const sd = await window.demo.kiln.loadImage(m.source);
      const ac = new AbortController();
      let last = 0;
      const error = await sd
        .generate(m.prompt, { steps: 200, signal: ac.signal, onStep: ({ step }) => (last = step) === 2 && ac.abort() })
        .then(() => null, (e) => e.name);
      const img = await sd.generate(m.prompt, { steps: 2 });
      sd.dispose();
      return { error, last, after: [img.width, img.height] };
    }, FIXTURE_IMAGE);
    await page.close();
    log(`${worker ? "worker" : "page  "}: ${JSON.stringify(r)}`);
    assert(r.error === "AbortError" && r.last <= 3 && r.after[0] > 0, JSON.stringify(r));
  }
});

test("a lost GPU device ends generation with an Error, not a hang; a new Kiln works (page and worker)", 300000, async () => {
  for (const worker of [false, true]) {
    const page = await openDemo(worker);
    const r = await page.evaluate(
      async ([t, im, worker]) => {
        const { Kiln } = await import("/pkg/kiln.js");
        const fail = (e) => e?.message ?? String(e);
        let k = await Kiln.create({ worker });
        const llm = await k.loadText(t.source);
        let pieces = 0;
        let text = null;
        try {
          for await (const _ of llm.generate(t.prompt, { maxTokens: 200, temperature: 0 })) {
            if (++pieces === 2) await k.loseDevice();
          }
        } catch (e) {
          text = fail(e);
        }
        k = await Kiln.create({ worker });
        const sd = await k.loadImage(im.source);
        let last = 0;
        const image = await sd
          .generate(im.prompt, { steps: 50, onStep: async ({ step }) => (last = step) === 2 && (await k.loseDevice()) })
          .then(() => null, fail);
        k = await Kiln.create({ worker });
        const again = await (await k.loadText(t.source)).complete(t.prompt, { maxTokens: 4, temperature: 0 });
        return { pieces, text, last, image, after: again.ids.length };
      },
      [FIXTURE_TEXT, FIXTURE_IMAGE, worker],
    );
    await page.close();
    log(`${worker ? "worker" : "page  "}: ${JSON.stringify(r)}`);
    assert(/lost/.test(r.text ?? "") && r.pieces < 10, `text: ${JSON.stringify(r)}`);
    assert(/lost/.test(r.image ?? "") && r.last < 10, `image: ${JSON.stringify(r)}`);
    assert(r.after === 4, `a new Kiln: ${JSON.stringify(r)}`);
  }
});

test("a server that answers missing files with index.html (SPA fallback): optional files count as absent, a missing model is a clear error", 300000, async () => {
  const page = await openDemo(false);
  const r = await page.evaluate(async (src) => {
    const k = window.demo.kiln;
    const load = async (s) => {
      const m = await k.loadText(s, { cache: false });
      const out = await m.complete([1, 2, 3], { maxTokens: 6, temperature: 0 });
      m.dispose();
      return out.ids;
    };
    const plain = await load(src);
    const spa = await load(`/__spa${src}`);
    const missing = await k.loadText("/__spa/fixtures/llm/no-such-model/", { cache: false }).then(() => null, (e) => e.message);
    return { plain, spa, missing };
  }, FIXTURE_TEXT.source);
  await page.close();
  log(`behind the fallback: ${r.spa}; missing model: ${r.missing}`);
  assert(JSON.stringify(r.spa) === JSON.stringify(r.plain), `ids behind the SPA fallback ${r.spa}, direct ${r.plain}`);
  assert(/got an HTML page for config\.json/.test(r.missing) && /is the model folder served at/.test(r.missing), r.missing);
});

test("bad model sources give an Error, not a hang", 180000, async () => {
  const page = await openDemo(false);
  const r = await page.evaluate(async () => {
    const k = window.demo.kiln;
    const err = (p) => p.then(() => "no error", (e) => (e instanceof Error ? e.message : `not an Error: ${e}`));
    return {
      missingFolder: await err(k.loadText("/models/no-such-model/")),
      unreachable: await err(k.loadText("http://127.0.0.1:9/model/")),
      stalled: await err(k.loadText("/__stall/model.gguf", { stallMs: 1500 })),
      notASource: await err(k.loadText("not a model")),
      textAsImage: await err(k.loadImage("/fixtures/llm/llama-gqa-f32/")),
      imageAsText: await err(k.loadText("/fixtures/sd/sd1-tiny/")),
      missingGguf: await err(k.loadText("/fixtures/llm/llama-gqa-f32/nothing.gguf")),
      noiseGguf: await err(k.loadText("/__garbage/model.gguf")),
      noiseFolder: await err(k.loadText("/__garbage/")),
      noisePipeline: await err(k.loadImage("/__garbage/")),
    };
  });
  for (const [k, v] of Object.entries(r)) log(`${k}: ${v}`);
  assert(/config\.json.*HTTP 404/.test(r.missingFolder), r.missingFolder);
  assert(/could not fetch/.test(r.unreachable), r.unreachable);
  assert(/no data for 1\.5 s/.test(r.stalled), r.stalled);
  assert(/not a URL/.test(r.notASource), r.notASource);
  assert(/model_index\.json.*404/.test(r.textAsImage), r.textAsImage);
  assert(/config\.json.*404/.test(r.imageAsText), r.imageAsText);
  assert(/nothing\.gguf.*404/.test(r.missingGguf), r.missingGguf);
  for (const k of ["noiseGguf", "noiseFolder", "noisePipeline"]) assert(r[k] !== "no error" && !/not an Error|panic/.test(r[k]), `${k}: ${r[k]}`);
  // The same through the demo's controls: the error is shown.
  await page.fill("#text-source", "/models/no-such-model/");
  await page.click("#text-load");
  assert((await waitState(page, "text-section", ["loaded", "error"], 60000)) === "error", "no error state");
  assert(await page.isVisible("#text-error"), "the error is not shown");
  log(`shown: ${await page.textContent("#text-error")}`);
  await page.close();
});

/** Starts `kiln serve --port 0 ...args` (the native binary); resolves to { base, proc, log() }. */
function startKilnServe(args) {
  assert(existsSync(KILN), `native binary ${KILN} not found: build it with \`cargo build -p kiln-demo\``);
  const env = { ...process.env, XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR ?? tmpdir() };
  const proc = spawn(KILN, ["serve", "--port", "0", ...args], { env, stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`kiln serve did not start:\n${log}`)), 120000);
    proc.stderr.on("data", (d) => {
      log += d;
      const m = /listening on (http:\/\/\S+)\r?\n/.exec(log);
      if (m) clearTimeout(timer), resolve({ base: m[1], proc, log: () => log });
    });
    proc.on("exit", (code) => reject(new Error(`kiln serve exited (${code}):\n${log}`)));
  });
}

test("kiln serve --cors-origin: the demo page on an allowed origin calls it; a page on another origin cannot", 300000, async () => {
  const KEY = "sk-cors";
  const serve = await startKilnServe(["-m", join(root, "tests/fixtures/llm/llama-gqa-f32"), "--ctx", "128", "--api-key", KEY, "--cors-origin", new URL(url).origin]);
  const other = await startServer({ port: 0, log: false });
  try {
    const call = (base, key, contentType) =>
      fetch(`${base}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": contentType, authorization: `Bearer ${key}` },
        body: JSON.stringify({ messages: [{ role: "user", content: "Hello" }], max_tokens: 4, temperature: 0 }),
      }).then(async (r) => ({ status: r.status, body: await r.json() }), (e) => ({ error: String(e) }));
    // The allowed page: a preflighted JSON request with a key, as an OpenAI client sends it.
    const page = await openDemo(false);
    const ok = await page.evaluate(`(${call})(${JSON.stringify(serve.base)}, ${JSON.stringify(KEY)}, "application/json")`);
    await page.close();
    assert(ok.status === 200 && ok.body.choices?.[0]?.message?.role === "assistant", JSON.stringify(ok));
    log(`allowed origin ${new URL(url).origin}: 200, ${JSON.stringify(ok.body.choices[0].message.content)}`);
    // The same demo page from another origin: the preflight is refused, so fetch fails, and a
    // "simple" text/plain POST (no preflight) is refused by the server before it runs.
    const foreign = await context.newPage();
    await foreign.goto(`${other.url}/demo/?worker=0`);
    const refused = await foreign.evaluate(`(${call})(${JSON.stringify(serve.base)}, ${JSON.stringify(KEY)}, "application/json")`);
    assert(refused.error && !refused.status, `a foreign origin read an answer: ${JSON.stringify(refused)}`);
    const before = (serve.log().match(/ chat: /g) ?? []).length;
    await foreign.evaluate(`fetch(${JSON.stringify(serve.base + "/v1/chat/completions")}, { method: "POST", mode: "no-cors", headers: { "content-type": "text/plain" }, body: JSON.stringify({ messages: [{ role: "user", content: "Hello" }], max_tokens: 4 }) }).catch(() => null)`);
    await foreign.close();
    await new Promise((r) => setTimeout(r, 500));
    const after = (serve.log().match(/ chat: /g) ?? []).length;
    assert(after === before, `the foreign page's text/plain POST ran a generation:\n${serve.log()}`);
    log(`foreign origin ${other.url}: ${refused.error}; its text/plain POST did not run`);
  } finally {
    serve.proc.kill("SIGKILL");
    other.server.closeAllConnections();
    other.server.close();
  }
});

test("a Rust panic reaches JavaScript as an Error with its message", 60000, async () => {
  for (const inFuture of [false, true]) {
    const page = await context.newPage();
    page.on("pageerror", () => {}); // the trap itself is also reported to the page
    await page.goto(`${url}/demo/?worker=0`);
    const r = await page.evaluate(async (f) => {
      const k = await import("/pkg/kiln.js");
      const first = await k.debugPanic(f).then(() => null, (e) => ({ error: e instanceof Error, name: e.name, message: e.message }));
      const later = await k.debugPanic(false).then(() => null, (e) => e.message);
      return { first, later };
    }, inFuture);
    await page.close();
    log(`${inFuture ? "in a future" : "synchronous"}: ${r.first?.message}`);
    assert(r.first?.error && /deliberate panic/.test(r.first.message) && !/unreachable/.test(r.first.message), JSON.stringify(r));
    assert(/deliberate panic/.test(r.later), `a later call: ${r.later}`);
  }
});

// ---- main

const wasmFile = join(web, "pkg", "wasm", "kiln_web_bg.wasm");
assert(existsSync(wasmFile), `${wasmFile} not found: run \`npm run build\` first`);
const raw = statSync(wasmFile).size;
const gz = gzipSync(readFileSync(wasmFile), { level: 9 }).length;
console.log(`wasm: ${(raw / 1048576).toFixed(2)} MiB raw, ${(gz / 1048576).toFixed(2)} MiB gzip`);

({ server, url } = await startServer({ port: 0, log: false }));
server.on("request", (req, res) => res.on("finish", () => hits.push({ path: new URL(req.url, url).pathname, status: res.statusCode })));
userDir = mkdtempSync(join(tmpdir(), "kiln-chromium-"));
const extra = (process.env.CHROMIUM_EXTRA_FLAGS ?? "").split(" ").filter(Boolean);
context = await chromium.launchPersistentContext(userDir, { executablePath: CHROMIUM, headless: true, args: ["--headless=new", ...FLAGS, ...extra] });

let failed = 0;
for (const t of tests) {
  if (grep && !t.name.includes(grep)) continue;
  const t0 = Date.now();
  let timer;
  try {
    await Promise.race([t.fn(), new Promise((_, rej) => (timer = setTimeout(() => rej(new Error(`timed out after ${t.timeoutMs / 1000} s`)), t.timeoutMs)))]);
    console.log(`ok   ${t.name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${t.name} (${((Date.now() - t0) / 1000).toFixed(1)} s)\n     ${(e.stack ?? String(e)).split("\n").join("\n     ")}`);
  } finally {
    clearTimeout(timer);
  }
}
await context.close();
server.closeAllConnections();
server.close();
rmSync(userDir, { recursive: true, force: true });
console.log(`wasm: ${(raw / 1048576).toFixed(2)} MiB raw, ${(gz / 1048576).toFixed(2)} MiB gzip; time to first token (default model, page): ${results.ttft ? results.ttft.toFixed(0) + " ms" : "n/a"}`);
console.log(failed ? `${failed} browser test(s) FAILED` : "all browser tests passed");
process.exit(failed ? 1 : 0);
