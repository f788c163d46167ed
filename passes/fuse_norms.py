"""fuse-norms — every RMSNorm / LayerNorm spelling the exporters produce -> mmc.RMSNorm /
mmc.LayerNorm, with a trailing constant scale absorbed into the weight.

Rules:
- `rms-norm`:      Mul(w, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))
                   (dynamo; TorchScript's Div(1, ·) is Reciprocal after canonicalize; Div(x,
                   Sqrt(·)) too; with Casts to fp32 around the core for half models)
- `rms-norm-onnx`: RMSNormalization(x, w) over the last axis (opset 23)
- `layer-norm`:    LayerNormalization(x, w, b) over the last axis (opset 17+)
- `layer-norm-decomposed`: Add(Mul(Div(Sub(x, m), Sqrt(Add(ReduceMean(Pow(Sub(x, m), 2)), eps))), w), b)
- `absorb-scale`:  Mul(RMSNorm/LayerNorm(x, w), c) -> norm(x, w*c) (c constant over the last axis;
                   for LayerNorm the bias scales too)

    before:  p = Pow(x, 2); m = ReduceMean(p, [-1]); a = Add(m, 1e-6); s = Sqrt(a)
             r = Reciprocal(s); n = Mul(x, r); y = Mul(@w, n)
    after:   y = mmc.RMSNorm(x, @w) {epsilon=1e-6}

Preconditions: the reduction is over the last axis with keepdims, the exponent is 2, epsilon
and the weight are constants, the weight is 1-D over the last axis. Pipeline: after
canonicalize and cse, before fuse-skip-norm.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmc.patterns import AnyOf, Const, Op, Rule, Var
from mmc.plugins import DOMAIN
from mmc.registry import PassResult, register_pass

from .fusion_util import const_value, fused_node, is_last_axis, last_dim, rank, reduce_axes, run_rules


def _mean_sq(x):
    return Op("ReduceMean", Op("Pow", x, Const("two")), label="mean")


def _inv_rms(x):
    denom = Op("Sqrt", Op("Add", _mean_sq(x), Const("eps"), commute=True))
    return denom


_core = AnyOf(
    Op("Mul", Var("xc"), Op("Reciprocal", _inv_rms(Var("xc"))), commute=True, label="core"),
    Op("Div", Var("xc"), _inv_rms(Var("xc")), label="core"),
)
RMS = Op("Mul", Const("w"), AnyOf(Op("Cast", _core, label="out_cast"), _core), commute=True)


def _check_weight(m, x: gs.Tensor) -> str | None:
    w = const_value(m["w"])
    if w is None or w.ndim != 1:
        return "weight is not a 1-D constant"
    if last_dim(x) is not None and isinstance(last_dim(x), int) and w.shape[0] != last_dim(x):
        return f"weight has {w.shape[0]} entries, the normalized axis {last_dim(x)}"
    return None


def _check_rms(m) -> str | None:
    if m.scalar("two") != 2.0:
        return "exponent is not 2"
    if m.scalar("eps") is None:
        return "epsilon is not a scalar constant"
    mean = m.nodes["mean"]
    if not is_last_axis(reduce_axes(mean), rank(m["xc"])) or not mean.attrs.get("keepdims", 1):
        return f"ReduceMean is over axes {reduce_axes(mean)}, not the last axis with keepdims"
    return _check_weight(m, m["xc"])


def _rms_input(m) -> gs.Tensor:
    """x itself, or the half-precision x when the core is Cast(x) ... Cast back."""
    xc = m["xc"]
    if "out_cast" in m.nodes and len(xc.inputs) == 1 and xc.inputs[0].op == "Cast":
        return xc.inputs[0].inputs[0]
    return xc


def _check_rms_casts(m) -> str | None:
    reason = _check_rms(m)
    if reason or "out_cast" not in m.nodes:
        return reason
    x = _rms_input(m)
    if x is m["xc"]:
        return "output is cast but the input is not a Cast"
    if np.dtype(x.dtype) != np.dtype(m.root.outputs[0].dtype):
        return "the Casts do not return to the input's dtype"
    return None


def _rewrite_rms(g, m, ctx):
    x = _rms_input(m)
    w = m["w"]
    if np.dtype(w.dtype) != np.dtype(x.dtype):
        w = gs.Constant(ctx.fresh_name("norm_weight"), const_value(w).astype(x.dtype))
    fused_node(g, ctx, "RMSNorm", [x, w], [m.root.outputs[0]], {"epsilon": float(m.scalar("eps"))}, m.root)


def _check_onnx_norm(m) -> str | None:
    node = m.root
    if node.attrs.get("axis", -1) not in (-1, (rank(m["x"]) or 0) - 1):
        return f"normalizes from axis {node.attrs.get('axis')}, not only the last"
    if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
        return "mean / inv-std outputs are used"
    if not isinstance(m["w"], gs.Constant) or const_value(m["w"]).ndim != 1:
        return "scale is not a 1-D constant"
    return None


def _rewrite_onnx_norm(op):
    def rewrite(g, m, ctx):
        inputs = [m["x"], *m.root.inputs[1:3]]
        fused_node(g, ctx, op, inputs, [m.root.outputs[0]], {"epsilon": float(m.root.attrs.get("epsilon", 1e-5))},
                   m.root)
    return rewrite


_centered = Op("Sub", Var("x"), Op("ReduceMean", Var("x"), label="mu"), label="centered")
_var = Op("ReduceMean", Op("Pow", Var("centered_sq_in"), Const("two")), label="mean")
LN = Op("Add", Op("Mul", Op("Div", _centered, Op("Sqrt", Op("Add", _var, Const("eps"), commute=True)), label="div"),
                  Const("w"), commute=True), Const("b"), commute=True)


def _check_ln(m) -> str | None:
    if m.scalar("two") != 2.0:
        return "exponent is not 2"
    if m.scalar("eps") is None:
        return "epsilon is not a scalar constant"
    if m["centered_sq_in"] is not m.nodes["centered"].outputs[0]:
        return "the variance is not taken of the same centered x"
    for label in ("mu", "mean"):
        node = m.nodes[label]
        if not is_last_axis(reduce_axes(node), rank(m["x"])) or not node.attrs.get("keepdims", 1):
            return f"{label} is not reduced over the last axis with keepdims"
    b = const_value(m["b"])
    return _check_weight(m, m["x"]) or (None if b is not None and b.ndim == 1 else "bias is not 1-D")


def _rewrite_ln(g, m, ctx):
    fused_node(g, ctx, "LayerNorm", [m["x"], m["w"], m["b"]], [m.root.outputs[0]],
               {"epsilon": float(m.scalar("eps"))}, m.root)


SCALED = Op("Mul", Var("normed"), Const("c"), commute=True)


def _check_scale(m) -> str | None:
    src = m["normed"]
    node = src.inputs[0] if len(src.inputs) == 1 else None
    if node is None or node.domain != DOMAIN or node.op not in ("RMSNorm", "LayerNorm"):
        return "the scaled value is not an mmc norm"
    if len(src.outputs) != 1 or m.is_graph_output(src):
        return "the norm's output has other readers"
    if any(t.name and not isinstance(t, gs.Constant) for t in node.inputs[1:]):
        return "the norm's weight or bias is not a constant"
    c = const_value(m["c"])
    w = const_value(node.inputs[1])
    if c.size != 1 and (c.ndim == 0 or c.shape[-1] != w.shape[0] or c.size != w.shape[0]):
        return f"scale of shape {c.shape} is not per-channel over the last axis"
    if node.inputs[0].shape is not None and c.ndim > len(node.inputs[0].shape):
        return "scale broadcast adds dimensions"
    return None


def _rewrite_scale(g, m, ctx):
    node = m["normed"].inputs[0]
    c = const_value(m["c"]).reshape(-1)
    for i in range(1, len(node.inputs)):  # weight (and LayerNorm's bias) absorb the scale
        t = node.inputs[i]
        if t.name:
            node.inputs[i] = gs.Constant(ctx.fresh_name("scaled"), (const_value(t) * c).astype(const_value(t).dtype))
    out = m.root.outputs[0]
    m.root.outputs.clear()
    node.outputs.clear()
    node.outputs.append(out)


RULES = [
    Rule("rms-norm", RMS, check=_check_rms_casts, rewrite=_rewrite_rms),
    Rule("rms-norm-onnx", Op("RMSNormalization", Var("x"), Var("w")), check=_check_onnx_norm,
         rewrite=_rewrite_onnx_norm("RMSNorm")),
    Rule("layer-norm", Op("LayerNormalization", Var("x"), Var("w")), check=_check_onnx_norm,
         rewrite=_rewrite_onnx_norm("LayerNorm")),
    Rule("layer-norm-decomposed", LN, check=_check_ln, rewrite=_rewrite_ln),
]
ABSORB = [Rule("absorb-scale", SCALED, check=_check_scale, rewrite=_rewrite_scale)]


@register_pass(default=True)
class FuseNorms:
    name = "fuse-norms"
    summary = "RMSNorm / LayerNorm spellings -> mmc.RMSNorm / mmc.LayerNorm (+ trailing scale absorbed)"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        return run_rules(graph, ctx, RULES, ABSORB)
