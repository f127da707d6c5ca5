//! `kiln serve` end to end: web/tests/serve.test.mjs drives this build's binary with the official
//! OpenAI client library (the `openai` npm package from web/node_modules: `cd web && npm ci`)
//! and plain HTTP.

mod common;

#[test]
fn serve_answers_the_openai_client() {
    common::run_node_test("serve.test.mjs", &["openai"]);
}
