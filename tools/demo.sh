#!/usr/bin/env bash
# Kiln's main job with the embedded default models: build `kiln`, make sure a GPU adapter exists
# (installing Mesa's software Vulkan driver, lavapipe, where there is none and we may), then
# generate text and an image.
#
#   bash tools/demo.sh            # writes red-circle.png in the current folder
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out_dir="$(pwd)"

if ! command -v cargo >/dev/null; then
    echo "Rust is missing. Install it with: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
    exit 1
fi

echo "== building kiln (release; the first build takes about 10 minutes on two cores)" >&2
(cd "$root" && cargo build --release --quiet -p kiln-demo)
kiln="$root/target/release/kiln"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

if ! "$kiln" info >/dev/null 2>&1; then
    install=(apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1)
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "== no GPU adapter: installing the software Vulkan driver: ${install[*]}" >&2
        "${install[@]}" >/dev/null 2>&1 || { apt-get update -qq && "${install[@]}" >/dev/null; }
    elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        echo "== no GPU adapter: installing the software Vulkan driver: sudo ${install[*]}" >&2
        sudo "${install[@]}" >/dev/null 2>&1 || { sudo apt-get update -qq && sudo "${install[@]}" >/dev/null; }
    else
        "$kiln" info || true
        echo "No GPU adapter was found. On Debian or Ubuntu, install the software Vulkan driver with:" >&2
        echo "    sudo ${install[*]}" >&2
        exit 1
    fi
fi

echo "== adapters" >&2
"$kiln" info
echo >&2
echo "== kiln text --prompt \"And God said\" --seed 0" >&2
"$kiln" text --prompt "And God said" --max-tokens 48 --seed 0
echo >&2
echo "== kiln image --prompt \"a red circle on a blue background\" --out red-circle.png" >&2
"$kiln" image --prompt "a red circle on a blue background" --out "$out_dir/red-circle.png"
