// Structured output and tool calls against `kiln serve`, with the clients apps use: the official
// `openai` client (response_format json_schema / json_object, the Lark `grammar` extension,
// logit_bias, streaming under a constraint, the 400s; tools with required and named calls,
// streamed tool_calls deltas, a tool result) and the Vercel AI SDK (`generateObject` with a zod
// schema, `generateText` with a tool and its result, through @ai-sdk/openai-compatible). Every constrained output is parsed and validated
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
import { generateObject, generateText, stepCountIs, tool } from "ai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { z } from "zod";
import { KilnServers } from "./kiln-serve.mjs";
import { SCHEMAS } from "./schemas.mjs";
import { existsSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";

const root = join(dirname(fileURLToPath(import.meta.url)), "../..");
const bin = process.env.KILN_BIN ?? join(root, "target/release/kiln");
const fixture = join(root, "tests/fixtures/llm/llama-gqa-f32");
// A fixture with a 512-token context: tool definitions fill a system message.
const toolFixture = join(root, "tests/fixtures/llm/llama3-rope-f16");
const realModel = join(homedir(), ".cache/kiln/models/SmolLM2-135M-Instruct.Q4_1.gguf");
const realRuns = Number(process.env.KILN_STRUCTURED_REAL_RUNS ?? 20);
const env = { ...process.env, XDG_RUNTIME_DIR: process.env.XDG_RUNTIME_DIR ?? tmpdir() };

const kiln = new KilnServers(bin, env);
setTimeout(() => {
  console.log(`FAIL the structured-output tests did not finish in 15 minutes\n--- kiln serve log ---\n${kiln.log}`);
  kiln.killAll();
  process.exit(1);
}, 900_000).unref();

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

const ADD = {
  type: "function",
  function: {
    name: "add",
    description: "Add two digits.",
    parameters: { type: "object", properties: { a: { type: "integer", minimum: 0, maximum: 9 }, b: { type: "integer", minimum: 0, maximum: 9 } }, required: ["a", "b"], additionalProperties: false },
  },
};

test("tools with the openai client: required and named calls, a stream's tool_calls delta, a tool result", async () => {
  const base = await kiln.start(["-m", toolFixture, "--ctx", "512"]);
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "none", maxRetries: 0, timeout: 600_000 });
  const messages = [{ role: "user", content: "What is 2 + 3?" }];
  for (let seed = 0; seed < 4; seed++) {
    const r = await client.chat.completions.create({ messages, tools: [ADD], tool_choice: "required", parallel_tool_calls: false, max_tokens: 60, seed });
    const c = r.choices[0];
    assert.equal(c.finish_reason, "tool_calls", JSON.stringify(c));
    const call = c.message.tool_calls[0];
    assert.equal(call.function.name, "add");
    const args = JSON.parse(call.function.arguments);
    assert.ok(Number.isInteger(args.a) && args.a >= 0 && args.a <= 9 && Number.isInteger(args.b), call.function.arguments);
  }
  const stream = await client.chat.completions.create({ messages, tools: [ADD], tool_choice: { type: "function", function: { name: "add" } }, max_tokens: 60, seed: 9, stream: true });
  const calls = [];
  let finish = null;
  for await (const c of stream) {
    for (const d of c.choices[0]?.delta?.tool_calls ?? []) {
      calls[d.index] ??= { id: d.id, name: "", arguments: "" };
      calls[d.index].name += d.function?.name ?? "";
      calls[d.index].arguments += d.function?.arguments ?? "";
    }
    finish = c.choices[0]?.finish_reason ?? finish;
  }
  assert.equal(finish, "tool_calls");
  assert.equal(calls[0].name, "add");
  JSON.parse(calls[0].arguments);
  // The call and its result go back in the history.
  const followUp = await client.chat.completions.create({
    messages: [...messages, { role: "assistant", content: null, tool_calls: [{ id: calls[0].id, type: "function", function: { name: "add", arguments: calls[0].arguments } }] }, { role: "tool", tool_call_id: calls[0].id, content: "5" }],
    tools: [ADD],
    tool_choice: "none",
    max_tokens: 8,
    seed: 1,
  });
  assert.equal(typeof followUp.choices[0].message.content, "string");
});

test("Vercel AI SDK: generateText with a tool and a tool-result round trip", async () => {
  const base = await kiln.start(["-m", toolFixture, "--ctx", "512"]);
  const provider = createOpenAICompatible({ name: "kiln", baseURL: `${base}/v1`, supportsStructuredOutputs: true });
  let executed = null;
  const result = await generateText({
    model: provider("default"),
    tools: {
      add: tool({
        description: "Add two digits.",
        inputSchema: z.object({ a: z.number().int().min(0).max(9), b: z.number().int().min(0).max(9) }),
        execute: async ({ a, b }) => ((executed = [a, b]), a + b),
      }),
    },
    prompt: "What is 2 + 3?",
    stopWhen: stepCountIs(2),
    prepareStep: ({ stepNumber }) => ({ toolChoice: stepNumber === 0 ? "required" : "none" }),
    // A call takes ~45 tokens of this fixture's small vocabulary; allowed several, a
    // random-weight model goes on calling until the token limit (the SDK passes provider
    // options through as request fields).
    maxOutputTokens: 100,
    providerOptions: { kiln: { parallel_tool_calls: false } },
    seed: 3,
    maxRetries: 0,
  });
  assert.equal(result.steps.length, 2, JSON.stringify(result.steps.map((s) => s.finishReason)));
  assert.equal(result.steps[0].toolCalls[0].toolName, "add");
  assert.ok(executed, "the tool ran");
  assert.equal(result.steps[0].toolResults[0].output, executed[0] + executed[1]);
  assert.equal(typeof result.text, "string");
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
