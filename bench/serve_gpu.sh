#!/usr/bin/env bash
# GPU evidence for `gptoss serve` (serving issue): llama.cpp built with CUDA from the pinned source,
# a geometry-20b fixture as F16 and Q4_K_M GGUFs, llama-bench vs our API at 1/4/8/16 streams.
#
#   bash bench/serve_gpu.sh prepare        # here (PyPI + the llama.cpp cache): fills bench/carry/ (~40 MB)
#   bash bench/serve_gpu.sh prepare-cmake  # only if the GPU machine has no cmake: bench/carry-cmake/ (~29 MB)
#   bash bench/serve_gpu.sh setup          # GPU machine, carry bench/carry: wheels + source only (then build and
#                                          # models can run side by side; models' quantize step needs build)
#   bash bench/serve_gpu.sh build          # GPU machine, carry bench/carry: CUDA build (~3-5 min on 16 cores)
#   bash bench/serve_gpu.sh models [N] [..] # GPU machine: fixture with N layers (default 4) -> F16 -> Q4_K_M
#                                          # (more flags go to serve_gpu.py, e.g. --convert-type q8_0 --drop-fixture)
#   bash bench/serve_gpu.sh bench [N]      # GPU machine: prints JSON, writes $OUT/serve_gpu.json
#   bash bench/serve_gpu.sh sweep [N] [..] # GPU machine: llama-server flag sets side by side ($OUT/sweep.json)
#   bash bench/serve_gpu.sh api [N] [..]   # GPU machine: our API vs llama-server direct, CPU per token, py-spy
#                                          # ($OUT/api.json; e.g. --engine-args="--flash-attn on" --py-spy)
#
# Everything lands under .cache/ in the repo (git-ignored), so the stages can run as separate
# commands on a machine that stays warm; each stage skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=bench/carry
export GPTOSS_CACHE="$PWD/.cache/gptoss"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The o200k vocabulary without the 40 MB bpe-openai wheel (gptoss.vocab checks its sha256).
export GPTOSS_O200K_GZ="$PWD/$CARRY/o200k_base.tiktoken.gz"
LAYERS="${2:-4}"

install_carried_wheels() {
    # Only what the GPU image lacks; never from the network (there is none there).
    python3 - <<'EOF' || python3 -m pip install -q --no-index --find-links "$CARRY/wheels" \
        fastapi uvicorn httpx prometheus-client openai-harmony tiktoken fire pyyaml
import fastapi, uvicorn, httpx, prometheus_client, openai_harmony, tiktoken, fire, yaml  # noqa
EOF
    command -v py-spy >/dev/null || python3 -m pip install -q --no-index --find-links "$CARRY/wheels" py-spy || true
}

unpack_source() {
    # gptoss.llamacpp.source_dir() takes a complete src/ (with its .complete marker) as it is.
    local dest="$GPTOSS_CACHE/llama.cpp-$(python3 -c 'from gptoss.llamacpp import LLAMA_CPP_PYTHON_VERSION as v; print(v)')"
    if [ ! -f "$dest/src/.complete" ]; then
        mkdir -p "$dest" && tar xzf "$CARRY/llama.cpp-src.tgz" -C "$dest"
    fi
}

case "${1:-}" in
prepare)
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
    src_parent="$(python3 -c 'from gptoss import llamacpp; print(llamacpp.source_dir().parent)')"
    tar czf "$CARRY/llama.cpp-src.tgz" -C "$src_parent" src
    cp "$(env -u GPTOSS_O200K_GZ python3 -c 'from gptoss import vocab; print(vocab.packaged_vocab_path())')" "$CARRY/o200k_base.tiktoken.gz"
    for py in 3.10 3.11 3.12 3.13; do
        python3 -m pip download -q --only-binary=:all: --implementation cp --python-version "$py" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            -d "$CARRY/wheels" fastapi uvicorn httpx prometheus-client openai-harmony tiktoken fire pyyaml
    done
    python3 -m pip download -q --only-binary=:all: --no-deps --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --python-version 3.12 --implementation cp -d "$CARRY/wheels" py-spy
    # The transformers backend's continuous batching is written against this machine's transformers (the GPU image's is older).
    python3 -m pip download -q --only-binary=:all: --no-deps -d "$CARRY/wheels" \
        "transformers==$(python3 -c 'import transformers; print(transformers.__version__)')"
    du -sh "$CARRY"
    ;;
prepare-cmake)
    mkdir -p bench/carry-cmake
    python3 -m pip download -q --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --python-version 3.12 --implementation cp -d bench/carry-cmake cmake
    du -sh bench/carry-cmake
    ;;
setup)
    install_carried_wheels
    unpack_source
    ;;
build)
    install_carried_wheels
    unpack_source
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    if ! command -v cmake >/dev/null; then
        [ -d bench/carry-cmake ] || { echo "no cmake here: run 'bash bench/serve_gpu.sh prepare-cmake' and carry bench/carry-cmake" >&2; exit 2; }
        python3 -m pip install -q --no-index --find-links bench/carry-cmake cmake
    fi
    command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || { echo "no nvcc: the CUDA build needs the CUDA toolkit" >&2; exit 2; }
    export PATH="$PATH:/usr/local/cuda/bin"
    python3 -c "from gptoss import llamacpp as l; print(l.build_tools(cuda=True, targets=('llama-server', 'llama-bench', 'llama-batched-bench', 'llama-quantize')))"
    ;;
models)
    install_carried_wheels
    unpack_source
    python3 bench/serve_gpu.py models --layers "$LAYERS" "${@:3}"
    ;;
bench|sweep|api)
    install_carried_wheels
    unpack_source
    python3 bench/serve_gpu.py "$1" --layers "$LAYERS" "${@:3}"
    ;;
*)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
