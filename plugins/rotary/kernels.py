"""Triton kernel for RotaryEmbedding (the cuda target's face of plugins/rotary): text RoPE,
M-RoPE (the tables arrive already gathered per t/h/w section) and the vision tower's 2-D rotary.

One program per token and block of heads; any input strides (q/k usually arrive as transposed
views), contiguous output:

    lo = x[..., :R/2], hi = x[..., R/2:R]
    y[..., :R/2] = lo·cos - hi·sin;  y[..., R/2:R] = hi·cos + lo·sin;  y[..., R:] = x[..., R:]

cos/sin are rounded to the activation dtype first (transformers casts the tables), the rest is
float32 with one rounding at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmc.quantization import next_pow2

from ..triton_util import output


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, seq, heads, rot_dim, head_dim,
                   sxb, sxn, sxs, sxd, scb, scs, syb, syn, sys_,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // seq).to(tl.int64)
    s = (pid % seq).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    half = rot_dim // 2
    in_rot = d < rot_dim
    cos = tl.load(cos_ptr + b * scb + s * scs + d, mask=in_rot, other=0.0)
    sin = tl.load(sin_ptr + b * scb + s * scs + d, mask=in_rot, other=0.0)
    hm = (h < heads)[:, None]
    dm = (d < head_dim)[None, :]
    base = x_ptr + b * sxb + s * sxs + h[:, None].to(tl.int64) * sxn
    x = tl.load(base + d[None, :] * sxd, mask=hm & dm, other=0.0)
    partner = tl.where(d < half, d + half, d - half)
    xp = tl.load(base + partner[None, :] * sxd, mask=hm & in_rot[None, :], other=0.0).to(tl.float32)
    cosf = cos.to(x.dtype).to(tl.float32)[None, :]
    sinf = sin.to(x.dtype).to(tl.float32)[None, :]
    sign = tl.where(d < half, -1.0, 1.0)[None, :]
    xf = x.to(tl.float32)
    # transformers' rounding points: x*cos and rotate_half(x)*sin each rounded to x's dtype, then summed
    rot = (xf * cosf).to(x.dtype).to(tl.float32) + (sign * xp * sinf).to(x.dtype).to(tl.float32)
    y = tl.where(in_rot[None, :], rot, xf)
    tl.store(y_ptr + b * syb + s * sys_ + h[:, None].to(tl.int64) * syn + d[None, :], y.to(x.dtype), mask=hm & dm)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int = 0,
           layout: str = "bnsd", out=None) -> torch.Tensor:
    """x [B, N, S, D] with cos/sin [B, S, R] ("bnsd"), or x [S, N, D] with cos/sin [S, R] ("snd")."""
    d = x.shape[-1]
    r = rotary_dim or d
    y = output(out, 0, x.shape, x.dtype, x.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    if layout == "bnsd":
        bsz, heads, seq = x.shape[:3]
        sx = (x.stride(0), x.stride(1), x.stride(2), x.stride(3))
        sc = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))
        sy = (y.stride(0), y.stride(1), y.stride(2))
    else:
        bsz, (seq, heads) = 1, x.shape[:2]
        sx = (0, x.stride(1), x.stride(0), x.stride(2))
        sc = (0, cos.stride(0))
        sy = (0, y.stride(1), y.stride(0))
    block_h = min(16, next_pow2(heads, 1))
    _rotary_kernel[(bsz * seq, triton.cdiv(heads, block_h))](
        x, cos, sin, y, seq, heads, r, d, *sx, *sc, *sy, BLOCK_H=block_h, BLOCK_D=next_pow2(d, 1))
    return y
