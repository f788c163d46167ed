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


def _torch_rms(x, w, eps):
    """transformers' RMSNorm: normalize in float32, back to x's dtype, then scale."""
    import torch

    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w.to(x.dtype)


def _torch_ln(x, w, b, eps):
    import torch.nn.functional as F

    y = F.layer_norm(x.float(), x.shape[-1:], w.float(), b.float() if b is not None else None, eps)
    return y.to(x.dtype)


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

    def torch_reference(self, inputs, attrs):
        return [_torch_rms(inputs[0], inputs[1], attrs["epsilon"])]

    writes_out = True

    def triton_kernel(self, inputs, attrs, out=None):
        from .kernels import rms_norm

        return [rms_norm(inputs[0], inputs[1], attrs["epsilon"], out=out)[0]]

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

    def torch_reference(self, inputs, attrs):
        s = inputs[0] + inputs[1]  # the residual sum, in the activation dtype
        if len(inputs) > 3 and inputs[3] is not None:
            s = s + inputs[3]
        return [_torch_rms(s, inputs[2], attrs["epsilon"]), s]

    writes_out = True

    def triton_kernel(self, inputs, attrs, out=None):
        from .kernels import rms_norm

        x, skip, w = inputs[:3]
        if skip.shape != x.shape:
            return None
        return list(rms_norm(x, w, attrs["epsilon"], skip, inputs[3] if len(inputs) > 3 else None, out))

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

    def torch_reference(self, inputs, attrs):
        return [_torch_ln(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None, attrs["epsilon"])]

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

    def torch_reference(self, inputs, attrs):
        s = inputs[0] + inputs[1]
        if len(inputs) > 4 and inputs[4] is not None:
            s = s + inputs[4]
        return [_torch_ln(s, inputs[2], inputs[3] if len(inputs) > 3 else None, attrs["epsilon"]), s]

    def infer(self, node):
        t = (dtype_of(node.inputs[0]), shape_of(node.inputs[0]))
        return [t, t]

    def lower_ort(self, emit, node, opset):
        outs = [node.outputs[0], None, None, node.outputs[1] if len(node.outputs) > 1 else None]
        emit.op("SkipLayerNormalization", [*node.inputs[:3], present(node, 3), present(node, 4)], outs,
                {"epsilon": float(node.attrs["epsilon"])}, domain="com.microsoft")
