"""Every train.py and sample.py flag keeps its meaning (issue 28): argv recorded with the old parsers, re-parsed now.

tests/data/cli_golden.json was written by tests/record_cli_golden.py before the options moved onto the config
fields: each case holds the fields that differ from the defaults and the explicit set (or the error). An error
must stay an error (exit 2 from argparse, or the UsageError message) that still names the same flag.
"""

from __future__ import annotations

import json
import re

import pytest
from record_cli_golden import GOLDEN, flat, parse_sample, parse_train

_LINES = GOLDEN.read_text().splitlines()
HEADER = json.loads(_LINES[0])
CASES = [json.loads(line) for line in _LINES[1:]]


def test_defaults_unchanged():
    from jit_fast.configs import SampleConfig, TrainConfig

    assert flat(TrainConfig()) == HEADER["train_defaults"]
    assert flat(SampleConfig(ckpt="c.pth")) == HEADER["sample_defaults"]


def _flags(text: str) -> set[str]:
    return set(re.findall(r"--[A-Za-z][\w-]*", text))


@pytest.mark.parametrize("cli", ["train", "sample"])
def test_recorded_argv_parse_the_same(cli):
    parse = parse_train if cli == "train" else parse_sample
    bad = []
    for case in (c for c in CASES if c["cli"] == cli):
        got = parse(case["argv"])
        if "changed" in case:
            want = {k: case[k] for k in ("changed", "explicit") if k in case}
            if got != want:
                bad.append((case["argv"], want, got))
        elif "changed" in got:
            bad.append((case["argv"], case, got))
        else:
            old = case.get("message") or case.get("error")
            new = got.get("message") or got.get("error")
            if got.get("exit", 2) != 2 or not (_flags(old) <= _flags(new) or old == new):
                bad.append((case["argv"], case, got))
    assert not bad, f"{len(bad)} recorded command lines changed, first: {bad[:3]}"
