"""Fused JiT block ops: eager references and Triton kernels behind one typed op table.

`jit_kernels` imports nothing from `jit_fast`. The model asks `select_ops(name, device, precision)` (or
`get_ops(name)`) for an `OpTable`, the functions at the op boundaries of a JiT block with their capabilities;
`device_support` says whether the fused table runs on a GPU. Each fused op is declared once, by the `SPEC` of
its module, and registered by one line of `jit_kernels.table.FUSED_OPS`.
"""

from __future__ import annotations

from jit_kernels.table import FUSED_OPS, KERNEL_BACKENDS, OpTable, device_support, get_ops, op_specs, select_ops

__all__ = ["FUSED_OPS", "KERNEL_BACKENDS", "OpTable", "device_support", "get_ops", "op_specs", "select_ops"]
