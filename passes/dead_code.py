"""dce — dead-code elimination.

Matches: nodes none of whose outputs reach a graph output, weights no node reads, and
`Identity` nodes between two activations (their consumers read the source directly).

    before:  a = Relu(x); b = Neg(x)  [b unused]; y = Identity(a) -> out
    after:   y = Relu(x) -> out        (Identity kept only when it feeds a graph output)

Preconditions: none. Pipeline: last, after every pass that may leave unused values behind.
Rules (stats): `identity` (Identity nodes bypassed), `dead-node` (nodes removed).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from mmc.ir import replace_uses
from mmc.registry import PassResult, register_pass


def bypass_identities(graph: gs.Graph) -> int:
    """Point consumers of `Identity(x)` at `x`; an Identity feeding a graph output stays."""
    outputs = {t.name for t in graph.outputs}
    hits = 0
    for node in graph.nodes:
        if node.op != "Identity" or (node.domain or "") not in ("", "ai.onnx") or node.outputs[0].name in outputs:
            continue
        replace_uses(node.outputs[0], node.inputs[0])
        node.outputs.clear()
        hits += 1
    return hits


@register_pass(default=True)
class DeadCodeElimination:
    name = "dce"
    summary = "remove nodes and weights whose results are never used; bypass Identity"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        identities = bypass_identities(graph)
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before - len(graph.nodes) - identities
        stats = {"identity": identities, "dead-node": removed}
        return PassResult(modified=identities + removed > 0, stats=stats)
