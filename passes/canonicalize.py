"""canonicalize — rewrite exporter spelling variants into one form, so later rules match once.

Rules:
- `div-one-to-reciprocal`:  Div(1, x)            -> Reciprocal(x)       (TorchScript's RMSNorm)
- `identity-cast`:          Cast(x, to=dtype(x)) -> x
- `cast-roundtrip`:         Cast(Cast(x, to=W), to=dtype(x)) -> x, when W represents every value
                            of dtype(x) exactly (f16->f32->f16, f32->f64->f32, int32->int64->int32)
- `reshape-chain`:          Reshape(Reshape(x, s1), s2) -> Reshape(x, s2), when s2 is a constant
                            with no 0 entries (a 0 copies a dim of the *intermediate* shape)

    before:  r = Div(@one=1.0, s); y = Mul(x, r)
    after:   r = Reciprocal(s);    y = Mul(x, r)

Preconditions: dtypes known where a rule needs them (rejections say so). Pipeline: after
fold-constants (constants are visible), before cse and every fusion pass.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mmc.patterns import Const, Op, Rule, RuleStats, Var, apply_rules, bypass, rewrite_root
from mmc.plugins.base import dtype_of
from mmc.registry import PassResult, register_pass

# wider type -> narrower types it holds exactly
EXACT_WIDENING = {
    np.dtype("float32"): {np.dtype("float16"), np.dtype("float32")},
    np.dtype("float64"): {np.dtype("float16"), np.dtype("float32"), np.dtype("float64")},
    np.dtype("int64"): {np.dtype(t) for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "bool")},
    np.dtype("int32"): {np.dtype(t) for t in ("int8", "int16", "int32", "uint8", "uint16", "bool")},
}


def _cast_to(node: gs.Node):
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    except (KeyError, TypeError, ValueError):
        return None


def _check_div_one(m):
    return None if m.scalar("one") == 1.0 else "numerator is not the constant 1"


def _check_identity_cast(m):
    src, to = dtype_of(m["x"]), _cast_to(m.nodes["cast"])
    if src is None:
        return f"dtype of {m['x'].name!r} is unknown"
    return None if src == to else f"casts {src} to {to}"


def _check_roundtrip(m):
    src, mid, out = dtype_of(m["x"]), _cast_to(m.nodes["inner"]), _cast_to(m.nodes["outer"])
    if src is None:
        return f"dtype of {m['x'].name!r} is unknown"
    if out != src:
        return f"round trip ends in {out}, not the source {src}"
    if src not in EXACT_WIDENING.get(mid, set()):
        return f"inner cast {src} -> {mid} loses information"
    return None


def _check_reshape_chain(m):
    shape = np.asarray(m["s2"].values)
    if (shape == 0).any() and not m.nodes["outer"].attrs.get("allowzero", 0):
        return "outer shape has 0 entries (copies dims of the intermediate)"
    return None


RULES = [
    Rule("div-one-to-reciprocal", Op("Div", Const("one"), Var("x"), label="div"),
         check=_check_div_one,
         rewrite=lambda g, m, ctx: rewrite_root(m.root, "Reciprocal", [m["x"]], ctx=ctx)),
    Rule("identity-cast", Op("Cast", Var("x"), label="cast"),
         check=_check_identity_cast,
         rewrite=lambda g, m, ctx: bypass(g, m.root, m["x"], ctx)),
    Rule("cast-roundtrip", Op("Cast", Op("Cast", Var("x"), label="inner"), label="outer"),
         check=_check_roundtrip,
         rewrite=lambda g, m, ctx: bypass(g, m.root, m["x"], ctx)),
    Rule("reshape-chain", Op("Reshape", Op("Reshape", Var("x"), Var("s1")), Const("s2"), label="outer"),
         check=_check_reshape_chain,
         rewrite=lambda g, m, ctx: rewrite_root(m.root, "Reshape", [m["x"], m["s2"]],
                                                {"allowzero": m.root.attrs.get("allowzero", 0)}, ctx)),
]


@register_pass(default=True)
class Canonicalize:
    name = "canonicalize"
    summary = "one spelling per idiom: Div(1,x)->Reciprocal, no-op/round-trip Casts, Reshape chains"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        stats = RuleStats()
        for _ in range(4):  # a rewrite can expose another (Cast chains); stop at a fixed point
            before = sum(stats.hits.values())
            apply_rules(graph, RULES, ctx, stats)
            if sum(stats.hits.values()) == before:
                break
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        ctx.near_misses.update(stats.near_miss)
        return PassResult(modified=sum(stats.hits.values()) > 0, stats=dict(stats.hits))
