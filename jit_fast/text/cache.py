"""Caption-embedding cache: encode every caption once, train without loading the text encoder.

Layout of a cache directory (written by `python -m jit_fast.data.encode_text`):
* `index.json`: format, completeness, the encoder spec (name, revision, hidden size, max length), pooling
  ("pooled" or "sequence"), tokens kept per caption (`seq_len`, sequence mode), rows per shard, the keys
  (image paths under images/ without extension) and a 16-hex sha256 of each caption, and the length of the
  empty caption's encoding (null_text "empty"), or null when the tokenizer gives it no tokens.
* per shard s (`shard_rows` captions each, the last one shorter): `pooled-s.npy` (rows, E) float16 and, in
  sequence mode, `tokens-s.npy` (rows, seq_len, E) float16 with `lengths-s.npy` (rows,) int32;
  `done-s.npy` (rows,) uint8 marks the rows written, so an interrupted run resumes.
* `empty-pooled.npy` (E,) and `empty-tokens.npy` (seq_len, E) float32: the empty caption.

Every file is untrusted when read: JSON and .npy headers only (no pickle), types, shapes, dtypes and key
uniqueness checked on open, values checked finite on every lookup; errors name the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from jit_fast.shared.conditioning import TextCondition
from jit_fast.shared.errors import UserError
from jit_fast.shared.files import atomic_write
from jit_fast.text.encoder import EncoderSpec, directory_revision

FORMAT = "jit_fast-text-cache-v1"
INDEX = "index.json"
POOLINGS = ("pooled", "sequence")
SHARD_ROWS = 16384
_HEX16 = re.compile(r"[0-9a-f]{16}")


class CacheError(UserError, ValueError):
    """A text-embedding cache that is damaged, incomplete or made for other settings, naming the file."""


def caption_digest(caption: str) -> str:
    """16 hex digits of the caption's sha256: a changed caption no longer matches its cached embedding."""
    return hashlib.sha256(caption.encode()).hexdigest()[:16]


def shard_file(root: Path, kind: str, shard: int) -> Path:
    return root / f"{kind}-{shard:05d}.npy"


def shard_count(count: int, shard_rows: int) -> int:
    return math.ceil(count / shard_rows)


def shard_sizes(count: int, shard_rows: int) -> list[int]:
    """Rows of every shard: shard_rows each, the last one the remainder."""
    return [min(shard_rows, count - s * shard_rows) for s in range(shard_count(count, shard_rows))]


def _fail(where: Path, why: str) -> CacheError:
    return CacheError(f"text cache {where}: {why}")


def read_index(root: Path) -> dict:
    """The parsed and type-checked index.json of cache `root` (complete or not)."""
    path = root / INDEX
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise _fail(path, "no such file (not a text cache; make one with python -m jit_fast.data.encode_text)") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _fail(path, f"unreadable ({exc})") from exc

    def need(ok: bool, why: str) -> None:
        if not ok:
            raise _fail(path, why)

    need(isinstance(meta, dict) and meta.get("format") == FORMAT, f"not a {FORMAT} index")
    enc = meta.get("encoder")
    need(isinstance(enc, dict) and isinstance(enc.get("name"), str) and isinstance(enc.get("revision"), str),
         "encoder name/revision missing")
    for k in ("hidden_size", "max_length"):
        need(_int(enc.get(k)) and enc[k] >= 1, f"encoder {k} must be an integer >= 1")
    need(meta.get("pooling") in POOLINGS, f"pooling must be one of {POOLINGS}")
    seq = meta.get("seq_len")
    need(_int(seq) and (seq == 0 if meta["pooling"] == "pooled" else seq >= 1),
         "seq_len must be 0 in pooled mode and >= 1 in sequence mode")
    need(_int(meta.get("shard_rows")) and meta["shard_rows"] >= 1, "shard_rows must be an integer >= 1")
    keys, digests = meta.get("keys"), meta.get("captions")
    need(isinstance(keys, list) and all(isinstance(k, str) for k in keys) and len(keys) >= 1,
         "keys must be a non-empty list of strings")
    need(len(set(keys)) == len(keys), "duplicate keys")
    need(_int(meta.get("count")) and meta["count"] == len(keys), "count must be the number of keys")
    need(isinstance(digests, list) and len(digests) == len(keys)
         and all(isinstance(d, str) and _HEX16.fullmatch(d) for d in digests), "one caption digest per key needed")
    need(isinstance(meta.get("complete"), bool), "complete must be true or false")
    empty = meta.get("empty")
    need(empty is None or (isinstance(empty, dict) and _int(empty.get("length")) and empty["length"] >= 1),
         "empty must be null or {\"length\": n >= 1}")
    return meta


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load_array(path: Path, dtype: np.dtype, shape: tuple[int, ...], mode: str = "r") -> np.ndarray:
    """Memory-map a .npy file (header parsed without pickle) after checking its dtype, shape and C order."""
    try:
        arr = np.load(path, mmap_mode=mode, allow_pickle=False)
    except FileNotFoundError as exc:
        raise _fail(path, "missing") from exc
    except (OSError, ValueError) as exc:
        raise _fail(path, f"not a readable .npy file ({exc})") from exc
    if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != shape or not arr.flags.c_contiguous:
        raise _fail(path, f"holds {arr.dtype} {tuple(arr.shape)}, expected {np.dtype(dtype)} {shape} in C order")
    return arr


