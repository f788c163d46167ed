"""horizontal-gemm — sibling projections of one activation -> one GEMM over concatenated
weights + Split (fewer, larger GEMMs: one weight stream per layer input instead of three).

    before:  q = Add(MatMul(x, @Wq), @bq); k = Add(MatMul(x, @Wk), @bk); v = Add(MatMul(x, @Wv), @bv)
    after:   qkv = Add(MatMul(x, @[Wq|Wk|Wv]), @[bq|bk|bv]); q, k, v = Split(qkv, [Nq, Nk, Nv], axis=-1)

Rules (one merge, named by what the siblings feed):
- `merge-qkv`:      the projections feeding one mmc.Attention (q, k, v; unequal GQA widths)
- `merge-gate-up`:  gate and up of one mmc.SwiGLU; the Split then disappears: SwiGLU(packed)
- `merge-siblings`: any other group (vision MLPs, user models)

Preconditions: every weight is a constant 2-D [K, N_i] of one dtype (Gemm: B or Bᵀ, C the bias); a bias is a constant
[N_i] added by the projection's only reader (missing biases merge as zeros); no sibling depends
on another (checked on a networkx view, so a merge never makes a cycle). Pipeline: after
fuse-attention and fuse-swiglu (which name the groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from mmc.ir import to_networkx
from mmc.patterns import RuleStats
from mmc.plugins import DOMAIN
from mmc.registry import PassResult, register_pass

from .fusion_util import const_value

PASS_THROUGH = {"Reshape", "Transpose", "RotaryEmbedding", "Squeeze", "Unsqueeze", "Cast"}


@dataclass
class Projection:
    matmul: gs.Node
    weight: np.ndarray           # [K, N]
    bias_node: gs.Node | None    # Add(matmul_out, @b)
    bias: np.ndarray | None

    @property
    def out(self) -> gs.Tensor:
        return (self.bias_node or self.matmul).outputs[0]


def _projection(node: gs.Node, stats: RuleStats) -> Projection | None:
    if node.op == "Gemm":
        return _gemm_projection(node, stats)
    w = const_value(node.inputs[1])
    if w is None:
        stats.miss("merge-siblings", node, f"weight {node.inputs[1].name!r} is not a constant", 1)
        return None
    if w.ndim != 2:
        stats.miss("merge-siblings", node, f"weight is {w.ndim}-D, not [K, N]", 1)
        return None
    out = node.outputs[0]
    readers = list(out.outputs)
    if len(readers) == 1 and readers[0].op == "Add":
        add = readers[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        b = const_value(other)
        if b is not None and b.shape == (w.shape[1],):
            return Projection(node, w, add, b)
    return Projection(node, w, None, None)


def _gemm_projection(node: gs.Node, stats: RuleStats) -> Projection | None:
    """Gemm(x, B, C) with transA=0, alpha=beta=1 and constant B, C is x @ B(ᵀ) + C."""
    a = node.attrs
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        stats.miss("merge-siblings", node, "Gemm with transA or alpha/beta != 1", 1)
        return None
    w = const_value(node.inputs[1])
    c = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if w is None or (len(node.inputs) > 2 and node.inputs[2].name and c is None):
        stats.miss("merge-siblings", node, "Gemm weight or bias is not a constant", 1)
        return None
    w = w.T if a.get("transB", 0) else w
    if c is not None and c.shape != (w.shape[1],):
        stats.miss("merge-siblings", node, f"Gemm bias of shape {c.shape} is not per output column", 1)
        return None
    return Projection(node, w, None, c)


def _downstream(t: gs.Tensor, depth: int = 6):
    """The first compute op reading t through layout ops and rotary (Shape readers, which only
    read dims, are ignored), or None when t feeds several."""
    for _ in range(depth):
        readers = [r for r in t.outputs if r.op not in ("Shape", "Size")]
        if len(readers) != 1:
            return None
        node = readers[0]
        if node.op not in PASS_THROUGH or (node.domain == DOMAIN and node.op != "RotaryEmbedding"):
            return node
        t = node.outputs[0]
    return None


def _classify(group: list[Projection], graph_outputs: set[int]) -> tuple[str, list[Projection]]:
    readers = [_downstream(p.out) for p in group]
    if len(group) == 3 and all(r is not None and r.op == "Attention" and r.domain == DOMAIN for r in readers) \
            and readers[0] is readers[1] is readers[2]:
        return "merge-qkv", group
    if len(group) == 2 and all(p.out.outputs and len(p.out.outputs) == 1 for p in group):
        node = group[0].out.outputs[0]
        if node is group[1].out.outputs[0] and node.op == "SwiGLU" and node.domain == DOMAIN and \
                not any(id(p.out) in graph_outputs for p in group):
            gate = group if node.inputs[0] is group[0].out else group[::-1]
            return "merge-gate-up", gate
    return "merge-siblings", group


def _merge(graph, ctx, x: gs.Tensor, group: list[Projection], kind: str) -> None:
    widths = [p.weight.shape[1] for p in group]
    w = gs.Constant(ctx.fresh_name("merged_weight"), np.concatenate([p.weight for p in group], axis=1))
    merged = gs.Variable(ctx.fresh_name("merged"), dtype=x.dtype,
                         shape=[*x.shape[:-1], sum(widths)] if x.shape else None)
    nodes = [gs.Node("MatMul", ctx.fresh_name("MatMul"), inputs=[x, w], outputs=[merged])]
    if any(p.bias is not None for p in group):
        b = np.concatenate([p.bias if p.bias is not None else np.zeros(wd, p.weight.dtype)
                            for p, wd in zip(group, widths)])
        biased = gs.Variable(ctx.fresh_name("merged_bias"), dtype=x.dtype, shape=merged.shape)
        nodes.append(gs.Node("Add", ctx.fresh_name("Add"), inputs=[merged, gs.Constant(ctx.fresh_name("bias"), b)],
                             outputs=[biased]))
        merged = biased
    outs = [p.out for p in group]
    for p in group:
        (p.bias_node or p.matmul).outputs.clear()
        p.matmul.outputs.clear()
    swiglu = outs[0].outputs[0] if kind == "merge-gate-up" else None
    if swiglu is not None and len(swiglu.inputs) == 2 and widths[0] == widths[1]:
        swiglu.inputs.clear()
        swiglu.inputs.append(merged)  # packed [gate | up]
    else:
        split = gs.Constant(ctx.fresh_name("split"), np.asarray(widths, dtype=np.int64))
        nodes.append(gs.Node("Split", ctx.fresh_name("Split"), {"axis": -1}, inputs=[merged, split], outputs=outs))
    at = min(i for i, n in enumerate(graph.nodes) if any(n is p.matmul for p in group))
    graph.nodes[at:at] = nodes
    for n in nodes:
        ctx.created(n)


@register_pass(default=True)
class HorizontalGemm:
    name = "horizontal-gemm"
    summary = "sibling MatMuls on one input (q/k/v, gate/up, any group) -> one GEMM + Split"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        stats = RuleStats()
        for rule in ("merge-qkv", "merge-gate-up", "merge-siblings"):
            stats.hits[rule] = 0
        groups: dict[int, list[Projection]] = {}
        inputs: dict[int, gs.Tensor] = {}
        for node in graph.nodes:
            if node.op in ("MatMul", "Gemm") and not node.domain and len(node.inputs) >= 2:
                x = node.inputs[0]
                if sum(1 for r in x.outputs if r.op in ("MatMul", "Gemm")) < 2:
                    continue
                p = _projection(node, stats)
                if p is not None:
                    groups.setdefault(id(x), []).append(p)
                    inputs[id(x)] = x
        view = to_networkx(graph) if groups else None
        index = {id(n): i for i, n in enumerate(graph.nodes)}
        for key, group in groups.items():
            group = self._independent(group, view, index, stats)
            if len(group) < 2 or len({p.weight.dtype for p in group}) != 1:
                continue
            kind, ordered = _classify(group, {id(t) for t in graph.outputs})
            _merge(graph, ctx, inputs[key], ordered, kind)
            stats.hits[kind] += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        for name, n in stats.hits.items():
            if n:
                stats.near_miss.pop(name, None)
        ctx.near_misses.update(stats.near_miss)
        return PassResult(modified=sum(stats.hits.values()) > 0, stats=dict(stats.hits))

    @staticmethod
    def _independent(group: list[Projection], view: nx.DiGraph, index: dict, stats: RuleStats) -> list[Projection]:
        """Drop siblings reachable from another sibling: merging those would make a cycle."""
        keep: list[Projection] = []
        for p in group:
            a = index[id(p.matmul)]
            if any(nx.has_path(view, index[id(q.matmul)], a) or nx.has_path(view, a, index[id(q.matmul)])
                   for q in keep):
                stats.miss("merge-siblings", p.matmul, "depends on a sibling (merging would make a cycle)", 2)
                continue
            keep.append(p)
        return keep
