"""The verifier the pass manager runs after each pass (in tests and with --verify-each).

Checks, each failure naming the node: nodes in topological order; every value read is a graph
input, a weight or produced by an earlier node (no dangling values); every graph output is
produced; names are unique; ONNX's checker and strict shape inference accept the model (types
and shapes consistent).
"""

from __future__ import annotations

import numpy as np
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


def verify_fused_ops(graph: gs.Graph, where: str = "") -> None:
    """Each mmc node is a known op whose inferred output dtypes/shapes agree with the values'."""
    from mmc.plugins import DOMAIN, OPS

    prefix = f"{where}: " if where else ""
    for node in graph.nodes:
        if node.domain != DOMAIN:
            continue
        if node.op not in OPS:
            raise VerifyError(f"{prefix}node {node.name!r}: unknown mmc op {node.op!r}")
        for out, (dtype, shape) in zip(node.outputs, OPS[node.op].infer(node)):
            if out.name == "":
                continue
            if dtype is not None and out.dtype is not None and np.dtype(out.dtype) != dtype:
                raise VerifyError(f"{prefix}node {node.name!r} ({node.op}): output {out.name!r} is "
                                  f"{np.dtype(out.dtype)}, the op gives {dtype}")
            if shape is not None and out.shape is not None:
                if len(shape) != len(out.shape) or any(
                        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(shape, out.shape)):
                    raise VerifyError(f"{prefix}node {node.name!r} ({node.op}): output {out.name!r} has "
                                      f"shape {out.shape}, the op gives {shape}")


def verify(graph: gs.Graph, where: str = "") -> onnx.ModelProto:
    """Structure, then mmc ops' own inference, then ONNX's checker + strict inference on the
    graph with mmc ops lowered to their ORT faces (ONNX knows no mmc ops)."""
    from .lowering import lower_model

    verify_graph(graph, where)
    verify_fused_ops(graph, where)
    model = gs.export_onnx(graph, do_type_check=False)
    verify_model(lower_model(model), where)
    return model
