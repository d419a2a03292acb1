"""Every train.py and sample.py flag keeps its meaning (issue 28): argv recorded with the old parsers, re-parsed now.

tests/data/cli_golden.json was written by tests/record_cli_golden.py before the options moved onto the config
fields: each case holds the fields that differ from the defaults and the explicit set (or the error). An error
must stay an error (exit 2 from argparse, or the UsageError message) that names the same flag, or the flag
of the case (an old message that named the field instead of the flag, like `--solver` for
`--sampling-method`, now names the flag).
"""

from __future__ import annotations

import json
import re

import pytest
from record_cli_golden import GOLDEN, SAMPLE_BASE, TRAIN_BASE, flat, parse_sample, parse_train

_LINES = GOLDEN.read_text().splitlines()
HEADER = json.loads(_LINES[0])
CASES = [json.loads(line) for line in _LINES[1:]]
BASE = {"train": TRAIN_BASE, "sample": SAMPLE_BASE}


def test_defaults_unchanged():
    from jit_fast.configs import SampleConfig, TrainConfig

    """Every recorded field keeps its default (fields added since are new settings, not changed ones)."""
    for now, recorded in ((flat(TrainConfig()), HEADER["train_defaults"]),
                          (flat(SampleConfig(ckpt="c.pth")), HEADER["sample_defaults"])):
        assert {k: now.get(k, "missing") for k in recorded} == recorded


def _invalid_model(changed: dict) -> bool:
    """True if the model overrides of a recorded config are refused when the model is built."""
    from jit_fast.configs import model_config

    try:
        model_config("JiT-T/4", **changed.get("extra_model_args", {}))
    except (ValueError, TypeError):
        return True
    return False


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
            if got == want:
                continue
            if "changed" not in got and _invalid_model(case["changed"]) and _flags(got["message"]) & set(case["argv"]):
                continue  # a value the model would refuse at build time is now refused at parse time
            bad.append((case["argv"], want, got))
        elif "changed" in got:
            bad.append((case["argv"], case, got))
        else:
            old = case.get("message") or case.get("error")
            new = got.get("message") or got.get("error")
            named = _flags(old) <= _flags(new) or bool(_flags(new) & (set(case["argv"]) - set(BASE[cli])))
            if got.get("exit", 2) != 2 or not (named or old == new):
                bad.append((case["argv"], case, got))
    assert not bad, f"{len(bad)} recorded command lines changed, first: {bad[:3]}"
