"""Lowering: replace mmc's fused ops (domain `mmc`) with what a target executes.

    target "ort": each mmc node -> its plugin's ORT face (contrib op, standard op or a
                  decomposition; see plugins/<op>/). Faces that prefer a newer standard op
                  (Attention, RotaryEmbedding: opset 23) get it by converting the graph's opset
                  with ONNX's version converter first; if that fails, the fallback faces run.

The pass pipeline works on graphs with mmc ops; the numerical check, the verifier and the
engine writer see them lowered (`lower_model`), so every fused graph runs in ONNX Runtime.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from mmc.plugins import DOMAIN, OPS
from mmc.plugins.base import Emitter

from . import ir


def has_fused_ops(graph: gs.Graph) -> bool:
    return any(n.domain == DOMAIN for n in graph.nodes)


def _upgrade_opset(graph: gs.Graph, opset: int) -> gs.Graph:
    from onnx import version_converter

    model = ir.to_model(graph)
    converted = version_converter.convert_version(model, opset)
    return gs.import_onnx(converted)


def lower_graph(graph: gs.Graph, target: str = "ort", upgrade: bool = True) -> gs.Graph:
    """Return `graph` (modified in place, or a converted copy) with no mmc nodes left;
    `upgrade=False` keeps the opset (the fallback faces run where a face needs a newer one)."""
    if target != "ort":
        raise ValueError(f"no lowering for target {target!r}")
    fused = [n for n in graph.nodes if n.domain == DOMAIN]
    if not fused:
        return graph
    unknown = sorted({n.op for n in fused if n.op not in OPS})
    if unknown:
        from .errors import MmcError

        raise MmcError(f"graph has mmc ops without an ORT lowering: {', '.join(unknown)}")
    want = max(OPS[n.op].min_opset for n in fused)
    if upgrade and graph.opset < want:
        try:
            graph = _upgrade_opset(graph, want)
        except Exception:  # the converter lacks an adapter for some op: the fallback faces run
            pass
    for node in [n for n in graph.nodes if n.domain == DOMAIN]:
        emit = Emitter(graph, node)
        OPS[node.op].lower_ort(emit, node, graph.opset)
        emit.finish()
    graph.import_domains = [d for d in (graph.import_domains or []) if d.domain != DOMAIN] or None
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    _share_face_constants(graph)
    return graph


def _share_face_constants(graph: gs.Graph) -> None:
    """Faces emit per-node helpers (a bool mask made additive, a half rotary table); the
    layers' copies read the same tensors, so cse merges them into one."""
    from mmc.passes.cse import CommonSubexpressionElimination

    from .pass_manager import PassContext

    CommonSubexpressionElimination().run(graph, PassContext("lowering", current_pass="lower"))


def lower_model(model: onnx.ModelProto, target: str = "ort") -> onnx.ModelProto:
    """A lowered copy of `model` (unchanged if it has no mmc ops)."""
    if not any(n.domain == DOMAIN for n in model.graph.node):
        return model
    return ir.to_model(lower_graph(gs.import_onnx(model), target))
