#!/usr/bin/env bash
# Regenerates docker/locks/*.txt: the exact versions each image installs (pip -r), from pyproject.toml.
#   export.txt  core + export extra (CPU torch comes from TORCH_CPU_INDEX or the wheelhouse)
#   serve.txt   core + serve extra (no torch: serve-cpu and serve-llamacpp)
#   chat.txt    core + chat extra (no torch: the ui image)
#   train.txt   core + train + serve + unsloth extras for the CUDA images (train, serve-unsloth): resolved
#               for their Python (3.12, Ubuntu 24.04) against the CUDA torch pinned in docker/Dockerfile
#               (TORCH_VERSION, also in cuda-constraints.txt), which the lock leaves out (the image installs it)
# Needs uv (pip install uv). The project itself is installed with --no-deps after the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
# Resolve against the CPU build of torch (no CUDA packages in its metadata): from PyTorch's CPU
# index, or a folder of wheels (TORCH_CPU_WHEELS, e.g. /opt/wheels) where that index is unreachable.
TORCH_CPU_VERSION=2.13.0+cpu
source_flags=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
[ -n "${TORCH_CPU_WHEELS:-}" ] && source_flags=(--find-links "$TORCH_CPU_WHEELS")
overrides=$(mktemp)
trap 'rm -f "$overrides"' EXIT
echo "torch==$TORCH_CPU_VERSION" >"$overrides"
compile() {
  local out=$1; shift
  uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header \
     --no-annotate "${source_flags[@]}" --override "$overrides" "$@" -o "docker/locks/$out" --quiet
}
compile export.txt --extra export
compile serve.txt --extra serve
compile chat.txt --extra chat
# train and serve-unsloth install the CUDA torch pinned in docker/Dockerfile, so torch is left out;
# resolved against docker/locks/cuda-constraints.txt (that torch, and the torchao that works with it).
# PyPI's Linux torch of that version is the CUDA build, so no extra index is needed to resolve.
uv pip compile pyproject.toml --python-version 3.12 --python-platform x86_64-manylinux_2_28 --no-header --no-annotate \
   --constraint docker/locks/cuda-constraints.txt --extra train --extra serve --extra unsloth --no-emit-package torch \
   -o docker/locks/train.txt --quiet
echo "locks written: $(ls docker/locks)"
