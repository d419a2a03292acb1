"""Shared fixtures for the sampling / FID tests: tiny checkpoints, a cheap stand-in Inception, photo sets."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import jit_fast
from jit_fast.checkpoint.official import export_official_checkpoint
from jit_fast.sampling import fid

ROOT = Path(__file__).resolve().parents[1]
IMG, CLASSES = 16, 10


def tiny_net(seed: int = 0) -> jit_fast.JiT:
    """JiT-T/4 at 16 px with every weight perturbed (the official init zeroes adaLN and the output)."""
    torch.manual_seed(seed)
    net = jit_fast.build_model("JiT-T/4", img_size=IMG, num_classes=CLASSES)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def tiny_checkpoint(path: Path, seed: int = 0, noise_scale: float = 1.0) -> Path:
    """Official-layout .pth with distinct model / ema1 / ema2 weights and the official `args`."""
    sd = tiny_net(seed).state_dict()
    ema1 = {k: v + 0.01 for k, v in sd.items()}
    ema2 = {k: v - 0.01 for k, v in sd.items()}
    args = argparse.Namespace(model="JiT-T/4", img_size=IMG, class_num=CLASSES, noise_scale=noise_scale)
    export_official_checkpoint(path, sd, ema1, ema2, 1, args)
    return path


class FakeInception(torch.nn.Module):
    """Cheap deterministic stand-in for torch-fidelity's Inception: uint8 NCHW -> (2048, 1008) features."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.pool_proj = torch.nn.Parameter(torch.randn(48, 2048, generator=g), requires_grad=False)
        self.logit_proj = torch.nn.Parameter(torch.randn(48, 1008, generator=g), requires_grad=False)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3
        self.calls += 1
        h = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return torch.tanh(h @ self.pool_proj), 3 * torch.tanh(h @ self.logit_proj)


def photos() -> list[np.ndarray]:
    """Real RGB photos shipped with scikit-image and scikit-learn."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    out = [np.asarray(getattr(sd, n)())[..., :3] for n in ("astronaut", "chelsea", "coffee", "rocket")]
    return out + list(load_sample_images().images)


def crops(images: list[np.ndarray], n: int, size: int, seed: int, augment: bool) -> np.ndarray:
    """n random size x size crops (uint8 NHWC); with augment: flips, 90-degree turns, gain and gamma."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = images[i % len(images)]
        y0 = rng.integers(0, im.shape[0] - size + 1)
        x0 = rng.integers(0, im.shape[1] - size + 1)
        c = im[y0 : y0 + size, x0 : x0 + size].astype(np.float64)
        if augment:
            if rng.random() < 0.5:
                c = c[:, ::-1]
            c = np.rot90(c, k=int(rng.integers(0, 4)))
            c = 255.0 * (np.clip(c * rng.uniform(0.7, 1.3), 0, 255) / 255.0) ** rng.uniform(0.8, 1.25)
        out.append(np.clip(np.round(c), 0, 255).astype(np.uint8))
    return np.stack(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], timeout: float = 600, threads: int = 1) -> subprocess.CompletedProcess:
    """Run sample.py under torchrun on 127.0.0.1 (gloo on CPU) with `threads` intra-op threads per rank.

    CPU matmuls may split their reductions by thread count, so runs compared bit for bit use the same.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(ROOT / "sample.py"), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def gather_worker(rank: int, world: int, port: int, images: np.ndarray, chunk: int, folder: str, out: str) -> None:
    """mp.spawn target: this rank's chunks into a FeatureAccumulator and a folder's stats, over gloo."""
    import torch.distributed as dist

    from jit_fast.sampling import fid
    from jit_fast.sampling.generate import rank_chunks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ext = FakeInception()
        acc = fid.FeatureAccumulator(ext, 5)
        for _, st, en in rank_chunks(len(images), chunk, rank, world):
            acc.add(images[st:en], st)
        feats = acc.gather()
        stats = fid.reference_stats(folder, lambda: fid.FeatureAccumulator(ext, 5), "w", cache_dir=out + "/cache")
        if rank == 0:
            torch.save({"feats": feats, "stats": stats}, out + "/gathered.pt")
    finally:
        dist.destroy_process_group()


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised Inception state dict (test-only: nothing is downloaded).

    Kaiming-normal convolutions with identity batch norms keep the activation scale through the
    ~90 layers, so the random features still tell images apart (FID > 0, IS > 1).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = fid._skeleton_inception()
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.normal_(m.bias, std=0.1)
        torch.nn.init.normal_(net.fc.weight, std=4.0 / fid.FEATURE_DIM**0.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
