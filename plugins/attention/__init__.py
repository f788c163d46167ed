"""Scaled dot-product attention with a KV cache; MHA, GQA and MQA (num_heads % kv_heads == 0).

    inputs:  q [B, N, S, D]; k, v [B, KV, S, D] (this step's keys/values, rotary applied);
             past_k, past_v [B, KV, P, D] (optional); mask (optional), broadcastable to
             [B, N, S, P+S]: bool (true = may attend) or float (added to the scores)
    outputs: y [B, N, S, D]; present_k, present_v [B, KV, P+S, D] = cat(past, new) on axis 2
    attrs:   num_heads N, kv_heads KV, scale, nan_to_zero (1: rows whose softmax is NaN, i.e.
             fully masked with -inf, give 0 — sdpa's IsNaN guard; 0 when the pass proved the
             mask finite)

    K = repeat(present_k, N/KV on the head axis)   # query head h reads kv head h // (N/KV)
    y = softmax(q @ K^T * scale + mask) @ V

Causal, padding and block-diagonal (vision windows) masks are all the `mask` input, so the op
needs no proof about the mask's structure. ORT face: the standard Attention op (opset 23; GQA
and past/present natively), with a bool mask turned into a finite additive one; older opsets
get a decomposition (Concat, Tile-repeat, MatMul, Softmax, MatMul).
"""

from __future__ import annotations

import numpy as np

from ..base import Emitter, FusedOp, dtype_of, present, shape_of

LOWEST = float(np.finfo(np.float32).min)


def _cat_dim(a, b):
    return a + b if isinstance(a, int) and isinstance(b, int) else None


class Attention(FusedOp):
    __doc__ = __doc__
    name = "Attention"
    min_opset = 23

    def reference(self, inputs, attrs):
        q, k, v = inputs[:3]
        past_k, past_v, mask = (inputs + [None] * 6)[3:6]
        if past_k is not None:
            k, v = np.concatenate([past_k, k], axis=2), np.concatenate([past_v, v], axis=2)
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
        return [(p @ vr).astype(q.dtype), k, v]

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
        return [(dtype_of(q), y), (dtype_of(k), pres), (dtype_of(k), pres)]

    def lower_ort(self, emit: Emitter, node, opset):
        q, k, v = node.inputs[:3]
        past_k, past_v, mask = present(node, 3), present(node, 4), present(node, 5)
        outs = list(node.outputs) + [None] * (3 - len(node.outputs))
        if mask is not None and dtype_of(mask) == np.dtype(bool):
            zero, lowest = emit.const(0.0, dtype_of(q)), emit.const(LOWEST, dtype_of(q))
            mask = emit.op("Where", [mask, zero, lowest])[0]  # finite: a fully masked row stays NaN-free
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
