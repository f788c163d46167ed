"""The cuda target's GEMM ops, made by compiler/plan_rewrites.py (never by a pass): Linear (a
float weight in nn.Linear's layout, the bias in the GEMM's epilogue) and WeightOnlyMatMul (int8 /
int4 weight codes). Each class docstring is its spec."""

from __future__ import annotations

import numpy as np

from ..base import Emitter, FusedOp, dtype_of, present, shape_of
from . import prologue


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Signed 4-bit codes [N, K] (K even) -> uint8 [N, K/2]: low nibble k = j, high nibble k = j + K/2."""
    half = codes.shape[1] // 2
    lo, hi = codes[:, :half].astype(np.uint8) & 0xF, codes[:, half:].astype(np.uint8) & 0xF
    return (lo | (hi << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> int8 codes [N, K] (the inverse of pack_int4)."""
    b = packed.astype(np.int16)
    lo, hi = b & 0xF, b >> 4
    signed = lambda v: np.where(v >= 8, v - 16, v).astype(np.int8)  # noqa: E731
    return np.concatenate([signed(lo), signed(hi)], axis=1)


def dequantized(w: np.ndarray, scale: np.ndarray, attrs: dict) -> np.ndarray:
    """Ŵ [K, N] float64 from the op's stored weight."""
    if attrs["bits"] == 8:
        return (w.astype(np.float64) * scale.astype(np.float64)[:, None]).T
    codes = unpack_int4(w).astype(np.float64)
    s = np.repeat(scale.astype(np.float64), attrs["group_size"], axis=1)[:, : codes.shape[1]]
    return (codes * s).T


class _GemmWithPrologue(FusedOp):
    """What both GEMM ops share: y = P(x) @ Ŵ (+ bias), the bias just before the prologue inputs
    (index PROLOGUE_AT - 1); a subclass gives Ŵ as float64 [K, N] (`weight64`) and as an ONNX
    tensor (`ort_weight`)."""

    PROLOGUE_AT = 0

    def weight64(self, inputs, attrs) -> np.ndarray:
        raise NotImplementedError

    def ort_weight(self, emit: Emitter, node):
        raise NotImplementedError

    def reference(self, inputs, attrs):
        x, s = prologue.apply(inputs[0], inputs[self.PROLOGUE_AT:], attrs, "reference")
        y = x.astype(np.float64) @ self.weight64(inputs, attrs)
        bias = _bias(inputs, self.PROLOGUE_AT - 1)
        if bias is not None:
            y = y + bias.astype(np.float64)
        return [y.astype(x.dtype)] + ([s] if s is not None else [])

    def infer(self, node):
        xs, ws = prologue.gemm_rows(node), shape_of(node.inputs[1])
        y = (dtype_of(node.inputs[0]), None if xs is None or ws is None else [*xs[:-1], ws[0]])
        return [y] + prologue.extra_outputs(node)

    def lower_ort(self, emit: Emitter, node, opset):
        x = prologue.lower_ort(emit, node, self.PROLOGUE_AT, opset)
        w = self.ort_weight(emit, node)
        bias = present(node, self.PROLOGUE_AT - 1)
        if bias is not None:
            (y,) = emit.op("MatMul", [x, w], 1)
            emit.op("Add", [y, bias], [node.outputs[0]])
        else:
            emit.op("MatMul", [x, w], [node.outputs[0]])


