"""smooth-quant — SmoothQuant: move activation outliers into the weights, exactly.

Not in the default pipeline: `mmc compile --int8 w8a8` puts it before quantize-weights (unless
`--no-smooth`). LLM activations have a few channels far larger than the rest; one per-tensor
int8 scale for such an activation wastes its range on them. When a per-channel scale produces
the GEMM input (a norm's weight), the channels can be rebalanced without changing the function:

    before:  x = Norm(h) * g;          y_i = x @ W_i            (every reader i of x is a GEMM)
    after:   x' = Norm(h) * (g / s);   y_i = x' @ (diag(s) W_i)
             s_j = max|x_j|^alpha / max_i max_n |W_i[j, n]|^(1 - alpha)

    and for the down projection, through the up GEMM (act(gate) * up is linear in up):
    before:  x = act(gate) * (h @ U);            y = x @ W
    after:   x' = act(gate) * (h @ (U / s));     y = x' @ (diag(s) W)

max|x_j| comes from calibration (`ctx.options["calibration"]`, the float graph run over the
calibration feeds). The producers that own a per-channel scale are declared in `PRODUCERS`
(fused norms, ONNX's norms, or a Mul by a [K] constant for a decomposed norm; their weight
and bias inputs are divided by s) plus mmc's SwiGLU (the up GEMM's columns are divided by s). It is exact in real arithmetic, so the pass manager's
numerical check holds it to the usual tolerance. Readers that are not quantizable GEMMs (the
logits GEMM kept in float, anything else) leave the producer alone.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmc.calibration import collect
from mmc.quantization import QuantConfig
from mmc.registry import PassResult, register_pass

from .quantize_weights import float_gemm_weight, kept_reason

# (domain, op) -> indices of the inputs that scale output 0 per channel (weight, then bias/beta)
PRODUCERS = {
    ("mmc", "RMSNorm"): (1,),
    ("mmc", "SkipRMSNorm"): (2,),
    ("mmc", "LayerNorm"): (1, 2),
    ("mmc", "SkipLayerNorm"): (2, 3),
    ("", "RMSNormalization"): (1,),
    ("", "LayerNormalization"): (1, 2),
    ("", "SimplifiedLayerNormalization"): (1,),
    ("", "Mul"): (0, 1),  # whichever operand is a [K] constant
}


def _up_columns(node: gs.Node, k: int) -> list | None:
    """mmc SwiGLU: y = act(gate) * up, so y's channels scale with the columns of the GEMM that
    makes `up` (the second half of a merged gate/up GEMM, or the separate up GEMM): the
    down projection is smoothed through them. [(gemm, 1, columns)] or None."""
    packed = len(node.inputs) == 1
    up = node.inputs[0] if packed else node.inputs[1]
    gemm = up.inputs[0] if len(up.inputs) == 1 else None
    if gemm is None or gemm.op != "MatMul" or gemm.domain or len(up.outputs) != 1 \
            or not isinstance(gemm.inputs[1], gs.Constant):
        return None
    w = np.asarray(gemm.inputs[1].values)
    if w.ndim != 2 or w.dtype != np.float32 or w.shape[1] != (2 * k if packed else k):
        return None
    return [(gemm, 1, slice(k, 2 * k) if packed else slice(0, k))]


def _divisors(node: gs.Node, k: int) -> list | None:
    """Where `node`'s output channels get their scale: [(holder node, input index, columns)],
    columns None for a [K] constant (a norm weight or bias), a slice for GEMM weight columns."""
    if node.op == "SwiGLU" and node.domain == "mmc":
        return _up_columns(node, k)

    def ok(t) -> bool:
        return isinstance(t, gs.Constant) and np.asarray(t.values).shape == (k,) \
            and np.asarray(t.values).dtype == np.float32

    if node.op == "Mul" and not node.domain:
        idx = [i for i in (0, 1) if ok(node.inputs[i])][:1]
    else:
        idx = [i for i in PRODUCERS[(node.domain or "", node.op)] if i < len(node.inputs) and node.inputs[i].name]
        idx = idx if idx and all(ok(node.inputs[i]) for i in idx) else []
    return [(node, i, None) for i in idx] or None


def _gemm_readers(x: gs.Variable, graph: gs.Graph, cfg) -> list[gs.Node] | None:
    """The readers of x if every one is a quantizable float GEMM reading x as its activation."""
    readers = list(x.outputs)
    for r in readers:
        if float_gemm_weight(r) is None or r.inputs[0] is not x or kept_reason(r, graph, cfg):
            return None
    return readers or None


def smoothing_factors(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s [K] from the activation's per-channel absmax [K] and the readers' weights [K, N_i]."""
    a = act_absmax.astype(np.float64)
    w = np.max([np.abs(x.astype(np.float64)).max(axis=1) for x in weights], axis=0)
    s = np.power(np.maximum(a, 1e-5), alpha) / np.power(np.maximum(w, 1e-5), 1 - alpha)
    return np.where((a > 0) & (w > 0), s, 1.0)


@register_pass(default=False)
class SmoothQuant:
    name = "smooth-quant"
    summary = "SmoothQuant: per-channel activation scales folded into the norm weights and the GEMM weights"

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        cal = ctx.options.get("calibration")
        feeds = cal.feeds.get(ctx.component) if cal is not None else None
        cfg = ctx.options.get("quant") or QuantConfig("w8a8", smooth_alpha=0.5)
        alpha = 0.5 if cfg.smooth_alpha is None else float(cfg.smooth_alpha)
        if not feeds:
            return PassResult(modified=False, stats={"smoothed": 0, "no-calibration": 1})
        candidates = []
        for node in graph.nodes:
            if (node.domain or "", node.op) not in PRODUCERS and not (node.domain == "mmc" and node.op == "SwiGLU") \
                    or not node.outputs:
                continue
            x = node.outputs[0]
            readers = _gemm_readers(x, graph, cfg)
            if readers is None or any(o is x for o in graph.outputs):
                continue
            k = np.asarray(readers[0].inputs[1].values).shape[0]
            divisors = _divisors(node, k)
            if divisors:
                candidates.append((node, x, readers, divisors))
        if not candidates:
            return PassResult(modified=False, stats={"smoothed": 0})
        from mmc import ir

        stats = collect(ir.to_model(graph), feeds, [x.name for _, x, _, _ in candidates])
        record = ctx.options.setdefault("smoothing", {}).setdefault(ctx.component, [])
        for node, x, readers, divisors in candidates:
            st = stats[x.name]
            s = smoothing_factors(st.channel_absmax, [np.asarray(r.inputs[1].values) for r in readers], alpha)
            for holder, i, cols in divisors:
                c = holder.inputs[i]
                v = np.asarray(c.values, np.float64).copy()
                if cols is None:
                    v /= s
                else:
                    v[:, cols] /= s
                holder.inputs[i] = gs.Constant(ctx.fresh_name(f"{c.name}_smooth"), v.astype(np.float32))
            for r in readers:
                w = r.inputs[1]
                r.inputs[1] = gs.Constant(ctx.fresh_name(f"{w.name}_smooth"),
                                          (np.asarray(w.values, np.float64) * s[:, None]).astype(np.float32))
            ratio = lambda v: float(v.max() / max(np.median(v), 1e-12))  # noqa: E731
            record.append({"producer": node.name, "gemms": [r.name for r in readers], "alpha": alpha,
                           "outlier_ratio_before": round(ratio(st.channel_absmax), 2),
                           "outlier_ratio_after": round(ratio(st.channel_absmax / s), 2)})
        graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(modified=True, stats={"smoothed": len(candidates)})
