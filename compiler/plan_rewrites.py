"""The cuda target's rewrites of an optimized graph just before it becomes a plan (compiler/plan.py).

They are lowering, not passes: they pick the cuda target's kernels and storage, and the ORT
target never sees them.

    weight-only     y = MatMul(x, DequantizeLinear(@codes int8 [K, N], @s [N], axis=1))
                    y = MatMul(x, DequantizeLinear(@codes int4 [K, N], @s [K/g, N], axis=0, block_size=g))
                      ->  y = mmc.WeightOnlyMatMul(x, @w, @s' (, @b))   (plugins/linear: codes stored
                    [N, K] int8, or [N, K/2] packed int4, scales [N] / [N, K/g]; a constant
                    bias Add that is the GEMM's only reader joins it, as in linear); the float
                    weight is never materialized. fp8 weights and DQs with a zero point stay as
                    they are (DequantizeLinear then MatMul).
    last-logits     logits = MatMul(h, @W)  ->  logits = MatMul(h[:, -1:], @W)
                    the decoder's runtime reads only the last position's logits, so prefill
                    computes the vocabulary projection for one position instead of S
                    (151,936 × hidden MACs per position for Qwen2.5-VL).
    linear          y = MatMul(x, @W [K, N]) (+ @b [N], the MatMul's only reader)
                      ->  y = mmc.Linear(x, @Wᵀ (, @b))   (plugins/linear: W stored [N, K] as
                    nn.Linear does; one row runs the Triton GEMV, more rows one cuBLAS call; the
                    bias added in float32 before the one rounding, as nn.Linear does; one kernel
                    instead of two where there is a bias)
    rope-attention  q' = RotaryEmbedding(q, cos, sin); k' = RotaryEmbedding(k, cos, sin)   (layout bnsd,
                    one rotary_dim, the same tables; each read only by) y = mmc.Attention(q', k', v, ...)
                      ->  y = mmc.Attention(q, k, v, ..., cos, sin; rotary_dim)   (plugins/attention's
                    fused-RoPE form: a decode step's rotary, cache write and attention are one
                    kernel; prefill runs the rotary kernels, then flash attention)
    gemm-prologue   x' = RMSNorm(x, @g) | SkipRMSNorm(x, skip, @g) (no bias) | SwiGLU(gate_up), x' read
                    only by  y = mmc.Linear(x', @w (, @b)) or mmc.WeightOnlyMatMul(x', @w, @s (, @b))
                    with int8 codes (a norm only where N <= NORM_FOLD_MAX_N_PER_K · K, and into a
                    float GEMM only where K <= NORM_FOLD_MAX_K)
                      ->  y (, s) = mmc.Linear(x, @w, @b | "", @g (, skip); prologue)
                          y (, s) = mmc.WeightOnlyMatMul(x, @w, @s, @b | "", @g (, skip); prologue)
                    (plugins/linear/prologue.py: a batch-1 decode step's GEMV computes the norm or
                    the gated activation on the fly, plugins/linear/gemv.py: one launch fewer per
                    folded op; more rows run the op's own kernel first; tools/sweep_gemv.py and
                    docs/benchmarks.md for the rules' figures).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmc.quantization import weight_dq

INT64_MAX = np.iinfo(np.int64).max


def weight_only(graph: gs.Graph) -> int:
    """Rewrite int8 / int4 weight DequantizeLinear -> MatMul pairs; returns the count."""
    from mmc.plugins.linear import pack_int4

    hits = 0
    for node in list(graph.nodes):
        dq = weight_dq(node)
        if dq is None or len(dq.inputs) > 2 and _nonzero(dq.inputs[2]):
            continue
        codes = np.asarray(dq.inputs[0].values)
        scale = np.asarray(dq.inputs[1].values).astype(np.float32)
        k = codes.shape[0]
        bits = 4 if dq.attrs.get("block_size") else 8 if codes.dtype == np.int8 else 0
        if bits == 0 or codes.ndim != 2 or (bits == 4 and k % 2):
            continue  # fp8 (or anything else): DequantizeLinear stays
        if bits == 8:
            w, s, attrs = np.ascontiguousarray(codes.T), scale, {"bits": 8, "k": k}
        else:
            w = pack_int4(np.ascontiguousarray(codes.T.astype(np.int8)))
            s, attrs = np.ascontiguousarray(scale.T), {"bits": 4, "group_size": int(dq.attrs["block_size"]), "k": k}
        base = dq.inputs[0].name
        ins = [node.inputs[0], gs.Constant(f"{base}_nk", w), gs.Constant(f"{base}_scale_nk", s)]
        _replace_gemm(graph, node, gs.Node("WeightOnlyMatMul", f"{node.name}_woq", attrs, ins, domain="mmc"),
                      codes.shape[1])
        hits += 1
    if hits:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return hits


def _nonzero(zp) -> bool:
    return not isinstance(zp, gs.Constant) or bool(np.any(np.asarray(zp.values).astype(np.float64) != 0))


def last_logits(graph: gs.Graph, output: str = "logits") -> bool:
    """Slice the vocabulary projection's input to the last position; False if the graph does
    not end in one (a MatMul / WeightOnlyMatMul of a [B, S, H] activation into `output`)."""
    out = next((t for t in graph.outputs if t.name == output), None)
    if out is None or len(out.inputs) != 1:
        return False
    proj = out.inputs[0]
    h = proj.inputs[0] if proj.inputs else None
    if proj.op not in ("MatMul", "WeightOnlyMatMul") or h is None or h.shape is None or len(h.shape) != 3:
        return False
    last = gs.Variable(f"{h.name}_last", dtype=h.dtype, shape=[h.shape[0], 1, h.shape[2]])
    consts = [gs.Constant(f"{h.name}_last_{n}", np.array([v], dtype=np.int64))
              for n, v in (("start", -1), ("end", INT64_MAX), ("axis", 1))]
    graph.nodes.append(gs.Node("Slice", f"{h.name}_last_slice", inputs=[h, *consts], outputs=[last]))
    proj.inputs[0] = last
    if out.shape is not None and len(out.shape) == 3:
        out.shape = [out.shape[0], 1, out.shape[2]]
    graph.toposort()
    return True


def linear(graph: gs.Graph) -> int:
    """Rewrite float GEMMs with a constant 2-D weight (and their constant bias Add) into
    mmc.Linear; returns the count."""
    hits = 0
    for node in list(graph.nodes):
        if node.op != "MatMul" or node.domain or len(node.inputs) != 2 or not node.outputs:
            continue
        x, w = node.inputs
        if not isinstance(w, gs.Constant) or w.values.ndim != 2 or np.asarray(w.values).dtype.kind != "f":
            continue
        wt = gs.Constant(f"{w.name}_nk", np.ascontiguousarray(np.asarray(w.values).T))  # nn.Linear's [N, K]
        _replace_gemm(graph, node, gs.Node("Linear", f"{node.name}_linear", {}, [x, wt], domain="mmc"),
                      w.values.shape[1])
        hits += 1
    if hits:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return hits


def _replace_gemm(graph: gs.Graph, gemm: gs.Node, fused: gs.Node, n: int) -> None:
    """Put `fused` (its inputs but the bias set) in the place of `gemm`, taking in the constant
    bias Add that is the GEMM's only reader (its output becomes the fused node's)."""
    y = gemm.outputs[0]
    bias = _absorbed_bias(graph, y, n)
    if bias is not None:
        fused.inputs.append(bias)
        y = y.outputs[0].outputs[0]
        y.inputs.clear()
    gemm.outputs.clear()
    fused.outputs.append(y)
    graph.nodes.append(fused)


def _absorbed_bias(graph: gs.Graph, y: gs.Tensor, n: int) -> gs.Constant | None:
    """The constant float [N] bias an `Add` adds to GEMM result `y` when that Add is y's only
    reader (y not a graph output), else None."""
    if len(y.outputs) != 1 or y in graph.outputs:
        return None
    add = y.outputs[0]
    if add.op != "Add" or add.domain or len(add.inputs) != 2 or len(add.outputs) != 1:
        return None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if other is y or not isinstance(other, gs.Constant):
        return None
    b = np.asarray(other.values)
    return other if b.dtype.kind == "f" and b.shape == (n,) else None


def rope_attention(graph: gs.Graph) -> int:
    """Fold the rotary of q and k into the attention that alone reads them; returns the count."""
    hits = 0
    for node in list(graph.nodes):
        if node.op != "Attention" or node.domain != "mmc" or len(node.inputs) > 8:
            continue
        ropes = [_sole_rotary(graph, t, node) for t in node.inputs[:2]]
        if any(r is None for r in ropes):
            continue
        (rq, rk), attrs = ropes, [r.attrs for r in ropes]
        if rq.inputs[1] is not rk.inputs[1] or rq.inputs[2] is not rk.inputs[2] or \
                attrs[0].get("rotary_dim", 0) != attrs[1].get("rotary_dim", 0):
            continue
        node.inputs[0], node.inputs[1] = rq.inputs[0], rk.inputs[0]
        while len(node.inputs) < 8:
            node.inputs.append(gs.Variable.empty())
        node.inputs.extend([rq.inputs[1], rq.inputs[2]])
        node.attrs["rotary_dim"] = int(attrs[0].get("rotary_dim", 0))
        for r in ropes:
            r.inputs.clear()
            r.outputs.clear()
        hits += 1
    if hits:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return hits


def _sole_rotary(graph: gs.Graph, t: gs.Tensor, reader: gs.Node) -> gs.Node | None:
    """The mmc RotaryEmbedding (layout bnsd) that makes `t`, when `reader` is t's only reader."""
    if len(t.inputs) != 1 or t in graph.outputs or len(t.outputs) != 1 or t.outputs[0] is not reader:
        return None
    r = t.inputs[0]
    ok = r.op == "RotaryEmbedding" and r.domain == "mmc" and r.attrs.get("layout", "bnsd") == "bnsd"
    return r if ok else None


