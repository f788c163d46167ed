"""Rotary position embedding in the rotate-half convention of Hugging Face models.

    inputs:  x [B, N, S, D] (layout "bnsd") or [S, N, D] (layout "snd", the vision tower's)
             cos, sin [B, S, R] ("bnsd") or [S, R] ("snd"): per-token tables, R = rotary_dim
    outputs: y, same shape as x
    attrs:   rotary_dim R (0: R = D; R < D rotates the first R channels, the rest pass through),
             layout, halves_equal (1 when the pass proved cos[..., :R/2] == cos[..., R/2:], as
             for tables built as cos(cat(f, f)); only then may a face read half tables)

    xr = x[..., :R];  rot = cat(-xr[..., R/2:], xr[..., :R/2])
    y  = cat(xr * cos + rot * sin, x[..., R:])      (cos/sin broadcast over the head axis)

The tables are inputs, so text RoPE, M-RoPE (tables gathered per t/h/w section) and the vision
tower's 2-D rotary are one op. ORT face: standard RotaryEmbedding (opset 23, half tables) when
halves_equal and layout bnsd, otherwise the decomposition Slice/Neg/Concat/Mul/Add.
"""

from __future__ import annotations

import numpy as np

from ..base import Emitter, FusedOp, dtype_of, shape_of

BIG = np.iinfo(np.int64).max


class RotaryEmbedding(FusedOp):
    __doc__ = __doc__
    name = "RotaryEmbedding"
    min_opset = 23

    def reference(self, inputs, attrs):
        x, cos, sin = inputs
        d = x.shape[-1]
        r = attrs.get("rotary_dim", 0) or d
        head_axis = 1 if attrs.get("layout", "bnsd") == "bnsd" else -2
        cos, sin = (np.expand_dims(t, head_axis).astype(np.float64) for t in (cos, sin))
        xr = x[..., :r].astype(np.float64)
        rot = np.concatenate([-xr[..., r // 2:], xr[..., :r // 2]], axis=-1)
        y = np.concatenate([xr * cos + rot * sin, x[..., r:]], axis=-1)
        return [y.astype(x.dtype)]

    def torch_reference(self, inputs, attrs):
        """x*cos + rotate_half(x)*sin on the first rotary_dim channels, tables cast to x's dtype
        (transformers' apply_rotary_pos_emb)."""
        import torch

        x, cos, sin = inputs
        r = attrs.get("rotary_dim", 0) or x.shape[-1]
        head_axis = 1 if attrs.get("layout", "bnsd") == "bnsd" else -2
        cos, sin = (t.unsqueeze(head_axis).to(x.dtype) for t in (cos, sin))
        xr = x[..., :r]
        rot = torch.cat([-xr[..., r // 2:], xr[..., :r // 2]], dim=-1)
        y = xr * cos + rot * sin
        return [torch.cat([y, x[..., r:]], dim=-1) if r < x.shape[-1] else y]

    writes_out = True

    def triton_kernel(self, inputs, attrs, out=None):
        from .kernels import rotary

        x, cos, sin = inputs
        layout = attrs.get("layout", "bnsd")
        if cos.shape != sin.shape or cos.dim() != (3 if layout == "bnsd" else 2):
            return None
        return [rotary(x, cos, sin, attrs.get("rotary_dim", 0), layout, out)]

    def infer(self, node):
        return [(dtype_of(node.inputs[0]), shape_of(node.inputs[0]))]

    def lower_ort(self, emit: Emitter, node, opset):
        x, cos, sin = node.inputs
        r = node.attrs.get("rotary_dim", 0)
        d = x.shape[-1] if x.shape else None
        layout = node.attrs.get("layout", "bnsd")
        if opset >= 23 and node.attrs.get("halves_equal", 0) and layout == "bnsd" and isinstance(d, int):
            r = r or d
            half = [emit.op("Slice", [t, emit.const([0]), emit.const([r // 2]), emit.const([-1])])[0]
                    for t in (cos, sin)]
            attrs = {"rotary_embedding_dim": r} if r != d else {}
            emit.op("RotaryEmbedding", [x, *half], [node.outputs[0]], attrs)
            return
        self.decompose(emit, x, cos, sin, r, d, layout, node.outputs[0])

    @staticmethod
    def decompose(emit, x, cos, sin, r, d, layout, out=None):
        """Emit the rotation of x (Slice/Neg/Concat/Mul/Add) into `out` (or a new tensor); returns it."""
        axis = emit.const([1 if layout == "bnsd" else -2])
        cos, sin = (emit.op("Unsqueeze", [t, axis])[0] for t in (cos, sin))
        last = emit.const([-1])
        if r and r != d:
            xr = emit.op("Slice", [x, emit.const([0]), emit.const([r]), last])[0]
            rest = emit.op("Slice", [x, emit.const([r]), emit.const([BIG]), last])[0]
        else:
            xr, rest = x, None
        half = r // 2 if r else (d // 2 if isinstance(d, int) else None)
        if half is None:  # D unknown statically: half = D // 2 at run time
            dim = emit.op("Shape", [xr], 1, {"start": -1})[0]
            half_t = emit.op("Div", [dim, emit.const([2])])[0]
        else:
            half_t = emit.const([half])
        lo = emit.op("Slice", [xr, emit.const([0]), half_t, last])[0]
        hi = emit.op("Slice", [xr, half_t, emit.const([BIG]), last])[0]
        rot = emit.op("Concat", [emit.op("Neg", [hi])[0], lo], 1, {"axis": -1})[0]
        y = emit.op("Add", [emit.op("Mul", [xr, cos])[0], emit.op("Mul", [rot, sin])[0]],
                    [out] if rest is None and out is not None else 1)[0]
        if rest is not None:
            y = emit.op("Concat", [y, rest], [out] if out is not None else 1, {"axis": -1})[0]
        return y
