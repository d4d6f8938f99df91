"""The spec's training command: ``python scripts/train.py --config configs/multicrop_training.yaml``.

Same as ``hjepa train ...``.
"""

import sys

from hjepa_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
