"""Standard ONNX ops in torch, for mmc's plan executor (target "cuda"; the same code runs on the
CPU for tests). Each takes (inputs, attrs) — inputs are tensors or None for an omitted optional
input — and returns a list of outputs. Shape-like inputs (Reshape's shape, Slice's starts, …)
are host int64 tensors by the plan's placement; `ints()` reads them.

Semantics follow the ONNX operator specs (opset 13–23 forms that the exporters emit); an op
that is not here is rejected when the plan is built, naming it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ONNX TensorProto data type -> torch dtype (Cast's `to`, ConstantOfShape's value)
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16, 17: torch.float8_e4m3fn}


def ints(t) -> list[int]:
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else t)]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _unary(fn):
    return lambda ins, attrs: [fn(ins[0])]


def _binary(fn):
    return lambda ins, attrs: [fn(ins[0], ins[1])]


def _reshape(ins, attrs):
    x, shape = ins[0], ints(ins[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _expand(ins, attrs):
    x, shape = ins[0], ints(ins[1])
    out = torch.broadcast_shapes(tuple(x.shape), tuple(shape))  # ONNX Expand broadcasts both ways
    return [x.expand(out)]


def _unsqueeze(ins, attrs):
    axes = ints(ins[1]) if len(ins) > 1 and ins[1] is not None else list(attrs["axes"])
    x = ins[0]
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return [x]


def _squeeze(ins, attrs):
    axes = ints(ins[1]) if len(ins) > 1 and ins[1] is not None else attrs.get("axes")
    x = ins[0]
    if axes is None:
        return [x.squeeze()]
    for a in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = x.squeeze(a)
    return [x]


def _transpose(ins, attrs):
    perm = attrs.get("perm") or list(range(ins[0].dim()))[::-1]
    return [ins[0].permute(*perm)]


def _concat(ins, attrs):
    parts = [t for t in ins if t is not None and (t.numel() or t.dim() > 1)]
    return [torch.cat(parts or [ins[0]], dim=attrs["axis"])]


def _gather(ins, attrs):
    x, idx = ins
    axis = _axis(attrs.get("axis", 0), x.dim())
    if "_index" in attrs:  # one constant index (compiler/plan.py): a view, no kernel
        return [x.select(axis, attrs["_index"])]
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return [out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])]


def _gather_nd(ins, attrs):
    x, idx = ins
    b = attrs.get("batch_dims", 0)
    if b:
        raise NotImplementedError("GatherND with batch_dims")
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    out = x[tuple(flat[:, i] for i in range(k))]
    return [out.reshape(*idx.shape[:-1], *x.shape[k:])]


def _slice(ins, attrs):
    x = ins[0]
    starts, ends = ints(ins[1]), ints(ins[2])
    axes = ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.dim())
        n = x.shape[a]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            index[a] = slice(s, e, st)
        else:  # negative step: take the reversed range, then flip
            s = max(-1, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
            lo = e + 1
            index[a] = slice(lo, s + 1)
            flips.append((a, -st))
    y = x[tuple(index)]
    for a, st in flips:
        y = y.flip(a)[(slice(None),) * a + (slice(None, None, st),)]
    return [y]


def _split(ins, attrs):
    x = ins[0]
    axis = _axis(attrs.get("axis", 0), x.dim())
    if len(ins) > 1 and ins[1] is not None:
        sizes = ints(ins[1])
    elif "split" in attrs:
        sizes = list(attrs["split"])
    else:
        n = attrs.get("num_outputs") or attrs["_outputs"]
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    return list(torch.split(x, sizes, dim=axis))


def _range(ins, attrs):
    start, limit, delta = (t.item() for t in ins)
    return [torch.arange(start, limit, delta, dtype=ins[0].dtype, device=ins[0].device)]


def _shape(ins, attrs):
    dims = list(ins[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


def _cast(ins, attrs):
    return [ins[0].to(DTYPES[attrs["to"]])]


def _where(ins, attrs):
    return [torch.where(ins[0], ins[1], ins[2])]


def _constant_of_shape(ins, attrs):
    value = attrs.get("value")
    shape = ints(ins[0])
    if value is None:
        return [torch.zeros(shape, dtype=torch.float32)]
    return [torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype)]


def _constant(ins, attrs):
    return [attrs["value"]]


def _matmul(ins, attrs):
    return [torch.matmul(ins[0], ins[1])]


def _gemm(ins, attrs):
    a, b = ins[0], ins[1]
    a = a.transpose(-1, -2) if attrs.get("transA", 0) else a
    b = b.transpose(-1, -2) if attrs.get("transB", 0) else b
    y = torch.matmul(a, b)
    if attrs.get("alpha", 1.0) != 1.0:
        y = y * attrs["alpha"]
    if len(ins) > 2 and ins[2] is not None:
        y = y + ins[2] * attrs.get("beta", 1.0)
    return [y]


def _conv(ins, attrs):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = x.dim() - 2
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError("Conv auto_pad SAME_*")
    pads = list(attrs.get("pads", [0] * 2 * nd))
    if pads[:nd] != pads[nd:]:
        raise NotImplementedError("Conv with asymmetric pads")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return [conv(x, w, b, stride=attrs.get("strides", 1), padding=pads[:nd], dilation=attrs.get("dilations", 1),
                 groups=attrs.get("group", 1))]


def _softmax(ins, attrs):
    return [torch.softmax(ins[0], dim=attrs.get("axis", -1))]


def _reduce(fn):
    def run(ins, attrs):
        x = ins[0]
        axes = ints(ins[1]) if len(ins) > 1 and ins[1] is not None else attrs.get("axes")
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, dim=[_axis(a, x.dim()) for a in axes], keepdim=keep)]
    return run


def _gelu(ins, attrs):
    return [F.gelu(ins[0], approximate="tanh" if attrs.get("approximate", "none") == "tanh" else "none")]


def _layer_norm(ins, attrs):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    axis = _axis(attrs.get("axis", -1), x.dim())
    return [F.layer_norm(x, x.shape[axis:], w, b, attrs.get("epsilon", 1e-5))]


def _trilu(ins, attrs):
    k = int(ins[1].item()) if len(ins) > 1 and ins[1] is not None else 0
    return [torch.triu(ins[0], k) if attrs.get("upper", 1) else torch.tril(ins[0], k)]


def _cumsum(ins, attrs):
    x, axis = ins[0], int(ins[1].item())
    if attrs.get("exclusive", 0) or attrs.get("reverse", 0):
        raise NotImplementedError("CumSum exclusive/reverse")
    return [torch.cumsum(x, dim=axis)]


def _scatter_nd(ins, attrs):
    x, idx, upd = ins
    y = x.clone()
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    y[tuple(flat[:, i] for i in range(k))] = upd.reshape(-1, *x.shape[k:])
    return [y]


def _dequantize(ins, attrs):
    q, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 and ins[2] is not None else None
    x = q.to(torch.float32)
    if zp is not None:
        x = x - zp.to(torch.float32).reshape(_bshape(scale, q, attrs))
    s = scale.to(torch.float32)
    if "block_size" in attrs and attrs["block_size"]:
        axis = _axis(attrs.get("axis", 1), q.dim())
        s = s.repeat_interleave(attrs["block_size"], dim=axis).narrow(axis, 0, q.shape[axis])
        return [x * s]
    return [x * s.reshape(_bshape(scale, q, attrs))]


def _quantize(ins, attrs):
    x, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 and ins[2] is not None else None
    out = zp.dtype if zp is not None else torch.uint8
    y = x.to(torch.float32) / scale.to(torch.float32).reshape(_bshape(scale, x, attrs))
    if out.is_floating_point:  # float8: saturate, round to nearest
        top = torch.finfo(out).max
        return [y.clamp(-top, top).to(out)]
    info = torch.iinfo(out)
    y = torch.round(y)
    if zp is not None:
        y = y + zp.to(torch.float32).reshape(_bshape(scale, x, attrs))
    return [y.clamp(info.min, info.max).to(out)]


def _bshape(scale, x, attrs):
    """A per-axis scale [C] reshaped to broadcast along `axis` of x (a scalar stays one)."""
    if scale.numel() == 1:
        return list(scale.shape)
    axis = _axis(attrs.get("axis", 1), x.dim())
    return [scale.shape[0] if i == axis else 1 for i in range(x.dim())]


def _pow(a, b):
    if b.numel() == 1 and b.device.type == "cpu" and b.item() == 2:  # (never a device sync: CUDA graphs)
        return a * a
    return torch.pow(a, b)


OPS = {
    "Identity": _unary(lambda x: x),
    "Neg": _unary(torch.neg), "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Tanh": _unary(torch.tanh), "Erf": _unary(torch.erf),
    "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(torch.relu), "Abs": _unary(torch.abs),
    "Sin": _unary(torch.sin), "Cos": _unary(torch.cos), "Not": _unary(torch.logical_not),
    "IsNaN": _unary(torch.isnan), "IsInf": _unary(torch.isinf), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Div": _binary(lambda a, b: torch.div(a, b, rounding_mode="trunc") if not a.is_floating_point() else a / b),
    "Pow": _binary(_pow), "Max": lambda ins, attrs: [_fold(torch.maximum, ins)],
    "Min": lambda ins, attrs: [_fold(torch.minimum, ins)],
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Mod": _binary(lambda a, b: torch.remainder(a, b)),
    "Reshape": _reshape, "Expand": _expand, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Flatten": lambda ins, attrs: [ins[0].reshape(math.prod(ins[0].shape[:attrs.get("axis", 1)]), -1)],
    "Transpose": _transpose, "Concat": _concat, "Gather": _gather, "GatherND": _gather_nd,
    "Slice": _slice, "Split": _split, "Range": _range, "Shape": _shape, "Cast": _cast,
    "CastLike": lambda ins, attrs: [ins[0].to(ins[1].dtype)],
    "Size": lambda ins, attrs: [torch.tensor(ins[0].numel(), dtype=torch.int64)],
    "Where": _where, "ConstantOfShape": _constant_of_shape, "Constant": _constant,
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "Softmax": _softmax, "Gelu": _gelu,
    "LayerNormalization": _layer_norm, "Trilu": _trilu, "CumSum": _cumsum, "ScatterND": _scatter_nd,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim)),
    "DequantizeLinear": _dequantize, "QuantizeLinear": _quantize,
}


def _gemm_out(ins, attrs, out):
    a, b = ins[0], ins[1]
    a = a.transpose(-1, -2) if attrs.get("transA", 0) else a
    b = b.transpose(-1, -2) if attrs.get("transB", 0) else b
    y = torch.matmul(a, b, out=out[0])
    if attrs.get("alpha", 1.0) != 1.0:
        y.mul_(attrs["alpha"])
    if len(ins) > 2 and ins[2] is not None:
        y.add_(ins[2], alpha=attrs.get("beta", 1.0))
    return [y]


def _into(fn):
    """An elementwise / GEMM kernel writing its one result into the given memory."""
    return lambda ins, attrs, out: [fn(*ins, out=out[0])]


# kernels that write into memory the executor gives them (the activation arena,
# runtime/cuda/memory_plan.py); the same results as OPS in the dtypes and shapes a first run
# recorded. Cast is here for dtype changes only (a same-dtype Cast is a view, never planned).
OUT_OPS = {
    "MatMul": _into(torch.matmul), "Gemm": _gemm_out,
    "Add": _into(torch.add), "Sub": _into(torch.sub), "Mul": _into(torch.mul),
    "Neg": _into(torch.neg), "Sqrt": _into(torch.sqrt), "Reciprocal": _into(torch.reciprocal),
    "Exp": _into(torch.exp), "Tanh": _into(torch.tanh), "Erf": _into(torch.erf), "Sigmoid": _into(torch.sigmoid),
    "Sin": _into(torch.sin), "Cos": _into(torch.cos),
    "Where": _into(torch.where),
    "Concat": lambda ins, attrs, out: [torch.cat([t for t in ins if t is not None and (t.numel() or t.dim() > 1)]
                                                 or [ins[0]], dim=attrs["axis"], out=out[0])],
    "Cast": lambda ins, attrs, out: [out[0].copy_(ins[0])],
}


# inputs read as Python ints (shapes, axes, bounds): they stay on the host even for a device
# step, so a captured CUDA graph never waits on a device-to-host copy
HOST_ARGS = {"Reshape": {1}, "Expand": {1}, "Unsqueeze": {1}, "Squeeze": {1}, "Slice": {1, 2, 3, 4},
             "Split": {1}, "Range": {0, 1, 2}, "ConstantOfShape": {0}, "Trilu": {1}, "CumSum": {1},
             "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}}


def _fold(fn, ins):
    out = ins[0]
    for t in ins[1:]:
        out = fn(out, t)
    return out
