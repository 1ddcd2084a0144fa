#!/usr/bin/env bash
# Render a report.html headless to a PNG, to look at a report the way a reader's browser shows it.
# Usage: benchmarks/screenshot_report.sh REPORT_HTML [OUT_PNG=/tmp/report.png] [WIDTH,HEIGHT=1200,2400]
# Needs Debian's chromium: apt-get update && apt-get install -y chromium
set -euo pipefail
report=${1:?usage: $0 REPORT_HTML [OUT_PNG] [WIDTH,HEIGHT]}
out=${2:-/tmp/report.png}
size=${3:-1200,2400}
command -v chromium >/dev/null || { echo "chromium not found: apt-get update && apt-get install -y chromium" >&2; exit 1; }
[ -f "$report" ] || { echo "no such file: $report" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# everything that would reach the network is switched off: the report must render from the file alone
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --screenshot="$out" --window-size="$size" "file://$(realpath "$report")" 2>/dev/null
echo "$out"
