"""Shared test helpers: tiny data, tiny runs, torchrun, calls that must not hang."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# A tiny JiT (2 blocks, 16 px, in-context tokens from block 1) on 4 classes x 16 JPEGs (64 images):
# 8 samples per global batch gives 8 steps per epoch, so 20 steps cross two epoch boundaries.
# The EMA decays differ from each other and from the defaults (see `assert_distinct_decays`).
TINY = [
    "--model", "JiT-T/4", "--model-arg", "depth=2", "--model-arg", "in_context_start=1", "--img-size", "16",
    "--data-backend", "torch", "--num-workers", "0", "--lr", "1e-3", "--warmup-epochs", "1",
    "--ema-decay1", "0.9", "--ema-decay2", "0.5", "--log-freq", "1", "--no-tensorboard", "--batch-size", "8",
]


def make_image_folder(root: Path, classes: int = 4, per_class: int = 16, size: int = 20, seed: int = 0) -> Path:
    """A small JPEG ImageFolder with class-dependent colors; returns its root."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([(c * 60) % 256, (c * 110 + 40) % 256, (255 - c * 50) % 256], dtype=np.float64)
            arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:03d}.jpg", quality=95)
    return root


def tiny_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, "--data-path", str(data), "--output-dir", str(out), *extra]


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl (log_freq 1; evaluation rows skipped)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "kind" not in d:
            out[d["step"]] = d["loss"]
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model, optimizer, both EMAs) as full CPU tensors."""
    from jit_fast.checkpoint import latest_checkpoint
    from jit_fast.checkpoint.dcp import load_dcp_keys

    ckpt = Path(ckpt)
    if not (ckpt / ".metadata").is_file():
        ckpt = latest_checkpoint(ckpt)
    return flatten(load_dcp_keys(ckpt, {"model", "optim", "ema1", "ema2"}))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    assert any(k.startswith("optim/state/") for k in a) and any(k.startswith("ema2/") for k in a)


def assert_distinct_decays(decay1: float, decay2: float) -> None:
    """The EMA decays of a test differ from each other and from the defaults: an EMA built with the other one's
    decay (or a default) then fails the closed-form checks against the configured decays."""
    from jit_fast.configs import TrainConfig

    defaults = {TrainConfig.ema_decay1, TrainConfig.ema_decay2}
    assert decay1 != decay2 and decay1 not in defaults and decay2 not in defaults, (decay1, decay2)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(cache: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env.pop("TRITON_INTERPRET", None)
    if cache is not None:
        env["JIT_FAST_CACHE"] = str(cache)
    env.update(extra)
    return env


def torchrun(args: list[str], nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 300,
             launcher_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node=nproc <args>` on a free 127.0.0.1 port (cwd = repo root)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *launcher_args, *args]
    return subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def native_crash(p: subprocess.CompletedProcess) -> bool:
    """A torchrun launch failed because a worker died by SIGABRT/SIGSEGV (a C++ abort, not a Python error).

    Seen on CI and here in the 2-rank `grads` launches: a rank aborts with "terminate called without an active
    exception" after its work, while the interpreter finalizes (faulthandler: no Python frame). The Trainer was
    then still alive, held by a reference cycle; the worker now collects it before exiting (35 launches: 2
    aborts without that, 0 of 40 with it). Such a launch is rerun once; a crash that repeats still fails.
    """
    return p.returncode != 0 and re.search(r"exitcode\s*:\s*-(6|11)\b", p.stderr) is not None


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py <args>` in a subprocess (cwd = repo root)."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_worker(args: list[str], env: dict[str, str] | None = None, timeout: float = 300
               ) -> subprocess.CompletedProcess:
    """`python tests/dist_worker.py <args>` in one process (cwd = repo root): train.py's run with a test hook."""
    return subprocess.run([sys.executable, str(REPO / "tests" / "dist_worker.py"), *args], cwd=REPO,
                          env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)


def describe(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"


def run_with_timeout(fn, seconds: float, fifo: Path | None = None):
    """fn() in a thread; fails if it has not returned in time (then unblocks a reader stuck on `fifo`)."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            result["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive() and fifo is not None:
        try:  # lets the stuck open() return so the thread can end
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert not t.is_alive(), f"did not return within {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


COLORS = ("red", "green", "blue", "gray")


def make_text_data(root: Path) -> tuple[Path, Path, list[str]]:
    """A captioned folder (the 64 images of `make_image_folder`, captioned "a red picture" ... by class), a tiny
    local text encoder made from the captions and their embedding cache; returns (data, cache, train flags)."""
    from jit_fast.data.encode_text import encode_captions
    from jit_fast.text.encoder import TextEncoder
    from jit_fast.text.tiny import build_tiny_encoder

    classes = make_image_folder(root / "classes")
    data = root / "captioned"
    (data / "images").mkdir(parents=True)
    (data / "captions").mkdir()
    captions = []
    for c in range(4):
        for i, img in enumerate(sorted((classes / f"class{c}").iterdir())):
            caption = f"{'a' if i % 2 else 'the'} {COLORS[c]} picture"
            os.replace(img, data / "images" / f"c{c}_{i:03d}.jpg")
            (data / "captions" / f"c{c}_{i:03d}.txt").write_text(caption + "\n")
            captions.append(caption)
    encoder = build_tiny_encoder(root / "encoder", captions, hidden_size=16, layers=1, heads=2)
    cache = encode_captions(data, TextEncoder.load(encoder, device="cpu"), root / "cache", progress=False)
    return data, cache, ["--model", "JiT-T/4-Text", "--text-cache", str(cache)]
