// The demo page: adapter info, streaming text, images with a live preview. Everything it does
// goes through the public API of ../pkg/kiln.js. `window.demo` exposes the objects to the tests.
import { Kiln } from "../pkg/kiln.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const useWorker = params.get("worker") !== "0";
const demo = (window.demo = { Kiln, kiln: null, llm: null, sd: null });

$("use-worker").checked = useWorker;
$("use-worker").onchange = (e) => {
  params.set("worker", e.target.checked ? "1" : "0");
  location.search = params.toString();
};

function showError(id, e) {
  const el = $(id);
  if (e) console.error(e);
  el.hidden = !e;
  el.textContent = e ? `${e.name && e.name !== "Error" ? e.name + ": " : ""}${e.message ?? e}` : "";
}

function setState(section, state) {
  $(section).dataset.state = state;
}

function progressView(id) {
  const bar = $(id).querySelector("progress");
  const label = $(id).querySelector("span");
  bar.value = 0;
  label.textContent = "";
  return (p) => {
    if (p.phase === "download") {
      const total = p.total ?? 0;
      bar.max = total || 1;
      bar.value = total ? p.loaded : 0;
      const size = total ? `${(p.loaded / 1048576).toFixed(1)} / ${(total / 1048576).toFixed(1)} MiB` : `${(p.loaded / 1048576).toFixed(1)} MiB`;
      label.textContent = `${p.file}: ${p.cached ? "from cache" : size}`;
    } else {
      bar.max = p.total || 1;
      bar.value = p.loaded;
      label.textContent = `uploading to the GPU: ${p.loaded} / ${p.total}`;
    }
  };
}

function describe(a) {
  const f = a.features;
  return [
    `${a.name || "(unnamed adapter)"} — ${a.backend}, ${a.deviceType}${a.driver ? ", " + a.driver : ""}`,
    `shader-f16: ${f.shaderF16 ? "yes" : "no"}   subgroups: ${f.subgroups ? "yes" : "no"}   timestamps: ${f.timestamps ? "yes" : "no"}`,
    `max storage binding: ${(a.limits.maxStorageBufferBindingSize / 1048576).toFixed(0)} MiB   max buffer: ${(a.limits.maxBufferSize / 1048576).toFixed(0)} MiB   workgroup memory: ${a.limits.maxComputeWorkgroupStorageSize} B`,
    `browser adapter features: ${a.browser?.features.join(", ") || "?"}`,
    `mode: ${useWorker ? "Web Worker" : "main thread"}`,
  ].join("\n");
}

async function start() {
  setState("adapter-section", "loading");
  try {
    demo.kiln = await Kiln.create({ worker: useWorker });
  } catch (e) {
    $("adapter").textContent = "no WebGPU device";
    showError("adapter-error", e);
    setState("adapter-section", "error");
    return;
  }
  $("adapter").textContent = describe(demo.kiln.adapter);
  setState("adapter-section", "ready");
  for (const b of ["selftest", "text-load", "image-load"]) $(b).disabled = false;
}

$("selftest").onclick = async () => {
  $("selftest").disabled = true;
  try {
    const r = await demo.kiln.kernelParity();
    $("selftest-out").textContent = r.map((c) => `${c.ok ? "ok  " : "FAIL"} ${c.name}: relative error ${c.relErr.toExponential(2)} (tolerance ${c.tol})`).join("\n");
  } catch (e) {
    showError("adapter-error", e);
  }
  $("selftest").disabled = false;
};

// ---- text
let textAbort = null;

$("text-load").onclick = async () => {
  showError("text-error", null);
  setState("text-section", "loading");
  $("text-load").disabled = $("generate").disabled = true;
  demo.llm?.dispose();
  demo.llm = null;
  $("text-info").textContent = "";
  try {
    const t0 = performance.now();
    demo.llm = await demo.kiln.loadText($("text-source").value, { onProgress: progressView("text-progress") });
    const i = demo.llm.info;
    $("text-info").textContent = `${i.arch}: ${i.layers} layers, hidden ${i.hidden}, vocab ${i.vocab}, context ${i.ctx} — loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s`;
    $("generate").disabled = false;
    $("chat-send").disabled = false;
    setState("text-section", "loaded");
  } catch (e) {
    showError("text-error", e);
    setState("text-section", "error");
  }
  $("text-load").disabled = false;
};

