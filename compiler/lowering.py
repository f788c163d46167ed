"""Lowering: replace mmc's fused ops (domain `mmc`) with what a target executes.

    target "ort": each mmc node -> its plugin's ORT face (contrib op, standard op or a
                  decomposition; see plugins/<op>/). Faces that prefer a newer standard op
                  (Attention, RotaryEmbedding: opset 23) get it by converting the graph's opset
                  with ONNX's version converter first; if that fails, the fallback faces run.

                  Weight-only Q/DQ GEMMs (DequantizeLinear -> MatMul) become MatMulNBits;
                  W8A8 and FP8 QDQ stay as they are (ORT runs them: int8 as
                  MatMulIntegerToFloat; fp8 engines ask for session.disable_quant_qdq).

The pass pipeline works on graphs with mmc ops; the numerical check, the verifier and the
engine writer see them lowered (`lower_model`), so every fused graph runs in ONNX Runtime.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from mmc.plugins import DOMAIN, OPS
from mmc.plugins.base import Emitter

from . import ir


def lower_graph(graph: gs.Graph, target: str = "ort", upgrade: bool = True) -> gs.Graph:
    """Lower `graph` in place (returned for chaining): no mmc nodes left, Q/DQ GEMMs as MatMulNBits;
    `upgrade=False` keeps the opset (the fallback faces run where a face needs a newer one)."""
    if target != "ort":
        raise ValueError(f"no lowering for target {target!r}")
    lower_quantized_gemms(graph)
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
            ir.upgrade_opset(graph, want)
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


def lower_quantized_gemms(graph: gs.Graph) -> int:
    """MatMul(x, DequantizeLinear(@Wq, @s)) -> com.microsoft.MatMulNBits (ORT's weight-only
    GEMM: int8 per channel as one block of next_pow2(K) rows, int4 in blocks of g). Returns the
    number rewritten; anything else in Q/DQ form stays for ORT's own QDQ handling."""
    import numpy as np

    from . import quantization as qz

    done = 0
    for node in list(graph.nodes):
        dq = qz.weight_dq(node)
        if dq is None or len(dq.inputs) > 2 and dq.inputs[2].name:
            continue  # zero points: not produced by mmc's symmetric quantizer
        wq, scale = dq.inputs[0], dq.inputs[1]
        if not isinstance(scale, gs.Constant):
            continue
        x = node.inputs[0]
        if x.inputs and x.inputs[0].op == "DequantizeLinear":
            continue  # W8A8 / FP8: ORT runs the QDQ pair itself (int8: MatMulIntegerToFloat)
        if wq.dtype not in (np.int8, onnx.TensorProto.INT4) and str(wq.dtype) != "int4":
            continue  # float8 weights: no MatMulNBits form; never load them (gs cannot re-export)
        q = np.asarray(wq.values)
        if q.ndim != 2:
            continue
        k, n = q.shape
        s = np.asarray(scale.values, dtype=np.float32)
        if s.ndim == 1 and dq.attrs.get("axis", 1) in (1, -1) and q.dtype == np.int8:
            bits, block, scales = 8, qz.next_pow2(k), s.reshape(n, 1)
        elif s.ndim == 2 and dq.attrs.get("axis") == 0 and "block_size" in dq.attrs:
            bits, block, scales = 4, int(dq.attrs["block_size"]), s.T
            if block < 16 or block & (block - 1):
                continue  # MatMulNBits blocks are powers of two >= 16
        else:
            continue
        q = q.astype(np.int8)
        packed = qz.pack_matmulnbits(q, bits, block)
        tag = f"nbits{bits}_{done}"
        new = gs.Node("MatMulNBits", f"{node.name or 'gemm'}/{tag}",
                      {"K": k, "N": n, "bits": bits, "block_size": block},
                      [node.inputs[0], gs.Constant(f"{wq.name or 'w'}_{tag}", packed),
                       gs.Constant(f"{scale.name or 's'}_{tag}", np.ascontiguousarray(scales))],
                      list(node.outputs), domain="com.microsoft")
        node.outputs.clear()
        at = next(i for i, x in enumerate(graph.nodes) if x is node)
        graph.nodes[at] = new
        done += 1
    if done:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return done


def _share_face_constants(graph: gs.Graph) -> None:
    """Faces emit per-node helpers (a bool mask made additive, a half rotary table); the
    layers' copies read the same tensors, so cse merges them into one."""
    from mmc.passes.cse import CommonSubexpressionElimination

    from .pass_manager import PassContext

    CommonSubexpressionElimination().run(graph, PassContext("lowering", current_pass="lower"))


def lower_model(model: onnx.ModelProto, target: str = "ort") -> onnx.ModelProto:
    """A lowered copy of `model` (unchanged if it has no mmc ops and no Q/DQ weights)."""
    if not any(n.domain == DOMAIN or n.op_type == "DequantizeLinear" for n in model.graph.node):
        return model
    return ir.to_model(lower_graph(gs.import_onnx(model), target))
