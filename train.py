"""Train JiT: `python train.py --preset demo` or `torchrun --nproc_per_node=8 train.py --model JiT-B/16 ...`."""

import sys

from jit_fast.train import main

if __name__ == "__main__":
    sys.exit(main())