class WeightOnlyMatMul(_GemmWithPrologue):
    """Weight-only quantized GEMM: y = x @ Ŵ (+ bias) with Ŵ = codes · scale, read from int8 or packed int4.

    inputs:  x [..., K] (activation dtype)
             w  int8 [N, K] (bits 8: one code per byte, each output channel's K codes contiguous)
                or uint8 [N, K/2] (bits 4: byte j of row n holds k = j in its low nibble and
                k = j + K/2 in its high nibble, two's-complement codes in [-8, 7])
             scale float32 [N] (bits 8: per output channel) or [N, ceil(K/g)] (bits 4: per group
                   of g input channels)
             bias [N] (optional, may be empty; added in float32 before the one rounding to x's dtype)
             prologue inputs from index 4 (plugins/linear/prologue.py)
    outputs: y [..., N] (dtype of x), s (skip_rms prologue, optional)
    attrs:   bits (8 | 4), group_size g (bits 4), k K; prologue, epsilon, activation (optional:
             y = P(x) @ Ŵ, P the folded RMSNorm / SkipRMSNorm / SwiGLU, see prologue.py)

    Ŵ[k, n] = code[n, k] · scale[n]            (bits 8)
    Ŵ[k, n] = code[n, k] · scale[n, k // g]    (bits 4)

Not produced by a pass: the cuda target's plan compiler (compiler/plan.py) turns the
`DequantizeLinear(int8/int4 codes) -> MatMul` that quantize-weights writes (and an `Add` of a
constant [N] bias that is its only reader) into this op, stored in the layout above (the Triton kernel in kernels.py streams each output channel's codes
contiguously). The ORT face (the op appears only in cuda plans, but every op has one) multiplies
by the dequantized weight.
"""

    name = "WeightOnlyMatMul"
    PROLOGUE_AT = 4

    def weight64(self, inputs, attrs):
        return dequantized(inputs[1], inputs[2], attrs)

    def ort_weight(self, emit: Emitter, node):
        w, scale = node.inputs[1:3]
        return emit.const(dequantized(np.asarray(w.values), np.asarray(scale.values), node.attrs), np.float32)

    def torch_reference(self, inputs, attrs):
        """The prologue's op, then dequantize to x's dtype and one matmul (what the
        DequantizeLinear -> MatMul pair computes), the bias as nn.Linear adds it."""
        x, s = prologue.apply(inputs[0], inputs[self.PROLOGUE_AT:], attrs, "torch_reference")
        return [_torch_woq(x, inputs, attrs)] + ([s] if s is not None else [])

    writes_out = True

    def triton_kernel(self, inputs, attrs, out=None):
        """One row with int8 codes: the GEMV, its prologue inside (gemv.py). Else the
        prologue's kernel, then the weight-only GEMM (kernels.py)."""
        from .kernels import weight_only_matmul

        w, scale, bits = inputs[1], inputs[2], attrs["bits"]
        return _gpu_face(inputs, attrs, self.PROLOGUE_AT, out, w, scale, bits, lambda x: weight_only_matmul(
            x, w, scale, bits, attrs.get("group_size", 0), out=out, bias=_bias(inputs)))



def _bias(inputs, at: int = 3):
    return inputs[at] if len(inputs) > at else None


def _gpu_face(inputs, attrs, at: int, out, w, scale, bits: int, rows):
    """Both GEMMs' GPU face: one row runs the GEMV with the prologue inside (gemv.py; w as it
    takes it: float [K, N] or codes [N, K] with `scale`); more rows run the prologue's kernel,
    then `rows(x')` (the GEMM). Returns [y (, s)]."""
    from . import gemv

    x, kind = inputs[0], attrs.get("prologue", "")
    if gemv.applies(x, bits):
        extra = list(inputs[at:]) + [None, None]
        y, s = gemv.gemv(x, w, scale=scale, bias=_bias(inputs, at - 1), prologue=kind, gamma=extra[0],
                         skip=extra[1], epsilon=attrs.get("epsilon", 1e-6), activation=attrs.get("activation", "silu"),
                         out=out)
        return [y] + ([s] if kind == "skip_rms" else [])
    x, s = prologue.apply(x, inputs[at:], attrs, "triton_kernel", out[1] if out and len(out) > 1 else None)
    return [rows(x)] + ([s] if s is not None else [])


