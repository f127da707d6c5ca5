#!/usr/bin/env bash
# The full test suite: every GPU test on whatever adapter wgpu finds (lavapipe on a machine
# without a GPU), then the library build for the browser target.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cargo test --workspace
cargo build -p kiln --target wasm32-unknown-unknown
