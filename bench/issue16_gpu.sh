#!/usr/bin/env bash
# Issue 16's GPU evidence in three device calls of < 10 minutes on one machine that stays warm
# (carry bench/carry, made here by `bash bench/serve_gpu.sh prepare`). Results land in .cache/results/
# and are packed into $OUT/<call>.tgz at the end of every call, also when a stage ran out of time.
#
#   bash bench/issue16_gpu.sh models   # CUDA build, beside: geometry-20b 8 and 24 layers (MXFP4 release layout
#                                      # written directly -> Q8_0 GGUF with MXFP4 experts -> Q4_K_M), 2-layer bf16
#   bash bench/issue16_gpu.sh sweep    # 8 layers Q4_K_M: llama-server flag sweep, then our API with the winner
#   bash bench/issue16_gpu.sh deep     # 24 layers: our API vs llama-server (both files); transformers backend
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 GPTOSS_CACHE="$PWD/.cache/gptoss" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPTOSS_O200K_GZ="$PWD/bench/carry/o200k_base.tiktoken.gz"
R="$PWD/.cache/results"
W="$PWD/.cache/serve-gpu"
mkdir -p "$R" "$W"
call="${1:-}"
pack() { tar czf "${OUT:-/tmp}/$call.tgz" -C "$R" . 2>/dev/null; ls -la "$R"; }
trap pack EXIT
left() { echo $(( ${DEADLINE:-560} - SECONDS )); }  # seconds left in this call

case "$call" in
models)
    nproc; free -g | head -2; df -h . | tail -1
    python3 -c 'import torch, transformers; print("torch", torch.__version__, torch.cuda.is_available(), "transformers", transformers.__version__)'
    bash bench/serve_gpu.sh setup
    (bash bench/serve_gpu.sh build >"$R/build.log" 2>&1; echo "build rc=$?" >>"$R/build.log") &
    build=$!
    convert() {  # fixture + conversion only (the quantize step needs the build: rerun afterwards)
        OUT="$R" timeout "$(left)" bash bench/serve_gpu.sh models "$1" --fixture-format mxfp4 --convert-type q8_0 \
            --drop-fixture >"$R/models$1.log" 2>&1
        echo "models $1 rc=$?" >>"$R/models$1.log"
    }
    convert 8 &
    convert 24 &
    (timeout "$(left)" python3 -m gptoss fixture geometry-20b --layers 2 --out "$W/geometry-20b-2l-bf16" >"$R/hf2.log" 2>&1;
     echo "hf2 rc=$?" >>"$R/hf2.log") &
    wait "$build"; tail -3 "$R/build.log"
    wait
    for n in 8 24; do  # now the Q4_K_M step
        OUT="$R" timeout "$(left)" bash bench/serve_gpu.sh models "$n" --fixture-format mxfp4 --convert-type q8_0 \
            >>"$R/models$n.log" 2>&1; echo "quantize $n rc=$?" >>"$R/models$n.log"
    done
    tail -2 "$R"/models*.log; ls -la "$W"; df -h . | tail -1
    ;;
sweep)
    OUT="$R" timeout "$(( $(left) - 200 ))" bash bench/serve_gpu.sh sweep 8 --fixture-format mxfp4 --convert-type q8_0 \
        --quants Q4_K_M >"$R/sweep.log" 2>&1
    winner=$(python3 -c "import json; r=json.load(open('$R/sweep-8l-Q4_K_M.json')); w=r['winner']; print(' '.join(r['configs'][w]['flags']))" 2>/dev/null \
             || echo "--flash-attn on --kv-unified --kv-unified-per-slot 2048")
    echo "winner flags: $winner" | tee "$R/winner.txt"
    OUT="$R" timeout "$(left)" bash bench/serve_gpu.sh api 8 --fixture-format mxfp4 --convert-type q8_0 --quants Q4_K_M \
        --engine-args="$winner" --py-spy >"$R/api8.log" 2>&1
    ;;
deep)
    winner=$(cat "$R/winner.txt" 2>/dev/null | sed 's/^winner flags: //')
    OUT="$R" timeout "$(( $(left) - 150 ))" bash bench/serve_gpu.sh api 24 --fixture-format mxfp4 --convert-type q8_0 \
        --quants Q8_0,Q4_K_M --streams 1,4,8,16 --engine-args="$winner" >"$R/api24.log" 2>&1
    if [ -f bench/transformers_gpu.py ]; then
        OUT="$R" timeout "$(left)" python3 bench/transformers_gpu.py --model "$W/geometry-20b-2l-bf16" --device cuda:0 \
            >"$R/transformers.log" 2>&1
    fi
    ;;
*)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
