#!/usr/bin/env bash
# Screenshot of `kiln image --window` under a virtual X server (Xvfb), as in the README:
#   apt-get install xvfb imagemagick && bash tools/window-screenshot.sh native-demo/screenshots/window.png
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
shot="${1:-window.png}"
kiln="${KILN:-$root/target/debug/kiln}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
display=":${DISPLAY_NUM:-97}"
Xvfb "$display" -screen 0 512x512x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $kiln_pid $xvfb 2>/dev/null || true' EXIT
sleep 1
png="$(mktemp -d)/out.png"
DISPLAY="$display" "$kiln" image --prompt "a red circle on a blue background" --window --out "$png" &
kiln_pid=$!
# The window keeps showing the final image after saving it: wait for the PNG, then grab the screen.
for _ in $(seq 600); do [ -s "$png" ] && break; sleep 0.5; done
[ -s "$png" ] || { echo "kiln did not finish" >&2; exit 1; }
sleep 2
DISPLAY="$display" import -window root "$shot"
echo "wrote $shot"
