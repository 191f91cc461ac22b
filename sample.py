"""Sample images with and without an APL prefix:

    python sample.py --model M --prompt "..." [--prompt ...] --num-images N --seed S [--prefix FILE] [--compare] --out grid.png [--save-dir DIR]
"""

from apl_jax.commands.sample import main

if __name__ == "__main__":
    main()
