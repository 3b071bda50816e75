#!/usr/bin/env bash
# Collect what bench/export_geometry.py needs on a machine without network (run here, from the repo root):
#   bash bench/carry_export.sh 3.12      # the device's python3 version (python3 --version there)
# Fills two gitignored folders, to carry to the device:
#   .whl/export/          wheels: peft, accelerate, fire, openai-harmony, tiktoken, diskcache, ...
#   .cache/gptoss/        the pinned llama.cpp as the images ship it (python3 -m gptoss.llamacpp install):
#                         llama.cpp/bin (llama-quantize + libllama/libggml, CPU build, GGML_NATIVE=OFF) and
#                         llama.cpp/src (converter, conversion/, gguf-py/, the llama_cpp bindings), and
#                         the o200k_base vocabulary
# On the device:
#   python3 -m pip install --no-index --find-links .whl/export -r bench/export_requirements.txt
#   export GPTOSS_CACHE=$PWD/.cache/gptoss GPTOSS_O200K_GZ=$PWD/.cache/gptoss/o200k_base.tiktoken.gz \
#          GPTOSS_LLAMA_CPP_BIN=$PWD/.cache/gptoss/llama.cpp/bin GPTOSS_LLAMA_CPP_SRC=$PWD/.cache/gptoss/llama.cpp/src
#   python3 bench/export_geometry.py --stages fixture,adapter,merge,peft-merge,compare
#   python3 bench/export_geometry.py --stages mxfp4-base,merge-mxfp4,export,report
set -euo pipefail
PYVER="${1:?usage: bash bench/carry_export.sh PYTHON_VERSION (e.g. 3.12)}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

rm -rf .whl/export && mkdir -p .whl/export
grep -v '^#' bench/export_requirements.txt | xargs \
  python3 -m pip download --quiet --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps -d .whl/export
python3 -m pip download --quiet --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl/export termcolor psutil regex pydantic  # small; with their own dependencies

# Only the carried folders are replaced (GPTOSS_CACHE, where the build lives, may be .cache/gptoss too).
rm -rf .cache/gptoss/llama.cpp && mkdir -p .cache/gptoss
python3 -m gptoss.llamacpp install .cache/gptoss/llama.cpp --tools llama-quantize  # builds first if needed
cp "$(python3 -c 'from gptoss import vocab; print(vocab.packaged_vocab_path())')" .cache/gptoss/o200k_base.tiktoken.gz
find .cache/gptoss/llama.cpp -name __pycache__ -prune -exec rm -rf {} +
du -sh .whl/export .cache/gptoss/llama.cpp .cache/gptoss/o200k_base.tiktoken.gz
du -cb .whl/export .cache/gptoss/llama.cpp .cache/gptoss/o200k_base.tiktoken.gz | tail -1 | awk '{ printf "carry total: %.1f MiB (limit 64 MiB)\n", $1 / 1048576 }'
