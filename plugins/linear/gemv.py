"""Triton GEMV for one row (a batch-1 decode step): y = P(x) @ W (+ bias), where P, the op that
made the GEMM's input, runs inside the GEMV as its prologue instead of as a kernel of its own.

    W   float [K, N], usually a view of nn.Linear's [N, K] (mmc.Linear's layout), or int8 codes
        [N, K] and a scale [N] (WeightOnlyMatMul bits 8: y = (P(x) @ codesᵀ) · scale)
    P   none       x
        rms        RMSNorm(x, gamma)                                      plugins/norms RMSNorm
        skip_rms   RMSNorm(s, gamma), s = x + skip; s is written too      plugins/norms SkipRMSNorm
        swiglu     act(x[:K]) * x[K:], x the [2K] gate_up row             plugins/swiglu SwiGLU
    with the rounding points of the kernels it replaces (norms/kernels.normed, swiglu/kernels.gated).

A batch-1 decode GEMV is memory-bound and, at these sizes, latency-bound: each program loads one
BLOCK_K × BLOCK_N tile of W (every load issued before any math), multiplies it by P(x)'s K-slice
in float32 (products of bf16/fp16 values are exact in float32, as the tensor cores form them) and
reduces over K (on Hopper the kernel is launched while the kernel before it still runs, and its
W tile is in flight before it waits for its input: triton_util.pdl); the K / BLOCK_K programs of
a column tile meet in the split-K fixup (triton_util.split_sum: the last to finish sums the
partials in split order, adds the bias, rounds once and stores). The rms prologues need the row's 1/rms over all of K first: every
program computes it from x (K values from L2), and the program of column tile 0, split 0 writes
s. P(x)'s K-slice (and gamma's, skip's) come from L2.

Measured on the H100 (tools/sweep_gemv.py, docs/benchmarks.md): with int8 codes it beats the
weight-only GEMM kernel (kernels.py) plus the folded op's own kernel by 1.2-1.6× on the 3B
layer shapes, and is ~4 % slower on the 151,936-wide lm_head shape. With bf16 weights in
nn.Linear's [N, K] layout (rows of K contiguous, each program on all of K up to 2048) it streams
the 3B shapes at 2.0-3.1 TB/s, faster than cuBLAS on either layout (o 4.2 against 6.6 us,
lm_head 200 against 219); on the 7B's qkv / o (K = 3584) it is ~1 us slower than cuBLAS, on
its gate_up / down 2-3 us faster. On mmc.Linear's old [K, N] layout (rows of N) it lost to
cuBLAS everywhere.

More rows (batched decode, prefill) run P's own kernel and then cuBLAS / the weight-only kernel:
see `applies`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..norms.kernels import normed
from ..swiglu.kernels import ACTS, gated
from ..triton_util import inputs_ready, output, pdl, split_sum, tile_counters, to

PROLOGUES = {"": 0, "rms": 1, "skip_rms": 2, "swiglu": 3}
FLOAT_KN = {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4}  # float W [K, N] with rows of N contiguous
WHOLE_K = 2048  # float rows of K: each program takes all of K up to this
CODES = {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 8}  # codes [N, K]: rows of K contiguous
NORM_BLOCK = 1024


@triton.jit
def _input(x_ptr, skip_ptr, g_ptr, rk, km, K, r, PRO: tl.constexpr, ACT: tl.constexpr):
    """P(x)[rk] as float32 (zero where not km)."""
    x = tl.load(x_ptr + rk, mask=km, other=0.0)
    dt = x.dtype
    if PRO == 3:
        v = gated(x, tl.load(x_ptr + K + rk, mask=km, other=0.0), ACT)
    elif PRO == 0:
        v = x
    else:
        xf = x.to(tl.float32)
        if PRO == 2:
            xf = to(xf + tl.load(skip_ptr + rk, mask=km, other=0.0).to(tl.float32), dt).to(tl.float32)
        v = normed(xf, r, tl.load(g_ptr + rk, mask=km, other=0.0), dt)
    return v.to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, skip_ptr, g_ptr, w_ptr, s_ptr, b_ptr, y_ptr, sum_ptr, part_ptr, count_ptr,
                 N, K, swk, swn, n_splits, eps, PRO: tl.constexpr, ACT: tl.constexpr, QUANT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NORM: tl.constexpr, PDL: tl.constexpr):
    tile_n, split = tl.program_id(0), tl.program_id(1)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = rn < N
    rk = split * BLOCK_K + tl.arange(0, BLOCK_K)
    km = rk < K
    w = tl.load(w_ptr + rk[:, None].to(tl.int64) * swk + rn[None, :].to(tl.int64) * swn,  # before any math
                mask=km[:, None] & nm[None, :], other=0.0)
    inputs_ready(PDL)  # launched early (triton_util.pdl): W loads while the kernel before finishes
    r = 0.0
    if PRO == 1 or PRO == 2:  # the row's 1/rms over all of K (and s, written once)
        dt = x_ptr.dtype.element_ty
        write = (tile_n == 0) & (split == 0)
        ss = tl.zeros([NORM], tl.float32)
        k0 = 0
        while k0 < K:
            kk = k0 + tl.arange(0, NORM)
            kn = kk < K
            xf = tl.load(x_ptr + kk, mask=kn, other=0.0).to(tl.float32)
            if PRO == 2:
                xf = to(xf + tl.load(skip_ptr + kk, mask=kn, other=0.0).to(tl.float32), dt).to(tl.float32)
                if write:
                    tl.store(sum_ptr + kk, to(xf, dt), mask=kn)
            ss += xf * xf
            k0 += NORM
        r = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    x = _input(x_ptr, skip_ptr, g_ptr, rk, km, K, r, PRO, ACT)
    acc = x[:, None] * w.to(tl.float32)
    y = tl.sum(acc, axis=0)
    last = True
    if SPLIT:
        y, last = split_sum(y, part_ptr, count_ptr + tile_n, split, n_splits, N, rn, nm)
    if last:
        if QUANT:
            y = y * tl.load(s_ptr + rn, mask=nm, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, to(y, y_ptr.dtype.element_ty), mask=nm)


def applies(x: torch.Tensor, bits: int = 0) -> bool:
    """Whether `gemv` takes this call: one row (x [..., K] with one K-vector), a float or int8
    weight, on a GPU or under the interpreter."""
    from ..triton_util import INTERPRET

    return x.numel() == x.shape[-1] and bits in (0, 8) and (x.is_cuda or bool(INTERPRET))


NORM_CODES = {"BLOCK_N": 8, "num_warps": 4}  # codes with an rms prologue, K <= NORM_WHOLE_K
NORM_WHOLE_K = 2048


def config(n: int, k: int, weight: str, tile: dict | None = None, prologue: str = "") -> dict:
    """Tile for `weight` "int8" (codes [N, K]), "float" (rows of K: a view of [N, K]) or "float_kn"
    (rows of N): `tile` (a sweep's candidate), else a rule fitted to the H100 sweeps
    (tools/sweep_gemv.py). Float rows of K: all of K per program up to WHOLE_K on 16 columns
    (N <= 4096) or 4 (wider), longer K in 2048-slices on 8 columns (within 0.3 us of the best of
    32 tiles on the 3B and 7B shapes but the 3B o, 0.5). Codes: longer K-slices for long K, wider
    column tiles for wide N (within ~0.3 us of the best tile without a prologue); with an rms
    prologue and K <= NORM_WHOLE_K each program takes all of K on 8 columns (NORM_CODES): the row's
    1/rms is computed by 4x fewer programs and nothing is split (3B qkv with its norm: 6.9 -> 4.4
    us; the best of 50 tiles, 4.1 us, was this shape: `tools/sweep_gemv.py --with-prologue`). K is
    split into K / BLOCK_K programs per column tile."""
    if tile:
        return dict(tile)
    if weight == "float_kn":
        return dict(FLOAT_KN)
    if weight == "float":
        if k <= WHOLE_K:
            return {"BLOCK_N": 16 if n <= 4096 else 4, "BLOCK_K": triton.next_power_of_2(k), "num_warps": 8}
        return {"BLOCK_N": 8, "BLOCK_K": WHOLE_K, "num_warps": 4}
    if prologue in ("rms", "skip_rms") and k <= NORM_WHOLE_K:
        return dict(NORM_CODES, BLOCK_K=triton.next_power_of_2(k))
    return dict(CODES, BLOCK_K=1024 if k >= 8192 else 512, BLOCK_N=32 if n >= 8192 else 16)


def gemv(x: torch.Tensor, w: torch.Tensor, *, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         prologue: str = "", gamma: torch.Tensor | None = None, skip: torch.Tensor | None = None,
         epsilon: float = 1e-6, activation: str = "silu", tile: dict | None = None, out=None):
    """P(x) @ W (+ bias) for one row x [..., K] (swiglu: [..., 2K]) -> (y [..., N] in x's dtype,
    s = x + skip for skip_rms else None). W: float [K, N], or int8 codes [N, K] with `scale` [N].
    out: the executor's buffers [y, s] (entries may be None)."""
    codes = scale is not None
    n, k = (w.shape[0], w.shape[1]) if codes else (w.shape[1], w.shape[0])
    swk, swn = (1, k) if codes else w.stride()  # a float W may be a [K, N] view of an [N, K] tensor
    xr = x.reshape(-1).contiguous()
    cfg = config(n, k, "int8" if codes else "float" if swk == 1 else "float_kn", tile, prologue)
    splits = triton.cdiv(k, cfg["BLOCK_K"])
    y = output(out, 0, (n,), x.dtype, x.device)
    s = None
    if prologue == "skip_rms":
        skip = skip.reshape(-1).to(x.dtype).contiguous()
        s = output(out, 1, (k,), x.dtype, x.device)
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    part = torch.empty(splits, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    counters = tile_counters(x.device, tiles) if splits > 1 else y
    _gemv_kernel[(tiles, splits)](
        xr, skip if skip is not None else xr, gamma if gamma is not None else xr, w,
        scale if codes else xr, bias if bias is not None else xr, y, s if s is not None else y, part, counters,
        n, k, swk, swn, splits, float(epsilon), PRO=PROLOGUES[prologue], ACT=ACTS[activation],
        QUANT=codes, HAS_BIAS=bias is not None, SPLIT=splits > 1, NORM=min(NORM_BLOCK, triton.next_power_of_2(k)),
        **cfg, **pdl(x.device, tiles * splits))
    lead = x.shape[:-1]
    return y.view(*lead, n), (s.view(*lead, k) if s is not None else None)