def _torch_woq(x, inputs, attrs):
    import torch
    import torch.nn.functional as F

    w, scale = inputs[1:3]
    if attrs["bits"] == 8:
        wf = w.to(torch.float32) * scale.float()[:, None]                    # [N, K]
    else:
        b = w.to(torch.int16)
        lo, hi = b & 0xF, b >> 4
        codes = torch.cat([lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)], dim=1).float()
        wf = codes * scale.float().repeat_interleave(attrs["group_size"], dim=1)[:, : codes.shape[1]]
    return F.linear(x, wf.to(x.dtype), _bias(inputs))


class Linear(_GemmWithPrologue):
    """y = P(x) @ wᵀ (+ bias): the float GEMM of the cuda target, bias in the GEMM's epilogue.

    inputs:  x [..., K] (activation dtype), w [N, K] (nn.Linear's layout: each output channel's K
             weights contiguous), bias [N] (optional, may be empty), prologue inputs from index 3
             (plugins/linear/prologue.py)
    outputs: y [..., N] (dtype of x), s (skip_rms prologue, optional)
    attrs:   prologue, epsilon, activation (optional: y = P(x) @ wᵀ, P the folded RMSNorm /
             SkipRMSNorm / SwiGLU, see prologue.py)

Not produced by a pass: the plan compiler turns `MatMul(x, @W [K, N])`, and an `Add` of a constant
[N] bias that is its only reader, into this op with W stored transposed. On the GPU one row (a
batch-1 decode step) runs the Triton GEMV (gemv.py) with the prologue inside; more rows run the
prologue's kernel, then one cuBLAS call on the flattened rows (addmm with the bias, else mm). The
bias is added in float32 before the one rounding to the activation dtype (as nn.Linear does). The
[N, K] layout is the GEMV's: on the H100 it streams the 3B decode shapes at 2.0-3.1 TB/s against
cuBLAS's 1.3-2.8 on either layout (tools/sweep_gemv.py, docs/benchmarks.md). The ORT face is the
prologue's, then MatMul with the transposed weight (+ Add).
"""

    name = "Linear"
    PROLOGUE_AT = 3

    def weight64(self, inputs, attrs):
        return inputs[1].astype(np.float64).T

    def ort_weight(self, emit: Emitter, node):
        return emit.op("Transpose", [node.inputs[1]], 1, {"perm": [1, 0]})[0]

    writes_out = torch_writes_out = True

    def torch_reference(self, inputs, attrs, out=None):
        """The prologue's torch face, then cuBLAS (or the CPU's GEMM) through torch on the
        flattened rows (addmm with a bias, else mm), writing into `out[0]` when given."""
        x, s = prologue.apply(inputs[0], inputs[self.PROLOGUE_AT:], attrs, "torch_reference")
        if s is not None and out and len(out) > 1 and out[1] is not None:
            s = out[1].copy_(s)
        return [_cublas(x, inputs[1], _bias(inputs, 2), out)] + ([s] if s is not None else [])

    def triton_kernel(self, inputs, attrs, out=None):
        """One row: the GEMV, its prologue inside (gemv.py). Else the prologue's kernel, then cuBLAS."""
        w, bias = inputs[1], _bias(inputs, 2)
        return _gpu_face(inputs, attrs, self.PROLOGUE_AT, out, w.t(), None, 0, lambda x: _cublas(x, w, bias, out))



def _cublas(x, w, bias, out):
    """x [..., K] @ w[N, K]ᵀ (+ bias) by torch (cuBLAS on the GPU), into out[0] when given."""
    import torch

    o = out[0] if out and out[0] is not None else None
    x2, wt = x.reshape(-1, x.shape[-1]), w.t()
    o2 = o.view(-1, w.shape[0]) if o is not None else None
    if bias is not None:
        y = torch.addmm(bias, x2, wt, out=o2) if o2 is not None else torch.addmm(bias, x2, wt)
    else:
        y = torch.mm(x2, wt, out=o2) if o2 is not None else torch.mm(x2, wt)
    return y.view(*x.shape[:-1], w.shape[0])
