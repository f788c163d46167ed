"""Triton kernel for WeightOnlyMatMul (plugins/linear): int8 / packed-int4 weights, activations in
bf16/fp16/fp32, float32 accumulation.

Decode (M ≤ 16 rows) is memory-bound: the kernel streams each output channel's codes once,
converts them in registers and multiplies on the tensor cores (tl.dot, M padded to 16). Few
output columns would leave SMs idle, so K is split across programs (split-K) until there are
about two programs per SM. Each split stores its float32 partial [M, N-tile] in a workspace and
counts itself in on the tile's counter (an atomic); the last split to arrive sums the partials,
adds the bias, rounds once to x's dtype and writes the result, then resets the counter for the
next call. One kernel per GEMM: no reduce, cast or bias kernels after it. Prefill (M > 16) uses
larger tiles (two sizes, by M), split the same way when it has fewer tiles than SMS_TARGET.

    bits 8:  acc = x[:, k-tile] · codes[n-tile, k-tile]ᵀ;  y = acc · scale[n]
    bits 4:  byte j holds k = j (low nibble) and k = j + K/2 (high nibble), so each tile of
             bytes is two dots: x[:, j] · Ŵ_lo[n, j]ᵀ + x[:, j + K/2] · Ŵ_hi[n, j]ᵀ, with
             Ŵ = code · scale[n, k // g] formed in float32 and rounded to x's dtype; when a tile
             lies inside one group on both halves (K/2 and g multiples of the tile), the
             scale multiplies the tile's dot instead (codes are exact in bf16)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_util import dot, output, split_sum, tile_counters

SMS_TARGET = 264  # ~2 programs per SM on an H100 (132 SMs)


@triton.jit
def _signed4(v):
    return (v - 16 * (v >= 8).to(tl.int32)).to(tl.float32)


@triton.jit
def _woq_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, sxm, n_groups, group,
                k_per_split, n_splits, BITS: tl.constexpr, GROUP_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    split = tl.program_id(2)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm[:, None] < M
    nm = rn[:, None] < N
    xrow = x_ptr + rm[:, None].to(tl.int64) * sxm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k = split * k_per_split
    if BITS == 8:
        end = tl.minimum(k + k_per_split, K)
        wrow = w_ptr + rn[:, None].to(tl.int64) * K
        while k < end:
            rk = k + tl.arange(0, BLOCK_K)
            km = rk[None, :] < end
            x = tl.load(xrow + rk[None, :], mask=mm & km, other=0.0)
            w = tl.load(wrow + rk[None, :], mask=nm & km, other=0)
            acc += dot(x, tl.trans(w.to(tl.float32).to(x.dtype)))
            k += BLOCK_K
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    else:
        half = K // 2
        end = tl.minimum(k + k_per_split, half)
        wrow = w_ptr + rn[:, None].to(tl.int64) * half
        srow = s_ptr + rn.to(tl.int64) * n_groups
        while k < end:
            rj = k + tl.arange(0, BLOCK_K)
            jm = rj[None, :] < end
            b = tl.load(wrow + rj[None, :], mask=nm & jm, other=0).to(tl.int32)
            x_lo = tl.load(xrow + rj[None, :], mask=mm & jm, other=0.0)
            x_hi = tl.load(xrow + half + rj[None, :], mask=mm & jm, other=0.0)
            if GROUP_ALIGNED:  # the tile lies in one group on each half: scale the dot, not the codes
                s_lo = tl.load(srow + k // group, mask=rn < N, other=0.0)
                s_hi = tl.load(srow + (k + half) // group, mask=rn < N, other=0.0)
                c_lo = _signed4(b & 0xF).to(x_lo.dtype)
                c_hi = _signed4(b >> 4).to(x_lo.dtype)
                acc += dot(x_lo, tl.trans(c_lo)) * s_lo[None, :] + dot(x_hi, tl.trans(c_hi)) * s_hi[None, :]
            else:
                s_lo = tl.load(srow[:, None] + rj[None, :] // group, mask=nm & jm, other=0.0)
                s_hi = tl.load(srow[:, None] + (rj[None, :] + half) // group, mask=nm & jm, other=0.0)
                w_lo = (_signed4(b & 0xF) * s_lo).to(x_lo.dtype)
                w_hi = (_signed4(b >> 4) * s_hi).to(x_lo.dtype)
                acc += dot(x_lo, tl.trans(w_lo)) + dot(x_hi, tl.trans(w_hi))
            k += BLOCK_K
    omask = mm & (rn[None, :] < N)
    tile = (rm[:, None].to(tl.int64) * N + rn[None, :])
    last = True
    if SPLIT:
        counter = count_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        acc, last = split_sum(acc, part_ptr, counter, split, n_splits, M * N, tile, omask)
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + tile, acc.to(y_ptr.dtype.element_ty), mask=omask)


# best of the H100 sweeps (tools/bench_kernels.py; docs/bench-data/2026-11-22-h100-kernels-prefill-sweep.json):
# [M, 11008] x [11008, 22016] int8 at M = 32: 116.9 us (bf16 cuBLAS 165.9, the old 64/64/64 tile 233.3);
# at M = 312: 470.1 us (cuBLAS 238.8, old 746.1)
DECODE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4}
PREFILL_SHORT = {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4}  # 16 < M <= 64
PREFILL = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8}


def config(m: int, n: int, k_loop: int, tile: dict | None = None) -> dict:
    """Tile sizes and split-K for M rows, N outputs and k_loop positions to walk (K, or K/2 for
    int4): `tile` (a sweep's candidate) or DECODE / PREFILL_SHORT / PREFILL; K is split until there
    are about SMS_TARGET programs (shapes with fewer tiles than that: decode, short prefills)."""
    cfg = dict(tile or (DECODE if m <= 16 else PREFILL_SHORT if m <= 64 else PREFILL))
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    cfg.setdefault("splits", max(1, min(triton.cdiv(SMS_TARGET, tiles), k_loop // (4 * cfg["BLOCK_K"]))))
    return cfg


def weight_only_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bits: int, group: int = 0,
                       tile: dict | None = None, out=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ Ŵ (+ bias [N]) -> [..., N] in x's dtype; w int8 [N, K] or packed uint8 [N, K/2]
    (see plugins/linear); out: the executor's buffer for the result (or None)."""
    n = w.shape[0]
    k = w.shape[1] * (2 if bits == 4 else 1)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    k_loop = k if bits == 8 else k // 2
    cfg = config(m, n, k_loop, tile)
    splits = cfg.pop("splits")
    k_per_split = triton.cdiv(triton.cdiv(k_loop, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    splits = triton.cdiv(k_loop, k_per_split)
    y = output(out, 0, (m, n), x.dtype, x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), splits)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    counters = tile_counters(x.device, grid[0] * grid[1]) if splits > 1 else y
    _woq_kernel[grid](x2, w, scale, bias if bias is not None else scale, y, part, counters, m, n, k, x2.stride(0),
                      scale.shape[1] if scale.dim() == 2 else 1, max(group, 1), k_per_split, splits, BITS=bits,
                      GROUP_ALIGNED=bits == 4 and (k // 2) % group == 0 and group % cfg["BLOCK_K"] == 0
                      and k_per_split % cfg["BLOCK_K"] == 0, HAS_BIAS=bias is not None, SPLIT=splits > 1, **cfg)
    return y.view(*x.shape[:-1], n)