class TextCache:
    """Read side of a complete cache: settings checks, key -> row lookup, batches of `TextCondition`s."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta = read_index(self.root)
        if not meta["complete"]:
            raise _fail(self.root / INDEX, "incomplete: run python -m jit_fast.data.encode_text again to finish it")
        enc = meta["encoder"]
        self.spec = EncoderSpec(enc["name"], enc["revision"], enc["hidden_size"], enc["max_length"])
        self.pooling, self.seq_len, self.shard_rows = meta["pooling"], meta["seq_len"], meta["shard_rows"]
        self.keys, self.digests = meta["keys"], meta["captions"]
        self.dim = self.spec.hidden_size
        self.row_of = {k: i for i, k in enumerate(self.keys)}
        self.pooled, self.tokens, self.lengths = [], [], []
        for s, n in enumerate(shard_sizes(len(self.keys), self.shard_rows)):
            self.pooled.append(load_array(shard_file(self.root, "pooled", s), np.float16, (n, self.dim)))
            if self.pooling == "sequence":
                shape = (n, self.seq_len, self.dim)
                self.tokens.append(load_array(shard_file(self.root, "tokens", s), np.float16, shape))
                lengths = np.asarray(load_array(shard_file(self.root, "lengths", s), np.int32, (n,)))
                if lengths.min() < 0 or lengths.max() > self.seq_len:
                    raise _fail(shard_file(self.root, "lengths", s), f"token counts outside [0, {self.seq_len}]")
                self.lengths.append(lengths)
        self.empty_length = None if meta["empty"] is None else meta["empty"]["length"]

    def __len__(self) -> int:
        return len(self.keys)

    def require(
        self,
        *,
        encoder: str | None = None,
        revision: str | None = None,
        max_length: int | None = None,
        pooling: str | None = None,
        dim: int | None = None,
        context_len: int | None = None,
    ) -> None:
        """Refuse a cache made for other settings (those given); the error names the file and every mismatch."""
        where = self.root / INDEX
        wrong = []
        checks = (("encoder", encoder, self.spec.name), ("encoder revision", revision, self.spec.revision),
                  ("max text length", max_length, self.spec.max_length), ("pooling", pooling, self.pooling),
                  ("embedding width", dim, self.dim))
        for what, want, have in checks:
            if want is not None and want != have:
                wrong.append(f"{what} {have!r} (wanted {want!r})")
        if encoder is not None and revision is None and self.spec.revision.startswith("sha256:") \
                and Path(encoder).is_dir() and encoder == self.spec.name:
            now = directory_revision(encoder)
            if now != self.spec.revision:
                wrong.append(f"encoder revision {self.spec.revision!r} (the folder is now {now!r}: its files "
                             "changed since the cache was made)")
        if context_len is not None and self.pooling == "sequence" and self.seq_len < context_len:
            wrong.append(f"{self.seq_len} tokens per caption (the model's in_context_len is {context_len}; "
                         f"re-encode with --seq-tokens {context_len})")
        if wrong:
            raise _fail(where, "made with " + "; ".join(wrong))

    def rows(self, keys: list[str], captions: list[str] | None = None) -> np.ndarray:
        """Cache rows of `keys`; with `captions`, each must be the caption the row was encoded from."""
        missing = [k for k in keys if k not in self.row_of]
        if missing:
            raise _fail(self.root / INDEX, f"{len(missing)} keys of the dataset are not cached, e.g. "
                        f"{', '.join(repr(k) for k in missing[:5])}: encode this dataset with encode_text")
        rows = np.fromiter((self.row_of[k] for k in keys), dtype=np.int64, count=len(keys))
        if captions is not None:
            changed = [k for k, r, c in zip(keys, rows.tolist(), captions, strict=True)
                       if self.digests[r] != caption_digest(c)]
            if changed:
                raise _fail(self.root / INDEX, f"{len(changed)} captions changed since they were encoded, e.g. "
                            f"{', '.join(repr(k) for k in changed[:5])}: encode the dataset again")
        return rows

    def _gather(self, arrays: list[np.ndarray], kind: str, rows: np.ndarray) -> np.ndarray:
        shard, offset = np.divmod(rows, self.shard_rows)
        out = np.empty((len(rows), *arrays[0].shape[1:]), dtype=arrays[0].dtype)
        for s in np.unique(shard).tolist():
            sel = shard == s
            out[sel] = arrays[s][offset[sel]]
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            bad = rows[~np.isfinite(out.reshape(len(rows), -1)).all(axis=1)][0]
            raise _fail(shard_file(self.root, kind, int(bad) // self.shard_rows),
                        f"non-finite embedding for key {self.keys[bad]!r}")
        return out

    def condition(self, rows: np.ndarray | torch.Tensor) -> TextCondition:
        """The cached embeddings of `rows` (float16; sequence mode adds tokens and their mask)."""
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self.keys)):
            raise IndexError(f"cache rows must lie in [0, {len(self.keys)})")
        pooled = torch.from_numpy(self._gather(self.pooled, "pooled", rows))
        if self.pooling == "pooled":
            return TextCondition(pooled)
        tokens = torch.from_numpy(self._gather(self.tokens, "tokens", rows))
        lengths = torch.from_numpy(self._gather(self.lengths, "lengths", rows))
        mask = torch.arange(self.seq_len)[None] < lengths[:, None]
        return TextCondition(pooled, tokens, mask)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The empty caption's (pooled (E,), tokens (length, E) in sequence mode) in fp32, or None if it has none."""
        if self.empty_length is None:
            return None
        pooled = torch.from_numpy(np.array(load_array(self.root / "empty-pooled.npy", np.float32, (self.dim,))))
        tokens = None
        if self.pooling == "sequence":
            full = load_array(self.root / "empty-tokens.npy", np.float32, (self.seq_len, self.dim))
            tokens = torch.from_numpy(np.array(full[: min(self.empty_length, self.seq_len)]))
        for name, t in (("empty-pooled.npy", pooled), ("empty-tokens.npy", tokens)):
            if t is not None and not torch.isfinite(t).all():
                raise _fail(self.root / name, "non-finite values")
        return pooled, tokens


