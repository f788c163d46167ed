"""Gated MLP activation: y = act(gate) * up, with gate/up packed in one tensor (after the
gate/up GEMMs were merged) or given separately.

    inputs:  gate_up [..., 2I]  (gate = first half, up = second half)
             or gate [..., I], up [..., I]
    outputs: y [..., I]
    attrs:   activation: "silu" (SwiGLU: g*sigmoid(g)), "gelu" (erf), "gelu_tanh" (GeGLU)

ORT face: a decomposition (ORT's CPU provider has no gated-activation op): Split, the
activation (Gelu at opset >= 20), Mul.
"""

from __future__ import annotations

import math

import numpy as np

from ..base import Emitter, FusedOp, dtype_of, shape_of

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _act(g, kind):
    g = g.astype(np.float64)
    if kind == "silu":
        return g / (1 + np.exp(-g))
    if kind == "gelu":
        from math import erf

        return 0.5 * g * (1 + np.vectorize(erf)(g / math.sqrt(2)))
    return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


class SwiGLU(FusedOp):
    __doc__ = __doc__
    name = "SwiGLU"

    def reference(self, inputs, attrs):
        if len(inputs) == 1:
            gate, up = np.split(inputs[0], 2, axis=-1)
        else:
            gate, up = inputs
        return [(_act(gate, attrs.get("activation", "silu")) * up).astype(gate.dtype)]

    def torch_reference(self, inputs, attrs):
        """The cuda target's reference kernel: act in the input dtype, as transformers computes it."""
        import torch
        import torch.nn.functional as F

        gate, up = torch.chunk(inputs[0], 2, dim=-1) if len(inputs) == 1 else inputs
        kind = attrs.get("activation", "silu")
        act = F.silu(gate) if kind == "silu" else F.gelu(gate, approximate="tanh" if kind == "gelu_tanh" else "none")
        return [act * up]

    writes_out = True

    def triton_kernel(self, inputs, attrs, out=None):
        from .kernels import swiglu

        if len(inputs) == 2 and inputs[0].shape != inputs[1].shape:
            return None
        return [swiglu(inputs[0], inputs[1] if len(inputs) == 2 else None, attrs.get("activation", "silu"), out)]

    def infer(self, node):
        shape = shape_of(node.inputs[0])
        if shape is not None and len(node.inputs) == 1:
            shape[-1] = shape[-1] // 2 if isinstance(shape[-1], int) else None
        return [(dtype_of(node.inputs[0]), shape)]

    def lower_ort(self, emit: Emitter, node, opset):
        kind = node.attrs.get("activation", "silu")
        if len(node.inputs) == 1:
            width = node.inputs[0].shape[-1] if node.inputs[0].shape else None
            if isinstance(width, int):
                gate, up = emit.op("Split", [node.inputs[0], emit.const([width // 2, width // 2])], 2, {"axis": -1})
            elif opset >= 18:
                gate, up = emit.op("Split", [node.inputs[0]], 2, {"axis": -1, "num_outputs": 2})
            else:
                gate, up = emit.op("Split", [node.inputs[0]], 2, {"axis": -1})  # equal halves
        else:
            gate, up = node.inputs
        if kind == "silu":
            act = emit.op("Mul", [gate, emit.op("Sigmoid", [gate])[0]])[0]
        elif opset >= 20:
            act = emit.op("Gelu", [gate], 1, {"approximate": "tanh" if kind == "gelu_tanh" else "none"})[0]
        else:
            act = self._gelu_decomposed(emit, gate, kind, dtype_of(node.inputs[0]))
        emit.op("Mul", [act, up], [node.outputs[0]])

    @staticmethod
    def _gelu_decomposed(emit, g, kind, dtype):
        c = lambda v: emit.const(v, dtype)  # noqa: E731
        if kind == "gelu":  # 0.5*g*(1+erf(g/sqrt2))
            inner = emit.op("Erf", [emit.op("Mul", [g, c(1 / math.sqrt(2))])[0]])[0]
        else:  # 0.5*g*(1+tanh(sqrt(2/pi)*(g+0.044715 g^3)))
            cube = emit.op("Mul", [emit.op("Mul", [g, g])[0], g])[0]
            poly = emit.op("Add", [g, emit.op("Mul", [cube, c(0.044715)])[0]])[0]
            inner = emit.op("Tanh", [emit.op("Mul", [poly, c(math.sqrt(2 / math.pi))])[0]])[0]
        one_plus = emit.op("Add", [inner, c(1.0)])[0]
        return emit.op("Mul", [emit.op("Mul", [g, c(0.5)])[0], one_plus])[0]
