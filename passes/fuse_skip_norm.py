"""fuse-skip-norm — a residual Add feeding a norm -> the norm's skip form, which also returns
the sum (the residual stream the next block adds to).

Rules:
- `skip-rms-norm`:   mmc.RMSNorm(Add(a, b), w)      -> mmc.SkipRMSNorm(a, b, w) -> (y, a+b)
- `skip-layer-norm`: mmc.LayerNorm(Add(a, b), w, β) -> mmc.SkipLayerNorm(a, b, w, β) -> (y, a+b)

    before:  h = Add(x, attn_out); n = mmc.RMSNorm(h, @w); ... Add(h, mlp_out)
    after:   n, h = mmc.SkipRMSNorm(x, attn_out, @w); ... Add(h, mlp_out)

Preconditions: a and b have the same shape (the contrib ops do not broadcast). Pipeline: after
fuse-norms.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from mmc.patterns import Op, Rule, Var
from mmc.plugins import DOMAIN
from mmc.registry import PassResult, register_pass

from .fusion_util import fused_node, run_rules, same_dims


def _pattern(op: str) -> Op:
    return Op(op, Op("Add", Var("a"), Var("b"), label="add"), Var("w"), domain=DOMAIN)


def _check(m) -> str | None:
    if not same_dims(m["a"].shape, m["b"].shape):
        return f"the Add broadcasts ({m['a'].shape} + {m['b'].shape}); the skip op needs equal shapes"
    return None


def _rewrite(skip_op: str):
    def rewrite(g, m, ctx):
        add_out = m.nodes["add"].outputs[0]
        outputs = [m.root.outputs[0], add_out]
        inputs = [m["a"], m["b"], *m.root.inputs[1:]]
        fused_node(g, ctx, skip_op, inputs, outputs, dict(m.root.attrs), m.root)
        m.root.inputs.clear()
    return rewrite


RULES = [
    Rule("skip-rms-norm", _pattern("RMSNorm"), check=_check, rewrite=_rewrite("SkipRMSNorm")),
    Rule("skip-layer-norm", _pattern("LayerNorm"), check=_check, rewrite=_rewrite("SkipLayerNorm")),
]


@register_pass(default=True)
class FuseSkipNorm:
    name = "fuse-skip-norm"
    summary = "residual Add + norm -> mmc.SkipRMSNorm / mmc.SkipLayerNorm (returns the sum too)"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        return run_rules(graph, ctx, RULES)
