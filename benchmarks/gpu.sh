#!/usr/bin/env bash
# Both benchmarks at sd15@512 in bf16 on one GPU (H100/H200), in one command of at most ~9 minutes
# (each run has its own time cap, and all of them stop by a common deadline, APL_GPU_BUDGET_S).
#
# The GPU machines have python 3.12 with torch and jax 0.11 (CUDA), transformers 5.17,
# huggingface_hub 1.33, tokenizers 0.23, no diffusers, and no network. Fill benchmarks/wheels
# (git-ignored) beforehand, where PyPI is reachable, with our pins of what the benchmarks import
# that the machine has at another version or not at all (flax and optax too, so that only jax
# differs; regex because transformers 5.23 asks for a newer one):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d benchmarks/wheels diffusers==0.42.1 transformers==5.23.0 flax==0.12.8 optax==0.2.8 regex==2026.11.19
#
# (21 MB; huggingface_hub 2.x would need httpx2, which the machine lacks, and its 1.33 satisfies
# both diffusers and transformers), then run on the GPU machine: bash benchmarks/gpu.sh. Everything
# it prints also goes to $OUT/gpu.log ($OUT is the device tool's folder that comes back;
# /tmp/apl-gpu elsewhere). One failing or cut-off run does not stop the next.
#
# Measured on an H200 (2026-11-27, the Flax-era code): wheels and import check 23 s, export 51 s,
# train step 137 s (60 s of it compiling), sampling 73 s (30 s compiling). The runs, in order of
# priority, need more than the default deadline of 560 s: the last ones are skipped when time is
# short. Choose with APL_GPU_RUNS, e.g. APL_GPU_RUNS="fused8 cached8" bash benchmarks/gpu.sh
# On an H100 the step compiles slower: 91 s at 8 examples (63 s on an H200), 158 s for run batch8.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/apl-gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
TEE=$!
DEADLINE=$((SECONDS + ${APL_GPU_BUDGET_S:-560}))
echo "== $(date -u +%FT%TZ) $(hostname), deadline in $((DEADLINE - SECONDS)) s"

