"""Triton kernels for RMSNorm and SkipRMSNorm (the cuda target's face of plugins/norms).

One program per row of H values (H ≤ 16384, one block): the residual sum is formed in the
activation dtype and written back (SkipRMSNorm's second output), then normalized in float32 —
the same rounding points as transformers' Qwen2RMSNorm (all arithmetic is float32, rounded
to the activation dtype where torch rounds: exact on the GPU and under the interpreter alike):

    s = x + skip (+ bias)                          # activation dtype
    y = (s * rsqrt(mean(s²) + eps)).to(dtype) * w  # statistics in float32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmc.quantization import next_pow2

from ..triton_util import inputs_ready, output, pdl, to


@triton.jit
def _rms_norm_kernel(x_ptr, skip_ptr, bias_ptr, w_ptr, y_ptr, sum_ptr, n_cols, eps,
                     HAS_SKIP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    inputs_ready(PDL)
    x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0)
    dt = x.dtype
    xf = x.to(tl.float32)  # arithmetic in float32, rounded to dt where torch rounds
    if HAS_SKIP:
        xf = to(xf + tl.load(skip_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32), dt).to(tl.float32)
        if HAS_BIAS:
            xf = to(xf + to(tl.load(bias_ptr + cols, mask=m, other=0.0), dt).to(tl.float32), dt).to(tl.float32)
        tl.store(sum_ptr + row * n_cols + cols, to(xf, dt), mask=m)
    r = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    tl.store(y_ptr + row * n_cols + cols, normed(xf, r, w, dt), mask=m)


@triton.jit
def normed(xf, r, w, dt: tl.constexpr):
    """(xf * r).to(dt) * w.to(dt), rounded to dt: the norm's output with transformers' rounding
    points (xf float32, r the row's 1/rms; also the GEMV's rms prologue)."""
    return to(to(xf * r, dt).to(tl.float32) * to(w, dt).to(tl.float32), dt)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, skip: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, out=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., H] (skip the same shape) -> (y [..., H], s = x + skip (+ bias), or None without skip);
    out: [y, s] buffers to write (either None)."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h).contiguous()
    y = output(out, 0, x2.shape, x.dtype, x.device)
    s = None
    if skip is not None:
        skip = skip.reshape(-1, h).to(x.dtype).contiguous()
        s = output(out, 1, x2.shape, x.dtype, x.device)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, skip if skip is not None else x2, bias if bias is not None else weight, weight, y,
        s if s is not None else y, h, float(eps), HAS_SKIP=skip is not None, HAS_BIAS=bias is not None,
        BLOCK=next_pow2(h, 1), num_warps=8 if h >= 2048 else 4, **pdl(x.device, x2.shape[0]))
    return y.view(x.shape), (s.view(x.shape) if s is not None else None)
