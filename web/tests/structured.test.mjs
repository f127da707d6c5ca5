// Structured output against `kiln serve`, with the clients apps use: the official `openai`
// client (response_format json_schema / json_object, the Lark `grammar` extension, logit_bias,
// streaming under a constraint, the 400s) and the Vercel AI SDK (`generateObject` with a zod
// schema through @ai-sdk/openai-compatible). Every constrained output is parsed and validated
// against its schema by Ajv, a validator independent of the engine that enforced it.
//
// Validity by construction: on a random-weight fixture (whose unconstrained output is noise, so
// the sampler walks the grammar at random) 200 seeded runs over 10 schemas; on the real
// SmolLM2-135M-Instruct (when tools/fetch-real-model.sh has cached it) KILN_STRUCTURED_REAL_RUNS
// runs (default 20; the 200-run figure is in docs/structured-output.md).
// Run by native-demo/tests/structured.rs (which builds the binary):
//   KILN_BIN=target/release/kiln node web/tests/structured.test.mjs
import OpenAI from "openai";
import Ajv from "ajv";
import { generateObject } from "ai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { z } from "zod";
import { KilnServers } from "./kiln-serve.mjs";
import { existsSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";

const root = join(dirname(fileURLToPath(import.meta.url)), "../..");
const bin = process.env.KILN_BIN ?? join(root, "target/release/kiln");
const fixture = join(root, "tests/fixtures/llm/llama-gqa-f32");
const realModel = join(homedir(), ".cache/kiln/models/SmolLM2-135M-Instruct.Q4_1.gguf");
const realRuns = Number(process.env.KILN_STRUCTURED_REAL_RUNS ?? 20);
const env = { ...process.env, XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR ?? tmpdir() };

const kiln = new KilnServers(bin, env);
setTimeout(() => {
  console.log(`FAIL the structured-output tests did not finish in 15 minutes\n--- kiln serve log ---\n${kiln.log}`);
  kiln.killAll();
  process.exit(1);
}, 900_000).unref();

// Ten schemas: nested objects, arrays with min/max items, enums, bounded numbers,
// required/optional properties, anyOf, strings with patterns and lengths.
const name = { type: "string", minLength: 1, maxLength: 12 };
const SCHEMAS = [
  { type: "object", properties: { name, age: { type: "integer", minimum: 0, maximum: 120 } }, required: ["name", "age"], additionalProperties: false },
  { type: "object", properties: { color: { enum: ["red", "green", "blue"] }, shade: { type: "number", minimum: 0, maximum: 1 } }, required: ["color"], additionalProperties: false },
  { type: "object", properties: { tags: { type: "array", items: { type: "string", maxLength: 6 }, minItems: 2, maxItems: 4 } }, required: ["tags"], additionalProperties: false },
  {
    type: "object",
    properties: { user: { type: "object", properties: { id: { type: "integer", minimum: 1, maximum: 9999 }, email: { type: "string", pattern: "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$" } }, required: ["id", "email"], additionalProperties: false } },
    required: ["user"],
    additionalProperties: false,
  },
  { type: "object", properties: { value: { anyOf: [{ type: "integer", minimum: -50, maximum: 50 }, { type: "string", maxLength: 8 }, { type: "boolean" }] } }, required: ["value"], additionalProperties: false },
  { type: "array", items: { type: "integer", minimum: 0, maximum: 99 }, minItems: 1, maxItems: 5 },
  { type: "object", properties: { code: { type: "string", pattern: "^[A-Z]{3}-[0-9]{2}$" }, ok: { type: "boolean" }, note: { type: "string", maxLength: 10 } }, required: ["code", "ok"], additionalProperties: false },
  {
    type: "object",
    properties: { point: { type: "object", properties: { x: { type: "number", minimum: -10, maximum: 10 }, y: { type: "number", minimum: -10, maximum: 10 } }, required: ["x", "y"], additionalProperties: false }, label: { enum: ["a", "b", null] } },
    required: ["point", "label"],
    additionalProperties: false,
  },
  { type: "object", properties: { items: { type: "array", items: { type: "object", properties: { n: { type: "integer", minimum: 1, maximum: 9 }, s: { enum: ["x", "y"] } }, required: ["n", "s"], additionalProperties: false }, minItems: 1, maxItems: 3 } }, required: ["items"], additionalProperties: false },
  { type: "object", properties: { kind: { const: "event" }, day: { type: "integer", minimum: 1, maximum: 31 }, month: { enum: ["jan", "feb", "mar"] }, title: name }, required: ["kind", "day", "month", "title"], additionalProperties: false },
];

const ajv = new Ajv({ allErrors: true, strict: false });
const validators = SCHEMAS.map((s) => ajv.compile(s));

function checkValid(text, i, what) {
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new Error(`${what}: schema ${i}: not JSON (${e.message}): ${JSON.stringify(text)}`);
  }
  const ok = validators[i](value);
  assert.ok(ok, `${what}: schema ${i}: ${ajv.errorsText(validators[i].errors)}: ${text}`);
  return value;
}

