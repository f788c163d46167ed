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

from .fusion_util import const_value, depends_on, fused_node, int_list, last_dim, rank, run_rules, same_dims


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
PROBS = AnyOf(Op("Where", Op("IsNaN", Var("guarded")), Const("zero"), SOFTMAX, label="guard"), SOFTMAX)
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
    """The mask provably holds no ±inf/NaN: a finite constant, Where of finite ones, a bool
    (a bool mask becomes a finite additive one in the faces), or a widening/bool Cast of such."""
    if t is None:
        return True
    if t.dtype is not None and np.dtype(t.dtype) == np.dtype(bool):
        return True
    if isinstance(t, gs.Constant):
        v = const_value(t)
        return bool(np.isfinite(v).all()) if v.dtype.kind == "f" else True
    if len(t.inputs) != 1:
        return False
    node = t.inputs[0]
    if node.op == "Where":
        return all(_finite(x) for x in node.inputs[1:])
    if node.op in ("Expand", "Reshape", "Unsqueeze", "Squeeze"):
        return _finite(node.inputs[0])
    if node.op == "Cast":  # only a cast that cannot overflow: from bool, or to a wider float
        src, dst = node.inputs[0].dtype, t.dtype
        if src is None or dst is None:
            return False
        src, dst = np.dtype(src), np.dtype(dst)
        widening = src.kind in "fiu" and dst.kind == "f" and np.finfo(dst).max >= (
            np.finfo(src).max if src.kind == "f" else np.iinfo(src).max)
        return (src == np.dtype(bool) or widening) and _finite(node.inputs[0])
    return False


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


def _repeat_factor(m, name: str) -> int | str:
    """1 without repeat_kv; else the proven group size g, or a reason string."""
    if f"rep_{name}" not in m.nodes:
        return 1
    if int_list(m[f"uax_{name}"]) != [2]:
        return f"repeat_kv of {name} unsqueezes axis {int_list(m[f'uax_{name}'])}, not 2"
    src = m.nodes[f"unsq_{name}"].inputs[0]
    expanded = m.nodes[f"rep_{name}"].inputs[0]
    out = m.nodes[f"rep_{name}"].outputs[0]
    s, e, o = src.shape, expanded.shape, out.shape
    if s is None or e is None or o is None or len(s) != 4 or len(e) != 5 or len(o) != 4:
        return f"repeat_kv of {name}: shapes unknown, cannot prove [B, KV, T, D] -> [B, KV*g, T, D]"
    g = e[2]
    if not isinstance(g, int) or not isinstance(s[1], int) or not same_dims(e, [s[0], s[1], g, s[2], s[3]]) \
            or not same_dims(o, [s[0], s[1] * g, s[2], s[3]]):
        return f"repeat_kv of {name} is not [B, KV, T, D] -> [B, KV, g, T, D] -> [B, KV*g, T, D] ({s} -> {e} -> {o})"
    return g


def _check_kv(m, name: str) -> str | None:
    cat = m.nodes.get(f"cat_{name}")
    if cat is not None and (cat.attrs.get("axis") not in (2, -2) or len(cat.inputs) != 2):
        return f"{name} cache concat is not on the sequence axis"
    g = _repeat_factor(m, name)
    if isinstance(g, str):
        return g
    if rank(m.values.get(f"new_{name}")) != 4:
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
    if not n or not kv:
        return f"head counts unknown (query {n or '?'}, kv {kv or '?'})"
    if n % kv or kv != _kv_heads(m, "v"):
        return f"{n} query heads, {kv} key heads, {_kv_heads(m, 'v')} value heads: not a valid GQA split"
    if _repeat_factor(m, "k") != _repeat_factor(m, "v"):
        return "K and V are repeated differently"
    if _repeat_factor(m, "k") not in (1, n // kv):
        return f"repeat_kv factor {_repeat_factor(m, 'k')} does not turn {kv} kv heads into {n}"
    for name in ("q", "new_k", "new_v"):
        if not isinstance(last_dim(m[name]), int):
            return f"head dim of {name} is not static"
    caches = [m.nodes[c].outputs[0] for c in ("cat_k", "cat_v") if c in m.nodes]
    ins = [m.values.get(k) for k in ("q", "new_k", "new_v", "past_k", "past_v", "mask")]
    if caches and depends_on([t for t in ins if t is not None], {id(t) for t in caches}):
        return "an input of the attention reads the cache it writes (would make a cycle)"
    return None


def _check_decomposed(m) -> str | None:
    sm = m.nodes["softmax"]
    axis = sm.attrs.get("axis", -1 if m.opset >= 13 else 1)  # before opset 13: a 2-D view from axis 1
    if axis not in (-1, (rank(sm.outputs[0]) or 0) - 1) or (m.opset < 13 and "axis" not in sm.attrs):
        return f"softmax over axis {axis}, not the keys (last) axis"
    if "guard" in m.nodes and (m.scalar("zero") != 0.0 or m["guarded"] is not sm.outputs[0]):
        return "the NaN guard does not test the softmax it replaces, or does not write 0"
    kt = m.nodes["kt"]
    if kt.op == "Transpose" and list(kt.attrs.get("perm", [])) != [0, 1, 3, 2]:
        return f"K is transposed with perm {kt.attrs.get('perm')}, not its last two axes"
    if kt.op == "Reshape":
        if list(m.nodes["kt3"].attrs.get("perm", [])) != [0, 2, 1]:
            return "K's 3-D transpose is not (0, 2, 1)"
        flat = m.nodes["kt3"].inputs[0]           # Reshape(K) -> [B*N, T, D]
        src, out = flat.inputs[0].inputs[0], kt.outputs[0]
        k = src.shape
        # flat keeps K's last two dims, so its first is B*N; out splits it back as [B, N]
        if k is None or len(k) != 4 or flat.shape is None or len(flat.shape) != 3 or \
                not same_dims(flat.shape[1:], k[2:]) or not same_dims(out.shape, [k[0], k[1], k[3], k[2]]):
            return f"K's reshape-transpose-reshape is not Kᵀ over the last two axes ({k} -> {flat.shape} -> {out.shape})"
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
        scale = float(m.nodes["onnx"].attrs.get("scale", 0.0) or 1 / math.sqrt(last_dim(q)))
        nan_to_zero = 0
    else:
        scale = float(_scale(m))
        # half precision can overflow a finite mask to -inf: keep the guard there
        wide = q.dtype is not None and np.dtype(q.dtype) in (np.dtype("float32"), np.dtype("float64"))
        nan_to_zero = int("guard" in m.nodes and not (wide and _finite(m.values.get("mask"))))
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
