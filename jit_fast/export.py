"""`python -m jit_fast.export SRC DST`: convert a checkpoint to .safetensors (one weight set) or official .pth.

SRC may be a run directory (its newest checkpoint), a DCP checkpoint directory, an official
`.pth` or a `.safetensors` file. A `.pth` DST holds model, both EMAs, the AdamW state (official
index layout, from DCP checkpoints), epoch and args; a `.safetensors` DST holds the `--which`
weights with the model metadata in its header.
"""

from __future__ import annotations

import argparse
import sys

from jit_fast.checkpoint.weights import WEIGHT_SETS, export_checkpoint
from jit_fast.shared.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jit_fast.export",
        description="Convert a jit_fast / official JiT checkpoint to .safetensors (one weight set) or official .pth.",
    )
    p.add_argument("src", help="run dir, checkpoint dir, official .pth or .safetensors")
    p.add_argument("dst", help="output file: *.safetensors or *.pth")
    p.add_argument("--which", "--ema", default="ema1", choices=WEIGHT_SETS, help="weight set for .safetensors")
    p.add_argument("--skip-checksum", action="store_true",
                   help="load a DCP checkpoint even if its files differ from checksums.json (corrupt)")
    a = p.parse_args(argv)
    try:
        out = export_checkpoint(a.src, a.dst, a.which, verify=not a.skip_checksum)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
