"""Record tests/data/cli_golden.json: every train.py and sample.py option parsed with sample values (issue 28).

Run once with the code whose behaviour is the reference: `PYTHONPATH=. python tests/record_cli_golden.py`.
One JSON line of defaults, then one line per case;
tests/test_cli_compat.py re-parses each recorded argv and compares the outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import sys
from pathlib import Path

from jit_fast.configs import SampleConfig, TrainConfig
from jit_fast.sampling import generate
from jit_fast.shared.errors import UsageError
from jit_fast.train import cli as train_cli

GOLDEN = Path(__file__).parent / "data" / "cli_golden.json"
TRAIN_BASE = ["--data-path", "/tmp/jit-golden-data"]
SAMPLE_BASE = ["--ckpt", "c.pth"]
# Candidate values tried for every option taking one (valid ones give a config, invalid ones an error).
CANDIDATES = ["0", "1", "3", "0.5", "0.999", "1.5", "-1", "nan", "inf", "1e300", "abc", "cosine", "euler", "bf16",
              "fp16", "on", "off", "dali", "torch", "triton", "linear", "auto", "cpu", "JiT-B/32", "JiT-T/4",
              "demo", "demo-text", "imagenette", "hidden_size=32", "sequence", "empty", "2:4", "named", "ema2",
              "ema1,model", "2.5,2.7", "/tmp/jit-golden-missing"]


def _plain(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def flat(cfg) -> dict:
    """Field name -> JSON value of a (flat today) config dataclass."""
    return {k: _plain(v) for k, v in dataclasses.asdict(cfg).items()}


def _outcome(parse) -> dict:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse()
    except SystemExit as e:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        return {"exit": e.code, "message": lines[-1] if lines else ""}
    except UsageError as e:
        return {"error": str(e)}


def parse_train(argv: list[str]) -> dict:
    """Outcome of train.py's parser: changed fields and explicit set, or the error."""
    def go():
        cfg, explicit = train_cli.parse_config(argv)
        default = flat(TrainConfig())
        changed = {k: v for k, v in flat(cfg).items() if default[k] != v}
        return {"changed": changed, "explicit": sorted(explicit)}
    return _outcome(go)


def parse_sample(argv: list[str]) -> dict:
    """Outcome of sample.py's parser plus SampleConfig.validate: the config fields, or the error."""
    def go():
        conf = SampleConfig.from_args(generate.build_parser().parse_args(argv))
        conf.validate()
        base = flat(SampleConfig(ckpt="c.pth"))
        return {"changed": {k: v for k, v in flat(conf).items() if base.get(k) != v}}
    return _outcome(go)


def _cases(parser: argparse.ArgumentParser, base: list[str], skip: set[str]) -> list[list[str]]:
    cases = [list(base)]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings or action.dest in skip:
            continue
        for spelling in action.option_strings:
            if action.nargs == 0:
                cases.append(base + [spelling])
            elif action.nargs == 2:
                cases += [base + [spelling, "0.2", "0.9"], base + [spelling, "0.9", "0.2"],
                          base + [spelling, "0", "nan"]]
            else:
                cases += [base + [spelling, v] for v in CANDIDATES]
    return cases


def record() -> dict:
    """All cases of both command lines, parsed with today's code."""
    train_cases = _cases(train_cli.build_parser(), TRAIN_BASE, set())
    train_cases += [["--preset", "demo"], ["--preset", "demo", "--blr", "1e-4"], ["--preset", "demo", "--lr", "0.01"],
                    ["--preset", "demo", "--model-arg", "depth=2", "--model-arg", "text_tokens=sequence"],
                    ["--preset", "demo-text", "--text-tokens", "sequence"], ["--demo-data", "--model", "JiT-T/4",
                     "--use-text-conditioning"], ["--preset", "demo", "--evaluate-gen"],
                    ["--resume", "x", "--evaluate-gen"], [], ["--preset", "nope"], ["--preset", "demo",
                     "--interval-min", "0.9", "--interval-max", "0.1"], ["--preset", "demo", "--no-freeze-llm"],
                    ["--preset", "demo", "--online-eval", "--fid-ref", "/tmp/jit-golden-missing"],
                    ["--preset", "demo", "--profile-steps", "5:2"], ["--preset", "demo", "--model-arg", "depth"]]
    sample_cases = _cases(generate.build_parser(), SAMPLE_BASE, {"ckpt"})
    sample_cases += [["--ckpt", "c.pth", "--preset", "demo"], ["--ckpt", "c.pth", "--preset", "demo", "--cfg", "1.5"],
                     ["--ckpt", "c.pth", "--prompt", "a", "--prompt", "b"], ["--ckpt", "c.pth", "--fid-ref", "s.npz",
                      "--no-metrics"], ["--ckpt", "c.pth", "--images-per-prompt", "2", "--num-images", "4"], [],
                     ["--ckpt", "c.pth", "--cfg", "1,-1"]]
    return {"train_defaults": flat(TrainConfig()), "sample_defaults": flat(SampleConfig(ckpt="c.pth")),
            "train": [{"cli": "train", "argv": a, **parse_train(a)} for a in train_cases],
            "sample": [{"cli": "sample", "argv": a, **parse_sample(a)} for a in sample_cases]}


if __name__ == "__main__":
    data = record()
    rows = [json.dumps(r, sort_keys=True) for k in ("train", "sample") for r in data[k]]
    GOLDEN.write_text(json.dumps({k: v for k, v in data.items() if k not in ("train", "sample")}, sort_keys=True)
                      + "\n" + "\n".join(rows) + "\n")
    print(f"{GOLDEN}: {len(data['train'])} train.py and {len(data['sample'])} sample.py cases", file=sys.stderr)
