"""Sample images with and without an APL prefix:

    python sample.py --model M --prompt "..." [--prompt ...] --num-images N --seed S [--prefix FILE] [--compare] --out grid.png [--save-dir DIR]
"""

from apl_jax.cli import sample_main

if __name__ == "__main__":
    sample_main()
