"""mmc's fused ops (ONNX domain `mmc`): one folder per op family, each op a `FusedOp` with

- a spec (the class docstring: inputs, outputs, attributes, semantics),
- `reference(inputs, attrs)`: the semantics in numpy (float64 inside), the judge of every face,
- `infer(node)`: output dtypes and shapes from the input values (ONNX shape inference for the
  ops ONNX does not know),
- `lower_ort(emit, node, opset)`: the ONNX Runtime face, a com.microsoft contrib op or a
  standard op where one matches, otherwise a decomposition into standard ops,
- for the cuda target: `torch_reference(inputs, attrs)` (torch; the CPU path's kernel) and, for
  most ops, `triton_kernel` (`<op>/kernels.py`, the GPU path), tested against the reference.

`OPS` maps op type -> FusedOp; `mmc.lowering` rewrites a graph's mmc nodes for a target.
"""

from __future__ import annotations

from .attention import Attention
from .base import DOMAIN, FusedOp
from .linear import Linear, WeightOnlyMatMul
from .norms import LayerNorm, RMSNorm, SkipLayerNorm, SkipRMSNorm
from .rotary import RotaryEmbedding
from .swiglu import SwiGLU

OPS: dict[str, FusedOp] = {op.name: op for op in (
    RMSNorm(), SkipRMSNorm(), LayerNorm(), SkipLayerNorm(), SwiGLU(), RotaryEmbedding(), Attention(),
    Linear(), WeightOnlyMatMul())}


def get(op_type: str) -> FusedOp:
    return OPS[op_type]


__all__ = ["DOMAIN", "OPS", "FusedOp", "get"]
