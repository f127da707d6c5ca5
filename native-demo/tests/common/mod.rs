//! Running a Node end-to-end script of web/tests against this build's `kiln`.

use std::process::Command;

/// Runs `node web/tests/{script}` with `KILN_BIN` set to this build's binary, after checking
/// that the web package's dev dependencies `deps` are installed; fails with the script's output.
pub fn run_node_test(script: &str, deps: &[&str]) {
    let root = format!("{}/..", env!("CARGO_MANIFEST_DIR"));
    for dep in deps {
        assert!(
            std::path::Path::new(&format!("{root}/web/node_modules/{dep}")).is_dir(),
            "{script} needs Node and the web package's dev dependencies: (cd web && npm ci)"
        );
    }
    let out = Command::new("node")
        .arg(format!("{root}/web/tests/{script}"))
        .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .unwrap_or_else(|e| panic!("run node for {script} (Node 20 or newer is needed): {e}"));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{log}");
    assert!(out.status.success(), "{script} failed:\n{log}");
}
