#!/usr/bin/env bash
# Issue 16's GPU evidence in three device calls of < 10 minutes on one machine that stays warm
# (carry bench/carry, made here by `bash bench/serve_gpu.sh prepare`). Results land in .cache/results/
# and are packed into $OUT/<call>.tgz at the end of every call, also when a stage ran out of time.
#
#   bash bench/issue16_gpu.sh models   # CUDA build, beside: geometry-20b at $LAYERS layers (default 24: MXFP4 release
#                                      # layout written directly -> Q8_0 GGUF with MXFP4 experts -> Q4_K_M);
#                                      # HF2=1 also a 2-layer bf16 checkpoint for the transformers backend
#   bash bench/issue16_gpu.sh sweep    # Q4_K_M: llama-server flag sweep, then our API with the winner (py-spy)
#   bash bench/issue16_gpu.sh deep     # the Q8_0 + MXFP4 file: our API vs llama-server; HF2=1: transformers backend
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 GPTOSS_CACHE="$PWD/.cache/gptoss" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPTOSS_O200K_GZ="$PWD/bench/carry/o200k_base.tiktoken.gz"
R="$PWD/.cache/results"
W="$PWD/.cache/serve-gpu"
mkdir -p "$R" "$W"
call="${1:-}"
L="${LAYERS:-24}"
pack() { tar czf "${OUT:-/tmp}/$call.tgz" -C "$R" . 2>/dev/null; ls -la "$R"; }
trap pack EXIT
left() { echo $(( ${DEADLINE:-560} - SECONDS )); }  # seconds left in this call

case "$call" in
models)
    nproc; free -g | head -2; df -h . | tail -1
    python3 -c 'import torch, transformers; print("torch", torch.__version__, torch.cuda.is_available(), "transformers", transformers.__version__)'
    bash bench/serve_gpu.sh setup
    python3 -m pip install -q --no-index --no-deps bench/carry/wheels/transformers-*.whl
    (bash bench/serve_gpu.sh build >"$R/build.log" 2>&1; echo "build rc=$?" >>"$R/build.log") &
    build=$!
    convert() {  # fixture + conversion only (the quantize step needs the build: rerun afterwards)
        OUT="$R" timeout "$(left)" bash bench/serve_gpu.sh models "$1" --fixture-format mxfp4 --convert-type q8_0 \
            --drop-fixture >"$R/models$1.log" 2>&1
        echo "models $1 rc=$?" >>"$R/models$1.log"
    }
    convert "$L" &
    if [ -n "${HF2:-}" ]; then
        (timeout "$(left)" python3 -m gptoss fixture geometry-20b --layers 2 --out "$W/geometry-20b-2l-bf16" >"$R/hf2.log" 2>&1;
         echo "hf2 rc=$?" >>"$R/hf2.log") &
    fi
    wait "$build"; tail -3 "$R/build.log"
    wait
    # What time is left: the flag sweep on the Q8_0 + MXFP4 file (partial results are kept)
    OUT="$R" timeout "$(left)" bash bench/serve_gpu.sh sweep "$L" --fixture-format mxfp4 --convert-type q8_0 --no-q4 \
        --quants Q8_0 >"$R/sweep.log" 2>&1
    tail -2 "$R"/models*.log; ls -la "$W"; df -h . | tail -1
    ;;
sweep)  # the rest of the sweep, the API with its winner, then (time allowing) Q4_K_M
    OUT="$R" timeout 200 bash bench/serve_gpu.sh sweep "$L" --fixture-format mxfp4 --convert-type q8_0 --no-q4 \
        --quants Q8_0 >>"$R/sweep.log" 2>&1
    winner=$(python3 -c "
import json, glob
r = json.load(open(sorted(glob.glob('$R/sweep-*.json'))[-1]))
ok = {k: v for k, v in r['configs'].items() if 'stream_device' in v and v.get('parallel') == 16}
print(' '.join(ok[max(ok, key=lambda k: ok[k]['stream_device'].get('16', 0))]['flags']))" 2>"$R/winner.err" \
             || echo "--flash-attn on --kv-unified --kv-unified-per-slot 2048")
    echo "winner flags: $winner" | tee "$R/winner.txt"
    OUT="$R" timeout "$(( $(left) - 180 ))" bash bench/serve_gpu.sh api "$L" --fixture-format mxfp4 --convert-type q8_0 --no-q4 \
        --quants Q8_0 --engine-args="$winner" --py-spy >"$R/api$L.log" 2>&1
    OUT="$R" timeout "$(left)" bash bench/serve_gpu.sh api "$L" --fixture-format mxfp4 --convert-type q8_0 --quants Q4_K_M \
        --streams 1,16 --engine-args="$winner" >"$R/api$L-q4.log" 2>&1
    ;;
deep)
    winner=$(cat "$R/winner.txt" 2>/dev/null | sed 's/^winner flags: //')
    OUT="$R" timeout "$(( $(left) - ${HF2:+150} + 0 ))" bash bench/serve_gpu.sh api "$L" --fixture-format mxfp4 --convert-type q8_0 \
        --quants Q8_0 --streams 1,4,8,16 --engine-args="$winner" >"$R/api${L}-q8.log" 2>&1
    if [ -n "${HF2:-}" ]; then
        OUT="$R" timeout "$(left)" python3 bench/transformers_gpu.py --model "$W/geometry-20b-2l-bf16" --device cuda:0 \
            --streams 1,4,8,16 >"$R/transformers.log" 2>&1
    fi
    ;;
*)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
