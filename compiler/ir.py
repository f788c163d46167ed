"""The IR: ONNX ModelProto <-> onnx-graphsurgeon Graph, plus a text form and a networkx view.

Graphs are imported with their weights as gs Constants; models are saved with weights as ONNX
external data in one file next to the graph (no 2 GB protobuf limit). `graph_text` renders a
graph one node per line, weights summarized by dtype and shape, so two dumps diff cleanly.
"""

from __future__ import annotations

import os
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import set_external_data

MMC_DOMAIN = "mmc"

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # gs warns about every skipped fold
DEFAULT_OPSET = 20


def load_graph(path: str | Path) -> gs.Graph:
    """Load an ONNX file (external data next to it) as a gs Graph, with inferred dtypes/shapes
    on every value (the TorchScript exporter leaves intermediate values untyped). Shapes are
    inferred before the weights are read in, so models over protobuf's 2 GB limit (the real-size
    presets) infer too."""
    from onnx.external_data_helper import load_external_data_for_model

    model = _infer_shapes(onnx.load(str(path), load_external_data=False), symbolic=True)
    load_external_data_for_model(model, str(Path(path).parent))
    return gs.import_onnx(model)


def import_model(model: onnx.ModelProto, symbolic: bool = False) -> gs.Graph:
    """ModelProto -> gs Graph after ONNX shape inference (dtypes and shapes on every value).

    `symbolic=True` then runs ONNX Runtime's symbolic shape inference, which follows shape
    arithmetic that ONNX's leaves unknown (TorchScript's Reshape(x, Concat(Shape(...), -1)):
    a head count or head dim becomes a number, so fold-constants can fold the slices and
    reshapes built from it). It never merges unequal symbols (auto_merge off); if it cannot
    handle a graph, ONNX's inference stands."""
    return gs.import_onnx(_infer_shapes(model, symbolic))


def _infer_shapes(model: onnx.ModelProto, symbolic: bool) -> onnx.ModelProto:
    from google.protobuf.message import EncodeError

    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, EncodeError):
        pass  # >2 GB in memory or an op without inference: passes fall back to what the exporter recorded
    if symbolic:
        model = _symbolic_shapes(model) or model
    return model


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ORT's symbolic inference, driven step by step: its `infer_shapes` saves a model into the
    current directory when inference is incomplete, which a compiler must never do. Only a
    complete inference is used."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        sym = SymbolicShapeInference(2**31 - 1, False, False, 0)  # int_max, auto_merge, guess_rank, verbose
        sym._preprocess(model)
        complete = False
        while sym.run_:
            complete = sym._infer_impl()
        sym._update_output_from_vi()
        return sym.out_mp_ if complete else None
    except Exception:  # the optional tool failed: ONNX's shapes stand
        return None


def lazy_constant(name: str, q: np.ndarray, int4: bool = False) -> gs.Constant:
    """A constant of a type gs cannot export from numpy (int4, float8): built as a TensorProto."""
    tensor = onnx.helper.make_tensor(name, onnx.TensorProto.INT4, q.shape, q.reshape(-1).tolist()) if int4 \
        else onnx.numpy_helper.from_array(q, name)
    from onnx_graphsurgeon.ir.tensor import LazyValues

    return gs.Constant(name, LazyValues(tensor))


def upgrade_opset(graph: gs.Graph, opset: int) -> None:
    """Convert `graph` in place to default-domain `opset` with ONNX's version converter (custom
    domains, e.g. mmc ops, pass through unchanged)."""
    from onnx import version_converter

    # The converter serializes the model: convert it without the weights' bytes (protobuf's 2 GB
    # limit, and copying a real-size preset's weights into protobuf and back costs minutes), then
    # give the converted graph's constants their values back by name.
    stash = {}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and _nbytes(t) > 1 << 16:
            stash[t.name] = (t._values, t.data_location)
            t._values = gs.ir.tensor.LazyValues(_placeholder(t))
    try:
        converted = gs.import_onnx(version_converter.convert_version(to_model(graph), opset))
    finally:
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and t.name in stash:
                t._values, t.data_location = stash[t.name]
    for t in converted.tensors().values():
        if isinstance(t, gs.Constant) and t.name in stash:
            t._values, t.data_location = stash[t.name]
    graph.nodes, graph.inputs, graph.outputs = converted.nodes, converted.inputs, converted.outputs
    graph.opset, graph.import_domains = converted.opset, converted.import_domains


def _nbytes(t: gs.Constant) -> int:
    v = t._values
    if isinstance(v, gs.ir.tensor.LazyValues):
        return int(np.prod(v.shape)) * 4
    return int(getattr(v, "nbytes", 0))


def _placeholder(t: gs.Constant) -> onnx.TensorProto:
    """A TensorProto with `t`'s name, type and shape whose data is 'elsewhere' (never read)."""
    v = t._values
    if isinstance(v, gs.ir.tensor.LazyValues):
        dtype = v.tensor.data_type
    else:
        dtype = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype)
    p = onnx.TensorProto(name=t.name, dims=list(t.shape), data_type=dtype)
    p.data_location = onnx.TensorProto.EXTERNAL
    p.external_data.add(key="location", value="weights.stashed")
    return p


