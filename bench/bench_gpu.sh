#!/usr/bin/env bash
# One device call (10-minute limit) for `gptoss bench` on a GPU (docs/BENCHMARKS.md, "gptoss bench on a GPU"):
#   here:   bash bench/serve_gpu.sh prepare && bash bench/bench_gpu.sh prepare   # bench/carry/ (+ rich wheels)
#   device: bash bench/bench_gpu.sh run [LAYERS]                                # carry bench/carry
# run: the CUDA build of the pinned llama.cpp in the background while `gptoss fixture geometry-20b
# --layers N` is written and converted to F16 (pinned converter); then llama-quantize to Q4_K_M and
# `gptoss bench` on it (server started by bench, llama-bench beside it). Each stage leaves its log
# and a progress line under $OUT, so a call cut short still returns what was done.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=bench/carry
LAYERS="${2:-1}"
WORK="$PWD/.cache/serve-gpu"
OUT="${OUT:-$PWD/.cache/bench-gpu-out}"
export GPTOSS_CACHE="$PWD/.cache/gptoss" GPTOSS_O200K_GZ="$PWD/$CARRY/o200k_base.tiktoken.gz"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$PATH:/usr/local/cuda/bin"
T0=$(date +%s)
note() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a "$OUT/progress.log"; }

case "${1:-}" in
prepare)
    mkdir -p "$CARRY/wheels-bench"
    python3 -m pip download -q --only-binary=:all: --no-deps -d "$CARRY/wheels-bench" rich markdown-it-py mdurl pygments
    du -sh "$CARRY"
    ;;
run)
    mkdir -p "$OUT" "$WORK"
    note "start on $(hostname), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1), $(nproc) CPUs, $(python3 --version)"
    bash bench/serve_gpu.sh setup > "$OUT/setup.log" 2>&1 || { note "setup failed"; tail -20 "$OUT/setup.log"; exit 1; }
    python3 -c "import rich" 2>/dev/null || python3 -m pip install -q --no-index --find-links "$CARRY/wheels-bench" rich >> "$OUT/setup.log" 2>&1
    note "setup done"
    # Only the three tools used here (serve_gpu.sh build adds llama-batched-bench); sm_90 only (CUDA_ARCHS).
    (python3 -c "from gptoss import llamacpp as l; print(l.build_tools(cuda=True, targets=('llama-server', 'llama-bench', 'llama-quantize')))" \
        > "$OUT/build.log" 2>&1; echo $? > "$OUT/build.rc") &
    BUILD=$!
    name="geometry-20b-${LAYERS}l"
    if [ ! -f "$WORK/$name-F16.gguf" ]; then
        python3 -m gptoss fixture geometry-20b --layers "$LAYERS" --out "$WORK/$name" --force > "$OUT/models.log" 2>&1 \
            && note "fixture written" \
            && python3 - "$WORK/$name" "$WORK/$name-F16.gguf" >> "$OUT/models.log" 2>&1 <<'EOF'
import os, subprocess, sys
from gptoss import llamacpp
script, env = llamacpp.converter()
tmp = sys.argv[2] + ".partial"
subprocess.run([sys.executable, str(script), sys.argv[1], "--outfile", tmp, "--outtype", "f16"], env=env, check=True)
os.replace(tmp, sys.argv[2])
EOF
        note "F16 GGUF: $(ls -la "$WORK/$name-F16.gguf" 2>&1)"
    fi
    wait "$BUILD"
    note "CUDA build exit $(cat "$OUT/build.rc"); $(tail -1 "$OUT/build.log")"
    python3 bench/serve_gpu.py models --layers "$LAYERS" --work "$WORK" >> "$OUT/models.log" 2>&1
    note "Q4_K_M: $(ls -la "$WORK/$name-Q4_K_M.gguf" 2>&1)"
    python3 -m gptoss bench --model "$WORK/$name-Q4_K_M.gguf" --device cuda:0 --concurrency 1,2,4,8,16 \
        --prompt-lengths 64,512,2048 --max-tokens 128 --ctx 4096 --out "$OUT/bench_gpu.json" --no-progress \
        > "$OUT/bench.txt" 2>&1
    note "gptoss bench exit $?"
    cat "$OUT/bench.txt" | tail -40
    ;;
*)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac
