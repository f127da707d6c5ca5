#!/usr/bin/env bash
# Browser tests: builds the wasm module and the npm package (web/pkg), the native `kiln` binary
# the tests compare against, then runs web/tests/browser.test.mjs in headless Chromium with
# WebGPU on SwiftShader, and web/tests/bundlers.test.mjs (the packed package inside Vite and
# webpack production builds and a no-bundler page; installs vite and webpack from the npm
# registry). Exits non-zero when a test fails, including when no adapter appears.
#
# Needs: the wasm32 target, wasm-bindgen-cli at Cargo.lock's version, Node >= 18, chromium,
# lavapipe (for the native side); `bash .ci/run` installs them.
# KILN_WEB_PROFILE=dev builds the wasm without optimizations (faster to build, slower to run).
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || { echo "${CHROMIUM:-/usr/bin/chromium} not found: apt-get install chromium (bash .ci/run installs everything)" >&2; exit 1; }
command -v node >/dev/null || { echo "node not found: apt-get install nodejs npm" >&2; exit 1; }
want=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')
if [ "$want" != "$have" ]; then
    echo "wasm-bindgen-cli $want is needed (found: ${have:-none}): cargo install wasm-bindgen-cli --version $want" >&2
    exit 1
fi

cargo build -p kiln-demo
(
    cd web
    [ -d node_modules/playwright-core ] || npm ci
    if [ "${KILN_WEB_PROFILE:-release}" = dev ]; then npm run build:dev; else npm run build; fi
    node tests/browser.test.mjs "$@"
    # Only for a full run (a --grep run is a single browser test).
    [ $# -gt 0 ] || node tests/bundlers.test.mjs
)
