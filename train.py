"""Train JiT: `python train.py --preset demo` or `torchrun --nproc_per_node=8 train.py --model JiT-B/16 ...`."""

import faulthandler
import sys

from jit_fast.train.trainer import main

if __name__ == "__main__":
    faulthandler.enable()  # a native crash (SIGSEGV/SIGABRT) on any rank still prints that rank's Python stack
    sys.exit(main())
