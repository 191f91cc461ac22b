"""Sampling with and without the prefix: not implemented yet (see the sampling issue)."""

import sys

if __name__ == "__main__":
    print("sample.py is not implemented yet: the sharded sampler is tracked in the sampling issue.", file=sys.stderr)
    sys.exit(2)
