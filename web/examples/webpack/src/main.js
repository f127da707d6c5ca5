// kiln-gpu with webpack 5: `npm run build` bundles the engine, its worker and its wasm.
// The default models are fetched from /models/ on this origin (copy them to dist/models/).
import { Kiln } from "kiln-gpu";

/** Text, then an image, with the default models; `worker` runs the engine off the page. */
export async function run({ worker = true, prompt = "And God said", maxTokens = 16, seed = 7, steps = 4 } = {}) {
  const out = document.getElementById("out");
  const kiln = await Kiln.create({ worker });
  const llm = await kiln.loadText("default", {
    onProgress: (p) => (out.textContent = `loading: ${p.phase} ${p.loaded} / ${p.total ?? "?"}`),
  });
  out.textContent = prompt;
  let text = null;
  const stream = llm.generate(prompt, { maxTokens, temperature: 0 });
  for (let r = await stream.next(); ; r = await stream.next()) {
    if (r.done) {
      text = r.value;
      break;
    }
    out.textContent += r.value;
  }
  const sd = await kiln.loadImage("default");
  const image = await sd.generate("a red circle on a blue background", { seed, steps });
  document.getElementById("image").getContext("2d").putImageData(image, 0, 0);
  kiln.dispose();
  return { ids: text.ids, text: text.text, image: Array.from(image.data) };
}

window.example = { run };