const tests = [];
const test = (name, fn) => tests.push([name, fn]);

const fixtureBase = await kiln.start(["-m", fixture, "--ctx", "256"]);
const fixtureClient = new OpenAI({ baseURL: `${fixtureBase}/v1`, apiKey: "none", maxRetries: 0, timeout: 600_000 });

const schemaFormat = (i) => ({ type: "json_schema", json_schema: { name: `schema${i}`, schema: SCHEMAS[i], strict: true } });

test("random-weight fixture: 200 seeded runs over 10 schemas all validate (openai client)", async () => {
  let tokens = 0;
  let maskMs = 0;
  for (let run = 0; run < 200; run++) {
    const i = run % SCHEMAS.length;
    const r = await fixtureClient.chat.completions.create({
      model: "default",
      messages: [{ role: "user", content: `Answer in JSON (${run})` }],
      response_format: schemaFormat(i),
      temperature: 1,
      top_k: 0,
      top_p: 1,
      min_p: 0,
      max_tokens: 200,
      seed: run,
    });
    assert.equal(r.choices[0].finish_reason, "stop", `run ${run}: ${r.choices[0].message.content}`);
    checkValid(r.choices[0].message.content, i, `fixture run ${run}`);
    tokens += r.usage.completion_tokens;
    maskMs += r.kiln.timings.mask_ms_per_token * r.usage.completion_tokens;
  }
  console.log(`      ${tokens} tokens, mask ${(maskMs / tokens).toFixed(3)} ms/token (vocabulary 800)`);
});

test("a Lark grammar, streaming under a constraint, logit_bias", async () => {
  const grammar = 'start: "The answer is " ANSWER "."\nANSWER: /(yes|no|maybe)/';
  for (let seed = 0; seed < 5; seed++) {
    const g = await fixtureClient.chat.completions.create({ messages: [{ role: "user", content: "?" }], grammar, max_tokens: 40, seed });
    assert.match(g.choices[0].message.content, /^The answer is (yes|no|maybe)\.$/);
  }

  // A stream's deltas under a schema add up to a valid document.
  const stream = await fixtureClient.chat.completions.create({
    messages: [{ role: "user", content: "stream" }],
    response_format: schemaFormat(3),
    max_tokens: 200,
    seed: 11,
    stream: true,
  });
  let text = "";
  let chunks = 0;
  for await (const c of stream) {
    text += c.choices[0]?.delta?.content ?? "";
    chunks++;
  }
  assert.ok(chunks > 3, `${chunks} chunks`);
  checkValid(text, 3, "stream");

  // logit_bias: greedy picks the argmax; +100 on another token makes it the reply, -100 on
  // the argmax removes it.
  const base = { messages: [{ role: "user", content: "bias" }], temperature: 0, max_tokens: 1, logprobs: true };
  const plain = await fixtureClient.chat.completions.create(base);
  const first = plain.kiln.ids[0];
  const other = (first + 37) % 700;
  const forced = await fixtureClient.chat.completions.create({ ...base, logit_bias: { [other]: 100 } });
  assert.equal(forced.kiln.ids[0], other);
  const banned = await fixtureClient.chat.completions.create({ ...base, logit_bias: { [first]: -100 } });
  assert.notEqual(banned.kiln.ids[0], first);
  // The log-probability reported is the model's own, not the biased one.
  assert.equal(forced.choices[0].logprobs.content[0].logprob < plain.choices[0].logprobs.content[0].logprob, true);
});

