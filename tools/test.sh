#!/usr/bin/env bash
# The full test suite: every GPU test on whatever adapter wgpu finds (lavapipe on a machine
# without a GPU), then the browser tests (which build the engine for wasm32 through kiln-web).
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cargo test --workspace
# The model-level tests again with the kernels written for GPUs (lavapipe runs the software
# ones by default): the fused decode graph, the GEMM tiles and the f16 KV cache against
# transformers and diffusers.
KILN_SOFTWARE=0 cargo test -p kiln-tests --test llm --test slots --test chat --test sd --test sdxl --test embed --test default_models
# The npm package in headless Chromium (WebGPU on SwiftShader), compared with the native binary.
bash tools/test-browser.sh
