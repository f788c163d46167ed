"""quantize-activations — static per-tensor activation Q/DQ for W8A8 (int8) and FP8 GEMMs.

Not in the default pipeline: `mmc compile --int8 w8a8` / `--fp8` put it after quantize-weights.
Every GEMM whose weight is already a DequantizeLinear (quantize-weights made it) gets its
activation input quantized with one calibrated scale:

    before:  y = MatMul(x, DequantizeLinear(@Wq, @sw))
    after:   y = MatMul(DequantizeLinear(QuantizeLinear(x, @sx, @zp), @sx, @zp), DequantizeLinear(@Wq, @sw))
             sx = amax(x) / 127 (int8, zp int8 0) or amax(x) / 448 (fp8 e4m3fn, zp fp8 0)

amax comes from the calibration set (`ctx.options["calibration"]`: the current graph, weights
already quantized, run over the calibration feeds; "minmax" or "percentile"). GEMMs reading
the same activation share one Q/DQ pair. This is the explicit-quantization form TensorRT
reads; ONNX Runtime's CPU provider runs the int8 form as MatMulIntegerToFloat.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmc import quantization as qz
from mmc.calibration import collect
from mmc.ir import lazy_constant
from mmc.registry import PassResult, register_pass


def _zero_point(name: str, kind: str) -> gs.Constant:
    if kind == "int8":
        return gs.Constant(name, np.zeros((), np.int8))
    import ml_dtypes

    return lazy_constant(name, np.zeros((), ml_dtypes.float8_e4m3fn))


@register_pass(default=False)
class QuantizeActivations:
    name = "quantize-activations"
    summary = "static per-tensor int8 / fp8 activation Q/DQ before quantized GEMMs (calibrated)"
    lossy = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        cfg: qz.QuantConfig = ctx.options.get("quant") or qz.QuantConfig()
        kind = cfg.activations
        cal = ctx.options.get("calibration")
        feeds = cal.feeds.get(ctx.component) if cal is not None else None
        if kind is None:
            return PassResult(modified=False, stats={"quantized": 0})
        if not feeds:  # e.g. the vision tower with a text-only --calib set: weights stay W8A16
            return PassResult(modified=False, stats={"quantized": 0, "no-calibration": 1})
        readers: dict[str, list[gs.Node]] = {}
        tensors: dict[str, gs.Variable] = {}
        for node in graph.nodes:
            x = node.inputs[0] if node.inputs else None
            if qz.weight_dq(node) is None or not isinstance(x, gs.Variable) \
                    or x.inputs and x.inputs[0].op == "DequantizeLinear":
                continue
            readers.setdefault(x.name, []).append(node)
            tensors[x.name] = x
        if not readers:
            return PassResult(modified=False, stats={"quantized": 0})
        from mmc import ir

        stats = collect(ir.to_model(graph), feeds, list(readers))
        layers = {x["node"]: x for x in ctx.options.get("quant_layers", {}).get(ctx.component, [])}
        for name, nodes in readers.items():
            x = tensors[name]
            amax = stats[name].amax(cal.method, cal.percentile)
            scale = gs.Constant(ctx.fresh_name("act_scale"), np.asarray(qz.activation_scale(amax, kind), np.float32))
            zp = _zero_point(ctx.fresh_name("act_zp"), kind)
            xq = gs.Variable(ctx.fresh_name("act_q"), dtype=None, shape=x.shape)
            xd = gs.Variable(ctx.fresh_name("act_dq"), dtype=np.float32, shape=x.shape)
            q = gs.Node("QuantizeLinear", ctx.fresh_name("QuantizeLinear"), {}, [x, scale, zp], [xq])
            dq = gs.Node("DequantizeLinear", ctx.fresh_name("DequantizeLinear"), {}, [xq, scale, zp], [xd])
            at = min(next(i for i, n in enumerate(graph.nodes) if n is r) for r in nodes)
            graph.nodes[at:at] = [ctx.created(q), ctx.created(dq)]
            for r in nodes:
                r.inputs[0] = xd
                if r.name in layers:
                    layers[r.name].update(activations=kind, act_amax=round(amax, 6),
                                          act_absmax=round(stats[name].absmax, 6))
        graph.toposort()
        return PassResult(modified=True, stats={"quantized": sum(len(v) for v in readers.values()),
                                                "activation-qdq": len(readers)})