test("bad constraints are 400s naming the field", async () => {
  const cases = [
    [{ response_format: { type: "xml" } }, /response_format/],
    [{ response_format: { type: "json_schema", json_schema: { name: "x" } } }, /json_schema\.schema/],
    [{ response_format: { type: "json_object" }, grammar: 'start: "a"' }, /grammar/],
    [{ grammar: "start: (" }, /grammar/],
    [{ logit_bias: { abc: 1 } }, /logit_bias/],
    [{ logit_bias: { 5: 500 } }, /logit_bias/],
    [{ logit_bias: { 99999: 1 } }, /logit_bias/],
    [{ response_format: { type: "json_schema", json_schema: { name: "x", schema: { type: "object", properties: { a: { $ref: "http://example.com/s.json" } } } } } }, /response_format/],
  ];
  for (const [extra, want] of cases) {
    const r = await fetch(`${fixtureBase}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ messages: [{ role: "user", content: "x" }], max_tokens: 4, ...extra }),
    });
    const body = await r.text();
    assert.equal(r.status, 400, `${JSON.stringify(extra)}: ${r.status} ${body}`);
    assert.match(JSON.parse(body).error.message, want, `${JSON.stringify(extra)}: ${body}`);
  }
});

test("Vercel AI SDK: generateObject with a zod schema", async () => {
  const kiln = createOpenAICompatible({ name: "kiln", baseURL: `${fixtureBase}/v1`, supportsStructuredOutputs: true });
  const schema = z.object({
    city: z.string().max(10),
    population: z.number().int().min(0).max(1000),
    coastal: z.boolean(),
  });
  for (let seed = 0; seed < 3; seed++) {
    const { object } = await generateObject({ model: kiln("default"), schema, prompt: "A city as JSON", seed, maxOutputTokens: 200, maxRetries: 0 });
    assert.deepEqual(Object.keys(object).sort(), ["city", "coastal", "population"]);
    assert.ok(schema.safeParse(object).success, JSON.stringify(object));
  }
});

if (existsSync(realModel)) {
  test(`SmolLM2-135M-Instruct: ${realRuns} seeded runs over the 10 schemas all validate`, async () => {
    const base = await kiln.start(["-m", realModel, "--ctx", "512"]);
    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "none", maxRetries: 0, timeout: 600_000 });
    let tokens = 0;
    let maskMs = 0;
    for (let run = 0; run < realRuns; run++) {
      const i = run % SCHEMAS.length;
      const r = await client.chat.completions.create({
        messages: [{ role: "user", content: `Give an example JSON value for this schema: ${JSON.stringify(SCHEMAS[i])}` }],
        response_format: schemaFormat(i),
        max_tokens: 160,
        seed: run,
      });
      checkValid(r.choices[0].message.content, i, `SmolLM2 run ${run}`);
      tokens += r.usage.completion_tokens;
      maskMs += r.kiln.timings.mask_ms_per_token * r.usage.completion_tokens;
    }
    console.log(`      ${tokens} tokens, mask ${(maskMs / tokens).toFixed(3)} ms/token (vocabulary 49152)`);
    // json_object: any JSON object (its strings and nesting are unbounded, so a random-weight
    // model may wander to the token limit; a real one closes it).
    for (let seed = 0; seed < 3; seed++) {
      const obj = await client.chat.completions.create({
        messages: [{ role: "user", content: "Describe a cat as a JSON object." }],
        response_format: { type: "json_object" },
        max_tokens: 200,
        seed,
      });
      const v = JSON.parse(obj.choices[0].message.content);
      assert.ok(typeof v === "object" && v !== null && !Array.isArray(v), obj.choices[0].message.content);
    }
  });
} else if (process.env.KILN_REQUIRE_REAL_MODELS) {
  test("SmolLM2-135M-Instruct is cached", () => assert.fail(`${realModel} is missing (tools/fetch-real-model.sh)`));
} else {
  console.log(`NOT RUN: the SmolLM2 runs (${realModel} is missing; tools/fetch-real-model.sh fetches it)`);
}

let failed = 0;
for (const [name, fn] of tests) {
  const t0 = Date.now();
  try {
    await fn();
    console.log(`ok   ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}\n${e.stack}\n--- kiln serve log (tail) ---\n${kiln.log.slice(-4000)}`);
  }
}
kiln.killAll();
process.exit(failed ? 1 : 0);
