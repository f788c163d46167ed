"""fuse-swiglu — gated MLP activations -> mmc.SwiGLU(gate, up).

Rules:
- `swiglu`:          Mul(Mul(g, Sigmoid(g)), up)           -> mmc.SwiGLU(g, up) {activation=silu}
- `gelu-gated`:      Mul(Gelu(g), up)                       -> {activation=gelu | gelu_tanh}
- `gelu-erf-gated`:  Mul(Mul(Mul(g, 0.5), Add(Erf(Div(g, √2)), 1)), up) (erf GELU before opset 20)

    before:  s = Sigmoid(g); a = Mul(g, s); y = Mul(a, u)
    after:   y = mmc.SwiGLU(g, u) {activation="silu"}

horizontal-gemm later merges the gate/up projections and packs the op's two inputs into one.
Preconditions: gate and up have the same shape. Pipeline: after fuse-attention, before
horizontal-gemm.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from mmc.patterns import Const, Op, Rule, Var
from mmc.registry import PassResult, register_pass

from .fusion_util import fused_node, run_rules, same_dims

SILU = Op("Mul", Op("Mul", Var("g"), Op("Sigmoid", Var("g")), commute=True), Var("up"), commute=True)
GELU = Op("Mul", Op("Gelu", Var("g"), label="gelu"), Var("up"), commute=True)
_erf = Op("Add", Op("Erf", Op("Div", Var("g"), Const("sqrt2"))), Const("one"), commute=True)
GELU_ERF = Op("Mul", Op("Mul", Op("Mul", Var("g"), Const("half"), commute=True), _erf, commute=True), Var("up"),
              commute=True)


def _same_shape(m) -> str | None:
    g, u = m["g"], m["up"]
    if not same_dims(g.shape, u.shape):
        return f"gate {g.shape} and up {u.shape} differ in shape"
    if g is u:
        return "gate and up are the same tensor (x*silu(x) is SiLU, not a gated MLP)"
    return None


def _check_erf(m) -> str | None:
    if m.scalar("half") != 0.5 or m.scalar("one") != 1.0 or abs((m.scalar("sqrt2") or 0) - math.sqrt(2)) > 1e-6:
        return "constants are not 0.5, 1 and sqrt(2) of the erf GELU"
    return _same_shape(m)


def _rewrite(activation):
    def rewrite(g, m, ctx):
        act = activation
        if act == "gelu" and "gelu" in m.nodes and m.nodes["gelu"].attrs.get("approximate", "none") == "tanh":
            act = "gelu_tanh"
        fused_node(g, ctx, "SwiGLU", [m["g"], m["up"]], [m.root.outputs[0]], {"activation": act}, m.root)
    return rewrite


RULES = [
    Rule("swiglu", SILU, check=_same_shape, rewrite=_rewrite("silu")),
    Rule("gelu-gated", GELU, check=_same_shape, rewrite=_rewrite("gelu")),
    Rule("gelu-erf-gated", GELU_ERF, check=_check_erf, rewrite=_rewrite("gelu")),
]


@register_pass(default=True)
class FuseSwiGLU:
    name = "fuse-swiglu"
    summary = "act(gate) * up (SiLU, GELU, erf-GELU) -> mmc.SwiGLU"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        return run_rules(graph, ctx, RULES)