def to_model(graph: gs.Graph) -> onnx.ModelProto:
    return gs.export_onnx(graph, do_type_check=False)


def save_model(model: onnx.ModelProto, path: str | Path, data_name: str | None = None) -> list[str]:
    """Write `model` to `path` with all weights in one external file; return the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = data_name or path.name + ".data"
    if (path.parent / data_name).exists():
        os.remove(path.parent / data_name)
    # Mark big tensors external ourselves: onnx's own converter tests `location` against the
    # current directory instead of the model's (a stray file in cwd makes it refuse).
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
            set_external_data(tensor, data_name)
    onnx.save_model(model, str(path))
    written = [path.name]
    if (path.parent / data_name).exists():
        written.append(data_name)
    return written


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads `old` read `new` instead (graph outputs are not touched)."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def model_weight_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def _dims(t: gs.Tensor) -> str:
    if t.shape is None:
        return "?"
    return "[" + ",".join(str(d) for d in t.shape) + "]"


def _dtype(t: gs.Tensor) -> str:
    if t.dtype is None:
        return "?"
    try:
        return np.dtype(t.dtype).name
    except TypeError:
        return str(t.dtype)


def const_nbytes(t: gs.Constant) -> int:
    """Stored size of a weight from its dtype and shape (int4 packs two per byte), without
    loading it: gs caches a loaded value, and it cannot export int4 arrays it loaded."""
    size = int(np.prod(t.shape))
    try:
        return size * np.dtype(t.dtype).itemsize
    except TypeError:  # int4/uint4/fp4: no numpy dtype
        return -(-size // 2)


def describe_value(t: gs.Tensor) -> str:
    """`%name` for activations; `@name<dtype[shape]>` for weights (values of <=4 elements shown)."""
    if isinstance(t, gs.Constant):
        if int(np.prod(t.shape)) <= 4:  # shape, not values: reading values would load lazy weights
            return f"@{t.name}<{_dtype(t)}{_dims(t)}={np.asarray(t.values).reshape(-1).tolist()}>"
        return f"@{t.name}<{_dtype(t)}{_dims(t)}>"
    if not t.name:
        return "%<none>"
    return f"%{t.name}"


def _attr_text(value) -> str:
    if isinstance(value, gs.Constant | gs.Tensor):
        return describe_value(value)
    if isinstance(value, gs.Graph):
        return f"<subgraph {value.name} {len(value.nodes)} nodes>"
    if isinstance(value, np.ndarray):
        return f"<{value.dtype.name}{list(value.shape)}>"
    if isinstance(value, float):
        return repr(float(np.float32(value)))
    return repr(value)


def node_line(node: gs.Node, origin: str = "export") -> str:
    outs = ", ".join(f"%{o.name}: {_dtype(o)}{_dims(o)}" for o in node.outputs)
    ins = ", ".join(describe_value(i) for i in node.inputs)
    op = node.op if node.domain in ("", "ai.onnx", None) else f"{node.domain}.{node.op}"
    attrs = ""
    if node.attrs:
        attrs = " {" + ", ".join(f"{k}={_attr_text(v)}" for k, v in sorted(node.attrs.items())) + "}"
    return f"{outs} = {op}({ins}){attrs}  # by {origin}"


def graph_text(graph: gs.Graph, origins: dict[str, str] | None = None) -> str:
    """A readable, diffable text form of `graph`: signature, then one line per node."""
    origins = origins or {}
    lines = [f"graph {graph.name} (opset {graph.opset})"]
    for t in graph.inputs:
        lines.append(f"  input  %{t.name}: {_dtype(t)}{_dims(t)}")
    for t in graph.outputs:
        lines.append(f"  output %{t.name}: {_dtype(t)}{_dims(t)}")
    weights = {t.name: t for n in graph.nodes for t in n.inputs if isinstance(t, gs.Constant)}
    nbytes = sum(const_nbytes(t) for t in weights.values())
    lines.append(f"  weights: {len(weights)} tensors, {nbytes / 2**20:.2f} MiB")
    lines += [node_line(n, origins.get(n.name, "export")) for n in graph.nodes]
    return "\n".join(lines) + "\n"


def op_counts(graph: gs.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.nodes:
        key = n.op if n.domain in ("", "ai.onnx", None) else f"{n.domain}.{n.op}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def to_networkx(graph: gs.Graph) -> nx.DiGraph:
    """Node-level dataflow view: an edge u -> v when v reads a tensor that u produces."""
    g = nx.DiGraph()
    producer: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        g.add_node(i, op=n.op, name=n.name)
        for o in n.outputs:
            producer[o.name] = i
    for i, n in enumerate(graph.nodes):
        for t in n.inputs:
            if t.name in producer:
                g.add_edge(producer[t.name], i, tensor=t.name)
    return g
