#!/usr/bin/env bash
# README's first run from a fresh clone, timed in one piece (issue 18): an empty HOME (no pip, HF or
# gptoss caches), a new venv, the README's set-up line, then `gptoss pipeline --demo` twice (the first
# run builds llama.cpp on first use; the second is the warm demo).
#   bash bench/first_run.sh [REPO] [WORK]      (defaults: this checkout, /tmp/first-run)
set -euo pipefail
REPO=${1:-$(cd "$(dirname "$0")/.." && pwd)}
WORK=${2:-/tmp/first-run}
rm -rf "$WORK" && mkdir -p "$WORK/home"
export HOME=$WORK/home XDG_CACHE_HOME=$WORK/home/.cache PIP_CACHE_DIR=$WORK/home/.cache/pip
git clone -q "$REPO" "$WORK/repo"
python3 -m venv "$WORK/venv"
source "$WORK/venv/bin/activate"
cd "$WORK/repo"
uptime
t0=$(date +%s)
python3 -m pip install -q torch==2.13.0 && python3 -m pip install -q -e '.[dev]'
t1=$(date +%s); echo "set-up: $((t1 - t0)) s"
gptoss pipeline --demo --work demo > "$WORK/demo1.log" 2>&1
t2=$(date +%s); echo "first demo (builds llama.cpp on first use): $((t2 - t1)) s"
rm -rf demo
gptoss pipeline --demo --work demo > "$WORK/demo2.log" 2>&1
t3=$(date +%s); echo "warm demo: $((t3 - t2)) s"
echo "set-up + first demo: $((t2 - t0)) s"
uptime
