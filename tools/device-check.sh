#!/usr/bin/env bash
# Runs prebuilt test binaries and the kernel benchmark on a machine with a real GPU, through
# Vulkan. Expects: .devbin/tests/* (from `cargo test --workspace --profile device --no-run`),
# .devbin/kiln (the CLI), and optionally .gl/*.deb (the Vulkan loader) when the machine lacks it.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p | grep -q libvulkan.so.1 && ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
nv=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$nv" ] && export VK_DRIVER_FILES="$nv"
# Binaries may travel gzipped to fit transfer limits.
for z in .devbin/*.gz .devbin/tests/*.gz; do [ -e "$z" ] && gunzip -f "$z"; done
chmod +x .devbin/kiln .devbin/tests/* 2>/dev/null
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
# The fixtures are found through the path the tests were built in (DEVICE_SRC_PATHS lists it).
for src in ${DEVICE_SRC_PATHS:-/work/main}; do
    mkdir -p "$(dirname "$src")" && [ -e "$src" ] || ln -s "$PWD" "$src"
done
nvidia-smi -L 2>/dev/null || true
out="${OUT:-/tmp}"
status=0
for t in .devbin/tests/*; do
    case "$(basename "$t")" in cli-*) continue;; esac  # needs the kiln binary at its build path
    echo "== $(basename "$t")"
    "$t" --test-threads=4 2>&1 | grep -E "^test |test result|panicked|GPU error|expected" | grep -v "^test .* ok$" | tee -a "$out/tests.log" || true
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
echo "== bench kernels"
timeout 240 .devbin/kiln bench kernels 2>&1 | grep -v XDG | tee "$out/bench.md"
echo "== bench text"
timeout 240 .devbin/kiln bench text 2>&1 | grep -v XDG | tee "$out/bench-text.md"
echo "== bench image"
timeout 300 .devbin/kiln bench image 2>&1 | grep -v XDG | tee "$out/bench-image.md"
exit $status
