"""Generate images from a JiT checkpoint and evaluate FID/IS; torchrun-compatible (docs/SAMPLING.md).

    python sample.py --ckpt checkpoint-last.pth --num-images 50000 --cfg 2.9 --fid-ref stats.npz --out eval/
    python sample.py --preset demo --ckpt output/demo/checkpoint-last.pth
"""

import faulthandler
import sys

from jit_fast.sampling.generate import main

if __name__ == "__main__":
    faulthandler.enable()  # a native crash on any rank still prints that rank's Python stack
    sys.exit(main())
