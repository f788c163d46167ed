"""Plan compiler (target "cuda"): an optimized graph -> the execution plan mmc's own engine runs.

    plan.json   {"format": 2, "component", "precision", "inputs", "outputs", "constants", "steps",
                 "caches"}
      steps     in topological order, one per node: {op, domain ("" or "mmc"), inputs, outputs,
                attrs, place, free}
                  place "host":   shape arithmetic on int64 CPU tensors (Shape and whatever
                                  reads only host values); it depends on input shapes alone,
                                  so the runtime computes it once per shape bucket
                  place "device": data ops (torch / cuBLAS / the plugins' kernels), the part a
                                  CUDA graph captures
                  free:           values whose last reader is this step (liveness)
                attrs may carry what the plan compiler knows about constant inputs: a Gather of
                one constant index has "_index" (the runtime selects a view: no kernel)
      constants name -> {dtype, shape, place}; the data is in the component's safetensors
      rewrites  what compiler/plan_rewrites.py did: weight_only (GEMMs turned into
                mmc.WeightOnlyMatMul), linear (float GEMMs, with their bias, turned into
                mmc.Linear), last_logits (the decoder returns logits [B, 1, V] for the
                last position only), rope_attention (attentions that took in the rotary
                of their q and k), gemm_prologue (norms / gated activations folded into the
                float or int8 GEMM they feed)
      caches    per attention that reads its K/V cache from graph inputs and returns it as graph
                outputs: {step, past: [k, v], present: [k, v]} (the runtime keeps those caches
                static and the attention writes them in place)
    precision   float tensors that depend on a float graph input (activations) run in the engine
                precision (bf16 default, fp16, fp32); float tensors computed from integers and
                constants only (rotary tables, masks) stay float32 and are cast where they meet
                an activation, as transformers does. Float weights read only by activation
                steps are stored in the engine precision.

Every op must have a kernel (`runtime/cuda/onnx_ops.py` or an mmc plugin's); an unknown one is a
compile error naming the node. The runtime loads the plan without the compiler.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmc.runtime.engine_format import CUDA_PLAN_FORMAT

from .errors import MmcError

FORMAT = CUDA_PLAN_FORMAT  # the runtime refuses other formats (runtime/engine_format.py)


def _attr(value):
    """A node attribute as JSON (tensors as {"tensor": {dtype, shape, data}})."""
    if isinstance(value, gs.Constant):
        value = np.asarray(value.values)
    if isinstance(value, np.ndarray):
        return {"tensor": {"dtype": value.dtype.name, "shape": list(value.shape), "data": value.reshape(-1).tolist()}}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_attr(v) for v in value]
    if isinstance(value, int | float | str | bool):
        return value
    raise MmcError(f"target cuda: cannot store attribute value of type {type(value).__name__}")


def _dtype_name(t: gs.Tensor) -> str | None:
    try:
        return np.dtype(t.dtype).name if t.dtype is not None else None
    except TypeError:
        return None


def build_plan(graph: gs.Graph, component: str, precision: str = "bf16") -> tuple[dict, dict[str, np.ndarray]]:
    """(plan, constants) for `graph` (mmc ops kept, not lowered; the plan rewrites change the
    graph in place first). Constants are the graph's numpy
    arrays, named as in the plan; the plan's `constants[name]["dtype"]` is the type each is
    stored in (float weights of activation steps: the engine precision)."""
    from mmc.plugins import DOMAIN, OPS
    from mmc.runtime.cuda.executor import PRECISIONS
    from mmc.runtime.cuda.onnx_ops import OPS as ONNX_OPS

    if precision not in PRECISIONS:
        raise MmcError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    from .plan_rewrites import gemm_prologue, last_logits, linear, rope_attention, weight_only

    rewrites = {"weight_only": weight_only(graph), "last_logits": component == "decoder" and last_logits(graph)}
    rewrites["linear"] = linear(graph)
    rewrites["rope_attention"] = rope_attention(graph)
    rewrites["gemm_prologue"] = gemm_prologue(graph)
    graph.toposort()
    for node in graph.nodes:
        known = node.op in OPS if node.domain == DOMAIN else (not node.domain and node.op in ONNX_OPS)
        if not known:
            raise MmcError(f"target cuda: no kernel for {node.domain + '.' if node.domain else ''}{node.op} "
                           f"(node {node.name!r} of the {component} graph)")
    constants: dict[str, np.ndarray] = {}
    place: dict[str, str] = {}
    for t in graph.inputs:
        place[t.name] = "device"
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and t.name not in constants:
                arr = np.asarray(t.values)
                constants[t.name] = arr
                place[t.name] = "device" if arr.dtype.kind == "f" else "host"  # (integers: revisited below)
    # activations: float values downstream of a float graph input
    act = {t.name for t in graph.inputs if t.dtype is not None and np.dtype(t.dtype).kind == "f"}
    steps = []
    for node in graph.nodes:
        ins = [t.name for t in node.inputs]
        live_ins = [n for n in ins if n]
        where = "host" if node.op == "Shape" or all(place.get(n) == "host" for n in live_ins) else "device"
        if any(n in act for n in live_ins) and node.op != "Shape":
            act.update(o.name for o in node.outputs if o.name and (_dtype_name(o) or "float32").startswith("float"))
        for o in node.outputs:
            if o.name:
                place[o.name] = where
        attrs = {k: _attr(v) for k, v in node.attrs.items()}
        if node.op == "Split" and not node.domain:
            attrs["_outputs"] = len(node.outputs)
        if node.op == "Gather" and not node.domain and _scalar_constant(node.inputs[1]):
            attrs["_index"] = int(np.asarray(node.inputs[1].values))  # (M-RoPE's section picks)
        steps.append({"op": node.op, "domain": node.domain or "", "name": node.name, "inputs": ins,
                      "outputs": [o.name for o in node.outputs], "attrs": attrs, "place": where})
    _liveness(steps, {t.name for t in graph.outputs}, set(constants))
    readers: dict[str, list[dict]] = {}
    for s in steps:
        for n in s["inputs"]:
            if n in constants:
                readers.setdefault(n, []).append(s)
    for name, rs in readers.items():  # integer data only device steps read (weight codes) lives on the device
        if place[name] == "host" and all(s["place"] == "device" and not _host_arg(s, name) for s in rs):
            place[name] = "device"
    weight_dtypes = {}
    for name, arr in constants.items():
        acts = all(any(i in act for i in s["inputs"] if i) for s in readers.get(name, []))
        weight_dtypes[name] = PRECISIONS[precision] if arr.dtype == np.float32 and acts else arr.dtype.name
    plan = {
        "format": FORMAT, "component": component, "precision": precision,
        "inputs": [{"name": t.name, "dtype": _dtype_name(t), "shape": _dims(t)} for t in graph.inputs],
        "outputs": [{"name": t.name, "dtype": _dtype_name(t), "shape": _dims(t)} for t in graph.outputs],
        "constants": {n: {"dtype": weight_dtypes[n], "shape": list(a.shape), "place": place[n]}
                      for n, a in constants.items()},
        "steps": steps,
        "caches": _caches(graph, steps),
        "rewrites": rewrites,
    }
    return plan, constants


def _scalar_constant(t) -> bool:
    return isinstance(t, gs.Constant) and np.asarray(t.values).ndim == 0


def _host_arg(step: dict, name: str) -> bool:
    """Whether a step reads `name` where its kernel wants a host value (a shape, axes, ...)."""
    from mmc.runtime.cuda.onnx_ops import HOST_ARGS

    want = HOST_ARGS.get(step["op"], ()) if not step["domain"] else ()
    return any(j in want for j, n in enumerate(step["inputs"]) if n == name)


def _dims(t: gs.Tensor) -> list | None:
    return [d if isinstance(d, int) else str(d) for d in t.shape] if t.shape is not None else None


def _liveness(steps: list[dict], outputs: set[str], constants: set[str]) -> None:
    last: dict[str, int] = {}
    for i, s in enumerate(steps):
        for n in s["inputs"]:
            if n:
                last[n] = i
    for i, s in enumerate(steps):
        s["free"] = sorted({n for n in s["inputs"] if n and last.get(n) == i and n not in outputs and n not in constants})
        # outputs nobody reads (e.g. an unused Split half) die where they are made
        s["free"] += [o for o in s["outputs"] if o and o not in last and o not in outputs]


def _caches(graph: gs.Graph, steps: list[dict]) -> list[dict]:
    """Attentions whose K/V cache is a graph input and whose present K/V are graph outputs."""
    ins, outs = {t.name for t in graph.inputs}, {t.name for t in graph.outputs}
    found = []
    for i, s in enumerate(steps):
        if s["op"] != "Attention" or s["domain"] != "mmc" or len(s["inputs"]) < 5 or len(s["outputs"]) < 3:
            continue
        past, present = s["inputs"][3:5], s["outputs"][1:3]
        if all(p in ins for p in past) and all(p in outs for p in present):
            found.append({"step": i, "past": past, "present": present})
    return found


def write_plan(graph: gs.Graph, component: str, precision: str, stage) -> dict:
    """Write plans/<component>.json and weights/<component>.safetensors into the engine being
    staged; returns the manifest's component entry."""
    import json

    import torch
    from safetensors.torch import save_file

    from mmc.runtime.cuda.executor import TORCH_DTYPES

    plan, constants = build_plan(graph, component, precision)
    tensors = {}
    for name, arr in constants.items():
        want = TORCH_DTYPES[plan["constants"][name]["dtype"]]
        tensors[name] = torch.from_numpy(np.array(arr, order="C")).to(want)  # (ascontiguousarray would make 0-d 1-d)
    (stage / "plans").mkdir(exist_ok=True)
    (stage / "weights").mkdir(exist_ok=True)
    rel_plan, rel_weights = f"plans/{component}.json", f"weights/{component}.safetensors"
    (stage / rel_plan).write_text(json.dumps(plan))
    save_file(tensors, str(stage / rel_weights))
    ops: dict[str, int] = {}
    for s in plan["steps"]:
        key = f"{s['domain']}.{s['op']}" if s["domain"] else s["op"]
        ops[key] = ops.get(key, 0) + 1
    return {"plan": rel_plan, "weights": rel_weights, "inputs": plan["inputs"], "outputs": plan["outputs"],
            "nodes": len(plan["steps"]), "ops": ops,
            "host_steps": sum(s["place"] == "host" for s in plan["steps"])}
