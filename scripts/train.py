"""Train from a recipe: `accelerate launch scripts/train.py recipes/teacher_digits.yaml --set train.lr=2e-4`.

The same as `fastdiff train RECIPE ...`; this file exists so that `accelerate launch` and `torchrun` have a script.
"""

import sys

from fastdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
