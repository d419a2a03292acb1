"""Encode every caption once: `python -m jit_fast.data.encode_text DATA --encoder NAME_OR_DIR --out CACHE`.

DATA is a captioned folder (images/ + captions/ or captions.jsonl, see `jit_fast.data.captions`). Captions
are encoded in batches by the text encoder into the float16 cache of `jit_fast.text.cache`, which training
reads with --text-cache instead of running the encoder. An interrupted run resumes where it stopped; under
torchrun the shards are shared out over the ranks (rank r encodes shards r, r + W, ...), so the result does
not depend on the world size. A CACHE made with other settings or for other captions is refused, never
overwritten.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..shared.errors import UserError
from ..text.cache import (
    INDEX,
    POOLINGS,
    SHARD_ROWS,
    CacheError,
    cache_files,
    new_index,
    pending_rows,
    prepare_shards,
    read_index,
    settings_mismatch,
    shard_count,
    shard_sizes,
    write_empty,
    write_index,
    write_rows,
)
from ..text.encoder import DEFAULT_MAX_LENGTH, EncoderError, TextEncoder
from .captions import scan_captioned
from .index import listing, show_path

DEFAULT_SEQ_TOKENS = 32  # JiT's in_context_len


def encode_empty(encoder: TextEncoder, seq_len: int):
    """The encoder's embedding of the empty caption, or None when its tokenizer gives it no tokens."""
    try:
        return encoder([""], seq_len=seq_len)
    except EncoderError:
        return None


def prepare_cache(out: Path, meta: dict) -> dict:
    """Create the cache (or check that the existing one is this run's, to resume it); returns its index."""
    if (out / INDEX).exists():
        old = read_index(out)
        wrong = settings_mismatch(old, meta)
        if wrong:
            raise CacheError(f"text cache {out / INDEX} was made with other settings ({'; '.join(wrong)}): "
                             "choose another --out")
        return old
    names = cache_files(out)
    if any(re.fullmatch(r"(pooled|tokens|lengths|done)-\d{5}\.npy|empty-\w+\.npy", n) for n in names):
        raise CacheError(f"--out {out} holds text-cache files but no {INDEX} (an encode_text run was stopped before "
                         "it wrote one, or the index was removed): nothing there is used or overwritten; remove the "
                         "folder or choose another --out")
    if names:
        raise CacheError(f"--out {out} is a non-empty folder without {INDEX}: not a text cache, not written into")
    out.mkdir(parents=True, exist_ok=True)
    prepare_shards(out, meta)
    write_index(out, meta)
    return meta


def encode_captions(
    data: str | Path,
    encoder: TextEncoder,
    out: str | Path,
    *,
    pooling: str = "pooled",
    seq_len: int = DEFAULT_SEQ_TOKENS,
    batch_size: int = 64,
    shard_rows: int = SHARD_ROWS,
    env=None,
    progress: bool = True,
) -> Path:
    """Encode the captions of captioned folder `data` into cache `out` (resuming it); returns `out`.

    `env` (a `jit_fast.shared.distributed.DistEnv`) shares the shards over its ranks; None is one process.
    """
    from tqdm import tqdm

    from ..shared.distributed import barrier, broadcast_object

    if pooling not in POOLINGS:
        raise CacheError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    out = Path(out)
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    _, keys, captions, unpaired = scan_captioned(data)
    if not keys:
        raise CacheError(f"no captioned images under {data}")
    if unpaired and rank == 0:
        names = listing([f"{show_path(p)} ({why})" for p, why in unpaired])
        warnings.warn(f"not encoding {len(unpaired)} unpaired files under {data}: {names}", stacklevel=2)
    seq = seq_len if pooling == "sequence" else 0
    empty = encode_empty(encoder, seq)
    empty_len = None if empty is None else int(encoder.tokenize([""])["attention_mask"].sum())
    meta = new_index(encoder.spec, pooling, seq, keys, captions, empty_len, shard_rows)
    problem = None
    if rank == 0:
        try:
            meta = prepare_cache(out, meta)
            if not meta["complete"]:
                write_empty(out, meta, empty)
        except UserError as exc:
            problem = str(exc)
    problem = broadcast_object(env, problem)
    if problem is not None:
        raise CacheError(problem)
    meta = read_index(out) if rank != 0 else meta
    if meta["complete"]:
        return out
    # Batches sit at fixed offsets of their shard and are written whole, so a resumed or sharded run pads every
    # caption with the same neighbours as one uninterrupted process: the files come out bitwise the same.
    sizes = shard_sizes(meta["count"], meta["shard_rows"])
    todo = []
    for s in range(len(sizes)):
        if s % world == rank:
            pending = set(pending_rows(out, meta, s).tolist())
            todo += [(s, np.arange(b, min(b + batch_size, sizes[s]))) for b in range(0, sizes[s], batch_size)
                     if pending.intersection(range(b, min(b + batch_size, sizes[s])))]
    bar = tqdm(total=sum(len(part) for _, part in todo), unit="caption", desc="encoding captions",
               disable=not progress or rank != 0)
    for s, part in todo:
        rows = (s * meta["shard_rows"] + part).tolist()
        with torch.no_grad():
            cond = encoder([captions[r] for r in rows], seq_len=seq)
        write_rows(out, meta, s, part, cond, [keys[r] for r in rows])
        bar.update(len(part))
    bar.close()
    if env is not None:
        barrier(env)
    if rank == 0:
        left = sum(len(pending_rows(out, meta, s)) for s in range(shard_count(meta["count"], meta["shard_rows"])))
        if left:
            raise CacheError(f"text cache {out}: {left} captions were not written; run again to finish")
        write_index(out, {**meta, "complete": True})
    if env is not None:
        barrier(env)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (torchrun-compatible)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="captioned folder: images/ + captions/ (or captions.jsonl)")
    ap.add_argument("--encoder", required=True, help="Hugging Face model id or local directory")
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --encoder")
    ap.add_argument("--out", required=True, help="cache directory (created; an interrupted one is resumed)")
    ap.add_argument("--max-text-len", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per caption (truncated)")
    ap.add_argument("--pooling", choices=POOLINGS, default="pooled",
                    help="pooled: the mask-mean only; sequence: also the first --seq-tokens per-token states")
    ap.add_argument("--seq-tokens", type=int, default=DEFAULT_SEQ_TOKENS,
                    help="per-token states kept in sequence mode (the model's in_context_len)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-rows", type=int, default=SHARD_ROWS, help="captions per shard file (the unit of work "
                    "a rank takes)")
    ap.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu or cuda")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (loading and encoding)")
    args = ap.parse_args(argv)
    from ..shared.distributed import init_distributed, shutdown

    env = None
    try:
        for flag, value in (("--max-text-len", args.max_text_len), ("--seq-tokens", args.seq_tokens),
                            ("--batch-size", args.batch_size), ("--shard-rows", args.shard_rows)):
            if value < 1:
                raise CacheError(f"{flag} must be an integer >= 1, got {value}")
        if not Path(args.data).is_dir():
            raise CacheError(f"data folder {args.data} does not exist or is not a folder")
        env = init_distributed(args.device)
        encoder = TextEncoder.load(args.encoder, revision=args.revision, max_length=args.max_text_len,
                                   device=env.device, progress=not args.no_progress)
        encode_captions(args.data, encoder, args.out, pooling=args.pooling, seq_len=args.seq_tokens,
                        batch_size=args.batch_size, shard_rows=args.shard_rows, env=env,
                        progress=not args.no_progress)
    except UserError as exc:
        print(f"encode_text: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if env is not None:
            shutdown(env)
    if env is None or env.is_main:
        print(f"done: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

