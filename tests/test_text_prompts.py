"""Sampling prompts: the prompts file is untrusted text; image i gets prompt i mod P at any batch split."""

from __future__ import annotations

import pytest
import torch

from jit_fast.shared.conditioning import TextCondition
from jit_fast.text.prompts import PromptError, prompt_conditions, read_prompts


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa handwritten seven\n\n   the  digit 7 \r\nun chat\n".encode())
    assert read_prompts(f) == ["a handwritten seven", "the digit 7", "un chat"]
    for content, needle in ((b"\n \n", "no prompts"), (b"caf\xe9", "not UTF-8")):
        f.write_bytes(content)
        with pytest.raises(PromptError, match=needle) as err:
            read_prompts(f)
        assert str(f) in str(err.value)
    with pytest.raises(PromptError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")


def test_prompt_rows_do_not_depend_on_the_batch_split():
    encoded = TextCondition(torch.arange(3.0)[:, None].expand(3, 4).contiguous())
    whole = prompt_conditions(encoded, 0, 8).pooled[:, 0].tolist()
    assert whole == [0, 1, 2, 0, 1, 2, 0, 1]
    parts = torch.cat([prompt_conditions(encoded, s, e).pooled for s, e in ((0, 3), (3, 5), (5, 8))])
    assert parts[:, 0].tolist() == whole
