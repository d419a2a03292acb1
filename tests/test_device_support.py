"""GPU generations: which ones run the fused kernels (and in which precisions), the model's fallback to the torch ops
elsewhere, and flash-attn only where it runs. No GPU here: CUDA tensors are fake, the device capability patched."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import jit_fast
from jit_kernels import device_support, get_ops, reference, select_ops
from jit_kernels.compile_check import TARGETS


@pytest.mark.parametrize("capability,precision,ok", [
    ((7, 5), "fp16", True), ((7, 5), "fp32", True), ((7, 5), "bf16", False),  # T4: no bf16
    ((8, 6), "bf16", True), ((8, 9), "fp16", True), ((9, 0), "bf16", True),
    ((7, 0), "fp16", False), ((6, 1), "fp32", False),  # V100, P40: older than every target
    ((8, 7), "bf16", True), ((12, 0), "bf16", True),  # not compile-checked, newer than a target
])
def test_device_support(capability, precision, ok):
    got, reason = device_support(capability, precision)
    assert got == ok and reason.startswith(f"sm_{capability[0]}{capability[1]}")
    checked = 10 * capability[0] + capability[1] in TARGETS
    assert ("not a compile-checked target" in reason) == (ok and not checked)


def fallback(capability: tuple[int, int], precision: str, monkeypatch) -> tuple[object, list[str]]:
    """The table `select_ops("triton", "cuda", precision)` gives on a GPU with `capability`, and its warnings."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = select_ops("triton", "cuda", precision)
    return table, [str(w.message) for w in caught]


def fake_cuda_forward(**build) -> torch.nn.Module:
    """A tiny JiT built with `build` options and run twice in fp32 on fake CUDA tensors (the custom ops run their
    fake impls; CUDA autocast needs a real GPU)."""
    with FakeTensorMode(), torch.device("cuda"):
        net = jit_fast.build_model("JiT-T/4", img_size=16, num_classes=10, kernels="triton", **build)
        for _ in range(2):
            net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long))
    return net


def test_old_gpu_falls_back_to_torch_ops_with_one_line_before_the_model_exists(monkeypatch):
    table, messages = fallback((7, 0), "fp32", monkeypatch)
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("kernels=triton falls back to the torch ops: sm_70: ")
    assert table == get_ops("torch")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        net = fake_cuda_forward(device="cuda")
    assert all(m.ops.swiglu is reference.swiglu for m in net.modules() if hasattr(m, "ops"))
    assert not net.c_activated and not net.fused_dropout  # the torch table's forward, declared by the table


def test_turing_runs_the_kernels_in_fp16_not_bf16(monkeypatch):
    for precision, falls_back in (("fp16", False), ("bf16", True)):
        table, messages = fallback((7, 5), precision, monkeypatch)
        assert messages == (["kernels=triton falls back to the torch ops: sm_75 has no bf16 (the fused kernels run "
                             "fp32 and fp16 there); use fp16"] if falls_back else [])
        assert table.name == ("torch" if falls_back else "triton")


def test_a_fused_model_refuses_a_gpu_its_kernels_do_not_run_on(monkeypatch):
    """A model built without `select_ops` for its device cannot silently run kernels that do not run there: its first
    CUDA forward says why and how to build it, and nothing in its table changed."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    net = fake_cuda_forward()  # fp32 runs on sm_75: the first forward's check passes
    assert net.device_checked and net.ops is get_ops("triton")
    net.check_device(torch.device("cuda"), torch.float16)  # so does fp16
    with pytest.raises(RuntimeError, match=r"sm_75 has no bf16 .*select_ops\('triton', device, 'bf16'\)"):
        net.check_device(torch.device("cuda"), torch.bfloat16)
    assert net.ops is get_ops("triton") and net.ops.swiglu.__module__ == "jit_kernels.swiglu"
