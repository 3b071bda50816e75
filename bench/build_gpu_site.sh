#!/usr/bin/env bash
# Builds .gpu_site/: the extracted wheels `gptoss train` needs on the offline GPU machine
# (python 3.12, torch 2.11+cu130, transformers 5.17 preinstalled). Carry it and run with
#   PYTHONPATH=$PWD:$PWD/.gpu_site GPTOSS_O200K_GZ=$PWD/.gpu_site/o200k_base.tiktoken.gz HF_HUB_OFFLINE=1
# Stays under ~60 MiB so it fits the 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=.gpu_site
WHEELS=$(mktemp -d)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform linux_x86_64)
PACKAGES=(
  # Unsloth and what it imports (the device has torch, transformers, triton, numpy, pyarrow, pandas, ...)
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 bitsandbytes==0.50.2 trl==1.15.0 torchao==0.18.0
  cut_cross_entropy==25.1.1 tyro==1.0.17 docstring_parser==0.18.0 shtab==1.13.0 typeguard==4.6.0
  datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 msgspec==0.22.0 json5==0.17.3 structlog==26.1.0
  einops==0.8.2 psutil==7.2.2
  # the plain backend
  peft==0.21.2 accelerate==1.15.0
  # gptoss core (bpe-openai's o200k file only, see below)
  fire==0.7.1 termcolor==3.3.0 openai-harmony==0.0.8 pydantic==2.14.3 pydantic_core==2.50.4
  annotated_types==0.8.0 typing_inspection==0.4.5 tiktoken==0.14.0 bpe-openai==0.1.4
)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "${PLATFORMS[@]}" -d "$WHEELS" "${PACKAGES[@]}"
rm -rf "$SITE" && mkdir -p "$SITE"
for w in "$WHEELS"/*.whl; do python3 -m zipfile -e "$w" "$SITE"; done
# bpe-openai's 71 MB binding is not needed: gptoss.vocab reads the o200k file from GPTOSS_O200K_GZ.
cp "$SITE/bpe_openai/data/o200k_base.tiktoken.gz" "$SITE/"
rm -rf "$SITE"/bpe_openai "$SITE"/bpe_openai-*.dist-info
rm -rf "$SITE/studio" "$SITE/unsloth_cli" "$SITE/test"                    # Unsloth Studio, unsloth CLI, torchao's tests
find "$SITE/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
rm -f "$SITE"/torchao/_C*.so                                              # built for another torch; torchao falls back
find "$SITE/unsloth_zoo/mlx" -mindepth 1 ! -name __init__.py ! -name runtime.py -exec rm -rf {} +   # Apple only
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$WHEELS"
du -s --apparent-size -m "$SITE"
