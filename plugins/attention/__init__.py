"""Scaled dot-product attention with a KV cache; MHA, GQA and MQA (num_heads % kv_heads == 0).

    inputs:  q [B, N, S, D]; k, v [B, KV, S, D] (this step's keys/values, rotary applied);
             past_k, past_v [B, KV, P, D] (optional); mask (optional), broadcastable to
             [B, N, S, P+S]: bool (true = may attend) or float (added to the scores);
             k_scale, v_scale [KV] float32 (only with kv_cache);
             cos, sin [B, S, R] (optional, inputs 8 and 9: RoPE fused in — q and k are rotated
             first, exactly as plugins/rotary's RotaryEmbedding with layout bnsd)
    outputs: y [B, N, S, D]; present_k, present_v [B, KV, P+S, D] = cat(past, new) on axis 2
    attrs:   num_heads N, kv_heads KV, scale, rotary_dim R (with cos/sin; 0: R = D),
             nan_to_zero (1: rows whose softmax is NaN, i.e.
             fully masked with -inf, give 0 — sdpa's IsNaN guard; 0 when the pass proved the
             mask finite); kv_cache "int8" | "fp8" (optional: the cache holds codes, one
             scale per kv head; past and present are int8 / float8_e4m3fn)

    K = repeat(present_k, N/KV on the head axis)   # query head h reads kv head h // (N/KV)
    y = softmax(q @ K^T * scale + mask) @ V
    kv_cache: present_k = cat(past_k, Q(k, k_scale)); K = DQ(present_k, k_scale)  (same for V):
              every key is attended to as it is stored, this step's included

Causal, padding and block-diagonal (vision windows) masks are all the `mask` input, so the op
needs no proof about the mask's structure. The fused-RoPE form (cos/sin given) is made by the
cuda target's plan rewrite (compiler/plan_rewrites.py `rope_attention`), so a decode step's
rotary, cache write and attention are one kernel; its ORT face rotates with RotaryEmbedding's
decomposition first. ORT face: the standard Attention op (opset 23; GQA
and past/present natively), with a bool mask turned into a finite additive one; older opsets
get a decomposition (Concat, Tile-repeat, MatMul, Softmax, MatMul). With kv_cache the face
quantizes k/v per head (QuantizeLinear axis 1), concatenates codes (int8; fp8 has no ONNX
Concat, so its codes are concatenated dequantized and quantized again, which is exact) and
attends over DequantizeLinear(present) with no past.
"""

from __future__ import annotations

import numpy as np

from mmc import quantization as qz

from ..base import Emitter, FusedOp, dtype_of, present, shape_of

LOWEST = float(np.finfo(np.float32).min)


def _cat_dim(a, b):
    return a + b if isinstance(a, int) and isinstance(b, int) else None


