"""Small helpers shared by the fusion passes: constant reads, static shapes, the fused-node
builder, and the dependency test that keeps a rewrite from creating a cycle."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmc.plugins import DOMAIN


def const_value(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def int_list(t: gs.Tensor) -> list[int] | None:
    v = const_value(t)
    return None if v is None else [int(x) for x in v.reshape(-1)]


def reduce_axes(node: gs.Node) -> list[int] | None:
    """ReduceMean's axes: an attribute before opset 18, the second input from 18 on."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    return int_list(node.inputs[1]) if len(node.inputs) > 1 else None


def is_last_axis(axes: list[int] | None, rank: int | None) -> bool:
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


def same_dims(a, b) -> bool:
    """Two shapes are provably equal: same length, every dim known (a number or a named
    symbol) and equal."""
    return a is not None and b is not None and len(a) == len(b) and all(
        x is not None and x != "" and x == y for x, y in zip(a, b))


def last_dim(t: gs.Tensor):
    return t.shape[-1] if t.shape else None


def fused_node(graph: gs.Graph, ctx, op: str, inputs: list, outputs: list, attrs: dict, anchor: gs.Node) -> gs.Node:
    """Insert an mmc node producing `outputs` (existing tensors, whose old producers are
    detached) right where `anchor` is, so the graph stays topologically sorted."""
    for t in outputs:
        for producer in list(t.inputs):
            producer.outputs.remove(t)
    inputs = [gs.Variable.empty() if t is None else t for t in inputs]
    node = gs.Node(op, name=ctx.fresh_name(op), attrs=attrs, inputs=inputs, outputs=outputs, domain=DOMAIN)
    at = next((i for i, n in enumerate(graph.nodes) if n is anchor), len(graph.nodes))
    graph.nodes.insert(at, node)
    ctx.created(node)
    return node


def depends_on(tensors: list[gs.Tensor], targets: set[int]) -> bool:
    """Whether any of `tensors` is computed from a tensor whose id is in `targets` (walking
    producers up to graph inputs and weights)."""
    seen: set[int] = set()
    stack = list(tensors)
    while stack:
        t = stack.pop()
        if id(t) in targets:
            return True
        if id(t) in seen or not isinstance(t, gs.Variable):
            continue
        seen.add(id(t))
        for producer in t.inputs:
            stack.extend(producer.inputs)
    return False


def run_rules(graph: gs.Graph, ctx, *rule_sets):
    """The body of a rule-based pass: apply each rule set in turn (one sweep each, cleanup and
    topological sort after), record near misses on ctx, return the PassResult."""
    from mmc.patterns import RuleStats, apply_rules
    from mmc.registry import PassResult

    stats = RuleStats()
    for rules in rule_sets:
        apply_rules(graph, rules, ctx, stats)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    ctx.near_misses.update(stats.near_miss)
    return PassResult(modified=sum(stats.hits.values()) > 0, stats=dict(stats.hits))
