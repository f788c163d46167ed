"""fold-constants — evaluate every subgraph whose inputs are all constants, at compile time.

Matches: nodes whose inputs are weights/constants (and, through shape folding, `Shape` of a
tensor whose dims are static), e.g. the dtype casts of weights, `Range`/`Cos`/`Sin` tables
over static lengths, `Reshape` shape arithmetic.

    before:  s = Shape(w_const); n = Gather(s, 0); r = Reshape(x, Concat(n, -1))
    after:   r = Reshape(x, @const[2]=[64, -1])

Preconditions: none; the evaluation runs in ONNX Runtime (onnx-graphsurgeon's folder), and
folded tensors above `SIZE_LIMIT` bytes are left unfolded (they would bloat the engine, e.g. an
Expand of a weight). Pipeline: first, so later rules see constants.
Rules (stats): `folded-node` (nodes replaced by constants), `constant-node` (Constant ops
turned into weights).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from mmc.registry import PassResult, register_pass

SIZE_LIMIT = 16 << 20  # bytes: do not materialize bigger folded tensors


def _constant_ops(graph: gs.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "Constant" and (n.domain or "") in ("", "ai.onnx"))


@register_pass(default=True)
class ConstantFolding:
    name = "fold-constants"
    summary = "evaluate constant subgraphs (incl. static Shape arithmetic) at compile time"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # the folder's sessions warn about every Unsqueeze they keep
        nodes_before = len(graph.nodes)
        constant_ops = _constant_ops(graph)
        graph.fold_constants(fold_shapes=True, size_threshold=SIZE_LIMIT, error_ok=True)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = nodes_before - len(graph.nodes)
        stats = {"constant-node": min(constant_ops, removed), "folded-node": max(0, removed - constant_ops)}
        return PassResult(modified=removed > 0, stats=stats)