$("generate").onclick = async () => {
  showError("text-error", null);
  setState("text-section", "generating");
  $("generate").disabled = true;
  $("text-stop").disabled = false;
  $("output").textContent = "";
  $("text-stats").textContent = "";
  textAbort = new AbortController();
  const opts = {
    maxTokens: +$("max-tokens").value,
    temperature: +$("temperature").value,
    topK: +$("top-k").value,
    topP: +$("top-p").value,
    seed: +$("text-seed").value,
    signal: textAbort.signal,
  };
  const t0 = performance.now();
  let ttft = null;
  try {
    const it = demo.llm.generate($("prompt").value, opts);
    let r;
    while (!(r = await it.next()).done) {
      ttft ??= performance.now() - t0;
      $("output").textContent += r.value;
    }
    const res = r.value;
    demo.lastText = { ...res, ttftMs: ttft };
    $("text-stats").textContent = `${res.ids.length} tokens, first after ${ttft?.toFixed(0)} ms, ${res.timings.decodeTokS.toFixed(1)} tok/s (stop: ${res.stop})`;
    setState("text-section", "done");
  } catch (e) {
    if (e.name === "AbortError") {
      $("text-stats").textContent = "stopped";
      setState("text-section", "stopped");
    } else {
      showError("text-error", e);
      setState("text-section", "error");
    }
  }
  $("generate").disabled = false;
  $("text-stop").disabled = true;
};

$("text-stop").onclick = () => textAbort?.abort();

// ---- chat: the OpenAI-shaped API on the loaded text model
let chatAbort = null;
const chat = (demo.chat = { messages: [] });

function bubble(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.textContent = text;
  $("chat-history").append(el);
  return el;
}

$("chat-send").onclick = async () => {
  const text = $("chat-input").value.trim();
  if (!text || !demo.llm) return;
  showError("chat-error", null);
  setState("chat-section", "generating");
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  chat.messages.push({ role: "user", content: text });
  bubble("user", text);
  $("chat-input").value = "";
  const reply = bubble("assistant", "");
  chatAbort = new AbortController();
  const t0 = performance.now();
  let ttft = null, last = null;
  try {
    const stream = await demo.llm.chat.completions.create(
      {
        messages: chat.messages,
        stream: true,
        max_tokens: +$("max-tokens").value,
        temperature: +$("temperature").value,
        top_k: +$("top-k").value,
        top_p: +$("top-p").value,
        seed: +$("text-seed").value,
        context_overflow: "drop_oldest",
      },
      { signal: chatAbort.signal },
    );
    for await (const chunk of stream) {
      const c = chunk.choices[0];
      if (c?.delta?.content) {
        ttft ??= performance.now() - t0;
        reply.textContent += c.delta.content;
      }
      if (chunk.kiln) last = chunk;
    }
    const k = last.kiln;
    chat.messages.splice(chat.messages[0]?.role === "system" ? 1 : 0, k.dropped_messages);
    chat.messages.push({ role: "assistant", content: reply.textContent });
    chat.last = last;
    $("chat-stats").textContent = `${k.ids.length} tokens; prompt ${k.prompt_ids.length} tokens (${k.reused_tokens} reused, ${k.prompt_ids.length - k.reused_tokens} prefilled); first token after ${(ttft ?? 0).toFixed(0)} ms; ${k.timings.decode_tok_s.toFixed(1)} tok/s (${last.choices[0].finish_reason})`;
    setState("chat-section", "done");
  } catch (e) {
    chat.messages.pop();
    if (e.name === "AbortError") {
      reply.textContent += " [stopped]";
      $("chat-stats").textContent = "stopped";
      setState("chat-section", "stopped");
    } else {
      showError("chat-error", e);
      setState("chat-section", "error");
    }
  }
  $("chat-send").disabled = false;
  $("chat-stop").disabled = true;
};

$("chat-input").onkeydown = (e) => {
  if (e.key === "Enter") $("chat-send").click();
};
$("chat-stop").onclick = () => chatAbort?.abort();
$("chat-clear").onclick = () => {
  chat.messages = [];
  $("chat-history").textContent = "";
  $("chat-stats").textContent = "";
};

// ---- image
let imageAbort = null;
const canvas = $("canvas");
const ctx2d = canvas.getContext("2d");

async function draw(image) {
  // Previews are one pixel per latent: scale them up without smoothing.
  const bitmap = await createImageBitmap(image);
  ctx2d.imageSmoothingEnabled = false;
  ctx2d.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
}

