#!/usr/bin/env bash
# Reproduces docs/report.png, docs/report_quality.png and docs/report_samples.png: screenshots of the HTML report of a real run
# (the toy task of `tether demo --quick`, ~1 minute on two CPU cores), rendered by headless Chromium.
#
# Needs Debian's chromium (run once, as root):
#   apt-get update && apt-get install -y chromium fonts-dejavu-core
# Run from the repository root:
#   bash docs/make_report_screenshot.sh
# REUSE_RUN=1 skips the training run and screenshots the report already in $DEMO_DIR.
set -euo pipefail

DEMO_DIR=${DEMO_DIR:-/tmp/report_demo}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
CHROMIUM=(chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1)

# 1. a real run; PPOTrainer.train() writes report.html into its run directory at the end
if [ -z "${REUSE_RUN:-}" ]; then
    rm -rf "$DEMO_DIR"
    tether demo --quick --output-dir "$DEMO_DIR"
fi
# The run directory is --output-dir itself, or its quick/ subdirectory where the demo keeps one per mode.
REPORT=""
for candidate in "$DEMO_DIR/report.html" "$DEMO_DIR/quick/report.html"; do
    if [ -z "$REPORT" ] && [ -f "$candidate" ]; then REPORT=$candidate; fi
done
[ -n "$REPORT" ] || { echo "no report.html in $DEMO_DIR or $DEMO_DIR/quick" >&2; exit 1; }
echo "screenshots of $REPORT"

# 2. where each <h2> section starts, in CSS pixels: a copy of the report with a script that writes the layout
#    into a body attribute, read back with --dump-dom (a #fragment in the URL does not scroll a screenshot)
python - "$REPORT" "$WORK/probe.html" <<'EOF'
import sys
probe = ('<script>addEventListener("load", () => { const o = {height: document.documentElement.scrollHeight};'
         ' for (const h of document.querySelectorAll("h2")) o[h.textContent] = Math.round(h.getBoundingClientRect().top + scrollY);'
         ' const pre = document.querySelector("pre.config"), text = pre.firstChild, r = document.createRange();'
         ' let end = -1; for (let i = 0; i < 8; i++) end = text.data.indexOf("\\n", end + 1);'
         ' r.setStart(text, 0); r.setEnd(text, end); o.config_8_lines = Math.round(r.getBoundingClientRect().bottom + scrollY);'
         ' document.body.setAttribute("data-layout", JSON.stringify(o)); });</script></body>')
text = open(sys.argv[1], encoding="utf-8").read()
open(sys.argv[2], "w", encoding="utf-8").write(text.replace("</body>", probe))
EOF
"${CHROMIUM[@]}" --window-size=1280,2400 --dump-dom "file://$WORK/probe.html" 2>/dev/null \
    | grep -o 'data-layout="[^"]*"' > "$WORK/layout.txt"
HEIGHT=$(python -c "import html, json, sys; print(json.loads(html.unescape(open(sys.argv[1]).read().strip()[13:-1]))['height'])" "$WORK/layout.txt")

# 3. the whole page at 1280 px wide, then three crops: the top (summary and the first plot sections, up to the
#    "Policy" heading), the text-quality and KL-by-token section, and the bottom (samples, health warnings,
#    the first 8 lines of the config)
"${CHROMIUM[@]}" --window-size="1280,$HEIGHT" --screenshot="$WORK/page.png" "file://$REPORT" 2>/dev/null
python - "$WORK/page.png" "$WORK/layout.txt" <<'EOF'
import html, json, sys
from PIL import Image

layout = json.loads(html.unescape(open(sys.argv[2]).read().strip()[13:-1]))
page = Image.open(sys.argv[1]).convert("RGB")
crops = {
    "docs/report.png": (0, layout["Policy"] - 12),
    "docs/report_quality.png": (layout["Text quality and KL by token"] - 16, layout["Samples"] - 16),
    "docs/report_samples.png": (layout["Samples"] - 16, layout["config_8_lines"] + 1),
}
for path, (top, bottom) in crops.items():
    # 256 colours are plenty for flat plots and text and keep each PNG well under 600 KB.
    shot = page.crop((0, top, page.width, bottom)).quantize(colors=256, dither=Image.Dither.NONE)
    shot.save(path, optimize=True)
    print(f"{path}: {shot.width}x{shot.height}")
EOF
ls -l docs/report.png docs/report_quality.png docs/report_samples.png
