"""Test driver: run encode_text's real `main`, SIGKILLing this process in the middle of writing the cache.

`python tests/text_cache_killer.py MODE ARGS...` where ARGS are encode_text's and MODE says where to die:
* `rows`: inside the second batch write, after its embeddings reached the shard but before its rows are marked done;
* `prepare`: while the shard files of a new cache are being created, before its index.json exists.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np

import jit_fast.data.encode_text as encode_text
from jit_fast.text import cache as text_cache


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    """Patch the writer named by argv[1], then run encode_text on argv[2:] (never returns normally)."""
    mode, argv = sys.argv[1], sys.argv[2:]
    calls = []
    if mode == "rows":
        real = encode_text.write_rows

        def write_rows(root, meta, shard, offsets, cond, keys):
            calls.append(shard)
            if len(calls) == 2:
                n = text_cache.shard_sizes(meta["count"], meta["shard_rows"])[shard]
                arr = text_cache.load_array(text_cache.shard_file(root, "pooled", shard), np.float16,
                                            (n, meta["encoder"]["hidden_size"]), mode="r+")
                arr[offsets[:1]] = cond.pooled[:1].half().numpy()
                arr.flush()
                _die()
            return real(root, meta, shard, offsets, cond, keys)

        encode_text.write_rows = write_rows
    elif mode == "prepare":
        real_prepare = text_cache.prepare_shards

        def prepare_shards(root, meta):
            real_prepare(root, {**meta, "count": min(meta["count"], meta["shard_rows"])})  # the first shard only
            _die()

        encode_text.prepare_shards = prepare_shards
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    encode_text.main(argv)
    raise SystemExit("text_cache_killer: the writer was never reached")


if __name__ == "__main__":
    main()