class Attention(FusedOp):
    __doc__ = __doc__
    name = "Attention"
    min_opset = 23

    def reference(self, inputs, attrs):
        inputs = with_rotary(inputs, attrs, "reference")
        q, k, v = inputs[:3]
        past_k, past_v, mask, k_scale, v_scale = (inputs + [None] * 8)[3:8]
        kind = attrs.get("kv_cache")
        if kind:  # the cache holds codes: store this step's k/v quantized, attend to what is stored
            k, v = qz.quantize_per_head(k, k_scale, kind), qz.quantize_per_head(v, v_scale, kind)
        if past_k is not None:
            k, v = np.concatenate([past_k, k], axis=2), np.concatenate([past_v, v], axis=2)
        present_k, present_v = k, v
        if kind:
            k, v = qz.dequantize_per_head(k, k_scale), qz.dequantize_per_head(v, v_scale)
        g = attrs["num_heads"] // attrs["kv_heads"]
        kr, vr = (np.repeat(t.astype(np.float64), g, axis=1) for t in (k, v))
        scores = q.astype(np.float64) @ kr.swapaxes(-1, -2) * attrs["scale"]
        if mask is not None:
            scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
        with np.errstate(invalid="ignore", over="ignore"):
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
        if attrs.get("nan_to_zero", 1):
            p = np.nan_to_num(p, nan=0.0)
        return [(p @ vr).astype(q.dtype), present_k, present_v]

    def torch_reference(self, inputs, attrs):
        """The cuda target's reference kernel (torch; scores and softmax in float32, as sdpa)."""
        return torch_cached_attention(with_rotary(inputs, attrs, "torch_reference"), attrs, torch_attend)

    writes_out = True

    def triton_kernel(self, inputs, attrs, out=None):
        """Prefill / vision: the rotary kernel (fused RoPE), then the flash kernel over cat(past, new)
        (decode over a static cache is the executor's: one decode_attention kernel)."""
        from .kernels import flash_attention

        return torch_cached_attention(with_rotary(inputs, attrs, "triton_kernel"), attrs,
                                      lambda q, k, v, mask, a: flash_attention(q, k, v, mask, a["scale"], out))

    def infer(self, node):
        q, k = node.inputs[0], node.inputs[1]
        qs, ks = shape_of(q), shape_of(k)
        y = None if qs is None else [*qs[:3], shape_of(node.inputs[2])[3] if shape_of(node.inputs[2]) else None]
        pk = present(node, 3)
        if ks is None:
            pres = None
        elif pk is None:
            pres = ks
        else:
            ps = shape_of(pk)
            pres = [ks[0], ks[1], _cat_dim(ps[2], ks[2]) if ps else None, ks[3]]
        kind = node.attrs.get("kv_cache")
        cache = qz.kv_dtype(kind) if kind else dtype_of(k)
        return [(dtype_of(q), y), (cache, pres), (cache, pres)]

    def lower_ort(self, emit: Emitter, node, opset):
        from ..rotary import RotaryEmbedding

        q, k, v = node.inputs[:3]
        past_k, past_v, mask = present(node, 3), present(node, 4), present(node, 5)
        if present(node, 8) is not None:  # fused RoPE: rotate q and k first
            r, d = node.attrs.get("rotary_dim", 0), q.shape[-1] if q.shape else None
            rotated = []
            for t in (q, k):
                y = RotaryEmbedding.decompose(emit, t, node.inputs[8], node.inputs[9], r, d, "bnsd")
                y.shape, y.dtype = t.shape, t.dtype  # the decomposition of older opsets reads the head dim
                rotated.append(y)
            q, k = rotated
        outs = list(node.outputs) + [None] * (3 - len(node.outputs))
        if mask is not None and dtype_of(mask) == np.dtype(bool):
            zero, lowest = emit.const(0.0, dtype_of(q)), emit.const(LOWEST, dtype_of(q))
            mask = emit.op("Where", [mask, zero, lowest])[0]  # finite: a fully masked row stays NaN-free
        if node.attrs.get("kv_cache"):  # attend over the dequantized cache, this step's codes included
            k, v = (self._quantized_cache(emit, node, new, past, present(node, i), out)
                    for new, past, i, out in ((k, past_k, 6, outs[1]), (v, past_v, 7, outs[2])))
            past_k = past_v = None
            outs[1] = outs[2] = None
        nan_to_zero = node.attrs.get("nan_to_zero", 1)
        y = emit.var(dtype_of(q)) if nan_to_zero else outs[0]
        if opset >= 23:
            emit.op("Attention", [q, k, v, mask, past_k, past_v], [y, outs[1], outs[2]],
                    {"scale": float(node.attrs["scale"])})
        else:
            self._decompose(emit, node, q, k, v, past_k, past_v, mask, [y, outs[1], outs[2]])
        if nan_to_zero:  # sdpa's guard: a NaN row (all -inf) becomes 0
            zero = emit.const(0.0, dtype_of(q))
            emit.op("Where", [emit.op("IsNaN", [y])[0], zero, y], [outs[0]])

    @staticmethod
    def _quantized_cache(emit: Emitter, node, new, past, scale, out):
        """present = cat(past, Q(new)) written to `out`; returns DQ(present) (float, [B, KV, P+S, D])."""
        kind = node.attrs["kv_cache"]
        zp = emit.const(np.zeros(node.attrs["kv_heads"]), qz.kv_dtype(kind))
        axis = {"axis": 1}
        codes = emit.op("QuantizeLinear", [new, scale, zp], 1, axis)[0]
        if past is None:
            pres = emit.op("Identity", [codes], [out] if out is not None else 1)[0]
        elif kind == "int8":
            pres = emit.op("Concat", [past, codes], [out] if out is not None else 1, {"axis": 2})[0]
        else:  # ONNX Concat takes no float8: join dequantized codes, quantize again (exact: x = q*s -> q)
            parts = [emit.op("DequantizeLinear", [t, scale, zp], 1, axis)[0] for t in (past, codes)]
            joined = emit.op("Concat", parts, 1, {"axis": 2})[0]
            pres = emit.op("QuantizeLinear", [joined, scale, zp], [out] if out is not None else 1, axis)[0]
        full = emit.op("DequantizeLinear", [pres, scale, zp], 1, axis, dtype=np.float32)[0]
        ns = shape_of(new)
        full.shape = [ns[0], ns[1], None, ns[3]] if ns else None  # the decomposition reads the head dim
        return full

    @staticmethod
    def _decompose(emit, node, q, k, v, past_k, past_v, mask, outs):
        n, kv = int(node.attrs["num_heads"]), int(node.attrs["kv_heads"])
        full = []
        for new, past, out in ((k, past_k, outs[1]), (v, past_v, outs[2])):
            if past is not None:
                full.append(emit.op("Concat", [past, new], [out] if out is not None else 1, {"axis": 2})[0])
            else:
                full.append(emit.op("Identity", [new], [out])[0] if out is not None else new)
        if n != kv:  # repeat kv heads: [B,KV,T,D] -> [B,KV,G,T,D] -> [B,N,T,D]
            reps = emit.const([1, 1, n // kv, 1, 1])
            # 0 copies B, -1 is T; each of K and V keeps its own head dim
            full = [emit.op("Reshape", [emit.op("Tile", [emit.op("Unsqueeze", [t, emit.const([2])])[0], reps])[0],
                                        emit.const([0, n, -1, src.shape[-1]])])[0]
                    for t, src in zip(full, (k, v))]
        kt = emit.op("Transpose", [full[0]], 1, {"perm": [0, 1, 3, 2]})[0]
        scores = emit.op("MatMul", [q, kt])[0]
        scores = emit.op("Mul", [scores, emit.const(float(node.attrs["scale"]), dtype_of(q))])[0]
        if mask is not None:
            scores = emit.op("Add", [scores, mask])[0]
        probs = emit.op("Softmax", [scores], 1, {"axis": -1})[0]
        emit.op("MatMul", [probs, full[1]], [outs[0]])


ROTARY_INPUTS = (8, 9)  # cos, sin


def with_rotary(inputs, attrs, face: str) -> list:
    """The op's inputs with q and k rotated by the fused tables — by plugins/rotary's RotaryEmbedding
    face `face` ("reference", "torch_reference" or "triton_kernel", which falls back to the torch
    reference where it does not apply) — and the tables dropped; unchanged (to 8 inputs) without them."""
    from ..rotary import RotaryEmbedding

    ins = list(inputs) + [None] * (10 - len(inputs))
    cos, sin = (ins[i] for i in ROTARY_INPUTS)
    if cos is not None:
        rope, rattrs = RotaryEmbedding(), {"rotary_dim": attrs.get("rotary_dim", 0), "layout": "bnsd"}
        for i in (0, 1):
            got = getattr(rope, face)([ins[i], cos, sin], rattrs)
            ins[i] = (got if got is not None else rope.torch_reference([ins[i], cos, sin], rattrs))[0]
    return ins[:8]


def torch_cached_attention(inputs, attrs, attend):
    """The op with a growing cache: this step's k/v (as codes with kv_cache) appended to the past,
    then `attend(q, K, V, mask, attrs)` over the whole (dequantized) cache; -> [y, present_k, present_v]."""
    import torch

    q, k, v = inputs[:3]
    past_k, past_v, mask, k_scale, v_scale = (list(inputs) + [None] * 8)[3:8]
    if len(inputs) > ROTARY_INPUTS[0] and inputs[ROTARY_INPUTS[0]] is not None:
        raise ValueError("torch_cached_attention: rotate first (with_rotary)")
    kind = attrs.get("kv_cache")
    if kind:
        k, v = torch_quantize_kv(k, k_scale, kind), torch_quantize_kv(v, v_scale, kind)
    if past_k is not None and past_k.shape[2]:
        k, v = torch.cat([past_k.to(k.dtype), k], dim=2), torch.cat([past_v.to(v.dtype), v], dim=2)
    present_k, present_v = k, v
    if kind:
        k, v = torch_dequantize_kv(k, k_scale, q.dtype), torch_dequantize_kv(v, v_scale, q.dtype)
    return [attend(q, k, v, mask, attrs), present_k, present_v]


def torch_attend(q, k, v, mask, attrs):
    """softmax(q Kᵀ·scale + mask) V with kv heads repeated; q [B, N, S, D], k/v [B, KV, T, D];
    mask bool (True = may attend) or additive, broadcastable to [B, N, S, T]."""
    import torch

    g = attrs["num_heads"] // attrs["kv_heads"]
    kf = k.float().repeat_interleave(g, dim=1) if g > 1 else k.float()
    vf = v.float().repeat_interleave(g, dim=1) if g > 1 else v.float()
    scores = q.float() @ kf.transpose(-1, -2) * attrs["scale"]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    p = torch.softmax(scores, dim=-1)
    if attrs.get("nan_to_zero", 1):
        p = torch.nan_to_num(p, nan=0.0)
    return (p @ vf).to(q.dtype)


def torch_quantize_kv(x, scale, kind):
    """[B, KV, T, D] -> codes, one scale per head (QuantizeLinear's math, as quantize_per_head)."""
    import torch

    y = x.float() / scale.float().reshape(1, -1, 1, 1)
    if kind == "int8":
        return torch.round(y).clamp(-128, 127).to(torch.int8)
    return y.clamp(-qz.FP8_MAX, qz.FP8_MAX).to(torch.float8_e4m3fn)


def torch_dequantize_kv(codes, scale, dtype):
    return (codes.float() * scale.float().reshape(1, -1, 1, 1)).to(dtype)
