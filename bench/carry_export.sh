#!/usr/bin/env bash
# Collect what bench/export_geometry.py needs on a machine without network (run here, from the repo root):
#   bash bench/carry_export.sh 3.12      # the device's python3 version (python3 --version there)
# Fills two gitignored folders, to carry to the device:
#   .whl/export/     wheels: peft, accelerate, fire, openai-harmony, tiktoken, llama-cpp-python 0.3.36, ...
#   .cache/gptoss/   the pinned llama.cpp converter (convert_hf_to_gguf.py, conversion/, gguf-py/),
#                    llama-quantize (CPU build, GGML_NATIVE=OFF) and the o200k_base vocabulary
# On the device:
#   python3 -m pip install --no-index --find-links .whl/export -r bench/export_requirements.txt
#   export GPTOSS_CACHE=$PWD/.cache/gptoss GPTOSS_O200K_GZ=$PWD/.cache/gptoss/o200k_base.tiktoken.gz
#   python3 bench/export_geometry.py --stages fixture,adapter,merge,peft-merge,compare
#   python3 bench/export_geometry.py --stages mxfp4-base,merge-mxfp4,export,report
set -euo pipefail
PYVER="${1:?usage: bash bench/carry_export.sh PYTHON_VERSION (e.g. 3.12)}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LLAMA="${GPTOSS_CACHE:-$HOME/.cache/gptoss}/llama.cpp-0.3.36"
WHEEL="${GPTOSS_CACHE:-$HOME/.cache/gptoss}/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
cd "$ROOT"
python3 -c "from gptoss import llamacpp; llamacpp.source_dir(); llamacpp.tool('llama-quantize', build=False)"

rm -rf .whl/export && mkdir -p .whl/export
grep -v '^#' bench/export_requirements.txt | grep -v llama-cpp-python | xargs \
  python3 -m pip download --quiet --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps -d .whl/export
python3 -m pip download --quiet --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl/export termcolor psutil regex diskcache pydantic  # small; with their own dependencies
cp "$WHEEL" .whl/export/

DST=.cache/gptoss/llama.cpp-0.3.36
rm -rf .cache/gptoss && mkdir -p "$DST/src" "$DST/build-cpu/bin"
cp -r "$LLAMA/src/convert_hf_to_gguf.py" "$LLAMA/src/conversion" "$LLAMA/src/gguf-py" "$LLAMA/src/LLAMA_CPP_COMMIT" \
  "$LLAMA/src/.complete" "$DST/src/"
cp "$LLAMA/build-cpu/bin/llama-quantize" "$DST/build-cpu/bin/"
cp "$(python3 -c 'from gptoss import vocab; print(vocab.packaged_vocab_path())')" .cache/gptoss/o200k_base.tiktoken.gz
find .cache/gptoss -name __pycache__ -prune -exec rm -rf {} +
du -sh .whl/export .cache/gptoss
du -cb .whl/export .cache/gptoss | tail -1 | awk '{ printf "carry total: %.1f MiB (limit 64 MiB)\n", $1 / 1048576 }'
