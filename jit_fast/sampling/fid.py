"""In-memory FID and Inception Score with torch-fidelity's Inception, as the official JiT evaluation.

The official evaluation writes 50k PNGs and runs `torch_fidelity.calculate_metrics` on the folder.
Here the same network (torch-fidelity's `inception-v3-compat`, features "2048" for FID and
"logits_unbiased" for IS) is fed on the device with the uint8 images the PNGs would hold
(`jit_fast.sampling.sampler.to_uint8` is the PNG rounding, and PNG is lossless), and the metrics are
torch-fidelity's own functions. Feature batches are cut on a global grid of `batch_size`
image indices, which is how torch-fidelity's DataLoader batches a sorted PNG folder, so on one
device the in-memory features equal the folder path's bit for bit.

Reference statistics: an `.npz` with `mu` (2048,) and `sigma` (2048, 2048) (the ADM and
official JiT stats format), an `.npz` of uint8 NHWC images (`arr_0` or `images`), or an image
folder; the last two are reduced to statistics once and cached by content fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import sys
import urllib.error
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from jit_fast.shared import integrity
from jit_fast.shared.distributed import broadcast_object
from jit_fast.shared.errors import UserError
from jit_fast.shared.files import atomic_write

EXTRACTOR_NAME = "inception-v3-compat"
POOL, LOGITS = "2048", "logits_unbiased"
FEATURE_DIM = 2048
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
STATS_CACHE_VERSION = 1


class InceptionWeightsError(UserError, RuntimeError):
    """The Inception weights can be neither downloaded nor read from the given file."""


class StatsError(UserError, ValueError):
    """A reference statistics file or folder cannot be used for FID."""


# --------------------------------------------------------------------------------------------
# Inception feature extractor
# --------------------------------------------------------------------------------------------
def _inception_cls():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def default_weights_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def build_inception(weights: str | Path | None = None, device: torch.device | str = "cpu"):
    """torch-fidelity's InceptionV3 giving ("2048", "logits_unbiased") for uint8 (B, 3, H, W) images.

    `weights=None` takes torch-fidelity's default (downloaded once into the torch hub cache);
    a path loads that state dict (offline use). Either failing raises InceptionWeightsError.
    """
    cls = _inception_cls()
    if weights is not None:
        sd = load_inception_state_dict(weights)
        # torch-fidelity would torch.load(path, weights_only=False) a weights path: hand it the checked dict instead
        with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: sd):
            net = cls(EXTRACTOR_NAME, [POOL, LOGITS], feature_extractor_weights_path=None, verbose=False)
    else:
        try:
            net = cls(EXTRACTOR_NAME, [POOL, LOGITS], feature_extractor_weights_path=None, verbose=False)
        except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:
            raise InceptionWeightsError(
                f"cannot get torch-fidelity's Inception weights ({type(e).__name__}: {e}); they download from "
                f"{default_weights_url()} into {torch.hub.get_dir()}/checkpoints. Offline, pass "
                "--inception-weights PATH with a copy of that file."
            ) from None
    return net.to(device).eval()


def _skeleton_inception():
    """torch-fidelity's InceptionV3 with untouched initial weights (nothing downloaded or loaded)."""
    cls = _inception_cls()
    with mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
        return cls(EXTRACTOR_NAME, [POOL])


@functools.lru_cache(maxsize=1)
def expected_inception_shapes() -> dict[str, tuple[tuple[int, ...], bool]]:
    """{key: (shape, is_floating_point)} of the state dict torch-fidelity's InceptionV3 loads."""
    with torch.random.fork_rng(devices=[]):
        sd = _skeleton_inception().state_dict()
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in sd.items()}