$("image-load").onclick = async () => {
  showError("image-error", null);
  setState("image-section", "loading");
  $("image-load").disabled = $("image-generate").disabled = true;
  demo.sd?.dispose();
  demo.sd = null;
  try {
    demo.sd = await demo.kiln.loadImage($("image-source").value, { onProgress: progressView("image-progress") });
    $("width").placeholder = demo.sd.info.width;
    $("height").placeholder = demo.sd.info.height;
    $("image-generate").disabled = false;
    setState("image-section", "loaded");
  } catch (e) {
    showError("image-error", e);
    setState("image-section", "error");
  }
  $("image-load").disabled = false;
};

// img2img and inpainting: an init image (uploaded or the last result) and a mask painted over it.
const initCanvas = $("init-canvas");
const maskCanvas = $("mask-canvas");
const maskCtx = maskCanvas.getContext("2d", { willReadFrequently: true });
demo.init = null;
demo.maskPainted = false;

function setInit(image) {
  demo.init = image;
  for (const c of [initCanvas, maskCanvas]) [c.width, c.height] = [image?.width ?? 64, image?.height ?? 64];
  if (image) initCanvas.getContext("2d").putImageData(image, 0, 0);
  maskCtx.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  demo.maskPainted = false;
  $("edit").hidden = $("edit-hint").hidden = !image;
  $("init-clear").disabled = $("mask-clear").disabled = !image;
}

$("init-file").onchange = async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  try {
    const b = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const c = new OffscreenCanvas(b.width, b.height).getContext("2d");
    c.drawImage(b, 0, 0);
    setInit(c.getImageData(0, 0, b.width, b.height));
  } catch (err) {
    showError("image-error", new Error(`that file is not an image the browser can read (${err.message})`));
  }
};
$("init-from-result").onclick = () => demo.lastImage && setInit(demo.lastImage);
$("init-clear").onclick = () => {
  $("init-file").value = "";
  setInit(null);
};
$("mask-clear").onclick = () => {
  maskCtx.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  demo.maskPainted = false;
};
function paint(e) {
  if (!(e.buttons & 1)) return;
  const r = maskCanvas.getBoundingClientRect();
  const x = ((e.clientX - r.left) * maskCanvas.width) / r.width;
  const y = ((e.clientY - r.top) * maskCanvas.height) / r.height;
  maskCtx.fillStyle = "#fff";
  maskCtx.beginPath();
  maskCtx.arc(x, y, +$("brush").value || 4, 0, 2 * Math.PI);
  maskCtx.fill();
  demo.maskPainted = true;
}
maskCanvas.onpointerdown = (e) => {
  maskCanvas.setPointerCapture(e.pointerId);
  paint(e);
};
maskCanvas.onpointermove = paint;

$("image-generate").onclick = async () => {
  showError("image-error", null);
  setState("image-section", "generating");
  $("image-generate").disabled = true;
  $("image-stop").disabled = false;
  imageAbort = new AbortController();
  const num = (id) => ($(id).value === "" ? undefined : +$(id).value);
  const t0 = performance.now();
  try {
    const image = await demo.sd.generate($("image-prompt").value, {
      steps: num("steps"),
      guidance: num("guidance"),
      scheduler: $("scheduler").value || undefined,
      seed: num("image-seed"),
      width: num("width"),
      height: num("height"),
      initImage: demo.init ?? undefined,
      mask: demo.init && demo.maskPainted ? maskCtx.getImageData(0, 0, maskCanvas.width, maskCanvas.height) : undefined,
      strength: demo.init ? num("strength") : undefined,
      signal: imageAbort.signal,
      onStep: ({ step, steps, preview }) => {
        $("image-stats").textContent = `step ${step} / ${steps}`;
        if (preview) draw(preview);
      },
    });
    canvas.width = image.width;
    canvas.height = image.height;
    ctx2d.putImageData(image, 0, 0);
    demo.lastImage = image;
    demo.lastEdit = demo.init ? { init: [demo.init.width, demo.init.height], masked: demo.maskPainted } : null;
    $("init-from-result").disabled = false;
    const notes = image.notes?.length ? ` — ${image.notes.join("; ")}` : "";
    $("image-stats").textContent = `${image.width}x${image.height} in ${((performance.now() - t0) / 1000).toFixed(1)} s${notes}`;
    setState("image-section", "done");
  } catch (e) {
    if (e.name === "AbortError") {
      $("image-stats").textContent = "stopped";
      setState("image-section", "stopped");
    } else {
      showError("image-error", e);
      setState("image-section", "error");
    }
  }
  $("image-generate").disabled = false;
  $("image-stop").disabled = true;
};

$("image-stop").onclick = () => imageAbort?.abort();

start();
