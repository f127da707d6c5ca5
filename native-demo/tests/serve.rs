//! `kiln serve` end to end: web/tests/serve.test.mjs drives this build's binary with the official
//! OpenAI client library (the `openai` npm package from web/node_modules: `cd web && npm ci`)
//! and plain HTTP.

use std::process::Command;

#[test]
fn serve_answers_the_openai_client() {
    let root = format!("{}/..", env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::path::Path::new(&format!("{root}/web/node_modules/openai")).is_dir(),
        "the serve test needs Node and the web package's dev dependencies: (cd web && npm ci)"
    );
    let out = Command::new("node")
        .arg(format!("{root}/web/tests/serve.test.mjs"))
        .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run node (Node 20 or newer is needed for the serve test)");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{log}");
    assert!(out.status.success(), "serve tests failed:\n{log}");
}
