"""fuse-attention — decomposed scaled-dot-product attention (+ KV-cache concat and repeat_kv)
-> mmc.Attention with KV-cache semantics.

Rules (one pattern family, alternatives for each exporter's spelling):
- `attention`:       MatMul(P, V) with P = [Where(IsNaN(s), 0, s) |] s, s = Softmax(scores [+ mask]),
                     scores = MatMul(q [* c1], Kᵀ [* c2]) [* c | / c]; Kᵀ = Transpose(K, 0,1,3,2) or
                     dynamo's Reshape→Transpose(0,2,1)→Reshape; K, V = [repeat_kv(] [Concat(past, new)] [)],
                     repeat_kv = Reshape(Expand(Unsqueeze(·, 2))) (eager, sdpa and TorchScript forms)
- `attention-onnx`:  opset 23 Attention(q, K, V[, mask]) with the same K/V forms

    before:  pk = Concat(past_k, k, axis=2); K = Reshape(Expand(Unsqueeze(pk, 2)))   (same for v)
             s = Softmax(Add(MatMul(Mul(q, a), Mul(Kᵀ, b)), mask)); y = MatMul(s, V)
    after:   y, pk, pv = mmc.Attention(q, k, v, past_k, past_v, mask) {scale=a*b, num_heads, kv_heads}

The mask is an input (causal, padding and block-diagonal masks alike), so nothing is assumed
about it; sdpa's NaN guard becomes nan_to_zero=1 unless the mask is provably finite. Must not
fire: softmax not over the last axis, a non-constant scale, K not transposed on its last two
axes, an opset-23 node with is_causal/softcap, a mask or query that reads the cache it writes.
Pipeline: after fuse-rotary (q and k are the rotated tensors), before horizontal-gemm.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from mmc.patterns import AnyOf, Const, Op, Rule, Var
from mmc.registry import PassResult, register_pass

from .fusion_util import const_value, depends_on, fused_node, int_list, rank, run_rules


def _kv(name: str):
    cat = Op("Concat", Var(f"past_{name}"), Var(f"new_{name}"), label=f"cat_{name}")

    def rep(src):
        return Op("Reshape", Op("Expand", Op("Unsqueeze", src, Const(f"uax_{name}"), label=f"unsq_{name}"),
                                Var(f"eshape_{name}")), Var(f"rshape_{name}"), label=f"rep_{name}")
    return AnyOf(rep(cat), cat, rep(Var(f"new_{name}")), Var(f"new_{name}"))


K, V = _kv("k"), _kv("v")
KT = AnyOf(Op("Transpose", K, label="kt"),
           Op("Reshape", Op("Transpose", Op("Reshape", K, Var("kt_s1")), label="kt3"), Var("kt_s2"), label="kt"))
SCORES = Op("MatMul", AnyOf(Op("Mul", Var("q"), Const("qscale"), commute=True), Var("q")),
            AnyOf(Op("Mul", KT, Const("kscale"), commute=True), KT), label="qk")
SCALED = AnyOf(Op("Mul", SCORES, Const("sscale"), commute=True), Op("Div", SCORES, Const("sdiv")), SCORES)
SOFTMAX = Op("Softmax", AnyOf(Op("Add", SCALED, Var("mask"), commute=True), SCALED), label="softmax")
PROBS = AnyOf(Op("Where", Op("IsNaN", SOFTMAX), Const("zero"), SOFTMAX, label="guard"), SOFTMAX)
ATTENTION = Op("MatMul", PROBS, V)
ONNX_MASKED = Op("Attention", Var("q"), K, V, Var("mask"), label="onnx")
ONNX_PLAIN = Op("Attention", Var("q"), K, V, label="onnx")


def _heads(q: gs.Tensor) -> int:
    """Query heads: static dim 1 of q, else hidden/head_dim of the Reshape that split heads
    (TorchScript leaves the head count to run time: Reshape(x, [B, S, -1, D]))."""
    if q.shape and isinstance(q.shape[1], int):
        return q.shape[1]
    t = q
    for _ in range(4):  # through RotaryEmbedding / Transpose / Reshape back to the projection
        if len(t.inputs) != 1:
            break
        node = t.inputs[0]
        if node.op == "Reshape" and node.inputs[0].shape and isinstance(node.inputs[0].shape[-1], int) \
                and q.shape and isinstance(q.shape[-1], int) and len(node.inputs[0].shape) == 3:
            return node.inputs[0].shape[-1] // q.shape[-1]
        t = node.inputs[0]
    return 0


def _kv_heads(m, name: str) -> int:
    for key in (f"new_{name}", f"past_{name}"):
        t = m.values.get(key)
        if t is not None and t.shape and len(t.shape) == 4 and isinstance(t.shape[1], int):
            return t.shape[1]
    return 0


def _finite(t: gs.Tensor | None) -> bool:
    """The mask provably holds no ±inf/NaN (a finite constant or Where of finite constants)."""
    if t is None:
        return True
    if isinstance(t, gs.Constant):
        return bool(np.isfinite(const_value(t)).all()) if const_value(t).dtype.kind == "f" else True
    if len(t.inputs) == 1:
        node = t.inputs[0]
        if node.op == "Where":
            return all(_finite(x) for x in node.inputs[1:])
        if node.op in ("Cast", "Expand", "Reshape", "Unsqueeze"):
            return _finite(node.inputs[0]) if np.dtype(node.inputs[0].dtype).kind in "fb" else True
    return t.dtype is not None and np.dtype(t.dtype) == np.dtype(bool)


def _scale(m) -> float | None:
    s = 1.0
    for key in ("qscale", "kscale", "sscale"):
        if key in m.values:
            v = m.scalar(key)
            if v is None:
                return None
            s *= v
    if "sdiv" in m.values:
        v = m.scalar("sdiv")
        if not v:
            return None
        s /= v
    return s


def _check_kv(m, name: str) -> str | None:
    cat = m.nodes.get(f"cat_{name}")
    if cat is not None and (cat.attrs.get("axis") not in (2, -2) or len(cat.inputs) != 2):
        return f"{name} cache concat is not on the sequence axis"
    if f"rep_{name}" in m.nodes:
        if int_list(m[f"uax_{name}"]) != [2]:
            return f"repeat_kv of {name} unsqueezes axis {int_list(m[f'uax_{name}'])}, not 2"
        src = m.nodes[f"unsq_{name}"].inputs[0]
        out = m.nodes[f"rep_{name}"].outputs[0]
        if rank(src) != 4 or rank(out) != 4:
            return f"repeat_kv of {name} is not [B, KV, T, D] -> [B, N, T, D]"
    t = m.values.get(f"new_{name}")
    if rank(t) != 4:
        return f"{name} is not rank 4 [B, heads, S, D]"
    return None


def _check_common(m) -> str | None:
    for name in ("k", "v"):
        reason = _check_kv(m, name)
        if reason:
            return reason
    if ("cat_k" in m.nodes) != ("cat_v" in m.nodes):
        return "only one of K and V is concatenated with a cache"
    if rank(m["q"]) != 4:
        return "q is not rank 4 [B, N, S, D]"
    n, kv = _heads(m["q"]), _kv_heads(m, "k")
    if n and kv and n % kv:
        return f"{n} query heads are not a multiple of {kv} kv heads"
    caches = [m.nodes[c].outputs[0] for c in ("cat_k", "cat_v") if c in m.nodes]
    ins = [m.values.get(k) for k in ("q", "new_k", "new_v", "past_k", "past_v", "mask")]
    if caches and depends_on([t for t in ins if t is not None], {id(t) for t in caches}):
        return "an input of the attention reads the cache it writes (would make a cycle)"
    return None


def _check_decomposed(m) -> str | None:
    sm = m.nodes["softmax"]
    if sm.attrs.get("axis", -1) not in (-1, (rank(sm.outputs[0]) or 0) - 1):
        return f"softmax over axis {sm.attrs.get('axis')}, not the keys (last) axis"
    if "guard" in m.nodes and m.scalar("zero") != 0.0:
        return "the NaN guard does not write 0"
    kt = m.nodes["kt"]
    if kt.op == "Transpose" and list(kt.attrs.get("perm", [])) != [0, 1, 3, 2]:
        return f"K is transposed with perm {kt.attrs.get('perm')}, not its last two axes"
    if kt.op == "Reshape":
        if list(m.nodes["kt3"].attrs.get("perm", [])) != [0, 2, 1]:
            return "K's 3-D transpose is not (0, 2, 1)"
        src, out = m.nodes["kt3"].inputs[0].inputs[0].inputs[0], kt.outputs[0]
        if rank(out) != 4 or rank(src) != 4 or (isinstance(src.shape[-1], int) and out.shape[-2] != src.shape[-1]):
            return "K's reshape-transpose-reshape is not Kᵀ over the last two axes"
    if _scale(m) is None:
        return "the attention scale is not a scalar constant"
    return _check_common(m)


def _check_onnx(m) -> str | None:
    node = m.nodes["onnx"]
    if node.attrs.get("is_causal", 0):
        return "is_causal=1: the mmc op takes its mask as an input, none is given"
    if node.attrs.get("softcap", 0.0) or node.attrs.get("qk_matmul_output_mode", 0):
        return "softcap / qk output mode is set"
    if len([t for t in node.inputs if t.name]) > (4 if "mask" in m.values else 3):
        return "the node takes its own past_key/past_value inputs"
    if len([o for o in node.outputs if o.name]) > 1:
        return "the node's present/qk outputs are used"
    return _check_common(m)


def _rewrite(g, m, ctx):
    q = m["q"]
    if "onnx" in m.nodes:
        d = q.shape[-1] if q.shape and isinstance(q.shape[-1], int) else None
        scale = float(m.nodes["onnx"].attrs.get("scale", 0.0) or (1 / math.sqrt(d) if d else 0.0))
        nan_to_zero = 0
    else:
        scale = float(_scale(m))
        nan_to_zero = int("guard" in m.nodes and not _finite(m.values.get("mask")))
    attrs = {"num_heads": _heads(q), "kv_heads": _kv_heads(m, "k"), "scale": scale, "nan_to_zero": nan_to_zero}
    cached = "cat_k" in m.nodes
    inputs = [q, m["new_k"], m["new_v"], m.values.get("past_k") if cached else None,
              m.values.get("past_v") if cached else None, m.values.get("mask")]
    while inputs and inputs[-1] is None:
        inputs.pop()
    outputs = [m.root.outputs[0]] + ([m.nodes["cat_k"].outputs[0], m.nodes["cat_v"].outputs[0]] if cached else [])
    fused_node(g, ctx, "Attention", inputs, outputs, attrs, m.root)


def _check_onnx_plain(m) -> str | None:
    node = m.nodes["onnx"]
    if len(node.inputs) > 3 and node.inputs[3].name:
        return "has a mask (the masked rule handles it)"
    return _check_onnx(m)


RULES = [
    Rule("attention", ATTENTION, check=_check_decomposed, rewrite=_rewrite),
    Rule("attention-onnx", ONNX_MASKED, check=_check_onnx, rewrite=_rewrite),
    Rule("attention-onnx", ONNX_PLAIN, check=_check_onnx_plain, rewrite=_rewrite),
]


@register_pass(default=True)
class FuseAttention:
    name = "fuse-attention"
    summary = "decomposed attention + KV-cache concat + repeat_kv -> mmc.Attention"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        return run_rules(graph, ctx, RULES)
