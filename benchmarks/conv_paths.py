"""XLA's convolution against the patch matmul (apl_jax/nn/layers.py), forward and input gradient, side by side.

Square 3x3 convolutions at SD 1.x's channel counts and latent sizes, batch 2 by default. The
ratio is XLA's time over the patch path's (above 1: patches faster). Where the ratios cross 1 as
(batch x positions) / channels grows is where layers.FORWARD_PATCH_ROWS and BACKWARD_PATCH_ROWS sit.

    python benchmarks/conv_paths.py [--batch 2] [--repeats 5] [--max-gflop 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from apl_jax.nn import layers

CHANNELS = (64, 128, 256, 320, 512, 640, 1280)
SIZES = (4, 8, 16, 32, 64)
PADDING = ((1, 1), (1, 1))


def xla_conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), PADDING, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def patch_conv(x, w):
    return layers.patch_conv(x, w, (1, 1), PADDING)


def median_ms(fn, *args, repeats: int) -> float:
    fn(*args).block_until_ready()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def input_gradient(conv):
    return jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-gflop", type=float, default=6.0, help="skip larger convolutions")
    parser.add_argument("--channels", type=int, nargs="*", default=CHANNELS)
    parser.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, batch {args.batch}, median of {args.repeats}; ms, ratio = XLA / patches")
    print(f"{'channels':>8} {'size':>5} {'rows/ch':>8} | {'fwd XLA':>8} {'patches':>8} {'ratio':>6} | "
          f"{'grad XLA':>8} {'patches':>8} {'ratio':>6}")
    for c in args.channels:
        for size in args.sizes:
            gflop = 2 * args.batch * size * size * 9 * c * c / 1e9
            if gflop > args.max_gflop:
                continue
            x = jnp.ones((args.batch, size, size, c))
            w = jnp.full((3, 3, c, c), 0.01)
            forward = [median_ms(jax.jit(conv), x, w, repeats=args.repeats) for conv in (xla_conv, patch_conv)]
            backward = [median_ms(input_gradient(conv), x, w, x, repeats=args.repeats) for conv in (xla_conv, patch_conv)]
            print(f"{c:8d} {size:5d} {args.batch * size * size / c:8.2f} | {forward[0]:8.2f} {forward[1]:8.2f} "
                  f"{forward[0] / forward[1]:6.2f} | {backward[0]:8.2f} {backward[1]:8.2f} {backward[0] / backward[1]:6.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