# A norm folds only into GEMMs with N <= NORM_FOLD_MAX_N_PER_K · K: every GEMV program recomputes
# the row's 1/rms over all of K, which costs more than the norm's own launch on wide GEMMs (H100,
# tools/sweep_gemv.py: the 3B gate_up [2048 -> 22016] int8 GEMV 20.8 us alone, 41.2 us with the
# skip_rms prologue; qkv [2048 -> 2560] 6.4 / 7.7 us, where the norm kernel alone costs ~2).
NORM_FOLD_MAX_N_PER_K = 4
# ... and into float GEMMs only with K <= NORM_FOLD_MAX_K (the GEMV takes all of K per program): the 7B
# qkv [3584 -> 4608] bf16 GEMV is 16.0 us alone, 20.3 with the rms prologue; the 3B [2048 -> 2560] 5.0
# with it against 7.0 for the norm kernel + GEMV.
NORM_FOLD_MAX_K = 2048
# producer op -> (prologue, which of its inputs become the GEMM's prologue inputs, in prologue.py's order)
PROLOGUE_OPS = {"RMSNorm": ("rms", (1,)), "SkipRMSNorm": ("skip_rms", (2, 1)), "SwiGLU": ("swiglu", ())}


def gemm_prologue(graph: gs.Graph) -> int:
    """Fold the norm / gated activation that alone feeds a float or int8 weight-only GEMM into it;
    returns the count."""
    from mmc.plugins import OPS

    hits = 0
    for node in list(graph.nodes):
        gemv = node.op == "Linear" or node.op == "WeightOnlyMatMul" and node.attrs.get("bits") == 8
        if not gemv or node.domain != "mmc" or node.attrs.get("prologue"):
            continue
        n, k = node.inputs[1].shape  # both keep W as [N, K]
        x = node.inputs[0]
        if len(x.inputs) != 1 or x in graph.outputs or len(x.outputs) != 1:
            continue
        p = x.inputs[0]
        kind, picks = PROLOGUE_OPS.get(p.op, (None, ())) if p.domain == "mmc" and p.outputs[0] is x else (None, ())
        if kind == "skip_rms" and len(p.inputs) > 3 and p.inputs[3].name:
            kind = None  # a biased residual add: not a prologue form
        if kind == "swiglu" and len(p.inputs) != 1:
            kind = None  # gate and up as two tensors
        if kind in ("rms", "skip_rms") and (n > NORM_FOLD_MAX_N_PER_K * k or node.op == "Linear" and k > NORM_FOLD_MAX_K):
            kind = None  # the norm's own kernel is cheaper than recomputing 1/rms in every program
        if kind is None:
            continue
        extra = [p.inputs[i] for i in picks]
        attrs = {"prologue": kind}
        attrs.update({"activation": p.attrs.get("activation", "silu")} if kind == "swiglu"
                     else {"epsilon": float(p.attrs["epsilon"])})
        s = p.outputs[1] if kind == "skip_rms" and len(p.outputs) > 1 else None
        src = p.inputs[0]
        p.inputs.clear()
        p.outputs.clear()
        node.inputs[0] = src
        while len(node.inputs) < OPS[node.op].PROLOGUE_AT:
            node.inputs.append(gs.Variable.empty())
        node.inputs.extend(extra)
        node.attrs.update(attrs)
        if s is not None and (s.outputs or s in graph.outputs):
            node.outputs.append(s)
        hits += 1
    if hits:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return hits

