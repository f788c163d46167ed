"""The verifier the pass manager runs after each pass (in tests and with --verify-each).

Checks, each failure naming the node: nodes in topological order; every value read is a graph
input, a weight or produced by an earlier node (no dangling values); every graph output is
produced; names are unique; ONNX's checker and strict shape inference accept the model (types
and shapes consistent).
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .errors import MmcError, first_line


class VerifyError(MmcError):
    pass


def verify_graph(graph: gs.Graph, where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    known = {t.name for t in graph.inputs}
    produced: set[str] = set()
    names: set[str] = set()
    for node in graph.nodes:
        if node.name:
            if node.name in names:
                raise VerifyError(f"{prefix}duplicate node name {node.name!r}")
            names.add(node.name)
        for t in node.inputs:
            if t.name == "" or isinstance(t, gs.Constant):
                continue
            if t.name not in known:
                state = "is produced later (graph not topologically sorted)" if any(
                    t in later.outputs for later in graph.nodes) else "is dangling (no producer)"
                raise VerifyError(f"{prefix}node {node.name or node.op!r} reads {t.name!r} which {state}")
        for o in node.outputs:
            if o.name in produced or o.name in {t.name for t in graph.inputs}:
                raise VerifyError(f"{prefix}value {o.name!r} is produced twice")
            produced.add(o.name)
            known.add(o.name)
    for t in graph.outputs:
        if t.name not in known and not isinstance(t, gs.Constant):
            raise VerifyError(f"{prefix}graph output {t.name!r} is not produced")


def verify_model(model: onnx.ModelProto, where: str = "") -> None:
    """ONNX checker + strict shape inference (types and shapes consistent)."""
    prefix = f"{where}: " if where else ""
    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise VerifyError(f"{prefix}ONNX check failed: {first_line(e, limit=10_000) or type(e).__name__}") from e


def verify(graph: gs.Graph, where: str = "") -> onnx.ModelProto:
    verify_graph(graph, where)
    model = gs.export_onnx(graph, do_type_check=False)
    verify_model(model, where)
    return model
