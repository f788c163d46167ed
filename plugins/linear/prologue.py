"""A GEMM's prologue: the op that made its input, folded into it by a plan rewrite
(compiler/plan_rewrites.py gemm-prologue) so that a decode step's GEMV computes it on the fly
(plugins/linear/gemv.py) instead of launching it. y = P(x) @ W (+ bias).

    attr prologue   inputs after the GEMM's own   P(x)                          extra output
    rms             gamma [K]                     RMSNorm(x, gamma)
    skip_rms        gamma [K], skip [..., K]      RMSNorm(s, gamma), s = x + skip   s (optional)
    swiglu          —  (x is gate_up [..., 2K])   act(x[..., :K]) * x[..., K:]
    attrs: epsilon (rms, skip_rms), activation (swiglu)

Every face of P is the face of the op it replaces (plugins/norms RMSNorm / SkipRMSNorm,
plugins/swiglu SwiGLU): numpy reference, torch reference, Triton kernel and ORT lowering.
"""

from __future__ import annotations

from types import SimpleNamespace

PROLOGUES = ("rms", "skip_rms", "swiglu")


def _op(kind: str, attrs: dict):
    from ..norms import RMSNorm, SkipRMSNorm
    from ..swiglu import SwiGLU

    if kind == "swiglu":
        return SwiGLU(), {"activation": attrs.get("activation", "silu")}
    return (RMSNorm() if kind == "rms" else SkipRMSNorm()), {"epsilon": attrs["epsilon"]}


def _inputs(kind: str, x, extra: list) -> list:
    return {"rms": lambda: [x, extra[0]], "skip_rms": lambda: [x, extra[1], extra[0]], "swiglu": lambda: [x]}[kind]()


def apply(x, extra: list, attrs: dict, face: str, s_out=None):
    """(P(x), s or None) by the replaced op's face `face` ("reference", "torch_reference" or
    "triton_kernel", which falls back to the torch reference where it does not apply; it writes s
    into `s_out` where given); x unchanged without a prologue."""
    kind = attrs.get("prologue", "")
    if not kind:
        return x, None
    op, a = _op(kind, attrs)
    ins = _inputs(kind, x, extra)
    got = op.triton_kernel(ins, a, [None, s_out]) if face == "triton_kernel" else getattr(op, face)(ins, a)
    got = got if got is not None else op.torch_reference(ins, a)
    return got[0], (got[1] if kind == "skip_rms" else None)


def lower_ort(emit, node, at: int, opset: int):
    """Emit P's ORT face for fused GEMM `node` (its prologue inputs from index `at`); returns the
    tensor that feeds the GEMM (node.inputs[0] without a prologue)."""
    kind = node.attrs.get("prologue", "")
    if not kind:
        return node.inputs[0]
    op, a = _op(kind, node.attrs)
    x = emit.var(node.inputs[0].dtype)
    outs = [x] + ([node.outputs[1]] if kind == "skip_rms" and len(node.outputs) > 1 else [])
    op.lower_ort(emit, SimpleNamespace(inputs=_inputs(kind, node.inputs[0], node.inputs[at:]), outputs=outs,
                                       attrs=a, name=node.name), opset)
    return x


def extra_outputs(node) -> list:
    """infer's entries for the outputs after y: s (skip_rms), the shape of x."""
    if node.attrs.get("prologue") == "skip_rms" and len(node.outputs) > 1:
        from ..base import dtype_of, shape_of

        return [(dtype_of(node.inputs[0]), shape_of(node.inputs[0]))]
    return []


def gemm_rows(node):
    """The GEMM input's shape (x's; swiglu halves the last axis), or None."""
    from ..base import shape_of

    xs = shape_of(node.inputs[0])
    if xs is not None and node.attrs.get("prologue") == "swiglu" and isinstance(xs[-1], int):
        xs = [*xs[:-1], xs[-1] // 2]
    return xs
