"""quantize-kv-cache — the decoder's K/V cache stored as int8 or fp8 (e4m3fn) codes, one scale
per kv head.

Not in the default pipeline: `mmc compile --kv-cache int8|fp8` appends it after the weight
passes (`ctx.options["quant"].kv_cache`). Every mmc.Attention that reads its cache from graph
inputs and writes it to graph outputs:

    before:  y, present_k, present_v = mmc.Attention(q, k, v, past_k, past_v, mask)
             past_* / present_* float32 [B, KV, T, D]
    after:   y, present_k, present_v = mmc.Attention(q, k, v, past_k, past_v, mask, @k_scale, @v_scale)
                                       {kv_cache = "int8"}
             past_* / present_* int8 codes (fp8: float8_e4m3fn); k_scale [KV] = amax_h(k) / 127 (fp8: / 448)

amax_h is the absolute maximum of the head's keys (after rotary) or values over the
calibration prefills, run on the graph as it is here (weights already quantized). The graph's
cache inputs and outputs change type; the manifest records it and the runtime allocates its
cache to match (a quarter of fp32's bytes). The op attends to the cache as stored, this step's
keys included, so prefill logits on the calibration prompts measure the whole effect.

Lossy (`lossy = True`): the check compares logits on feed sets with an empty cache; the
accuracy report compares float and quantized logits. Skipped, and shown as a near miss: an
attention without a cache, or whose cache is not a graph input / output or is read by
anything other than the attention and Shape.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmc import quantization as qz
from mmc.calibration import collect
from mmc.plugins import DOMAIN
from mmc.plugins.base import present
from mmc.registry import PassResult, register_pass


def _skip_reason(node: gs.Node, inputs: set[int], outputs: set[int]) -> str | None:
    past = [present(node, 3), present(node, 4)]
    if len(node.outputs) < 3 or not all(o.name for o in node.outputs[1:3]):
        return "the attention's present outputs are not used"
    for p in past:
        if id(p) not in inputs:
            return f"{p.name} is not a graph input"
        if p.dtype is None or np.dtype(p.dtype) != np.float32:
            return f"{p.name} is not float32"
        others = [r.op for r in p.outputs if r is not node and r.op != "Shape"]
        if others:
            return f"{p.name} is read by {others[0]}"
    for o in node.outputs[1:3]:
        if id(o) not in outputs or o.outputs:
            return f"{o.name} is not only a graph output"
    return None


@register_pass(default=False)
class QuantizeKVCache:
    name = "quantize-kv-cache"
    summary = "the decoder's K/V cache as int8 / fp8 codes with calibrated per-head scales"
    lossy = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        cfg = ctx.options.get("quant")
        kind = (cfg.kv_cache if cfg is not None else None) or "int8"
        cal = ctx.options.get("calibration")
        feeds = cal.feeds.get(ctx.component) if cal is not None else None
        inputs, outputs = {id(t) for t in graph.inputs}, {id(t) for t in graph.outputs}
        targets, skipped = [], 0
        for node in graph.nodes:  # attentions with a cache (the vision tower's have none)
            if node.op != "Attention" or node.domain != DOMAIN or node.attrs.get("kv_cache") \
                    or present(node, 3) is None or present(node, 4) is None:
                continue
            reason = _skip_reason(node, inputs, outputs)
            if reason is None:
                targets.append(node)
            else:
                skipped += 1
                ctx.near_misses.setdefault("kv-cache", {"node": node.name, "reason": reason})
        if not targets:
            return PassResult(modified=False, stats={"quantized": 0, "skipped": skipped})
        if not feeds:
            return PassResult(modified=False, stats={"quantized": 0, "no-calibration": len(targets)})
        from mmc import ir

        names = [t.name for n in targets for t in n.inputs[1:3]]
        stats = collect(ir.to_model(graph), feeds, names, axis=1)
        record = ctx.options.setdefault("kv_cache", {}).setdefault(ctx.component, [])
        dtype = qz.kv_dtype(kind)
        for node in targets:
            scales = []
            for t, role in zip(node.inputs[1:3], ("k", "v")):
                amax = stats[t.name].channel_absmax
                scales.append(gs.Constant(ctx.fresh_name(f"{role}_scale"), qz.kv_scale(amax, kind)))
            while len(node.inputs) < 6:
                node.inputs.append(gs.Variable.empty())
            node.inputs.extend(scales)
            node.attrs["kv_cache"] = kind
            for t in (node.inputs[3], node.inputs[4], node.outputs[1], node.outputs[2]):
                t.dtype = dtype
            record.append({"node": node.name, "cache": [node.inputs[3].name, node.inputs[4].name],
                           "k_amax": [round(float(a), 5) for a in stats[node.inputs[1].name].channel_absmax],
                           "v_amax": [round(float(a), 5) for a in stats[node.inputs[2].name].channel_absmax]})
        return PassResult(modified=True, stats={"quantized": len(targets), "skipped": skipped})
