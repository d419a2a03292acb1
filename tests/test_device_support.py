"""GPU generations: which ones run the fused kernels (and in which precisions), the model's fallback to the torch ops
elsewhere, and flash-attn only where it runs. No GPU here: CUDA tensors are fake, the device capability patched."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import jit_fast
from jit_fast import attention
from jit_kernels import device_support, reference
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


def fake_cuda_forward(capability: tuple[int, int], monkeypatch) -> tuple[object, list[str]]:
    """Two fp32 forwards of a tiny kernels="triton" JiT on fake CUDA tensors of a GPU with `capability` (CUDA autocast
    needs a GPU; the custom ops run their fake impls). Returns (model, warnings)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with FakeTensorMode(), torch.device("cuda"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = jit_fast.build_model("JiT-T/4", img_size=16, num_classes=10, kernels="triton")
        for _ in range(2):  # the check runs once
            net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long))
    return net, [str(w.message) for w in caught]


def test_old_gpu_falls_back_to_torch_ops_with_one_line(monkeypatch):
    net, messages = fake_cuda_forward((7, 0), monkeypatch)
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("kernels=triton falls back to the torch ops: sm_70: ")
    for m in net.modules():
        if hasattr(m, "ops"):
            assert m.ops.swiglu is reference.swiglu and m.ops.rmsnorm_modulate is reference.rmsnorm_modulate


def test_turing_runs_the_kernels_in_fp16_not_bf16(monkeypatch):
    net, messages = fake_cuda_forward((7, 5), monkeypatch)
    assert not messages and net.ops.swiglu.__module__ == "jit_kernels.swiglu"
    for amp, falls_back in ((torch.float16, False), (torch.bfloat16, True)):
        net = jit_fast.build_model("JiT-T/4", img_size=16, num_classes=10, kernels="triton")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net.check_kernels(torch.device("cuda"), amp)
        assert [str(w.message) for w in caught] == (
            ["kernels=triton falls back to the torch ops: sm_75 has no bf16 (the fused kernels run fp32 and fp16 "
             "there); use fp16"] if falls_back else [])
        assert (net.ops.swiglu is reference.swiglu) == falls_back


def test_flash_attn_only_on_ampere_and_newer(monkeypatch):
    """flash-attn 2 needs sm_80+: a T4 (sm_75) gets SDPA even with flash-attn installed."""
    monkeypatch.setattr(attention, "flash_attn_func", lambda q, k, v, dropout_p=0.0: q)
    with FakeTensorMode(), torch.device("cuda"):
        q = torch.randn(1, 4, 2, 8, dtype=torch.float16)
        for (major, minor), want in (((7, 5), False), ((8, 0), True), ((8, 9), True)):
            monkeypatch.setattr(torch.cuda, "get_device_properties",
                                lambda device=None, m=major, n=minor: SimpleNamespace(major=m, minor=n))
            assert attention.flash_supported(q, q, q) is want
        assert not attention.flash_supported(q.float(), q.float(), q.float())  # fp32: SDPA
    assert not attention.flash_supported(torch.randn(1, 4, 2, 8).half(), *[torch.randn(1, 4, 2, 8).half()] * 2)
