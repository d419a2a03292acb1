"""`--profile-steps A:B`: a torch.profiler trace of training steps [A, B) and, on CUDA, a memory snapshot.

The trace (`OUTPUT/profile/trace_rank<R>.json`, Chrome/Perfetto format) names every custom op
(`jit_fast::...`) and every Triton kernel by its function name. On CUDA the allocator history of the
same steps is dumped to `OUTPUT/profile/memory_rank<R>.pickle` for https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_step_range(text: str) -> tuple[int, int]:
    """'A:B' with 0 <= A < B (argparse type for --profile-steps)."""
    parts = text.split(":")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (two integers, A < B), got {text!r}") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"expected 0 <= A < B, got {text!r}")
    return a, b


class StepProfiler:
    """Profiles the optimizer steps numbered A..B-1 (the step counter before each step runs)."""

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, rank: int, device: torch.device) -> None:
        self.steps, self.out, self.rank, self.device = steps, out_dir / "profile", rank, device
        self.prof: torch.profiler.profile | None = None
        self.memory = False

    def before_step(self, step: int) -> None:
        """Start recording when `step` is the first profiled step."""
        if self.steps is None or step != self.steps[0] or self.prof is not None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            self.memory = True
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
        self.prof.__enter__()

    def after_step(self, step: int) -> None:
        """Stop and write the files once step B-1 has run (`step` is the counter after the step)."""
        if self.prof is None or step < self.steps[1]:
            return
        self.close()

    def close(self) -> None:
        """Write what was recorded (also for a run that ends inside the range)."""
        if self.prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.__exit__(None, None, None)
        trace = self.out / f"trace_rank{self.rank}.json"
        self.prof.export_chrome_trace(str(trace))
        self.prof = None
        written = [trace]
        if self.memory:
            snap = self.out / f"memory_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(snap))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory = False
            written.append(snap)
        if self.rank == 0:
            print(f"profile written: {', '.join(map(str, written))}", file=sys.stderr, flush=True)
