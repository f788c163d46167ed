"""quantize-weights — GEMM weights as standard ONNX Q/DQ (int8, int4, fp8 e4m3fn).

Not in the default pipeline: `mmc compile --int8 / --int4 / --fp8` appends it (after the
fusions, so merged q/k/v and gate/up GEMMs are quantized as one weight each). Configured by
`ctx.options["quant"]` (a `mmc.quantization.QuantConfig`). W8A8 and FP8 add the activation
side afterwards (quantize-activations).

    before:  y = MatMul(x, @W)                                   W float [K, N]
    after:   y = MatMul(x, DequantizeLinear(@Wq, @s, axis=1))    int8/fp8: Wq [K, N], s [N]
             y = MatMul(x, DequantizeLinear(@Wq, @s, axis=0, block_size=g))
                                                                 int4: Wq int4 [K, N], s [K/g, N]

This Q/DQ form is what TensorRT's explicit quantization reads; the ORT face turns each
DequantizeLinear->MatMul into com.microsoft.MatMulNBits (compiler/lowering.py). Block-wise
int4 needs opset 21, so the pass upgrades the graph to opset 23 first.

Kept in float (reported): the logits GEMM (`lm_head`, it writes a graph output; `mmc compile
--quantize-lm-head` quantizes it too) and projections that read a graph input directly (the
vision patch embedding), unless `keep_float` says otherwise. The pass changes the numbers by design (`lossy = True`): its numerical check is
reported, not enforced; the accuracy report compares logits on calibration prompts instead.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmc import quantization as qz
from mmc.ir import lazy_constant, upgrade_opset
from mmc.registry import PassResult, register_pass

QDQ_OPSET = 23


def float_gemm_weight(node: gs.Node) -> np.ndarray | None:
    """The [K, N] float32 constant weight of a plain MatMul, or None (not a quantizable GEMM)."""
    if node.op != "MatMul" or node.domain or len(node.inputs) != 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    w = np.asarray(node.inputs[1].values)
    return w if w.ndim == 2 and w.dtype == np.float32 else None


def kept_reason(node: gs.Node, graph: gs.Graph, cfg: qz.QuantConfig) -> str | None:
    """Why GEMM `node` stays in float under `cfg` (None: it is quantized)."""
    outputs = {id(t) for t in graph.outputs}
    if "lm_head" in cfg.keep_float and any(id(o) in outputs for o in node.outputs):
        return "lm_head"
    if "patch_embed" in cfg.keep_float and any(node.inputs[0] is t for t in graph.inputs):
        return "patch_embed"
    if node.name in cfg.keep_float:
        return node.name
    return None


@register_pass(default=False)
class QuantizeWeights:
    name = "quantize-weights"
    summary = "GEMM weights as int8 / fp8 (per channel) or int4 (group-wise) DequantizeLinear -> MatMul"
    lossy = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        cfg: qz.QuantConfig = ctx.options.get("quant") or qz.QuantConfig()
        if graph.opset < QDQ_OPSET:
            upgrade_opset(graph, QDQ_OPSET)
        hits = {"quantized": 0, "kept-float": 0}
        layers = ctx.options.setdefault("quant_layers", {}).setdefault(ctx.component, [])
        for node in list(graph.nodes):
            values = float_gemm_weight(node)
            if values is None:
                continue
            kept = kept_reason(node, graph, cfg)
            if kept:
                hits["kept-float"] += 1
                layers.append({"node": node.name, "shape": list(values.shape), "kept_float": kept,
                               "bytes": int(values.nbytes)})
                continue
            originals = ctx.options.setdefault("quant_originals", {}).setdefault(ctx.component, {})
            originals[node.name] = list(node.inputs)  # the budget search can put a layer back in float
            node.inputs[1] = self._dequantized(graph, ctx, node, values, cfg, layers)
            hits["quantized"] += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=hits["quantized"] > 0, stats=hits)

    @staticmethod
    def _dequantized(graph, ctx, node, w: np.ndarray, cfg: qz.QuantConfig, layers: list) -> gs.Variable:
        k, n = w.shape
        if cfg.mode == "fp8":
            q, scale = qz.quantize_fp8(w)
            qc = lazy_constant(ctx.fresh_name("w_fp8"), q)
            attrs, w_hat, nbytes = {"axis": 1}, qz.dequantize(q, scale), q.nbytes
        elif cfg.mode != "int4":
            q, scale = qz.quantize_per_channel(w, 8)
            qc = gs.Constant(ctx.fresh_name("w_int8"), q)
            attrs, w_hat, nbytes = {"axis": 1}, qz.dequantize(q, scale), q.nbytes
        else:
            g = cfg.group_size
            q, scale = qz.quantize_blockwise(w, 4, g)
            qc = lazy_constant(ctx.fresh_name("w_int4"), q, int4=True)
            attrs, w_hat, nbytes = {"axis": 0, "block_size": g}, qz.dequantize(q, scale, g), -(-q.size // 2)
        out = gs.Variable(ctx.fresh_name("w_dq"), dtype=np.float32, shape=[k, n])
        dq = gs.Node("DequantizeLinear", ctx.fresh_name("DequantizeLinear"), attrs,
                     [qc, gs.Constant(ctx.fresh_name("w_scale"), scale)], [out])
        at = next(i for i, x in enumerate(graph.nodes) if x is node)
        graph.nodes.insert(at, ctx.created(dq))
        layers.append({"node": node.name, "shape": [k, n], "bits": cfg.bits, "weights": cfg.weight_type,
                       "bytes": int(nbytes + scale.nbytes), "float_bytes": int(w.nbytes), **qz.weight_error(w, w_hat)})
        return out