def load_inception_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Inception weights read weights-only (a crafted pickle cannot run code) and checked key by key.

    The file must hold a state dict with exactly torch-fidelity's keys, shapes and kinds (float /
    integer) and finite values; anything else raises InceptionWeightsError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(f"Inception weights file not found: {path}")
    try:
        sd = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        why = next((x for x in lines if "GLOBAL" in x or "global" in x), lines[0] if lines else "")
        raise InceptionWeightsError(f"refused to load Inception weights {path}: not a plain state dict ({why})") \
            from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        text = str(e).strip().splitlines()
        raise InceptionWeightsError(f"cannot load Inception weights from {path}: {type(e).__name__}: "
                                    f"{text[0][:200] if text else ''}") from None
    cannot = f"cannot load Inception weights from {path}:"
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InceptionWeightsError(f"{cannot} it does not hold a state dict of tensors (got {type(sd).__name__})")
    want = expected_inception_shapes()
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise InceptionWeightsError(f"{cannot} not torch-fidelity's InceptionV3: {len(missing)} missing keys "
                                    f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    for k, (shape, is_float) in want.items():
        v = sd[k]
        if tuple(v.shape) != shape or v.is_floating_point() != is_float:
            raise InceptionWeightsError(f"{cannot} {k} is {v.dtype} {tuple(v.shape)}, expected "
                                        f"{'a float' if is_float else 'an integer'} tensor of shape {shape}")
        if is_float and not bool(torch.isfinite(v).all()):
            raise InceptionWeightsError(f"{cannot} {k} holds NaN or Inf values")
    return dict(sd)


def weights_tag(weights: str | Path | None) -> str:
    """Identity of the Inception weights for cache keys: the file's sha256, or the default's URL."""
    if weights is None:
        return "default:" + default_weights_url()
    return "sha256:" + integrity.file_digest(weights)


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (any count per rank), rank 0 first; CPU result."""
    _, world = dist_info()
    if world == 1:
        return t.cpu()
    dev = _comm_device()
    n = torch.tensor([t.shape[0]], device=dev)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:c].cpu() for o, c in zip(out, counts, strict=True)])


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------
def as_uint8_nchw(images) -> torch.Tensor:
    """uint8 NHWC (numpy or torch, the samples.npz layout) or NCHW torch -> contiguous uint8 NCHW."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"expected uint8 images (N, H, W, 3) or (N, 3, H, W), got {t.dtype} {tuple(t.shape)}")
    if t.shape[1] != 3 and t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise ValueError(f"expected 3 channels, got shape {tuple(t.shape)}")
    return t.contiguous()


def grid_pieces(start: int, n: int, batch_size: int) -> Iterable[tuple[int, int]]:
    """Split global indices [start, start + n) at multiples of batch_size; yields (offset, length)."""
    i = start
    while i < start + n:
        j = min((i // batch_size + 1) * batch_size, start + n)
        yield i - start, j - i
        i = j


class FeatureAccumulator:
    """Inception features of images identified by global index, gathered across ranks in index order.

    `add(images, start)` runs the extractor on images [start, start + n) in pieces cut at
    multiples of `batch_size` (torch-fidelity's batching of a sorted folder), so the features of
    an image depend only on its index range, never on which rank or call delivered it.
    """

    def __init__(self, extractor: torch.nn.Module, batch_size: int = 64, device: torch.device | str | None = None):
        self.extractor = extractor
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else next(extractor.parameters()).device
        self._starts: list[int] = []
        self._counts: list[int] = []
        self._pool: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, images, start: int) -> None:
        x = as_uint8_nchw(images)
        for off, n in grid_pieces(start, x.shape[0], self.batch_size):
            pool, logits = self.extractor(x[off : off + n].to(self.device, non_blocking=True))
            self._starts.append(start + off)
            self._counts.append(n)
            self._pool.append(pool.float())
            self._logits.append(logits.float())

    def __len__(self) -> int:
        return sum(self._counts)

    def gather(self) -> dict[str, torch.Tensor]:
        """{"2048": (N, 2048), "logits_unbiased": (N, 1008)} of all ranks, sorted by image index (CPU)."""
        idx = torch.cat([torch.arange(s, s + n) for s, n in zip(self._starts, self._counts, strict=True)]) if (
            self._starts
        ) else torch.zeros(0, dtype=torch.long)
        pool = torch.cat(self._pool) if self._pool else torch.zeros(0, FEATURE_DIM, device=self.device)
        logits = torch.cat(self._logits) if self._logits else torch.zeros(0, 1008, device=self.device)
        idx, pool, logits = all_gather_rows(idx), all_gather_rows(pool), all_gather_rows(logits)
        order = torch.argsort(idx, stable=True)
        if idx.numel() and torch.unique(idx).numel() != idx.numel():
            raise RuntimeError("the same image index was fed to the Inception features twice")
        return {"index": idx[order], POOL: pool[order], LOGITS: logits[order]}


# --------------------------------------------------------------------------------------------
# Metrics (torch-fidelity's formulas)
# --------------------------------------------------------------------------------------------
def fid_stats(pool: torch.Tensor) -> dict[str, np.ndarray]:
    """mu (float32, as torch-fidelity) and sigma (float64) of (N, 2048) pool features."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if pool.ndim != 2 or pool.shape[0] < 2:
        raise StatsError(f"FID statistics need at least 2 feature rows, got {tuple(pool.shape)}")
    return fid_features_to_statistics(pool.cpu().float())


def frechet_distance(stats1: dict, stats2: dict) -> float:
    """torch-fidelity's FID between two {mu, sigma}; mixed precisions are compared in float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {k: np.asarray(stats1[k]) for k in ("mu", "sigma")}
    s2 = {k: np.asarray(stats2[k]) for k in ("mu", "sigma")}
    for k in ("mu", "sigma"):
        if s1[k].dtype != s2[k].dtype:
            s1[k], s2[k] = s1[k].astype(np.float64), s2[k].astype(np.float64)
        if s1[k].shape != s2[k].shape:
            raise StatsError(f"FID statistics disagree on the shape of {k}: {s1[k].shape} vs {s2[k].shape}")
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """torch-fidelity's IS (mean, std over `splits` after its seeded shuffle) of logits_unbiased."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits.cpu().float(), splits, True, seed)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


# --------------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------------
def validate_stats(mu, sigma, source: str, dim: int = FEATURE_DIM) -> dict[str, np.ndarray]:
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise StatsError(
            f"{source}: mu {mu.shape} / sigma {sigma.shape} do not fit the {dim}-d Inception pool features "
            f"(expected ({dim},) and ({dim}, {dim}))"
        )
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise StatsError(f"{source}: mu/sigma must be floating point, got {mu.dtype} / {sigma.dtype}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatsError(f"{source}: mu/sigma hold NaN or Inf")
    return {"mu": mu, "sigma": sigma}


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except Exception as e:
        raise StatsError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def _npz_image_key(keys: list[str]) -> str | None:
    return next((k for k in ("arr_0", "images") if k in keys), None)


def load_stats_npz(path: str | Path, dim: int = FEATURE_DIM) -> dict[str, np.ndarray]:
    """Read and check FID statistics {mu, sigma} from an .npz (ADM / official JiT format)."""
    path = Path(path)
    keys = _npz_keys(path)
    if "mu" not in keys or "sigma" not in keys:
        raise StatsError(
            f"{path}: expected FID statistics 'mu' ({dim},) and 'sigma' ({dim}, {dim}), found keys {keys}"
        )
    with np.load(path, allow_pickle=False) as data:
        return validate_stats(data["mu"], data["sigma"], str(path), dim)


def save_stats(path: str | Path, stats: dict, **meta) -> None:
    """Atomically write {mu, sigma} plus JSON metadata as an .npz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_json = np.array(json.dumps(meta, sort_keys=True))
    atomic_write(path, lambda f: np.savez(f, mu=stats["mu"], sigma=stats["sigma"], meta=meta_json))


def default_cache_dir() -> Path:
    root = os.environ.get("JIT_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jit_fast")
    return Path(root) / "fid_stats"


def list_images(folder: str | Path) -> list[str]:
    """Image files under `folder` (recursive), sorted by real path as torch-fidelity sorts them."""
    files = []
    for root, _, names in os.walk(folder, followlinks=True):
        files += [os.path.realpath(os.path.join(root, f)) for f in names if f.lower().endswith(IMAGE_EXTS)]
    return sorted(files)


def folder_fingerprint(folder: str | Path, files: list[str]) -> str:
    """sha256 over every image's relative path, byte size and modification time."""
    h = hashlib.sha256()
    base = os.path.realpath(folder)
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, base)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_image(path: str, crop: int | None) -> torch.Tensor:
    if crop:
        from jit_fast.data import center_crop

        arr = center_crop(path, crop)
    else:
        with Image.open(path) as img:
            arr = np.array(img.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


class _FileImages(torch.utils.data.Dataset):
    def __init__(self, files: list[str], crop: int | None):
        self.files, self.crop = files, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _read_image(self.files[i], self.crop)


def features_of_files(
    acc: FeatureAccumulator, files: list[str], crop: int | None = None, num_workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Feed this rank's contiguous, grid-aligned share of `files` to `acc` (decoded by a DataLoader)."""
    rank, world = dist_info()
    bs = acc.batch_size
    n_batches = -(-len(files) // bs)
    lo, hi = rank * n_batches // world * bs, min((rank + 1) * n_batches // world * bs, len(files))
    if hi <= lo:
        return
    loader = torch.utils.data.DataLoader(
        _FileImages(files[lo:hi], crop), batch_size=bs, num_workers=num_workers, collate_fn=list
    )
    start = lo
    for batch in loader:
        # images of different sizes cannot share a batch: run each run of equal shapes separately
        i = 0
        while i < len(batch):
            j = i + 1
            while j < len(batch) and batch[j].shape == batch[i].shape:
                j += 1
            acc.add(torch.stack(batch[i:j]), start + i)
            i = j
        start += len(batch)
        if progress is not None:
            progress(len(batch))


class NpzRows:
    """Rows of one array inside an .npz read on demand (the file is never loaded whole)."""

    def __init__(self, path: Path, key: str) -> None:
        self.zip = zipfile.ZipFile(path)
        self.f = self.zip.open(key + ".npy")
        version = np.lib.format.read_magic(self.f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = read(self.f)
        if fortran:
            raise StatsError(f"{path}: '{key}' is stored in Fortran order")
        self.offset = self.f.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        self.f.seek(self.offset + start * self.row_bytes)
        buf = self.f.read((stop - start) * self.row_bytes)
        return np.frombuffer(buf, self.dtype).reshape(stop - start, *self.shape[1:])

    def close(self) -> None:
        self.f.close()
        self.zip.close()


def _features_of_npz_images(acc: FeatureAccumulator, path: Path, key: str) -> None:
    rank, world = dist_info()
    rows = NpzRows(path, key)
    try:
        if rows.dtype != np.uint8 or len(rows.shape) != 4:
            raise StatsError(f"{path}: '{key}' must be uint8 images (N, H, W, 3), got {rows.dtype} {rows.shape}")
        bs, n = acc.batch_size, rows.shape[0]
        n_batches = -(-n // bs)
        lo, hi = rank * n_batches // world * bs, min((rank + 1) * n_batches // world * bs, n)
        for s in range(lo, hi, bs):
            acc.add(rows.read(s, min(s + bs, hi)).copy(), s)
    finally:
        rows.close()


def reference_stats(
    ref: str | Path,
    make_accumulator: Callable[[], FeatureAccumulator],
    weights_id: str,
    cache_dir: str | Path | None = None,
    crop: int | None = None,
    num_workers: int = 0,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, np.ndarray]:
    """FID reference {mu, sigma} from a stats .npz, an images .npz or an image folder (cached).

    Folder and image-npz statistics are computed once by all ranks together and cached under
    `cache_dir` keyed by the content fingerprint, the Inception weights and the crop size.
    Every rank checks the reference; the statistics are returned on rank 0 (None elsewhere).
    """
    ref = Path(ref)
    if ref.is_file():
        keys = _npz_keys(ref)
        if "mu" in keys or "sigma" in keys or _npz_image_key(keys) is None:
            stats = load_stats_npz(ref)
            return stats if dist_info()[0] == 0 else None
        st = ref.stat()
        content = f"npz:{os.path.realpath(ref)}:{st.st_size}:{st.st_mtime_ns}"
        files = None
    elif ref.is_dir():
        files = list_images(ref)
        if len(files) < 2:
            raise StatsError(f"{ref}: need at least 2 images ({', '.join(IMAGE_EXTS)}) for FID statistics")
        content = "dir:" + folder_fingerprint(ref, files)
    else:
        raise StatsError(f"FID reference not found: {ref}")
    key = hashlib.sha256(
        json.dumps([STATS_CACHE_VERSION, content, weights_id, crop, POOL]).encode()
    ).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / f"{ref.name or 'ref'}-{key[:16]}.npz"
    if broadcast_object(None, cached.is_file()):  # rank 0 decides, so all ranks take the same path
        log(f"FID reference: cached statistics {cached}")
        return load_stats_npz(cached) if dist_info()[0] == 0 else None
    log(f"FID reference: computing statistics of {ref} (cached afterwards as {cached})")
    acc = make_accumulator()
    if files is None:
        _features_of_npz_images(acc, ref, _npz_image_key(keys))
    else:
        features_of_files(acc, files, crop, num_workers)
    feats = acc.gather()
    rank, world = dist_info()
    stats = fid_stats(feats[POOL]) if rank == 0 else None
    if rank == 0:
        save_stats(cached, stats, source=str(ref), num_images=int(feats[POOL].shape[0]), weights=weights_id,
                   crop=crop, key=key)
    if world > 1:
        dist.barrier()
    return stats
