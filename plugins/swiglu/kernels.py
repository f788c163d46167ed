"""Triton kernel for the gated MLP activation (the cuda target's face of plugins/swiglu).

    y = act(gate) * up        gate/up: the two halves of gate_up [..., 2I], or two tensors

Elementwise over [rows, I] in blocks; the activation is computed in float32 and rounded to the
activation dtype before the product, as torch computes F.silu(gate) * up in bf16.
    silu: g·σ(g)   gelu: ½g(1 + erf(g/√2))   gelu_tanh: ½g(1 + tanh(√(2/π)(g + 0.044715g³)))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_util import inputs_ready, output, pdl, to

ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, y_ptr, n_cols, g_row_stride, u_row_stride, ACT: tl.constexpr, BLOCK: tl.constexpr,
                   PDL: tl.constexpr):
    inputs_ready(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    g = tl.load(g_ptr + row * g_row_stride + cols, mask=m, other=0.0)
    u = tl.load(u_ptr + row * u_row_stride + cols, mask=m, other=0.0)
    tl.store(y_ptr + row * n_cols + cols, gated(g, u, ACT), mask=m)


@triton.jit
def gated(g, u, ACT: tl.constexpr):
    """act(g) * u in g's dtype with torch's rounding points (also the GEMV's swiglu prologue)."""
    gf = g.to(tl.float32)
    if ACT == 0:
        a = gf * tl.sigmoid(gf)
    elif ACT == 1:
        a = 0.5 * gf * (1.0 + tl.erf(gf * 0.7071067811865476))
    else:  # tanh(z) = 2σ(2z) - 1
        z = 0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)
        a = 0.5 * gf * (2.0 * tl.sigmoid(2.0 * z))
    return to(to(a, g.dtype).to(tl.float32) * u.to(tl.float32), g.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None, activation: str = "silu", out=None) -> torch.Tensor:
    """gate_up [..., 2I] (up None) or gate, up [..., I] -> y [..., I]."""
    if up is None:
        width = gate.shape[-1] // 2
        gu = gate.reshape(-1, 2 * width).contiguous()
        g, u, gs_, us = gu, gu[:, width:], gu.stride(0), gu.stride(0)
        lead = gate.shape[:-1]
    else:
        width = gate.shape[-1]
        g, u = gate.reshape(-1, width).contiguous(), up.reshape(-1, width).to(gate.dtype).contiguous()
        gs_, us = width, width
        lead = gate.shape[:-1]
    rows = g.shape[0]
    y = output(out, 0, (rows, width), gate.dtype, gate.device)
    block = min(1024, triton.next_power_of_2(width))
    _swiglu_kernel[(rows, triton.cdiv(width, block))](g, u, y, width, gs_, us, ACT=ACTS[activation], BLOCK=block,
                                                      **pdl(gate.device, rows * triton.cdiv(width, block)))
    return y.view(*lead, width)
