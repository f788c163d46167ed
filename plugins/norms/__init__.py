"""Normalization ops: RMSNorm, LayerNorm and their residual-add ("skip") forms.

All normalize over the last axis in float32-or-wider arithmetic (the exporters' Cast-to-fp32
spelling of a half-precision norm is the same op), then scale by `weight` (and shift by `bias`).

ORT faces: RMSNormalization (opset 23; ORT's SimplifiedLayerNormalization before), com.microsoft.SkipSimplifiedLayerNormalization,
LayerNormalization (opset >= 17), com.microsoft.SkipLayerNormalization.
"""

from __future__ import annotations

import numpy as np

from ..base import Emitter, FusedOp, dtype_of, present, shape_of


def _rms(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _ln(x, w, b, eps):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w
    return y + b if b is not None else y


class RMSNorm(FusedOp):
    """y = x / sqrt(mean(x², axis=-1) + epsilon) * weight

    inputs:  x [..., H], weight [H]
    outputs: y [..., H] (dtype of x)
    attrs:   epsilon (float)
    """

    name = "RMSNorm"
    min_opset = 23

    def reference(self, inputs, attrs):
        x, w = inputs[:2]
        return [_rms(x, w, attrs["epsilon"]).astype(x.dtype)]

    def infer(self, node):
        return [(dtype_of(node.inputs[0]), shape_of(node.inputs[0]))]

    def lower_ort(self, emit: Emitter, node, opset):
        # opset 23's RMSNormalization; before it ORT's own SimplifiedLayerNormalization (an ORT
        # extension in the default domain that ONNX's checker does not know)
        op = "RMSNormalization" if opset >= 23 else "SimplifiedLayerNormalization"
        emit.op(op, node.inputs[:2], [node.outputs[0]],
                {"epsilon": float(node.attrs["epsilon"]), "axis": -1, "stash_type": 1})


class SkipRMSNorm(FusedOp):
    """s = x + skip (+ bias);  y = RMSNorm(s, weight)  — the residual add fused into the norm.

    inputs:  x [..., H], skip [..., H] (same shape as x), weight [H], bias [H] (optional)
    outputs: y [..., H], sum [..., H] (the new residual stream; optional)
    attrs:   epsilon
    """

    name = "SkipRMSNorm"

    def reference(self, inputs, attrs):
        x, skip, w = inputs[:3]
        b = inputs[3] if len(inputs) > 3 else None
        s = x.astype(np.float64) + skip
        s = s + b if b is not None else s
        return [_rms(s, w, attrs["epsilon"]).astype(x.dtype), s.astype(x.dtype)]

    def infer(self, node):
        t = (dtype_of(node.inputs[0]), shape_of(node.inputs[0]))
        return [t, t]

    def lower_ort(self, emit, node, opset):
        outs = [node.outputs[0], None, None, node.outputs[1] if len(node.outputs) > 1 else None]
        emit.op("SkipSimplifiedLayerNormalization", [node.inputs[0], node.inputs[1], node.inputs[2],
                                                     present(node, 3)],
                outs, {"epsilon": float(node.attrs["epsilon"])}, domain="com.microsoft")


class LayerNorm(FusedOp):
    """y = (x - mean(x)) / sqrt(var(x) + epsilon) * weight + bias   (over the last axis)

    inputs:  x [..., H], weight [H], bias [H] (optional)
    outputs: y [..., H]
    attrs:   epsilon
    """

    name = "LayerNorm"
    min_opset = 17

    def reference(self, inputs, attrs):
        x, w = inputs[:2]
        b = inputs[2] if len(inputs) > 2 else None
        return [_ln(x, w, b, attrs["epsilon"]).astype(x.dtype)]

    def infer(self, node):
        return [(dtype_of(node.inputs[0]), shape_of(node.inputs[0]))]

    def lower_ort(self, emit, node, opset):
        emit.op("LayerNormalization", [node.inputs[0], node.inputs[1], present(node, 2)], [node.outputs[0]],
                {"epsilon": float(node.attrs["epsilon"]), "axis": -1})


class SkipLayerNorm(FusedOp):
    """s = x + skip (+ bias);  y = LayerNorm(s, weight, beta)

    inputs:  x [..., H], skip [..., H], weight [H], beta [H] (optional), bias [H] (optional)
    outputs: y [..., H], sum [..., H] (optional)
    attrs:   epsilon
    """

    name = "SkipLayerNorm"

    def reference(self, inputs, attrs):
        x, skip, w = inputs[:3]
        beta = inputs[3] if len(inputs) > 3 else None
        b = inputs[4] if len(inputs) > 4 else None
        s = x.astype(np.float64) + skip
        s = s + b if b is not None else s
        return [_ln(s, w, beta, attrs["epsilon"]).astype(x.dtype), s.astype(x.dtype)]

    def infer(self, node):
        t = (dtype_of(node.inputs[0]), shape_of(node.inputs[0]))
        return [t, t]

    def lower_ort(self, emit, node, opset):
        outs = [node.outputs[0], None, None, node.outputs[1] if len(node.outputs) > 1 else None]
        emit.op("SkipLayerNormalization", [*node.inputs[:3], present(node, 3), present(node, 4)], outs,
                {"epsilon": float(node.attrs["epsilon"])}, domain="com.microsoft")
