#!/usr/bin/env bash
# Both benchmarks at sd15@512 in bf16 on one GPU (H100/H200), in one command, under 8 minutes.
#
# The GPU machines have torch and jax 0.11 with CUDA, transformers 5 and no diffusers, and no
# network. Fill benchmarks/wheels (git-ignored) beforehand, where PyPI is reachable:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d benchmarks/wheels diffusers==0.39.0 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2
#
# then run, on the GPU machine: bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ls benchmarks/wheels/*.whl > /dev/null || { echo "benchmarks/wheels is empty: see the pip download line at the top of $0"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/apl-site benchmarks/wheels/*.whl
# Half the GPU for JAX, so PyTorch fits beside it where one process runs both (sampling.py)
export PYTHONPATH=/tmp/apl-site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, torch, diffusers, transformers; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
echo "== train step, sd15@512, bf16, one doubled UNet call (the default)"
timeout 200 python3 benchmarks/train_step.py --config sd15@512 --dtype bfloat16 --steps 10 --warmup 2 --cache /tmp/apl-bench
echo "== train step, sd15@512, bf16, two UNet calls and cached VAE encodings (fused_unet_passes=false, cache_latents=true)"
timeout 130 python3 benchmarks/train_step.py --config sd15@512 --dtype bfloat16 --steps 10 --warmup 2 --cache /tmp/apl-bench --split-passes --cached-latents
echo "== sampling, sd15-random 512 px, DDIM 20 steps, batch 4"
timeout 150 python3 benchmarks/sampling.py --model sd15-random --dtype bfloat16 --steps 20 --batch 4 --repeats 3
