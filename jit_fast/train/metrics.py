"""Training metrics: model FLOPs, MFU, peak memory, and a rank-0 TensorBoard + JSON-lines logger."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from jit_fast.configs import ModelConfig
from jit_fast.shared.errors import UserError
from jit_fast.shared.files import atomic_write

# Dense bf16 tensor-core peak per device in TFLOP/s (vendor datasheets, no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,  # NVIDIA H200 SXM datasheet
    "H100 SXM": 989.4,  # NVIDIA H100 SXM5 datasheet
    "H100 NVL": 835.0,
    "H100 PCIE": 756.0,
    "H100": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,  # NVIDIA B200 (HGX) datasheet
    "A100": 312.0,  # NVIDIA A100 datasheet
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
}


def forward_macs_per_image(cfg: ModelConfig) -> float:
    """Multiply-accumulates of one forward pass on one image (matmuls, convs and attention).

    JiT-B/16 at 256 gives 25.0e9, the paper's "25 Gflops" (which count multiply-adds).
    """
    d, p, c, b, h = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.bottleneck_dim, cfg.mlp_hidden
    n = cfg.grid_size**2
    macs = n * (c * p * p * b + b * d)  # bottleneck patch embed
    macs += 256 * d + d * d  # timestep MLP
    for i in range(cfg.depth):
        tokens = n + (cfg.in_context_len if cfg.in_context_len > 0 and i >= cfg.in_context_start else 0)
        macs += d * 6 * d  # adaLN (per image)
        macs += tokens * (3 * d * d + d * d + 2 * d * h + h * d)  # qkv, proj, w12, w3
        macs += 2 * tokens * tokens * d  # q k^T and attn v
    macs += d * 2 * d + n * d * p * p * c  # final adaLN and linear
    return float(macs)


def train_flops_per_image(cfg: ModelConfig) -> float:
    """Model FLOPs of one training step per image: forward + backward = 3 x forward, 2 FLOPs per MAC."""
    return 6.0 * forward_macs_per_image(cfg)


def peak_flops(device: torch.device, precision: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for MFU, or None when unknown (CPU, fp32, unlisted GPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or peak resident set size of the process (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except (ImportError, OSError):
        return 0.0


DROPPED_METRICS_FILE = "metrics.dropped.jsonl"


def drop_rows_after(path: str | Path, step: int, log: Callable[[str], None] | None = None) -> int:
    """Move rows with step > `step` from metrics.jsonl to metrics.dropped.jsonl beside it; returns how many (and
    says so through `log`).

    A resume redoes the steps after its checkpoint (or abandons them, --discard-newer): their old rows
    would otherwise stay as duplicates. The file is rewritten atomically and the rows are kept aside.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row_step = json.loads(line).get("step")
        except (ValueError, AttributeError):  # e.g. a row cut short by a kill: not continued by new rows
            row_step = math.inf
        (drop if isinstance(row_step, int | float) and row_step > step else keep).append(line)
    if not drop:
        return 0
    drop = [x if x.endswith("\n") else x + "\n" for x in drop]
    with open(path.with_name(DROPPED_METRICS_FILE), "a") as f:
        f.writelines(drop)
        f.flush()
        os.fsync(f.fileno())
    atomic_write(path, "".join(keep))
    if log is not None:
        log(f"moved {len(drop)} metrics.jsonl row(s) after step {step} to {DROPPED_METRICS_FILE}")
    return len(drop)


class MetricsLogger:
    """Scalars and images to TensorBoard (`<out>/tb`), `<out>/metrics.jsonl` and optionally Weights & Biases.

    A no-op off rank 0. W&B (`wandb_project`) is optional: it runs offline when no server is reachable
    and keeps one run id per output directory (`<out>/wandb_id`), so a resumed run continues its curves.
    """

    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self.wandb = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(out / "tb"))
            except ImportError as e:  # tensorboard is a declared dependency; keep training without it
                print(f"warning: TensorBoard logging disabled ({e})", file=sys.stderr)
        if wandb_project:
            self.wandb = start_wandb(wandb_project, out, config or {})

    def log(self, step: int, scalars: dict[str, float | str | None], group: str = "train") -> None:
        """One metrics.jsonl row; TensorBoard/W&B scalars named `group/key` (numbers only: None and text, such
        as a divergence's reason, go to metrics.jsonl alone)."""
        if not self.enabled:
            return
        present = {f"{group}/{k}": v for k, v in scalars.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for k, v in present.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(present, step=step)
        row = {"step": step, **scalars} if group == "train" else {"step": step, "kind": group, **scalars}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def log_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 HWC image (e.g. a sample grid) to TensorBoard and W&B."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_reachable(timeout_s: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def start_wandb(project: str, out: Path, config: dict):
    """A W&B run for `project` (offline without network unless WANDB_MODE says otherwise); its id is kept in OUT."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None
    id_file = out / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if not run_id or not run_id.isalnum() or len(run_id) > 64:
        run_id = wandb.util.generate_id()
        atomic_write(id_file, run_id + "\n")
    mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_reachable() else "offline")
    if mode == "offline":
        print(f"W&B: no server reachable, logging offline to {out / 'wandb'} (upload later with `wandb sync`)",
              file=sys.stderr)
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(out), mode=mode, config=config,
                      name=out.name)
