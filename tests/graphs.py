"""Small hand-built ONNX graphs for golden pass tests (onnx.helper, no exporter involved)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import mmc.ir as ir


def model(nodes, inputs, outputs, initializers=(), opset=20):
    g = helper.make_graph(nodes, "t", inputs, outputs, initializer=[numpy_helper.from_array(a, n) for n, a in initializers])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(m)
    return m


def fvi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def to_graph(m):
    return ir.import_model(m)


def random_feeds(m, rng, **dims):
    feeds = {}
    for vi in m.graph.input:
        shape = [d.dim_value or dims[d.dim_param] for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


__all__ = ["model", "fvi", "to_graph", "random_feeds", "ir", "helper", "numpy_helper"]
