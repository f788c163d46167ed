"""Triton kernel for RotaryEmbedding (the cuda target's face of plugins/rotary): text RoPE,
M-RoPE (the tables arrive already gathered per t/h/w section) and the vision tower's 2-D rotary.

One program per token and block of heads; any input strides (q/k usually arrive as transposed
views), contiguous output:

    lo = x[..., :R/2], hi = x[..., R/2:R]
    y[..., :R/2] = lo·cos - hi·sin;  y[..., R/2:R] = hi·cos + lo·sin;  y[..., R:] = x[..., R:]

cos/sin are rounded to the activation dtype first (transformers casts the tables); x·cos and
rotate_half(x)·sin are each rounded to it, then their sum (transformers' apply_rotary_pos_emb in
bf16), bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmc.quantization import next_pow2

from ..triton_util import output, to


@triton.jit
def rotate_rows(x_ptr, rows, d, s_row, s_d, cos_ptr, sin_ptr, rot_dim, head_dim, ROPE: tl.constexpr = True):
    """Rows `rows` of x (a row < 0 is masked off; stride s_row between rows, s_d between channels)
    rotated by the tables cos/sin [R] (contiguous): the rounding points of the module docstring.
    -> [rows, BLOCK_D] in x's dtype (channels >= rot_dim pass through; ROPE False: x as loaded).
    Also the decode attention kernel's (plugins/attention/kernels.py) rotation of q and k."""
    rm = rows[:, None] >= 0
    base = x_ptr + rows[:, None].to(tl.int64) * s_row
    x = tl.load(base + d[None, :] * s_d, mask=rm & (d[None, :] < head_dim), other=0.0)
    if ROPE:
        dt = x.dtype
        half = rot_dim // 2
        in_rot = d < rot_dim
        partner = tl.where(d < half, d + half, d - half)
        xp = tl.load(base + partner[None, :] * s_d, mask=rm & in_rot[None, :], other=0.0).to(tl.float32)
        cosf = to(tl.load(cos_ptr + d, mask=in_rot, other=0.0), dt).to(tl.float32)[None, :]
        sinf = to(tl.load(sin_ptr + d, mask=in_rot, other=0.0), dt).to(tl.float32)[None, :]
        sign = tl.where(d < half, -1.0, 1.0)[None, :]
        # transformers' rounding points: x*cos and rotate_half(x)*sin each rounded to x's dtype, then summed
        rot = to(x.to(tl.float32) * cosf, dt).to(tl.float32) + to(sign * xp * sinf, dt).to(tl.float32)
        x = to(tl.where(in_rot[None, :], rot, x.to(tl.float32)), dt)
    return x


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, seq, heads, rot_dim, head_dim,
                   sxb, sxn, sxs, sxd, scb, scs, syb, syn, sys_,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // seq).to(tl.int64)
    s = (pid % seq).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    table = b * scb + s * scs
    y = rotate_rows(x_ptr + b * sxb + s * sxs, tl.where(h < heads, h, -1), d, sxn, sxd, cos_ptr + table,
                    sin_ptr + table, rot_dim, head_dim)
    mask = (h < heads)[:, None] & (d[None, :] < head_dim)
    tl.store(y_ptr + b * syb + s * sys_ + h[:, None].to(tl.int64) * syn + d[None, :], y, mask=mask)


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
