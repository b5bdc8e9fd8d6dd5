#!/usr/bin/env bash
# Render a `medbench report` page in headless Chromium and check the screenshot is not blank.
#
# Why: the HTML is self-contained (inline CSS, base64 PNGs); a broken data URI or a CSS slip shows up only
# when a real browser draws the page. This script draws it the way a reader would and fails if the result
# is missing, tiny, or (nearly) one colour.
#
# Usage:
#   scripts/check_report.sh [-r RESULTS_DIR] [-o REPORT_DIR] [-s SCREENSHOT_PNG]
#     -r  (re)generate the report from RESULTS_DIR first (python -m medvlp_bench.report --results ...)
#     -o  report folder holding index.html (default: RESULTS_DIR/report, or ./results/report)
#     -s  where to write the screenshot (default: REPORT_DIR/screenshot.png)
#   Environment: CHROMIUM (default: chromium), PYTHON (default: python), WINDOW (default: 1400,4000).
#
# Needs Chromium (Debian: `apt-get install -y chromium`). --no-sandbox is needed when running as root
# (containers); the page runs no JavaScript and loads nothing from the network.
# Exit status: 0 = rendered and non-trivial, 1 = check failed, 2 = usage or missing tools.
set -euo pipefail

RESULTS="" REPORT="" SHOT=""
while getopts "r:o:s:h" opt; do
  case "$opt" in
    r) RESULTS="$OPTARG" ;;
    o) REPORT="$OPTARG" ;;
    s) SHOT="$OPTARG" ;;
    *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
CHROMIUM="${CHROMIUM:-chromium}"
PYTHON="${PYTHON:-python}"
WINDOW="${WINDOW:-1400,4000}"
REPORT="${REPORT:-${RESULTS:-results}/report}"
SHOT="${SHOT:-$REPORT/screenshot.png}"

command -v "$CHROMIUM" >/dev/null || { echo "check_report: $CHROMIUM not found (apt-get install -y chromium)" >&2; exit 2; }
if [[ -n "$RESULTS" ]]; then
  "$PYTHON" -m medvlp_bench.report --results "$RESULTS" --out "$REPORT" || exit 2
fi
INDEX="$(cd "$REPORT" 2>/dev/null && pwd)/index.html" || true
[[ -f "$INDEX" ]] || { echo "check_report: no index.html in $REPORT (generate it with -r RESULTS_DIR)" >&2; exit 2; }

mkdir -p "$(dirname "$SHOT")"
SHOT="$(cd "$(dirname "$SHOT")" && pwd)/$(basename "$SHOT")"
PROFILE="$(mktemp -d)"
trap 'rm -rf "$PROFILE"' EXIT
rm -f "$SHOT"
timeout 120 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars \
  --user-data-dir="$PROFILE" --no-first-run --window-size="$WINDOW" --screenshot="$SHOT" "file://$INDEX" \
  >"$PROFILE/chromium.log" 2>&1 || { cat "$PROFILE/chromium.log" >&2; echo "check_report: chromium failed" >&2; exit 1; }
[[ -s "$SHOT" ]] || { cat "$PROFILE/chromium.log" >&2; echo "check_report: no screenshot written" >&2; exit 1; }

# Non-trivial: the expected size, and enough ink and colours that text, tables and figures were drawn.
"$PYTHON" - "$SHOT" "$WINDOW" <<'EOF'
import sys

import numpy as np
from PIL import Image

path, window = sys.argv[1], sys.argv[2]
img = np.asarray(Image.open(path).convert("RGB"))
h, w = img.shape[:2]
want_w, want_h = (int(v) for v in window.split(","))
ink = float((img.min(axis=2) < 200).mean())  # share of pixels that are not near-white
colours = len(np.unique(img.reshape(-1, 3)[:: 7], axis=0))
print(f"check_report: {path}: {w}x{h}, {ink:.1%} non-white, {colours} colours")
problems = []
if (w, h) != (want_w, want_h):
    problems.append(f"size {w}x{h}, expected {want_w}x{want_h}")
if ink < 0.01:
    problems.append("almost blank page")
if colours < 50:
    problems.append("too few colours: figures did not render")
if problems:
    sys.exit("check_report: FAILED: " + "; ".join(problems))
print("check_report: OK")
EOF
