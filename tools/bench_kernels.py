# ruff: noqa: B023  (each lambda is timed inside row() before the loop moves on)
"""Micro-benchmark of the plugins' Triton kernels against their torch references (and torch's
own fused paths: sdpa, cuBLAS) at Qwen2.5-VL-3B sizes, on the GPU. Not a test.

    python tools/bench_kernels.py [--json out.json]

Each row: the kernel's time per call inside a CUDA graph (20 calls captured, the graph replayed
30 times after warm-up, median of replays / 20: what a captured decode step pays, launch
overhead excluded), the same for the reference, the speed-up and, for memory-bound kernels, the
achieved bandwidth. `eager` is the median of 30 single calls with CUDA events, launch included
(what an uncaptured prefill pays).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def bench(fn, calls: int = 20, runs: int = 30) -> tuple[float, float]:
    """(ms per call inside a CUDA graph, ms per eager call)."""
    from mmc.runtime.cuda.graphs import capture

    graph, _ = capture(lambda: [fn() for _ in range(calls)])
    graph.replay()
    return _median_ms(graph.replay, runs) / calls, _median_ms(fn, runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    from mmc import quantization as qz
    from mmc.plugins import OPS
    from mmc.plugins.attention.kernels import decode_attention, flash_attention
    from mmc.plugins.linear import pack_int4
    from mmc.plugins.linear.kernels import weight_only_matmul
    from mmc.plugins.norms.kernels import rms_norm
    from mmc.plugins.rotary.kernels import rotary
    from mmc.plugins.sampling.kernels import sample
    from mmc.plugins.swiglu.kernels import swiglu

    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    rows = []

    def row(name, kernel, ref, nbytes=None, ref_name="torch reference"):
        (t, te), (r, re_) = bench(kernel), bench(ref)
        gbs = nbytes / t / 1e6 if nbytes else None
        rows.append({"kernel": name, "ms": round(t, 4), "eager_ms": round(te, 4), "reference": ref_name,
                     "reference_ms": round(r, 4), "reference_eager_ms": round(re_, 4),
                     "speedup": round(r / t, 2), "GB/s": round(gbs) if gbs else None})
        print(f"{name:<46} {t * 1e3:8.1f} us (eager {te * 1e3:6.1f})   {ref_name:<22} {r * 1e3:8.1f} us "
              f"(eager {re_ * 1e3:6.1f})   x{r / t:5.2f}" + (f"   {gbs:6.0f} GB/s" if gbs else ""), flush=True)

    h, inter, heads, kvh, d = 2048, 11008, 16, 2, 128
    for m in (1, 300):
        x, s, w = torch.randn(m, h, device=dev, dtype=bf), torch.randn(m, h, device=dev, dtype=bf), torch.randn(h, device=dev, dtype=bf)
        row(f"skip_rms_norm [{m},{h}]", lambda: rms_norm(x, w, 1e-6, s),
            lambda: OPS["SkipRMSNorm"].torch_reference([x, s, w], {"epsilon": 1e-6}), nbytes=4 * m * h * 2)
        gu = torch.randn(m, 2 * inter, device=dev, dtype=bf)
        row(f"swiglu [{m},{2 * inter}]", lambda: swiglu(gu), lambda: OPS["SwiGLU"].torch_reference([gu], {}), nbytes=3 * m * inter * 2)
    for s_len in (1, 300):
        q = torch.randn(1, s_len, heads, d, device=dev, dtype=bf).transpose(1, 2)
        cos, sin = torch.randn(1, s_len, d, device=dev), torch.randn(1, s_len, d, device=dev)
        row(f"rotary q [1,{heads},{s_len},{d}]", lambda: rotary(q, cos, sin),
            lambda: OPS["RotaryEmbedding"].torch_reference([q, cos, sin], {}))
    # prefill attention: 300 causal tokens (GQA 16/2), and the vision tower's 1024 patches in 4 windows
    import torch.nn.functional as F

    for s_len, hq, hk, dd, kind in ((300, heads, kvh, d, "causal"), (1024, 16, 16, 80, "block-diagonal")):
        q = torch.randn(1, hq, s_len, dd, device=dev, dtype=bf)
        k, v = torch.randn(1, hk, s_len, dd, device=dev, dtype=bf), torch.randn(1, hk, s_len, dd, device=dev, dtype=bf)
        if kind == "causal":
            mask = torch.full((s_len, s_len), torch.finfo(torch.float32).min, device=dev).triu(1)[None, None]
        else:
            seg = torch.arange(s_len, device=dev) // 256
            mask = (seg[:, None] == seg[None, :])[None, None]
        sc = 1 / math.sqrt(dd)
        m_sdpa = mask.to(bf) if mask.dtype != torch.bool else mask
        row(f"flash_attention {kind} S={s_len} {hq}/{hk}x{dd}", lambda: flash_attention(q, k, v, mask, sc),
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m_sdpa, scale=sc, enable_gqa=hq != hk), ref_name="sdpa")
    t_max, pos = 1024, 160
    kb, vb = torch.randn(1, kvh, t_max, d, device=dev, dtype=bf), torch.randn(1, kvh, t_max, d, device=dev, dtype=bf)
    q1 = torch.randn(1, heads, 1, d, device=dev, dtype=bf)
    k1, v1 = torch.randn(1, kvh, 1, d, device=dev, dtype=bf), torch.randn(1, kvh, 1, d, device=dev, dtype=bf)
    p = torch.tensor([pos], device=dev)
    mask = torch.zeros(1, 1, 1, t_max, device=dev)
    mask[..., pos + 1:] = torch.finfo(torch.float32).min
    attrs = {"num_heads": heads, "kv_heads": kvh, "scale": 1 / math.sqrt(d)}
    angle = torch.rand(1, 1, d, device=dev) * 6
    cos, sin = torch.cos(angle), torch.sin(angle)

    def torch_decode():
        qr, kr = (OPS["RotaryEmbedding"].torch_reference([t, cos, sin], {})[0] for t in (q1, k1))
        kb.index_copy_(2, p, kr)
        vb.index_copy_(2, p, v1)
        return F.scaled_dot_product_attention(qr, kb, vb, attn_mask=mask.to(bf), scale=attrs["scale"], enable_gqa=True)

    def tri_decode():
        return decode_attention(q1, kb, vb, mask, p, attrs["scale"], k=k1, v=v1, cos=cos, sin=sin)

    row(f"decode_attention (RoPE, cache write, split-KV, merge) T={t_max} pos={pos}", tri_decode, torch_decode,
        ref_name="rotary + index_copy_ + sdpa")

    # weight-only GEMV (decode) and GEMM (prefill): int8 / int4 g128 against bf16 cuBLAS
    for n, k in ((2560, h), (2 * inter, h), (h, inter), (151936, h)):
        wf = torch.randn(k, n) * 0.02
        c8, s8 = qz.quantize_per_channel(wf.numpy(), 8)
        c4, s4 = qz.quantize_blockwise(wf.numpy(), 4, 128)
        w8, sc8 = torch.from_numpy(c8.T.copy()).to(dev), torch.from_numpy(s8).to(dev)
        w4, sc4 = torch.from_numpy(pack_int4(c4.T.copy())).to(dev), torch.from_numpy(s4.T.copy()).to(dev)
        wb = wf.to(dev, bf)
        for m in (1, 300):
            x = torch.randn(m, k, device=dev, dtype=bf)
            if m == 1:
                row(f"bf16 matmul (cuBLAS) [{m},{k}]x[{k},{n}]", lambda: x @ wb, lambda: x @ wb, nbytes=k * n * 2, ref_name="(itself)")
            row(f"woq int8 [{m},{k}]x[{k},{n}]", lambda: weight_only_matmul(x, w8, sc8, 8), lambda: x @ wb,
                nbytes=k * n if m == 1 else None, ref_name="bf16 cuBLAS")
            row(f"woq int4 g128 [{m},{k}]x[{k},{n}]", lambda: weight_only_matmul(x, w4, sc4, 4, 128), lambda: x @ wb,
                nbytes=k * n // 2 if m == 1 else None, ref_name="bf16 cuBLAS")
    # decode tile sweep for the weight-only GEMV (M = 1): the default is plugins/linear/kernels.DECODE
    x1 = torch.randn(1, inter, device=dev, dtype=bf)
    wf = torch.randn(inter, 2 * inter) * 0.02
    c8, s8 = qz.quantize_per_channel(wf.numpy(), 8)
    w8, sc8 = torch.from_numpy(c8.T.copy()).to(dev), torch.from_numpy(s8).to(dev)
    x1 = torch.randn(1, inter, device=dev, dtype=bf)
    for bn in (16, 32, 64):
        for bk in (128, 256, 512):
            for warps in (4, 8):
                cfg = {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
                t, _ = bench(lambda: weight_only_matmul(x1, w8, sc8, 8, tile=cfg))
                print(f"  sweep int8 [1,{inter}]x[{inter},{2 * inter}] {cfg}: {t * 1e3:7.1f} us "
                      f"{inter * 2 * inter / t / 1e6:6.0f} GB/s", flush=True)
    # prefill tile sweep (M = 32, a short prompt; M = 312, a 448² image prompt): the default is
    # plugins/linear/kernels.PREFILL; bf16 cuBLAS on the same shape for reference
    wb = wf.to(dev, bf)
    for m in (32, 312):
        xm = torch.randn(m, inter, device=dev, dtype=bf)
        t, _ = bench(lambda: xm @ wb)
        print(f"  sweep prefill bf16 cuBLAS [{m},{inter}]x[{inter},{2 * inter}]: {t * 1e3:7.1f} us", flush=True)
        want = (xm.float() @ (w8.float() * sc8[:, None]).T)
        for bm in (16, 32, 64, 128):
            for bn in (64, 128):
                for bk in (64, 128):
                    for warps in (4, 8):
                        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
                        try:
                            t, _ = bench(lambda: weight_only_matmul(xm, w8, sc8, 8, tile=cfg))
                        except Exception as e:  # a tile too big for shared memory
                            print(f"  sweep prefill int8 [{m}] {cfg}: failed ({type(e).__name__})", flush=True)
                            continue
                        got = weight_only_matmul(xm, w8, sc8, 8, tile=cfg).float()
                        err = ((got - want).abs().max() / want.abs().max()).item()
                        print(f"  sweep prefill int8 [{m},{inter}]x[{inter},{2 * inter}] {cfg}: {t * 1e3:7.1f} us "
                              f"(rel err {err:.1e} vs the dequantized weight)", flush=True)
    logits = torch.randn(1, 151936, device=dev) * 4
    u = torch.rand(1, 151936, device=dev)

    def torch_sample():  # the usual sort-based top-k/top-p
        x = logits / 0.8
        v, i = torch.topk(x, 50)
        pr = torch.softmax(v, -1)
        keep = (torch.cumsum(pr, -1) - pr) < 0.9
        pr = torch.where(keep, pr, 0)
        return i.gather(-1, torch.multinomial(pr, 1))

    row("sample top-k 50 top-p 0.9 V=151936", lambda: sample(logits, u, 0.8, 50, 0.9), torch_sample, ref_name="topk+sort+multinomial")
    row("sample top-p 0.9 V=151936", lambda: sample(logits, u, 0.8, 0, 0.9),
        lambda: torch.multinomial(torch.softmax(torch.sort(logits / 0.8, descending=True)[0], -1), 1), ref_name="full sort+multinomial")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
