//! Structured output end to end: web/tests/structured.test.mjs drives this build's `kiln serve`
//! with the official OpenAI client and the Vercel AI SDK (from web/node_modules: `cd web && npm
//! ci`) and validates every constrained reply with Ajv.

mod common;

#[test]
fn structured_output_validates_with_the_clients_apps_use() {
    common::run_node_test(
        "structured.test.mjs",
        &["openai", "ai", "@ai-sdk/openai-compatible", "ajv", "zod"],
    );
}
