"""The contract every fused op meets, and `Emitter`, the small builder that ORT lowerings use
to write standard nodes into an onnx-graphsurgeon graph."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs

DOMAIN = "mmc"
_ids = itertools.count()


class FusedOp:
    name = ""
    min_opset = 1  # default-domain opset the preferred ORT face needs (a fallback covers older)

    def reference(self, inputs: list[np.ndarray | None], attrs: dict) -> list[np.ndarray]:
        raise NotImplementedError

    def infer(self, node: gs.Node) -> list[tuple[np.dtype | None, list | None]]:
        raise NotImplementedError

    def lower_ort(self, emit: Emitter, node: gs.Node, opset: int) -> None:
        raise NotImplementedError

    # The cuda target's faces (torch tensors in, list of tensors out): `torch_reference` is the
    # kernel of the CPU path and the judge of `triton_kernel`, which returns None where it does
    # not apply (the executor then runs the reference).
    def torch_reference(self, inputs: list, attrs: dict) -> list:
        raise NotImplementedError

    writes_out = False  # whether triton_kernel takes `out` (buffers for its results, None entries allowed)
    torch_writes_out = False  # whether torch_reference takes `out` too (the CPU path's arena then covers it)

    def triton_kernel(self, inputs: list, attrs: dict, out: list | None = None) -> list | None:
        return None


def present(node: gs.Node, i: int) -> gs.Tensor | None:
    """The i-th input if given (ONNX marks an omitted optional input with an empty name)."""
    if i < len(node.inputs) and node.inputs[i].name != "":
        return node.inputs[i]
    return None


def dtype_of(t: gs.Tensor):
    try:
        return np.dtype(t.dtype) if t.dtype is not None else None
    except TypeError:
        return None


def shape_of(t: gs.Tensor):
    return list(t.shape) if t.shape is not None else None


class Emitter:
    """Write standard nodes in place of one fused node. The fused node's output tensors are
    reused as the last emitted nodes' outputs, so readers and graph outputs stay connected."""

    def __init__(self, graph: gs.Graph, node: gs.Node):
        self.graph, self.node = graph, node
        self.prefix = (node.name or node.op) + "/"
        self.nodes: list[gs.Node] = []

    def const(self, value, dtype=np.int64) -> gs.Constant:
        arr = np.asarray(value, dtype=dtype)
        name = f"{self.prefix}c{next(_ids)}"
        if arr.dtype.name.startswith("float8"):  # gs cannot export ml_dtypes arrays itself
            from mmc.ir import lazy_constant

            return lazy_constant(name, arr)
        return gs.Constant(name, arr)

    def var(self, dtype=None) -> gs.Variable:
        return gs.Variable(f"{self.prefix}v{next(_ids)}", dtype=dtype)

    def op(self, op: str, inputs: list, outputs: list | int = 1, attrs: dict | None = None,
           domain: str | None = None, dtype=None) -> list[gs.Tensor]:
        if isinstance(outputs, int):
            outputs = [gs.Variable(f"{self.prefix}{op}_{next(_ids)}", dtype=dtype) for _ in range(outputs)]
        # a fresh empty tensor per omitted slot: a shared one would link outputs to inputs
        inputs = [gs.Variable.empty() if t is None else t for t in inputs]
        outputs = [gs.Variable.empty() if t is None else t for t in outputs]
        node = gs.Node(op, f"{self.prefix}{op}_{next(_ids)}", attrs or {}, inputs, outputs, domain=domain)
        self.nodes.append(node)
        return outputs

    def finish(self) -> None:
        """Swap the fused node for the emitted ones (at its position, keeping topological order)."""
        self.node.outputs.clear()
        self.node.inputs.clear()
        idx = self.graph.nodes.index(self.node)
        self.graph.nodes[idx:idx + 1] = self.nodes
