"""Train an APL prefix: python train.py [--config configs/tiny.yaml] [--workdir runs/tiny] [--set key=value ...]"""

from apl_jax.commands.train import main

if __name__ == "__main__":
    main()