def write_index(root: Path, meta: dict) -> None:
    """Atomically (re)write index.json."""
    atomic_write(root / INDEX, json.dumps(meta, indent=0) + "\n")


def new_index(spec: EncoderSpec, pooling: str, seq_len: int, keys: list[str], captions: list[str],
              empty_length: int | None, shard_rows: int = SHARD_ROWS) -> dict:
    """The index.json content of a cache not yet written."""
    return {
        "format": FORMAT, "complete": False, "encoder": spec.to_dict(), "pooling": pooling,
        "seq_len": seq_len if pooling == "sequence" else 0, "shard_rows": shard_rows, "count": len(keys),
        "keys": keys, "captions": [caption_digest(c) for c in captions],
        "empty": None if empty_length is None else {"length": empty_length},
    }


def settings_mismatch(old: dict, new: dict) -> list[str]:
    """What differs between an existing index and the one a run would write (completeness aside)."""
    out = []
    for field, label in (("encoder", "encoder"), ("pooling", "pooling"), ("seq_len", "tokens per caption"),
                         ("shard_rows", "shard rows"), ("keys", "dataset keys"), ("captions", "captions")):
        if old.get(field) != new.get(field):
            show = (f"{old.get(field)!r} vs now {new.get(field)!r}" if field not in ("keys", "captions")
                    else "differ")
            out.append(f"{label} {show}")
    return out


