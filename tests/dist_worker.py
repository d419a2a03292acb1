"""torchrun worker for the distributed tests: trains with the CLI flags given and checks the sharded EMAs.

Besides a normal run (checkpoints, metrics.jsonl) it gathers the parameters after every step and, at the
end, checks on rank 0 that both sharded EMAs equal the closed-form recurrence over the gathered
parameters, writing the verdict to OUTPUT_DIR/ema_check.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from jit_fast import distributed as D
from jit_fast.train import Trainer, parse_config


def main(argv: list[str]) -> int:
    cfg, explicit = parse_config(argv)
    env = D.init_distributed(cfg.device)
    try:
        tr = Trainer(cfg, env, explicit)
        history = [[D.full_tensor(p).detach().double() for p in tr.params]]
        tr.run(step_callback=lambda t: history.append([D.full_tensor(p).detach().double() for p in t.params]))
        report = {"world_size": env.world_size, "sharded": [], "max_err": {}}
        for name, ema in (("ema1", tr.ema1), ("ema2", tr.ema2)):
            state = tr._ema_state(ema)
            full = [D.full_tensor(state[n]).double() for n in tr.names]
            same_layout = all(
                s.shape == D.local(p).shape and D.is_dtensor(state[n]) == D.is_dtensor(p)
                for s, p, n in zip(ema.shadow, tr.params, tr.names, strict=True)
            )
            split = env.world_size == 1 or any(
                s.numel() < p.numel() for s, p in zip(ema.shadow, tr.params, strict=True))
            report["sharded"].append(same_layout and split)
            d, k = ema.decay, len(history) - 1
            err = 0.0
            for j, f in enumerate(full):
                ref = d**k * history[0][j] + sum((1 - d) * d ** (k - i) * history[i][j] for i in range(1, k + 1))
                err = max(err, (f - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
            report["max_err"][name] = err
        if env.is_main:
            Path(cfg.output_dir, "ema_check.json").write_text(json.dumps(report))
    finally:
        D.shutdown(env)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
