"""fuse-rotary — the rotate-half rotary embedding -> mmc.RotaryEmbedding.

Rules: `rotary` (text RoPE, M-RoPE and the vision tower's 2-D rotary are one spelling);
`rotary-onnx` (opset 23 RotaryEmbedding without position_ids: half tables, doubled by a Concat
that cse shares across layers).

    before:  lo = Slice(x, 0, D/2, axis=-1); hi = Slice(x, D/2, end, axis=-1)
             r = Concat(Neg(hi), lo, axis=-1)
             y = Add(Mul(x, Unsqueeze(cos, head_axis)), Mul(r, Unsqueeze(sin, head_axis)))
    after:   y = mmc.RotaryEmbedding(x, cos, sin) {layout, halves_equal}

x [B, N, S, D] with tables [B, S, D] unsqueezed at axis 1 is layout "bnsd"; x [S, N, D] with
tables [S, D] unsqueezed at -2 is "snd" (vision). `halves_equal` is set when the tables are
provably cos/sin(Concat(f, f)) (then a face may use half tables, e.g. ORT's RotaryEmbedding).

Preconditions: the slices split the last axis exactly in half; cos and sin are unsqueezed on the
head axis. Pipeline: after cse (so each layer's table unsqueezes are shared), before
fuse-attention (which takes the rotated q/k as inputs).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from mmc.patterns import Const, Op, Rule, Var
from mmc.registry import PassResult, register_pass

from .fusion_util import fused_node, int_list, last_dim, rank, run_rules

BIG = 2**62

_rotated = Op("Concat", Op("Neg", Op("Slice", Var("x"), Const("hs"), Const("he"), Const("hax"), label="hi")),
              Op("Slice", Var("x"), Const("ls"), Const("le"), Const("lax"), label="lo"), label="cat")
ROTARY = Op("Add",
            Op("Mul", Var("x"), Op("Unsqueeze", Var("cos"), Const("cax"), label="ucos"), commute=True),
            Op("Mul", _rotated, Op("Unsqueeze", Var("sin"), Const("sax"), label="usin"), commute=True),
            commute=True)


def _layout(m) -> str | None:
    """bnsd: x [B, N, S, D], tables [B, S, D] unsqueezed at 1; snd: x [S, N, D], tables [S, D]
    unsqueezed at 1 (axes normalized against the unsqueezed rank)."""
    r, rc, rs = rank(m["x"]), rank(m["cos"]), rank(m["sin"])
    cax, sax = int_list(m["cax"]), int_list(m["sax"])
    if cax is None or len(cax) != 1 or rc is None or rc != rs or r != rc + 1:
        return None
    ax, sx = cax[0] % (rc + 1), sax[0] % (rs + 1) if sax and len(sax) == 1 else None
    if ax != 1 or sx != 1:
        return None
    return {4: "bnsd", 3: "snd"}.get(r)


def _check(m) -> str | None:
    d = last_dim(m["x"])
    if not isinstance(d, int):
        return "head dim of x is not static"
    r = rank(m["x"])
    for label in ("hi", "lo"):
        axes = int_list(m[label[0] + "ax"])
        if axes is None or len(axes) != 1 or axes[0] not in (-1, (r or 0) - 1):
            return f"{label} slice is not on the last axis"
        if len(m.nodes[label].inputs) > 4 and m.nodes[label].inputs[4].name and \
                int_list(m.nodes[label].inputs[4]) != [1]:
            return f"{label} slice has a step (or one known only at run time)"
    if int_list(m["ls"]) != [0] or int_list(m["le"]) != [d // 2] or int_list(m["hs"]) != [d // 2] or \
            int_list(m["he"])[0] < d:
        return f"the slices do not split the head dim {d} in half"
    if m.nodes["cat"].attrs.get("axis") not in (-1, (r or 0) - 1):
        return "rotated halves are not concatenated on the last axis"
    if _layout(m) is None:
        return f"cos/sin unsqueezed at {int_list(m['cax'])} for x of rank {r}: not a head axis"
    return None


def _doubled(t: gs.Tensor, depth: int = 4) -> bool:
    """t's two halves on the last axis are equal: t is Concat(a, a), or Cos/Sin/Cast of such
    (text RoPE: cos(cat(f, f)); M-RoPE after dynamo's optimizer: cat(sections, sections))."""
    if depth == 0 or len(t.inputs) != 1:
        return False
    node = t.inputs[0]
    if node.op in ("Cos", "Sin", "Cast"):
        return _doubled(node.inputs[0], depth - 1)
    if node.op != "Concat" or len(node.inputs) != 2 or node.inputs[0] is not node.inputs[1]:
        return False
    return node.attrs.get("axis") in (-1, len(t.shape or []) - 1)


def _rewrite(g, m, ctx):
    attrs = {"layout": _layout(m), "halves_equal": int(_doubled(m["cos"]) and _doubled(m["sin"]))}
    fused_node(g, ctx, "RotaryEmbedding", [m["x"], m["cos"], m["sin"]], [m.root.outputs[0]], attrs, m.root)


ROTARY_ONNX = Op("RotaryEmbedding", Var("x"), Var("cos"), Var("sin"), label="onnx")


def _check_onnx(m) -> str | None:
    node = m.nodes["onnx"]
    if len(node.inputs) > 3 and node.inputs[3].name:
        return "takes position_ids (a cos/sin cache indexed per position)"
    if node.attrs.get("interleaved", 0):
        return "interleaved rotary (pairs, not halves)"
    if rank(m["x"]) != 4 or rank(m["cos"]) != 3:
        return "x is not [B, N, S, D] with [B, S, R/2] tables"
    return None


def _rewrite_onnx(g, m, ctx):
    """opset 23 RotaryEmbedding reads half tables: mmc's op takes Concat(half, half)."""
    tables = []
    for name in ("cos", "sin"):
        half = m[name]
        twin = next((r for r in half.outputs if r.op == "Concat" and len(r.inputs) == 2 and r.attrs.get("axis") == -1
                     and r.inputs[0] is half and r.inputs[1] is half), None)
        if twin is not None:  # another layer's rotary already doubled this table
            tables.append(twin.outputs[0])
            continue
        full = gs.Variable(ctx.fresh_name(name), dtype=half.dtype,
                           shape=[*half.shape[:-1], half.shape[-1] * 2] if half.shape and
                           isinstance(half.shape[-1], int) else None)
        g.nodes.insert(0, ctx.created(gs.Node("Concat", ctx.fresh_name("Concat"), {"axis": -1}, [half, half], [full])))
        tables.append(full)
    attrs = {"layout": "bnsd", "halves_equal": 1, "rotary_dim": int(m.root.attrs.get("rotary_embedding_dim", 0))}
    fused_node(g, ctx, "RotaryEmbedding", [m["x"], *tables], [m.root.outputs[0]], attrs, m.root)


RULES = [Rule("rotary", ROTARY, check=_check, rewrite=_rewrite),
         Rule("rotary-onnx", ROTARY_ONNX, check=_check_onnx, rewrite=_rewrite_onnx)]


@register_pass(default=True)
class FuseRotary:
    name = "fuse-rotary"
    summary = "rotate-half rotary embedding (RoPE, M-RoPE, vision 2-D) -> mmc.RotaryEmbedding"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        return run_rules(graph, ctx, RULES)