def prepare_shards(root: Path, meta: dict) -> None:
    """Create the zero-filled shard files of a new cache (sparse on most file systems)."""
    dim, seq = meta["encoder"]["hidden_size"], meta["seq_len"]
    for s, n in enumerate(shard_sizes(meta["count"], meta["shard_rows"])):
        specs = [("pooled", np.float16, (n, dim)), ("done", np.uint8, (n,))]
        if meta["pooling"] == "sequence":
            specs += [("tokens", np.float16, (n, seq, dim)), ("lengths", np.int32, (n,))]
        for kind, dtype, shape in specs:
            arr = np.lib.format.open_memmap(shard_file(root, kind, s), mode="w+", dtype=dtype, shape=shape)
            arr.flush()
            del arr


def write_rows(root: Path, meta: dict, shard: int, offsets: np.ndarray, cond: TextCondition, keys: list[str]) -> None:
    """Store one encoded batch in its shard (float16, checked finite), then mark its rows done."""
    n = shard_sizes(meta["count"], meta["shard_rows"])[shard]
    dim, seq = meta["encoder"]["hidden_size"], meta["seq_len"]
    pooled = cond.pooled.to(torch.float16).cpu().numpy()
    parts = [("pooled", pooled, np.float16, (n, dim))]
    if meta["pooling"] == "sequence":
        tokens = cond.tokens.to(torch.float16).cpu().numpy()
        lengths = cond.mask.sum(dim=1).to(torch.int32).cpu().numpy()
        parts += [("tokens", tokens, np.float16, (n, seq, dim)), ("lengths", lengths, np.int32, (n,))]
    for kind, values, _, _ in parts:
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = [k for k, v in zip(keys, values.reshape(len(keys), -1), strict=True) if not np.isfinite(v).all()]
            raise CacheError(f"the embedding of caption {bad[0]!r} overflows float16 ({kind}): this encoder's "
                             "hidden states are too large to cache")
    for kind, values, dtype, shape in parts:
        arr = load_array(shard_file(root, kind, shard), dtype, shape, mode="r+")
        arr[offsets] = values
        arr.flush()
        del arr
    done = load_array(shard_file(root, "done", shard), np.uint8, (n,), mode="r+")
    done[offsets] = 1
    done.flush()


def pending_rows(root: Path, meta: dict, shard: int) -> np.ndarray:
    """Offsets of the rows of `shard` not written yet."""
    n = shard_sizes(meta["count"], meta["shard_rows"])[shard]
    return np.flatnonzero(np.asarray(load_array(shard_file(root, "done", shard), np.uint8, (n,))) == 0)


def write_empty(root: Path, meta: dict, empty: TextCondition | None) -> None:
    """Store the empty caption's encoding (float32) when it has tokens."""
    if empty is None:
        return
    np.save(root / "empty-pooled.npy", empty.pooled[0].float().cpu().numpy(), allow_pickle=False)
    if meta["pooling"] == "sequence":
        np.save(root / "empty-tokens.npy", empty.tokens[0].float().cpu().numpy(), allow_pickle=False)


def cache_files(root: Path) -> list[str]:
    """Names in a cache directory (to refuse writing into a folder that is not a cache)."""
    return sorted(os.listdir(root)) if root.is_dir() else []
