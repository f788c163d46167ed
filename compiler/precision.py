"""Strongly typed half-precision graphs: an exported float32 graph -> the same graph computing its
activations in bf16 or fp16, every node's inputs of matching types (what TensorRT's strongly
typed networks build from; the cuda target's plans follow the same rule at run time).

The rule (as in compiler/plan.py):
    activations   float values downstream of a float graph input (through any op but Shape)
                  run in the target dtype; the float graph inputs and outputs change with them
    tables        float values computed from integers and constants only (rotary tables, masks)
                  stay float32 and are cast where a node reads them with an activation
    weights       float constants read together with an activation are stored in the target
                  dtype (a constant read elsewhere too gets a converted copy)
    weight DQ     DequantizeLinear of constant codes feeding activation nodes: its scale is
                  stored in the target dtype, so the dequantized weight is (TensorRT keeps the
                  codes quantized)
    kept          inputs a node must read in float32 whatever the activations are (`keep`,
                  e.g. the KV-cache scales of mmc.Attention) are left alone
Cast(…, to=float32) whose result is an activation becomes a cast to the target dtype. Constants
saturate to the target's finite range (a float32.min mask constant stays finite in bf16).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

TARGETS = {"bf16": onnx.TensorProto.BFLOAT16, "fp16": onnx.TensorProto.FLOAT16}


def _np_dtype(precision: str):
    if precision == "fp16":
        return np.dtype(np.float16)
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _is_f32(t: gs.Tensor) -> bool:
    try:
        return t.dtype is not None and np.dtype(t.dtype) == np.float32
    except TypeError:
        return False


def lower_precision(graph: gs.Graph, precision: str, keep: Callable[[gs.Node, int], bool] | None = None) -> dict:
    """Rewrite `graph` in place to `precision` ("bf16" | "fp16"; "fp32" does nothing); returns
    counts (activations, weights converted, casts inserted)."""
    from mmc.ir import lazy_constant

    if precision == "fp32":
        return {}
    if precision not in TARGETS:
        raise ValueError(f"unknown precision {precision!r}")
    onnx_type, np_type = TARGETS[precision], _np_dtype(precision)
    keep = keep or (lambda node, i: False)
    graph.toposort()
    derived = {t.name for t in graph.inputs if _is_f32(t)}
    for node in graph.nodes:
        if node.op != "Shape" and any(t.name in derived for t in node.inputs if t.name):
            derived.update(o.name for o in node.outputs if o.name)
    acts = {n for n, t in graph.tensors().items() if n in derived and _is_f32(t)}
    readers_act = [n for n in graph.nodes if any(t.name in derived for t in n.inputs if t.name)]

    converted: dict[str, gs.Constant] = {}
    casts: dict[str, gs.Variable] = {}
    stats = {"activations": len(acts), "weights": 0, "casts": 0}

    def weight(c: gs.Constant) -> gs.Constant:
        if c.name not in converted:
            big = float(np.finfo(np.float16).max) if precision == "fp16" else 3.3895313892515355e38  # bf16's largest
            arr = np.clip(np.asarray(c.values).astype(np.float32), -big, big).astype(np_type)  # float32.min stays finite
            converted[c.name] = lazy_constant(f"{c.name}_{precision}", arr)
            stats["weights"] += 1
        return converted[c.name]

    # weight DequantizeLinear: the scale in the target dtype makes the dequantized weight one
    for node in graph.nodes:
        if node.op == "DequantizeLinear" and not node.domain and all(isinstance(t, gs.Constant) for t in node.inputs[:2]) \
                and _is_f32(node.inputs[1]) and node.outputs and any(r in readers_act for r in node.outputs[0].outputs):
            node.inputs[1] = weight(node.inputs[1])
            acts.add(node.outputs[0].name)
    for node in readers_act:
        if node.op == "Cast" and not node.domain and node.attrs.get("to") == onnx.TensorProto.FLOAT \
                and node.outputs[0].name in acts:
            node.attrs["to"] = onnx_type
            continue
        for i, t in enumerate(node.inputs):
            if not t.name or t.name in acts or not _is_f32(t) or keep(node, i):
                continue
            if isinstance(t, gs.Constant):
                node.inputs[i] = weight(t)
            else:
                if t.name not in casts:
                    out = gs.Variable(f"{t.name}_{precision}", dtype=np_type, shape=t.shape)
                    graph.nodes.append(gs.Node("Cast", f"{t.name}_to_{precision}", {"to": onnx_type}, [t], [out]))
                    casts[t.name] = out
                    stats["casts"] += 1
                node.inputs[i] = casts[t.name]
    for name, t in graph.tensors().items():
        if name in acts and not isinstance(t, gs.Constant):
            t.dtype = np_type
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return stats
