#!/usr/bin/env bash
# The device run, on a machine with a real GPU, from what tools/device-prepare.sh put in .devbin/
# (and .gl/): about 6 minutes, every step under its own timeout, everything it prints also
# written under $OUT.
#
#   1. the kernel tests (every variant against its CPU reference, the cooperative-matrix ones
#      where the adapter has them);
#   2. `kiln bench kernels` (its matvec rows at 1, 2, 4 and 8 per workgroup; its GEMM and
#      attention rows with f32 tiles and without cooperative matrices), `kiln bench text`
#      (per-kernel GPU time, dispatches, host cost serial and pipelined), `kiln bench image`,
#      `kiln bench embed` (64 inputs batched against 64 single calls);
#   3. the same GGUF files through llama.cpp's llama-bench (Vulkan, all layers on the GPU) and
#      `kiln bench text --model`: SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M rebuilt
#      from their headers with random data, a random Qwen 3.5-shaped Q8_0 (Gated DeltaNet:
#      the llama-bench carried, llama-cpp-python 0.3.9's, predates it and shows "-") and a
#      random Llama-3.2-1B-shaped Q4_K_M; a table of tok/s and Kiln / llama.cpp ratios.
#      The kernel tests of step 1 include the Gated DeltaNet kernels (`delta`) and the
#      mixture-of-experts ones (`moe`: router, lists, the expert-indexed GEMM, combine).
#
#   bash tools/device-check.sh            (the `run` tool: carry [".devbin", ".gl"])
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
t_start=$(date +%s)
log() { echo "== $* ($(($(date +%s) - t_start)) s)"; }

# The Vulkan loader and the NVIDIA driver's ICD.
if ! ldconfig -p | grep -q libvulkan.so.1 && ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
    [ -f "$icd" ] && export VK_DRIVER_FILES="$icd" && break
done
find .devbin -name '*.gz' -exec gunzip -f {} \;
chmod +x .devbin/kiln .devbin/llama-bench .devbin/tests/* 2>/dev/null
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
# The tests find their fixtures through the path they were built in.
for src in ${DEVICE_SRC_PATHS:-/work/main}; do
    mkdir -p "$(dirname "$src")" && [ -e "$src" ] || ln -s "$PWD" "$src"
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true
.devbin/kiln info 2>&1 | grep -v XDG | head -5 | tee "$out/adapter.txt"
status=0

log "kernel tests"
for t in .devbin/tests/*; do
    echo "-- $(basename "$t")"
    timeout 120 "$t" --test-threads=4 2>&1 | grep -E "^test |test result|panicked|GPU error|expected|left|right" |
        grep -v "^test .* ok$" | tee -a "$out/tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
done

log "bench kernels"
timeout 90 .devbin/kiln bench kernels 2>&1 | grep -v XDG | tee "$out/bench-kernels.md"
# The matvec's rows per workgroup (KILN_MATVEC=WG,ITEMS; WG is the subgroup size where the
# adapter's is fixed): which of 1, 2, 4 and 8 reads fastest here.
for items in 1 2 4 8; do
    echo "-- matvec, $items rows per workgroup"
    KILN_MATVEC="64,$items" timeout 60 .devbin/kiln bench kernels 2>&1 | grep -i "matvec" | tee -a "$out/matvec-sweep.md"
done
# The GEMM, convolution and prefill attention with f32 tiles (KILN_F32_MATH=1) and with f16
# tiles but no cooperative matrices (KILN_COOP=0), against the default run above.
for v in KILN_F32_MATH=1 KILN_COOP=0; do
    echo "-- $v"
    env "$v" timeout 60 .devbin/kiln bench kernels 2>&1 | grep -E "adapter|GEMM|conv|attention" | tee -a "$out/gemm-variants.md"
done
log "bench text"
timeout 90 .devbin/kiln bench text 2>&1 | grep -v XDG | tee "$out/bench-text.md"
log "bench image"
timeout 90 .devbin/kiln bench image 2>&1 | grep -v XDG | tee "$out/bench-image.md"
log "bench embed (issue 28: 64 inputs batched vs 64 single calls, target >= 8x)"
timeout 60 .devbin/kiln bench embed --quick 2>&1 | grep -v XDG | tee "$out/bench-embed.md"
log "bench parallel (issue 28: 4 slots' aggregate decode vs one stream)"
timeout 60 .devbin/kiln bench parallel 2>&1 | grep -v XDG | tee "$out/bench-parallel.md"

log "GGUF files"
models=$(mktemp -d)
trap 'rm -rf "$models"' EXIT
for h in .devbin/models/*.hdr.gguf; do
    [ -e "$h" ] || continue
    timeout 60 .devbin/kiln bench gguf --like "$h" --out "$models/$(basename "$h" .hdr.gguf).gguf" || status=1
done
timeout 60 .devbin/kiln bench gguf --llama-1b --out "$models/llama-3.2-1b-shaped-q4_k_m.gguf" || status=1

log "Kiln and llama.cpp on the same files"
{
    echo "| model (random weights, the real file's layout) | Kiln prefill tok/s | llama.cpp prefill | Kiln decode tok/s | llama.cpp decode | Kiln / llama.cpp (prefill, decode) |"
    echo "|---|---|---|---|---|---|"
} | tee "$out/vs-llama.md"
# (No Python on the device: the JSON and llama-bench's Markdown are read with grep and awk.)
num() { grep -o "\"$1\":[0-9.e+-]*" | head -1 | cut -d: -f2; }
for m in "$models"/*.gguf; do
    k=$(timeout 90 .devbin/kiln bench text --model "$m" --json 2>/dev/null | tail -1)
    kp=$(echo "$k" | num prefill_tok_s | awk 'NF {printf "%.1f", $1}')
    kd=$(echo "$k" | num decode_tok_s | awk 'NF {printf "%.1f", $1}')
    l=""
    [ -x .devbin/llama-bench ] && l=$(timeout 90 .devbin/llama-bench -m "$m" -p 128 -n 128 -ngl 99 -r 3 -o md 2>/dev/null)
    lp=$(echo "$l" | grep "pp128" | awk -F'|' '{print $(NF-1)}' | awk '{print $1}')
    ld=$(echo "$l" | grep "tg128" | awk -F'|' '{print $(NF-1)}' | awk '{print $1}')
    ratio=$(awk -v a="$kp" -v b="$lp" -v c="$kd" -v d="$ld" 'BEGIN { if (b > 0 && d > 0) printf "%.2fx, %.2fx", a / b, c / d; else print "-" }')
    echo "| $(basename "$m" .gguf) | ${kp:--} | ${lp:--} | ${kd:--} | ${ld:--} | $ratio |" | tee -a "$out/vs-llama.md"
done
log "done, status $status"
exit $status
