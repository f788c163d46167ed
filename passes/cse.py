"""cse — common-subexpression elimination.

Matches: two nodes with the same op, domain, attributes and the same inputs (weights compared
by dtype, shape and bytes, so duplicated constants count as the same input), e.g. the rotary
cos/sin tables and mask arithmetic that exporters emit once per layer.

    before:  a = Unsqueeze(cos, @axes=[1]); b = Unsqueeze(cos, @axes=[1]); f(a); g(b)
    after:   a = Unsqueeze(cos, @axes=[1]); f(a); g(a)

Commutative ops match with their inputs in either order (`Add(a, b)` == `Add(b, a)`), so the
per-layer copies of mask and rotary arithmetic that exporters spell in varying order collapse.
Preconditions: the node is deterministic (no Random* ops) and has no subgraph attributes.
Nodes whose outputs are graph outputs are kept (their names are part of the signature).
Pipeline: after fold-constants (so folded constants can merge), before dce.
Rules (stats): `duplicate-node` (nodes merged into an earlier twin), `duplicate-weight`
(constant tensors merged).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from mmc.ir import replace_uses
from mmc.registry import PassResult, register_pass

NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"}


COMMUTATIVE = {"Add", "Mul", "And", "Or", "Xor", "Equal", "Max", "Min", "Sum", "Mean"}


def _const_key(t: gs.Constant) -> tuple:
    arr = np.asarray(t.values)  # not ascontiguousarray: it turns 0-d into 1-d
    return ("const", arr.dtype.str, arr.shape, hashlib.sha1(arr.tobytes()).hexdigest())


def _attr_key(value):
    if isinstance(value, gs.Constant):
        return _const_key(value)
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, list):
        return tuple(_attr_key(v) for v in value)
    return value


def _sample_key(arr: np.ndarray) -> tuple:
    """dtype, shape and ~64 values spread over the array: weights that differ almost always
    differ here, so only look-alikes are hashed in full (hashing every weight of a real-size
    preset costs tens of seconds)."""
    flat = arr.reshape(-1)
    return (arr.dtype.str, arr.shape, flat[:: max(1, flat.size // 64)][:65].tobytes())


class _Keys:
    """Identity of a value for CSE: activations by object, weights by content."""

    def __init__(self):
        self.groups: dict[tuple, list[gs.Constant]] = {}
        self.digests: dict[int, str] = {}
        self.merged_weights = 0

    def _digest(self, t: gs.Constant) -> str:
        if id(t) not in self.digests:
            self.digests[id(t)] = _const_key(t)[3]
        return self.digests[id(t)]

    def canonical(self, t: gs.Tensor) -> gs.Tensor:
        if not isinstance(t, gs.Constant):
            return t
        group = self.groups.setdefault(_sample_key(np.asarray(t.values)), [])
        for first in group:
            if first is t:
                return t
            if self._digest(first) == self._digest(t):
                self.merged_weights += 1
                return first
        group.append(t)
        return t


@register_pass(default=True)
class CommonSubexpressionElimination:
    name = "cse"
    summary = "merge nodes and weights that compute the same value"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        graph.toposort()
        keys = _Keys()
        graph_outputs = {id(t) for t in graph.outputs}
        seen: dict[tuple, gs.Node] = {}
        merged = 0
        for node in graph.nodes:
            for i, t in enumerate(node.inputs):  # canonicalize duplicate weights first
                c = keys.canonical(t)
                if c is not t:
                    node.inputs[i] = c
            if node.op in NONDETERMINISTIC or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                continue
            if any(id(o) in graph_outputs for o in node.outputs):
                continue
            ins = tuple(id(t) if t.name else None for t in node.inputs)
            if node.op in COMMUTATIVE and not node.domain:  # Add(a, b) == Add(b, a)
                ins = tuple(sorted(ins, key=lambda i: -1 if i is None else i))
            key = (node.domain or "", node.op, tuple(bool(o.name) for o in node.outputs), ins,
                   tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())))
            twin = seen.setdefault(key, node)
            if twin is node:
                continue
            for mine, theirs in zip(node.outputs, twin.outputs):
                replace_uses(mine, theirs)
            node.outputs.clear()
            merged += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {"duplicate-node": merged, "duplicate-weight": keys.merged_weights}
        return PassResult(modified=merged + keys.merged_weights > 0, stats=stats)
