"""The plugins' Triton kernels against their torch references, on fresh random inputs.

On the CPU these run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no GPU), so CI checks the kernels' logic; on the GPU machine the same tests run the
compiled kernels. Bounds are per dtype (relative to the output's scale); NaN never passes.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from mmc.plugins.triton_util import to  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}  # max error / max |reference|


def close(got, want, dtype, tol=None):
    got, want = got.float().cpu(), want.float().cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.isfinite(got).all(), "non-finite output"
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
    assert err <= (tol or TOL[dtype]), f"relative error {err:.2e} > {tol or TOL[dtype]:.0e} ({dtype})"


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=GEN) * scale).to(dtype).to(DEV)


GEN = torch.Generator().manual_seed(0)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, DT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, to(tl.load(x_ptr + i, mask=i < n), DT), mask=i < n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_point_cast(dtype):
    """triton_util.to: float32 -> bf16 / fp16 as torch casts (nearest even), NaN kept as NaN (the
    GPU's canonical NaN is 0x7FFFFFFF), infinities and overflow as torch gives them."""
    x = torch.randn(4000, generator=GEN) * torch.exp(torch.randn(4000, generator=GEN) * 3)
    ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11])  # halfway cases
    special = torch.tensor([float("inf"), -float("inf"), 3.0e38, -7.0e4, 0.0, -0.0])
    nans = torch.tensor([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000], dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([x, ties, special, nans]).to(DEV)
    if dtype == torch.float16:  # (fp16's subnormal range is rounded twice: not compared)
        x = torch.where(x.abs() < 2 ** -14, torch.zeros_like(x), x)
    y = torch.empty(x.shape, dtype=dtype, device=DEV)
    _cast_kernel[(1,)](x, y, x.numel(), DT=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, BLOCK=4096)
    want = x.to(dtype)
    assert torch.isnan(y[-3:]).all()
    assert torch.equal(y[:-3], want[:-3])


def test_programmatic_dependent_launch_policy():
    """Which launch a decode-path kernel gets: on Hopper and newer (not with MMC_PDL=0) a grid of
    at most about one wave lets the next kernel launch early (PDL 2), a larger grid only waits
    (PDL 1); older GPUs, the CPU and the interpreter launch plainly (PDL 0). On an H100 the GPU
    tests run every kernel so."""
    from mmc.plugins import triton_util as tu

    limit = tu.early_limit((9, 0), 132)
    assert limit == tu.PDL_EARLY_PER_SM * 132
    assert tu.early_limit((9, 0), 132, "0") == 0 and tu.early_limit((8, 9), 132) == 0
    assert tu.launch_mode(limit, 640) == {"PDL": 2, "launch_pdl": True}
    assert tu.launch_mode(limit, limit + 1) == {"PDL": 1, "launch_pdl": True}
    assert tu.launch_mode(0, 640) == {"PDL": 0}
    assert tu.pdl(torch.device("cpu"), 640) == {"PDL": 0}


def test_pdl_kernels_read_only_weights_before_they_wait():
    """Compiled for Hopper with programmatic dependent launch (tests/pdl_ptx.py, no GPU needed),
    each decode-path kernel's global loads before griddepcontrol.wait read the weight (W, the
    norm's gamma) and nothing else, and it stores nothing before it: what it may do while the
    kernel before it still runs. (An activation load moved above the wait fails here.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("pdl_ptx.py"))], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert {r["kernel"] for r in rows} == {"_gemv_kernel", "_rms_norm_kernel", "_swiglu_kernel", "_decode_kernel"}
    for r in rows:
        assert not r["writes"], r
        assert all(src and set(src) <= set(r["allowed"]) for src in r["loads"]), r
        assert bool(r["loads"]) == bool(r["allowed"]), r  # the weight is loaded before the wait


def test_no_pdl_turns_programmatic_launch_off(monkeypatch):
    """Inside `no_pdl` (TensorRT's plugin enqueue) a GPU with PDL launches plainly; outside it
    does not (the device's limit cached as on an H100)."""
    from mmc.plugins import triton_util as tu

    dev = torch.device("cuda", 7)
    monkeypatch.setattr(tu, "INTERPRET", False)
    monkeypatch.setitem(tu._PDL, dev, tu.early_limit((9, 0), 132))
    assert tu.pdl(dev, 640) == {"PDL": 2, "launch_pdl": True}
    with tu.no_pdl():
        assert tu.pdl(dev, 640) == {"PDL": 0}
    assert tu.pdl(dev, 640)["PDL"] == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skip,bias", [(False, False), (True, False), (True, True)])
def test_rms_norm(dtype, skip, bias):
    from mmc.plugins import OPS
    from mmc.plugins.norms.kernels import rms_norm

    x, w = rand(3, 5, 96, dtype=dtype), rand(96, dtype=dtype)
    s, b = (rand(3, 5, 96, dtype=dtype) if skip else None), (rand(96, dtype=dtype) if bias else None)
    y, total = rms_norm(x, w, 1e-6, s, b)
    if skip:
        want = OPS["SkipRMSNorm"].torch_reference([x, s, w] + ([b] if bias else []), {"epsilon": 1e-6})
        close(total, want[1], dtype, 1e-6 if dtype == torch.float32 else TOL[dtype])
    else:
        want = OPS["RMSNorm"].torch_reference([x, w], {"epsilon": 1e-6})
        assert total is None
    close(y, want[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("packed", [True, False])
def test_swiglu(dtype, activation, packed):
    from mmc.plugins import OPS
    from mmc.plugins.swiglu.kernels import swiglu

    ref = OPS["SwiGLU"]
    if packed:
        gu = rand(2, 7, 2 * 80, dtype=dtype, scale=2.0)
        got, want = swiglu(gu, None, activation), ref.torch_reference([gu], {"activation": activation})[0]
    else:
        g, u = rand(2, 7, 80, dtype=dtype, scale=2.0), rand(2, 7, 80, dtype=dtype)
        got, want = swiglu(g, u, activation), ref.torch_reference([g, u], {"activation": activation})[0]
    close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,rotary_dim", [("bnsd", 0), ("bnsd", 32), ("snd", 0)])
def test_rotary(dtype, layout, rotary_dim):
    from mmc.plugins import OPS
    from mmc.plugins.rotary.kernels import rotary

    d = 64
    r = rotary_dim or d
    if layout == "bnsd":  # q arrives as a transposed view [B, S, N, D] -> [B, N, S, D]
        x = rand(2, 5, 6, d, dtype=dtype).transpose(1, 2)
        ang = torch.rand(2, 5, r // 2, generator=GEN) * 6
    else:
        x = rand(9, 4, d, dtype=dtype)
        ang = torch.rand(9, r // 2, generator=GEN) * 6
    cos, sin = (torch.cat([f(ang), f(ang)], -1).to(DEV) for f in (torch.cos, torch.sin))
    attrs = {"rotary_dim": rotary_dim, "layout": layout}
    got = rotary(x, cos, sin, rotary_dim, layout)
    want = OPS["RotaryEmbedding"].torch_reference([x, cos, sin], attrs)[0]
    if dtype == torch.float32:  # (the GPU may contract float32 products and sums into FMAs)
        close(got, want, dtype)
    else:  # transformers' rounding points, bit for bit (the interpreter rounds as the GPU: triton_util.to)
        assert torch.equal(got, want)


def _attend(q, k, v, mask, heads, kv_heads, scale):
    from mmc.plugins.attention import torch_attend

    return torch_attend(q, k, v, mask, {"num_heads": heads, "kv_heads": kv_heads, "scale": scale})


def _causal(b, s, t, pad=0):
    """Additive causal mask [B, 1, S, T] with the first `pad` keys of row 0 padding (finite min)."""
    allowed = torch.ones(s, t, dtype=torch.bool).tril(t - s)[None, None].repeat(b, 1, 1, 1)
    allowed[0, :, :, :pad] = False
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 64), (8, 1, 32), (3, 3, 80)])
def test_flash_attention_causal_gqa(dtype, heads, kv_heads, d):
    from mmc.plugins.attention.kernels import flash_attention

    b, s = 2, 37
    q, k, v = rand(b, heads, s, d, dtype=dtype), rand(b, kv_heads, s, d, dtype=dtype), rand(b, kv_heads, s, d, dtype=dtype)
    mask = _causal(b, s, s, pad=5)  # rows 0..4 of batch 0 are fully masked (finite: uniform softmax)
    scale = 1 / math.sqrt(d)
    close(flash_attention(q, k, v, mask, scale), _attend(q, k, v, mask, heads, kv_heads, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attention_block_diagonal_bool_and_past(dtype):
    """Vision windows: a bool block-diagonal mask; and a query block against a longer key range."""
    from mmc.plugins.attention.kernels import flash_attention

    s, heads, d = 50, 2, 80
    seg = torch.tensor([0] * 16 + [1] * 20 + [2] * 14)
    mask = (seg[:, None] == seg[None, :])[None, None].to(DEV)
    q, k, v = rand(1, heads, s, d, dtype=dtype), rand(1, heads, s, d, dtype=dtype), rand(1, heads, s, d, dtype=dtype)
    close(flash_attention(q, k, v, mask, 0.1), _attend(q, k, v, mask, heads, heads, 0.1), dtype)
    q2 = rand(1, heads, 7, d, dtype=dtype)
    none = flash_attention(q2, k, v, None, 0.1)
    close(none, _attend(q2, k, v, None, heads, heads, 0.1), dtype)
    fully = torch.zeros(1, 1, 7, s, dtype=torch.bool, device=DEV)  # every key masked with -inf: 0, not NaN
    assert flash_attention(q2, k, v, fully, 0.1).abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,t,pos,rot", [(4, 2, 96, 70, 64), (7, 1, 256, 255, 0), (2, 2, 40, 0, 32),
                                                      (4, 2, 1100, 1000, 64)])
def test_decode_attention_static_cache(dtype, heads, kv_heads, t, pos, rot):
    """One kernel: rotate q and this step's k (rot: rotary_dim; 0 = no rotary), store k/v at slot
    pos, attend over slots 0..pos split-KV, merge the splits — against rotary + attention in torch."""
    from mmc.plugins import OPS
    from mmc.plugins import triton_util as tu
    from mmc.plugins.attention.kernels import decode_attention

    b, d = 2, 64
    kbuf, vbuf = rand(b, kv_heads, t, d, dtype=dtype), rand(b, kv_heads, t, d, dtype=dtype)
    kbuf[:, :, pos:] = float("nan")  # unwritten slots (this step's included) must never be read
    vbuf[:, :, pos:] = float("nan")
    cached_k, cached_v = kbuf[:, :, :pos].clone(), vbuf[:, :, :pos].clone()
    # q at scale 3: a peaked softmax, so the output (an average over up to 1000 slots) is O(1)
    q, k, v = rand(b, heads, 1, d, dtype=dtype, scale=3.0), rand(b, kv_heads, 1, d, dtype=dtype), rand(b, kv_heads, 1, d, dtype=dtype)
    angle = rand(b, 1, rot, scale=3.0) if rot else None
    cos, sin = (torch.cos(angle), torch.sin(angle)) if rot else (None, None)
    rq, rk = q, k
    if rot:
        rope = OPS["RotaryEmbedding"]
        rq, rk = (rope.torch_reference([x, cos, sin], {"rotary_dim": rot})[0] for x in (q, k))
    p = torch.tensor([pos], device=DEV)
    mask = torch.zeros(b, 1, 1, t, device=DEV)
    mask[:, :, :, pos + 1:] = torch.finfo(torch.float32).min
    mask[1, :, :, :min(3, pos)] = torch.finfo(torch.float32).min  # row 1 left-padded
    out = [torch.full((b, heads, 1, d), float("nan"), dtype=dtype, device=DEV)]
    got = decode_attention(q, kbuf, vbuf, mask, p, 0.125, k=k, v=v, cos=cos, sin=sin, rotary_dim=rot, out=out)
    assert got.data_ptr() == out[0].data_ptr()
    # this step's k is rotated with torch's rounding points: bit for bit in bf16 / fp16 (float32: the
    # GPU may contract the products and the sum into FMAs)
    if dtype == torch.float32:
        close(kbuf[:, :, pos:pos + 1], rk, dtype)
    else:
        assert torch.equal(kbuf[:, :, pos:pos + 1], rk)
    assert torch.equal(vbuf[:, :, pos:pos + 1], v)
    assert torch.equal(kbuf[:, :, :pos], cached_k) and torch.equal(vbuf[:, :, :pos], cached_v)
    assert not any(int(c.abs().sum()) for c in tu._COUNTERS.values())  # the merging splits reset their counters
    want = _attend(rq, kbuf[:, :, :pos + 1], vbuf[:, :, :pos + 1], mask[..., :pos + 1], heads, kv_heads, 0.125)
    close(got, want, dtype)
    kbuf[:, :, pos:pos + 1] = float("nan")  # attended to from registers: the kernel stores it again
    again = decode_attention(q, kbuf, vbuf, mask, p, 0.125, k=k, v=v, cos=cos, sin=sin, rotary_dim=rot)
    assert torch.equal(again, got)  # the merge order does not depend on which split finishes last
    without_new = decode_attention(rq, kbuf, vbuf, mask, p, 0.125)  # slot pos already written
    close(without_new, want, dtype)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_decode_attention_quantized_cache(kind):
    from mmc.plugins.attention import torch_dequantize_kv, torch_quantize_kv
    from mmc.plugins.attention.kernels import decode_attention

    b, heads, kv_heads, t, d, pos = 1, 4, 2, 64, 32, 40
    ks, vs = (torch.rand(kv_heads, generator=GEN) * 0.05 + 0.01).to(DEV), (torch.rand(kv_heads, generator=GEN) * 0.05 + 0.01).to(DEV)
    kc, vc = torch_quantize_kv(rand(b, kv_heads, t, d), ks, kind), torch_quantize_kv(rand(b, kv_heads, t, d), vs, kind)
    q = rand(b, heads, 1, d, dtype=torch.bfloat16)
    k, v = rand(b, kv_heads, 1, d), rand(b, kv_heads, 1, d)
    kn, vn = torch_quantize_kv(k, ks, kind), torch_quantize_kv(v, vs, kind)
    got = decode_attention(q, kc, vc, None, torch.tensor([pos], device=DEV), 0.2, ks, vs, k=kn, v=vn)
    assert torch.equal(kc[:, :, pos:pos + 1].float(), kn.float()) and torch.equal(vc[:, :, pos:pos + 1].float(), vn.float())
    kf, vf = torch_dequantize_kv(kc, ks, q.dtype), torch_dequantize_kv(vc, vs, q.dtype)
    close(got, _attend(q, kf[:, :, :pos + 1], vf[:, :, :pos + 1], None, heads, kv_heads, 0.2), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 3, 40, 80])  # decode, decode, short prefill tile, prefill tile
@pytest.mark.parametrize("k", [384, 512])  # 512: int4 tiles lie inside one group (scale after the dot)
def test_weight_only_matmul(dtype, bits, m, k):
    """Codes and scales from the project's quantizers; the kernel against the op's numpy reference.
    Decode shapes split K over programs (the last split of a tile sums the partials); a bias and
    the executor's output buffer are used on some shapes; a second call gives the same result
    (the split counters are back at zero)."""
    import numpy as np

    from mmc import quantization as qz
    from mmc.plugins import triton_util as tu
    from mmc.plugins.linear import WeightOnlyMatMul, pack_int4, unpack_int4
    from mmc.plugins.linear import kernels as lk

    n, g = 72, 128
    w = torch.randn(k, n, generator=GEN).numpy()
    if bits == 8:
        codes, scale = qz.quantize_per_channel(w, 8)
        stored, s = codes.T.copy(), scale
    else:
        codes, scale = qz.quantize_blockwise(w, 4, g)
        stored, s = pack_int4(codes.T.copy()), scale.T.copy()
        assert np.array_equal(unpack_int4(stored), codes.T)
    attrs = {"bits": bits, "group_size": g, "k": k}
    x = rand(2, m, k, dtype=dtype)
    bias = rand(n, dtype=dtype) if m != 1 or k == 384 else None
    ins = [x, torch.from_numpy(stored).to(DEV), torch.from_numpy(s).to(DEV)] + ([bias] if bias is not None else [])
    want = WeightOnlyMatMul().reference([t.float().cpu().numpy() if torch.is_tensor(t) and t.is_floating_point()
                                         else t.cpu().numpy() for t in ins], attrs)[0]
    out = [torch.empty(2, m, n, dtype=dtype, device=DEV)] if m == 1 else None
    got = WeightOnlyMatMul().triton_kernel(ins, attrs, out=out)[0]
    assert got.dtype == dtype and (out is None or got.data_ptr() == out[0].data_ptr())
    close(got, torch.from_numpy(want), dtype)
    if m <= 16:  # split K three ways (these K are too small for the default to split)
        split = dict(lk.DECODE, BLOCK_K=64, splits=3)
        assert triton.cdiv(k if bits == 8 else k // 2, 64 * triton.cdiv(triton.cdiv(k if bits == 8 else k // 2, 3), 64)) > 1
        if out is not None:
            out[0].fill_(float("nan"))  # the split path must write every output itself
        got = lk.weight_only_matmul(x, ins[1], ins[2], bits, g, tile=split, out=out, bias=bias)
        assert not any(int(c.abs().sum()) for c in tu._COUNTERS.values())  # the last splits reset their counters
        close(got, torch.from_numpy(want), dtype)
        again = lk.weight_only_matmul(x, ins[1], ins[2], bits, g, tile=split, bias=bias)
        assert torch.equal(again, got)
    ref = WeightOnlyMatMul().torch_reference(ins, attrs)[0]
    close(ref, torch.from_numpy(want), dtype)


ONE_ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}  # of the max |y|


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", ["float", "float_kn", "int8"])
@pytest.mark.parametrize("kind", ["", "rms", "skip_rms", "swiglu"])
def test_gemv_with_prologue(dtype, weight, kind):
    """The decode GEMV (one row) with each prologue: the replaced kernel's output (P(x), by the
    norm / SwiGLU kernel) times W in float64, rounded once; s bit for bit the SkipRMSNorm
    kernel's; with W the identity, y is P(x) itself (the prologue's rounding points are the
    replaced kernel's). K is split three ways over programs and N is not a multiple of the tile:
    every output is written, the counters are back at zero, a second call gives the same bits.
    Float W as mmc.Linear passes it (a [K, N] view of [N, K]) and as a [K, N] tensor."""
    from mmc.plugins import triton_util as tu
    from mmc.plugins.linear import gemv, prologue

    k, n = 384, 72
    tile = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4}
    x = rand(1, 1, 2 * k if kind == "swiglu" else k, dtype=dtype)
    gamma, skip = (rand(k, dtype=dtype) * 0.5 + 1), rand(1, 1, k, dtype=dtype)
    attrs = {"prologue": kind, "epsilon": 1e-6, "activation": "silu"}
    xin, s_want = prologue.apply(x, [gamma, skip], attrs, "triton_kernel")
    codes = weight == "int8"
    if codes:
        w = torch.randint(-127, 128, (n, k), generator=GEN, dtype=torch.int8).to(DEV)
        scale = (torch.rand(n, generator=GEN) * 0.01 + 0.001).to(DEV)
        w64 = (w.double() * scale.double()[:, None]).T
    else:
        w, scale = rand(k, n, dtype=dtype, scale=0.1), None
        w = w if weight == "float_kn" else w.T.contiguous().t()
        assert w.stride() == ((n, 1) if weight == "float_kn" else (1, k))
        w64 = w.double()
    bias = rand(n, dtype=dtype)
    out = [torch.full((n,), float("nan"), dtype=dtype, device=DEV),
           torch.full((k,), float("nan"), dtype=dtype, device=DEV)]
    y, s = gemv.gemv(x, w, scale=scale, bias=bias, prologue=kind, gamma=gamma, skip=skip, tile=tile, out=out)
    want = xin.reshape(-1).double() @ w64 + bias.double()
    close(y.reshape(-1), want, dtype, ONE_ROUNDING[dtype])
    assert y.data_ptr() == out[0].data_ptr() and y.shape == (1, 1, n)
    if kind == "skip_rms":
        assert s.data_ptr() == out[1].data_ptr() and torch.equal(s, s_want)
    else:
        assert s is None
    assert not any(int(c.abs().sum()) for c in tu._COUNTERS.values())
    again, _ = gemv.gemv(x, w, scale=scale, bias=bias, prologue=kind, gamma=gamma, skip=skip, tile=tile)
    assert torch.equal(again, y)
    if not codes:
        eye, _ = gemv.gemv(x, torch.eye(k, dtype=dtype, device=DEV), prologue=kind, gamma=gamma, skip=skip, tile=tile)
        if tu.INTERPRET:
            assert torch.equal(eye, xin)
        else:  # the 1/rms may be summed in another order than the norm kernel's: an ulp at most
            close(eye, xin, dtype, ONE_ROUNDING[dtype])


def test_gemv_default_tile_with_a_norm_takes_all_of_k():
    """int8 codes with an rms prologue and K <= NORM_WHOLE_K: the default tile takes the whole
    row (no split-K, 8 columns per program) and gives the norm-then-GEMM result; K not a power of
    two, N not a multiple of 8."""
    from mmc.plugins.linear import gemv, prologue

    k, n = 1000, 36
    cfg = gemv.config(n, k, "int8", prologue="rms")
    assert cfg["BLOCK_K"] >= k and cfg["BLOCK_N"] == 8 and gemv.config(n, k, "int8")["BLOCK_K"] < k
    x, gamma = rand(1, k, dtype=torch.bfloat16), rand(k, dtype=torch.bfloat16) * 0.5 + 1
    w = torch.randint(-127, 128, (n, k), generator=GEN, dtype=torch.int8).to(DEV)
    scale = (torch.rand(n, generator=GEN) * 0.01 + 0.001).to(DEV)
    xin, _ = prologue.apply(x, [gamma], {"prologue": "rms", "epsilon": 1e-6}, "triton_kernel")
    y, _ = gemv.gemv(x, w, scale=scale, prologue="rms", gamma=gamma)
    want = xin.reshape(-1).double() @ (w.double() * scale.double()[:, None]).T
    close(y.reshape(-1), want, torch.bfloat16, ONE_ROUNDING[torch.bfloat16])


@pytest.mark.parametrize("k, n", [(1000, 36), (2304, 40), (512, 4100)])
def test_gemv_float_default_tiles(k, n):
    """Float W in nn.Linear's layout with the GEMV's own tile choice: all of K per program (K <=
    WHOLE_K; 16 columns, 4 on wide N) or 2048-slices of a longer K (split-K): x @ W in float64,
    rounded once; K not a power of two, N not a multiple of the tile."""
    from mmc.plugins.linear import gemv

    cfg = gemv.config(n, k, "float")
    whole = k <= gemv.WHOLE_K
    assert (cfg["BLOCK_K"] >= k) == whole and cfg["BLOCK_N"] == ((16 if n <= 4096 else 4) if whole else 8)
    x, w = rand(1, k, dtype=torch.bfloat16), rand(n, k, dtype=torch.bfloat16, scale=0.1)
    y, _ = gemv.gemv(x, w.t())
    close(y.reshape(-1), x.reshape(-1).double() @ w.double().T, torch.bfloat16, ONE_ROUNDING[torch.bfloat16])


def test_gemv_default_tiles_long_k_int8_without_bias():
    """The GEMV's own tile choice (no sweep tile) on an int8 shape with K over one 1/rms chunk
    (NORM_BLOCK) and over one K-slice (split-K), no bias: the SkipRMSNorm kernel's output times the
    dequantized codes, rounded once; s bit for bit."""
    from mmc.plugins.linear import gemv, prologue

    k, n = 2304, 40
    assert k > gemv.NORM_BLOCK and k > gemv.config(n, k, "int8")["BLOCK_K"]
    x, skip, gamma = rand(1, 1, k, dtype=torch.bfloat16), rand(1, 1, k, dtype=torch.bfloat16), rand(k) * 0.5 + 1
    attrs = {"prologue": "skip_rms", "epsilon": 1e-6}
    xin, s_want = prologue.apply(x, [gamma.to(torch.bfloat16), skip], attrs, "triton_kernel")
    w = torch.randint(-127, 128, (n, k), generator=GEN, dtype=torch.int8).to(DEV)
    scale = (torch.rand(n, generator=GEN) * 0.01 + 0.001).to(DEV)
    y, s = gemv.gemv(x, w, scale=scale, prologue="skip_rms", gamma=gamma.to(torch.bfloat16), skip=skip)
    want = xin.reshape(-1).double() @ (w.double() * scale.double()[:, None]).T
    close(y.reshape(-1), want, torch.bfloat16, ONE_ROUNDING[torch.bfloat16])
    assert torch.equal(s, s_want)


@pytest.mark.parametrize("op_name", ["WeightOnlyMatMul", "Linear"])
def test_gemm_prologue_faces_agree(op_name):
    """mmc.WeightOnlyMatMul (int8) and mmc.Linear with a folded SkipRMSNorm: the one-row GEMV, the
    many-row path (the norm kernel, then the weight-only kernel / cuBLAS) and the torch reference
    give the numpy reference's y and s."""
    from mmc import quantization as qz
    from mmc.plugins import OPS

    k, n = 256, 48
    codes, scale = qz.quantize_per_channel(torch.randn(k, n, generator=GEN).numpy(), 8)
    attrs = {"prologue": "skip_rms", "epsilon": 1e-6} | ({"bits": 8, "k": k} if op_name != "Linear" else {})
    op = OPS[op_name]
    for rows in (1, 5):
        x, skip, g = rand(1, rows, k), rand(1, rows, k), rand(k) * 0.5 + 1
        if op_name == "Linear":
            ins = [x, rand(n, k, scale=0.1), rand(n), g, skip]
        else:
            ins = [x, torch.from_numpy(codes.T.copy()).to(DEV), torch.from_numpy(scale).to(DEV), None, g, skip]
        y_ref, s_ref = op.reference([t.cpu().numpy() if torch.is_tensor(t) else t for t in ins], attrs)
        for got in (op.triton_kernel(ins, attrs), op.torch_reference(ins, attrs)):
            assert len(got) == 2
            close(got[0], torch.from_numpy(y_ref), torch.float32)
            close(got[1], torch.from_numpy(s_ref), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(1, 1), (2, 40)])
def test_linear(dtype, bias, rows):
    """mmc.Linear (W [N, K]; one row: the Triton GEMV, more rows: cuBLAS through torch): both
    faces near the float64 reference, and the same bits whether they write into the executor's
    buffer or a new tensor."""
    from mmc.plugins.linear import Linear

    x, w = rand(*rows, 96, dtype=dtype), rand(80, 96, dtype=dtype, scale=0.1)
    b = rand(80, dtype=dtype) if bias else None
    ins = [x, w] + ([b] if bias else [])
    ref = Linear().reference([t.float().cpu().numpy() for t in ins], {})[0]
    for face in (Linear().torch_reference, Linear().triton_kernel):
        new = face(ins, {})[0]
        out = [torch.empty(*rows, 80, dtype=dtype, device=DEV)]
        got = face(ins, {}, out=out)[0]
        assert got.dtype == dtype and got.shape == (*rows, 80) and got.data_ptr() == out[0].data_ptr()
        assert torch.equal(got, new)
        close(got, torch.from_numpy(ref), dtype)


def _kept_reference(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The reference's kept set (runtime/sampling.select's rule, by a full sort) as a bool mask."""
    order = torch.argsort(x.double(), descending=True, stable=True)
    vals = x.double()[order]
    keep = torch.ones_like(vals, dtype=torch.bool)
    if 0 < top_k < len(vals):
        keep[top_k:] = False
    p = torch.softmax(vals.masked_fill(~keep, float("-inf")), 0)
    if top_p < 1:
        keep &= (torch.cumsum(p, 0) - p) < top_p
    out = torch.zeros_like(keep)
    out[order] = keep
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 20, 0.5), (1.0, 1, 1.0)])
def test_sampling_thresholds_match_sorted_reference(temperature, top_k, top_p):
    """The bisected top-k / top-p thresholds keep exactly the set a full sort keeps."""
    from mmc.plugins.sampling.kernels import sample

    rows, v = 3, 500
    logits = torch.randn(rows, v, generator=GEN) * 3
    u = torch.rand(rows, v, generator=GEN)
    ids, thr = sample(logits.to(DEV), u.to(DEV), temperature, top_k, top_p, thresholds=True)
    for r in range(rows):
        x = (logits[r] * (1.0 / temperature)).float()
        kept = _kept_reference(x, top_k, top_p)
        assert torch.equal(x >= thr[r].cpu(), kept), f"row {r}: kept set differs from the sorted reference"
        assert kept[ids[r].cpu()], f"row {r}: sampled a token outside the kept set"
        if top_k == 1:
            assert ids[r].item() == x.argmax().item()


def test_sampling_draws_follow_the_distribution():
    """Gumbel-max over the kept set draws from softmax(logits / temperature)."""
    from mmc.plugins.sampling.kernels import sample

    v, rows, temperature = 24, 3000, 0.8
    base = torch.randn(v, generator=GEN) * 2
    u = torch.rand(rows, v, generator=GEN)
    ids = sample(base.repeat(rows, 1).to(DEV), u.to(DEV), temperature).cpu()
    p = torch.softmax(base.double() / temperature, 0)
    freq = torch.bincount(ids, minlength=v).double() / rows
    bound = 5 * torch.sqrt(p * (1 - p) / rows) + 2 / rows
    assert ((freq - p).abs() <= bound).all(), f"frequencies off: max {(freq - p).abs().max():.4f}"
