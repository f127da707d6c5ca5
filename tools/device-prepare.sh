#!/usr/bin/env bash
# Prepares, on this machine, everything tools/device-check.sh runs on a machine with a real GPU
# and no Rust toolchain, network or checkpoints, in .devbin/ (and the Vulkan loader in .gl/):
#
#   .devbin/kiln.gz              the CLI (profile `device`: release, stripped)
#   .devbin/tests/*.gz           the kernel test binaries (every variant against the CPU reference)
#   .devbin/llama-bench.gz       llama.cpp's llama-bench, Vulkan backend, static (from the
#                                llama.cpp that the PyPI sdist llama-cpp-python 0.3.9 vendors, as
#                                tools/bench-vs.sh builds it; skipped without glslc)
#   .devbin/models/*.hdr.gguf    the headers of the real checkpoints tools/fetch-real-model.sh
#                                fetches (metadata, tokenizer, tensor list), and of the random
#                                Qwen 3.5-shaped file of tools/make_random_qwen35_gguf.py: the
#                                device rebuilds each file's exact layout with random data
#                                (`kiln bench gguf`)
#   .gl/*.deb                    libvulkan1, for a device image without the loader
#
# Then: the `run` tool with carry [".devbin", ".gl"] and the command `bash tools/device-check.sh`.
# The carried paths must stay under 64 MiB; the script prints their size.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
rm -rf .devbin && mkdir -p .devbin/tests .devbin/models .gl

# The kernel tests: the binaries the device runs first.
KERNEL_TESTS="linear attention sample norm elementwise conv graph delta moe"
args=()
for t in $KERNEL_TESTS; do args+=(--test "$t"); done
cargo test -p kiln-tests --profile device --no-run "${args[@]}" --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do cp "$exe" ".devbin/tests/$name"; done
cargo build -p kiln-demo --profile device >&2
cp target/device/kiln .devbin/kiln

# llama-bench with the Vulkan backend, linked statically so that one file travels (the build
# tools/bench-vs.sh makes and uses on this machine's adapter).
if command -v glslc >/dev/null && [ -f /usr/include/vulkan/vulkan.h ]; then
    BENCH_VS_BUILD_ONLY=1 bash tools/bench-vs.sh .devbin/kiln >&2
    cp "${TMPDIR:-/tmp}"/llama-cpp-python-0.3.9/src/vendor/llama.cpp/build-vulkan-static/bin/llama-bench .devbin/
    strip .devbin/llama-bench
else
    echo "llama-bench: not built (apt-get install glslc libvulkan-dev spirv-headers glslang-tools)" >&2
fi

# The real checkpoints' headers (their data is rebuilt at random on the device).
mapfile -t real < <(tools/fetch-real-model.sh all)
qwen35=${TMPDIR:-/tmp}/qwen35-random-q8_0.gguf
if [ ! -f "$qwen35" ]; then
    src=$(dirname "$(dirname "$(dirname "$(bash tools/build-llama-quantize.sh 11434.0.0)")")")
    python3 tools/make_random_qwen35_gguf.py --llama-cpp "$src" "$qwen35" >&2 || true
fi
[ -f "$qwen35" ] && real+=("$qwen35")
for m in "${real[@]}"; do
    base=$(basename "$m" .gguf)
    .devbin/kiln bench gguf --like "$m" --header-only --out ".devbin/models/$base.hdr.gguf" >&2
done

(cd .gl && apt-get download libvulkan1 >/dev/null 2>&1) || echo "libvulkan1: not downloaded" >&2
find .devbin -type f -exec gzip -9f {} \;
du -sh .devbin .gl
total=$(du -sbc .devbin .gl | tail -1 | cut -f1)
[ "$total" -lt $((64 << 20)) ] || echo "warning: $((total >> 20)) MiB, over the 64 MiB a run carries" >&2