ls benchmarks/wheels/*.whl > /dev/null || { echo "benchmarks/wheels is empty: see the pip download line at the top of $0"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/apl-site benchmarks/wheels/*.whl || exit 2
export PYTHONPATH=/tmp/apl-site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

nvidia-smi
python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|flax|optax|chex|orbax-checkpoint|ml.dtypes|numpy|torch|accelerate|peft|safetensors|nvidia-cudnn-cu[0-9]+) '
echo "(flax, optax, diffusers, transformers and regex come from the carried wheels:)"
# Fail fast (a minute, not eight) if the environment can't even import what the benchmarks use.
python3 - <<'EOF' || { echo "== import check failed: nothing measured"; exit 3; }
import sys
import jax, flax, optax, regex, torch, diffusers, transformers, huggingface_hub, tokenizers
print("python", sys.version.split()[0], "| jax", jax.__version__, jax.devices(), "| flax", flax.__version__,
      "| optax", optax.__version__, "| torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "| diffusers", diffusers.__version__, "| transformers", transformers.__version__,
      "| huggingface_hub", huggingface_hub.__version__, "| tokenizers", tokenizers.__version__)
assert jax.default_backend() == "gpu", jax.default_backend()
for name in ("flax", "optax", "regex", "diffusers", "transformers"):
    assert sys.modules[name].__file__.startswith("/tmp/apl-site/"), (name, sys.modules[name].__file__)
from diffusers import StableDiffusionPipeline, DDIMScheduler  # sampling.py, PyTorch side
from apl_jax import objective, parallel, sampling  # the JAX sides
sys.path.insert(0, "benchmarks")
import torch_reference  # train_step.py, PyTorch side
print("imports ok")
# Our attention names cuDNN's flash kernel for the UNet's bf16 heads: check it against XLA's here
import jax.numpy as jnp
from apl_jax.nn.attention import cudnn_flash_applies, multi_head_attention
q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 4096, 320), jnp.bfloat16) for i in range(3))
def loss(q, impl):
    split = lambda x: x.reshape(2, 4096, 8, 40)
    out = multi_head_attention(q, k, v, heads=8) if impl == "ours" else jax.nn.dot_product_attention(
        split(q), split(k), split(v), implementation="xla").reshape(2, 4096, 320)
    return jnp.sum(out.astype(jnp.float32) ** 2), out
(_, ours), g_ours = jax.value_and_grad(loss, has_aux=True)(q, "ours")
(_, xla), g_xla = jax.value_and_grad(loss, has_aux=True)(q, "xla")
print("attention 2x4096x(8x40) bf16: cuDNN applies:", cudnn_flash_applies(jnp.bfloat16, 40, 4096, 4096),
      "| max |ours - XLA| forward", float(jnp.max(jnp.abs(ours.astype(jnp.float32) - xla.astype(jnp.float32)))),
      "| grad wrt q", float(jnp.max(jnp.abs(g_ours.astype(jnp.float32) - g_xla.astype(jnp.float32)))),
      "of max |grad|", float(jnp.max(jnp.abs(g_xla.astype(jnp.float32)))))
EOF

# Which runs, in this order (APL_GPU_RUNS, a space-separated subset); the export always comes first.
RUNS=${APL_GPU_RUNS:-train sampling batch8 fused fused8 cached8 remat8 batch16 sampling8}

# run ID NAME CAP COMMAND...: COMMAND under min(CAP, time to the deadline), skipped under 60 s.
run() {
  local id=$1 name=$2 cap=$3 left=$((DEADLINE - SECONDS)) start=$SECONDS rc
  shift 3
  [[ " prepare $RUNS " == *" $id "* ]] || return 0
  if ((left < 60)); then echo "== $name: skipped, $left s left before the deadline"; return; fi
  ((cap > left)) && cap=$left
  echo "== $name (at most $cap s): $*"
  timeout -k 10 "$cap" "$@"
  rc=$?
  ((rc == 124 || rc == 137)) && echo "== $name: cut off after $cap s"
  echo "== $name: exit status $rc, $((SECONDS - start)) s"
}

B=/tmp/apl-bench TRAIN="python3 benchmarks/train_step.py --config sd15@512 --dtype bfloat16 --steps 8 --warmup 2 --cache $B"
# Each train-step side runs in its own process, so JAX may take most of the GPU; in sampling.py
# JAX and PyTorch share one process: JAX preallocates 45%, PyTorch takes what it needs of the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.75
# sd15-random's shapes with NumPy-drawn weights (its jitted flax init took 209 s to compile on an
# H200), saved once as a diffusers folder with PyTorch safetensors in f32, on the host's CPU; every
# run below loads it from there (sampling.py too: no second init).
run prepare "sd15-random (NumPy-filled) exported to $B/sd15-random" 90 env JAX_PLATFORMS=cpu \
  python3 benchmarks/train_step.py --worker prepare --numpy-weights --weights $B/sd15-random --config sd15@512
run train "train step, sd15@512, bf16, one example per step (the official code's), default pass layout" 200 $TRAIN
run sampling "sampling, sd15-random 512 px, bf16, DDIM 20 steps, batch 4" 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 \
  python3 benchmarks/sampling.py --model $B/sd15-random --dtype bfloat16 --steps 20 --batch 4 --repeats 3
run batch8 "train step, sd15@512, bf16, 8 examples per step (both sides), default pass layout" 200 $TRAIN --batch 8
# Ours alone from here: the PyTorch figures to compare with are those of the same batch above.
run fused "train step, sd15@512, bf16, one example per step, one doubled UNet call (ours alone)" 110 $TRAIN --passes fused --skip-reference
run fused8 "train step, sd15@512, bf16, 8 examples per step, one doubled UNet call (ours alone)" 200 $TRAIN --batch 8 --passes fused --skip-reference
run cached8 "train step, sd15@512, bf16, 8 examples per step, VAE encodings cached (ours alone)" 120 $TRAIN --batch 8 --cached-latents --skip-reference
run remat8 "train step, sd15@512, bf16, 8 examples per step, UNet blocks rematerialised (ours alone)" 120 $TRAIN --batch 8 --remat --skip-reference
# Larger batches for the MFU target: a 512-px example at batch 8 did not fill an H200 (32.8%).
run batch16 "train step, sd15@512, bf16, 16 examples per step, default pass layout (ours alone)" 200 $TRAIN --batch 16 --skip-reference
run sampling8 "sampling, sd15-random 512 px, bf16, DDIM 20 steps, batch 8" 150 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 \
  python3 benchmarks/sampling.py --model $B/sd15-random --dtype bfloat16 --steps 20 --batch 8 --repeats 3
nvidia-smi --query-gpu=name,memory.used,memory.total,temperature.gpu,clocks.sm --format=csv
echo "== done in $SECONDS s"
exec >&- 2>&-
wait $TEE  # every line in gpu.log before the command returns
